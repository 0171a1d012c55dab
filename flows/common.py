"""What the two pipeline flows share (flows/foundation.py, flows/retrain.py): load and check, the pipeline lock,
one MLflow parent run tagged with the flow's name, each of the flow's registry stages through DVC, then
registration (when the flow evaluates) and the run's git commit and tag.

DVC owns the stage graph and versions (one dvc.yaml with every stage of both flows, one dvc.lock), Prefect when
and where (the flows, retries, schedules, independent stages at the same time), MLflow what happened (one parent
run per flow run, a nested run per stage attempt). `pipeline.flow` in params.yaml records which flow the run was,
for `clvr reproduce`.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
from pathlib import Path

from prefect.futures import PrefectFuture, wait

from clvr.config import Config, flat_params
from clvr.errors import ClvrError
from clvr.stages import PARAMS_FILE, Stage, dvc_yaml, flow_config, flow_stages, upstream, write_params
from tasks import dvc, tracking
from tasks.lock import pipeline_lock
from tasks.pipeline import finish_task, register_task, stage_task


@contextlib.contextmanager
def conf_of(root: Path):
    """Resolve configs from `root`/conf (the project being run, e.g. a temporary worktree)."""
    old = os.environ.get("CLVR_CONF_DIR")
    os.environ["CLVR_CONF_DIR"] = str(root / "conf")
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("CLVR_CONF_DIR", None)
        else:
            os.environ["CLVR_CONF_DIR"] = old


def check_project(root: Path) -> None:
    if not (root / ".dvc").is_dir():
        raise ClvrError(f"'{root}' is not a DVC project (no .dvc/); run from the clvr repository root")
    current = (root / "dvc.yaml").read_text() if (root / "dvc.yaml").is_file() else ""
    if current != dvc_yaml():
        raise ClvrError(f"{root / 'dvc.yaml'} does not match the stage registry; run `clvr pipeline dvc-yaml`")


def flow_run_id() -> str:
    from prefect.runtime import flow_run

    return str(flow_run.id or "")


def run_flow(flow: str, profile: str, overrides: list[str] | None, root: str, stages: list[str] | None,
             dry_run: bool) -> dict:
    """Run flow `flow`'s registry stages (all, or `stages` of them, in registry order) for a config profile.
    One run at a time per project (tasks/lock.py). `dry_run` checks the project and the config and takes the
    lock, then returns the stages it would run without running them (to try a schedule cheaply)."""
    root_p = Path(root).resolve()
    check_project(root_p)
    selected = flow_stages(flow, stages)
    with conf_of(root_p):
        cfg = flow_config(flow, profile, overrides)
    with pipeline_lock(root_p, {"prefect_flow_run": flow_run_id(), "flow": flow, "profile": profile}):
        if dry_run:
            return {"flow": flow, "profile": profile, "root": str(root_p), "dry_run": True,
                    "flow_run_id": flow_run_id(), "stages": [s.name for s in selected]}
        return _run(root_p, cfg, flow, profile, overrides, selected)


def _run(root_p: Path, cfg: Config, flow: str, profile: str, overrides: list[str] | None,
         selected: list[Stage]) -> dict:
    write_params(root_p, cfg)
    client = tracking.make_client(root_p)
    exp = tracking.experiment_id(client, cfg.pipeline.experiment, root_p)
    parent = tracking.start_run(client, exp, f"{flow}-{profile}-{dt.datetime.now():%Y%m%d-%H%M%S}", {
        "flow": flow, "profile": profile, "git.sha": dvc.head(root_p), "git.dirty": dvc.is_dirty(root_p),
        "prefect.flow_run_id": flow_run_id(), "stages": ",".join(s.name for s in selected),
        "overrides": " ".join(overrides or [])})
    tracking.log_params(client, parent, flat_params(cfg))
    client.log_artifact(parent, str(root_p / PARAMS_FILE), "config")
    try:
        results = _run_stages(root_p, cfg, selected, parent, exp)
        for r in results:
            tracking.log_metrics(client, parent, {f"{r['stage']}/{k}": v for k, v in r["metrics"].items()})
        ev = next((r for r in results if r["stage"] == "evaluate"), None)
        registry = register_task(str(root_p), [r for r in results if r["final"]], ev["metrics"],
                                 cfg.pipeline.register_model, cfg.pipeline.champion_metric, profile) if ev else None
        fin = finish_task(str(root_p), flow, profile, parent, [f for r in results for f in r["git_files"]],
                          cfg.pipeline.tag_runs, cfg.pipeline.push)
        tracking.set_tags(client, parent, {"dvc.lock_sha256": fin["lock_sha256"], "git.tag": fin["tag"] or "",
                                           "git.run_commit": fin["commit"] or "",
                                           **({"champion": registry["champion"]} if registry else {})})
    except BaseException as e:
        tracking.end_run(client, parent, False, f"{type(e).__name__}: {e}".removesuffix(": "))  # a signal: no text
        raise
    tracking.end_run(client, parent, True)
    return {"flow": flow, "profile": profile, "root": str(root_p), "mlflow_run_id": parent, "experiment_id": exp,
            "tracking_uri": client.tracking_uri, "flow_run_id": flow_run_id(), "stages": results,
            "registry": registry, **fin}


def _run_stages(root_p: Path, cfg: Config, selected: list[Stage], parent: str, exp: str) -> list[dict]:
    """Each stage as a Prefect task, started once the stages it reads from are done (`upstream`): stages that read
    nothing of each other run at the same time (the retrain flow's controller_sft and sft, one core each). Their
    results in registry order; the first failure in that order is raised once every started stage has ended.

    A signal reaches only this (main) thread: on one, the stage commands running in worker threads are stopped
    (`dvc.stopping`) before it propagates, as a single stage's command is in `dvc.stream`."""
    run_stage = stage_task.with_options(retries=cfg.pipeline.retries, retry_delay_seconds=cfg.pipeline.retry_delay_s)
    futures: dict[str, PrefectFuture] = {}
    for s in selected:
        futures[s.name] = run_stage.submit(s.name, str(root_p), parent, exp,
                                           wait_for=[futures[u.name] for u in upstream(s, selected)])
    try:
        wait(list(futures.values()))
    except BaseException:
        with dvc.stopping():
            wait(list(futures.values()), timeout=60)
        raise
    return [futures[s.name].result() for s in selected]
