"""The `retrain` flow: the stage registry's stages in order, each through DVC, tracked in MLflow.

    clvr pipeline run --profile ci              # locally, on Prefect's ephemeral server
    clvr pipeline serve --cron "0 3 * * 0"      # a cron deployment served from this machine
    prefect deploy --all                        # infra/prefect.yaml: process and Kubernetes-GPU work pools

DVC owns the stage graph and versions (dvc.yaml, dvc.lock), Prefect when and where (this flow, retries,
schedules), MLflow what happened (one parent run, a nested run per stage attempt).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `prefect deploy` entrypoints and `python flows/retrain.py` import tasks/ from here
    sys.path.insert(0, str(ROOT))

from prefect import flow  # noqa: E402

from clvr.config import Config, flat_params, load_config  # noqa: E402
from clvr.errors import ClvrError  # noqa: E402
from clvr.stages import PARAMS_FILE, STAGES, dvc_yaml, get_stage, write_params  # noqa: E402
from tasks import dvc, tracking  # noqa: E402
from tasks.lock import pipeline_lock  # noqa: E402
from tasks.pipeline import finish_task, register_task, stage_task  # noqa: E402


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


@flow(name="retrain")
def retrain(profile: str = "cpu", overrides: list[str] | None = None, root: str = ".",
            stages: list[str] | None = None, dry_run: bool = False) -> dict:
    """Run the pipeline for a config profile. `stages` limits it to some registry stages (in registry order).
    One run at a time per project (tasks/lock.py). `dry_run` checks the project and the config and takes the
    lock, then returns the stages it would run without running them (to try a schedule cheaply)."""
    root_p = Path(root).resolve()
    check_project(root_p)
    with conf_of(root_p):
        cfg: Config = load_config(profile, overrides)
    wanted = {get_stage(s).name for s in stages} if stages else None
    selected = [s for s in STAGES if wanted is None or s.name in wanted]
    with pipeline_lock(root_p, {"prefect_flow_run": flow_run_id(), "profile": profile}):
        if dry_run:
            return {"profile": profile, "root": str(root_p), "dry_run": True, "flow_run_id": flow_run_id(),
                    "stages": [s.name for s in selected]}
        return _run(root_p, cfg, profile, overrides, selected)


def _run(root_p: Path, cfg: Config, profile: str, overrides: list[str] | None, selected: list) -> dict:
    write_params(root_p, cfg)
    client = tracking.make_client(root_p)
    exp = tracking.experiment_id(client, cfg.pipeline.experiment, root_p)
    parent = tracking.start_run(client, exp, f"{profile}-{dt.datetime.now():%Y%m%d-%H%M%S}", {
        "profile": profile, "git.sha": dvc.head(root_p), "git.dirty": dvc.is_dirty(root_p),
        "prefect.flow_run_id": flow_run_id(), "stages": ",".join(s.name for s in selected),
        "overrides": " ".join(overrides or [])})
    tracking.log_params(client, parent, flat_params(cfg))
    client.log_artifact(parent, str(root_p / PARAMS_FILE), "config")
    try:
        run_stage = stage_task.with_options(retries=cfg.pipeline.retries,
                                            retry_delay_seconds=cfg.pipeline.retry_delay_s)
        results = [run_stage(s.name, str(root_p), parent, exp) for s in selected]
        for r in results:
            tracking.log_metrics(client, parent, {f"{r['stage']}/{k}": v for k, v in r["metrics"].items()})
        ev = next((r for r in results if r["stage"] == "evaluate"), None)
        registry = register_task(str(root_p), [r for r in results if r["final"]], ev["metrics"],
                                 cfg.pipeline.register_model, cfg.pipeline.champion_metric, profile) if ev else None
        fin = finish_task(str(root_p), profile, parent, [f for r in results for f in r["git_files"]],
                          cfg.pipeline.tag_runs, cfg.pipeline.push)
        tracking.set_tags(client, parent, {"dvc.lock_sha256": fin["lock_sha256"], "git.tag": fin["tag"] or "",
                                           "git.run_commit": fin["commit"] or "",
                                           **({"champion": registry["champion"]} if registry else {})})
    except BaseException as e:
        tracking.end_run(client, parent, False, f"{type(e).__name__}: {e}".removesuffix(": "))  # a signal: no text
        raise
    tracking.end_run(client, parent, True)
    return {"profile": profile, "root": str(root_p), "mlflow_run_id": parent, "experiment_id": exp,
            "tracking_uri": client.tracking_uri, "flow_run_id": flow_run_id(), "stages": results,
            "registry": registry, **fin}


def local_deployment(profile: str, root: str, name: str = "retrain-local", cron: str | None = None,
                     interval: float | None = None, overrides: list[str] | None = None, dry_run: bool = False):
    """The retrain flow as a scheduled deployment served from this machine (`clvr pipeline serve`).

    Overlap: at most one run of the deployment at a time (`concurrency_limit` 1, CANCEL_NEW: a run that comes
    due while another is running is cancelled, not queued, so a long run never builds a backlog). A run
    started any other way is kept apart by the project's pipeline lock (tasks/lock.py)."""
    from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy

    params = {"profile": profile, "root": root, "overrides": list(overrides or []), "dry_run": dry_run}
    what = f"profile {profile}" + (f", {' '.join(overrides)}" if overrides else "") + (", dry run" if dry_run else "")
    return retrain.to_deployment(
        name=name, cron=cron, interval=interval, parameters=params, paused=False,
        concurrency_limit=ConcurrencyLimitConfig(limit=1, collision_strategy=ConcurrencyLimitStrategy.CANCEL_NEW),
        description=f"clvr pipeline ({what}) in {root}")


if __name__ == "__main__":
    print(retrain(profile=sys.argv[1] if len(sys.argv) > 1 else "cpu"))
