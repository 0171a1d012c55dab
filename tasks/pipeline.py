"""The pipeline flows' tasks (flows/common.py).

`stage_task` runs one registry stage through DVC (`dvc repro --single-item`): DVC alone decides whether it
is up to date, so the tasks have no Prefect cache (NO_CACHE; a second cache would disagree with DVC's).
A transient failure (the stage process killed or crashed) is retried and the stage resumes from its newest
checkpoint; bad input (`clvr stage` exits 2) is not retried. Each attempt is a nested MLflow run.
"""

from __future__ import annotations

import datetime as dt
import json
import time
from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE

from clvr.config import flat_params, load_config_file
from clvr.stages import PARAMS_FILE, get_stage, resolve
from tasks import dvc, tracking
from tasks.progress import report


def _transient(task, task_run, state) -> bool:
    return isinstance(state.result(raise_on_failure=False), dvc.StageFailed)


def _attempt() -> int:
    from prefect.runtime import task_run

    return int(task_run.run_count or 1)


@task(name="stage", task_run_name="{name}", cache_policy=NO_CACHE, retry_condition_fn=_transient)
def stage_task(name: str, root: str, parent_run_id: str, experiment_id: str) -> dict:
    """Run stage `name` through DVC in project `root`; log it to a nested run of `parent_run_id`.
    Returns paths, hashes, metrics and the run id (never a model)."""
    root_p, stage = Path(root), get_stage(name)
    cfg = load_config_file(root_p / PARAMS_FILE)
    out = stage.out(cfg)
    client = tracking.make_client(root_p)
    attempt = _attempt()
    run_id = tracking.start_run(client, experiment_id, name, {"stage": name, "profile": cfg.profile,
                                                              "attempt": attempt}, parent_run_id)
    tracking.log_params(client, run_id, flat_params(cfg))
    log_path = root_p / out / "stage.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "a") as f:
        f.write(f"\n=== {dt.datetime.now().isoformat(timespec='seconds')} dvc repro --single-item {name} "
                f"(attempt {attempt}, MLflow run {run_id})\n")
    watcher = tracking.CheckpointWatcher(client, run_id, root_p / out) if stage.resumable else None
    report("start", name, "running" if attempt == 1 else f"retry {attempt - 1}")
    t0 = time.perf_counter()
    try:
        if watcher:
            watcher.start()
        status = dvc.repro(root_p, name, log_path, on_line=lambda s: report("line", name, s))
    except BaseException as e:
        if watcher:
            watcher.stop()
        client.log_artifact(run_id, str(log_path), "logs")
        tracking.end_run(client, run_id, False, str(e) or type(e).__name__)
        report("done", name, "failed", (str(e).splitlines() or [type(e).__name__])[0][:80])  # a signal: no text
        raise
    logged = watcher.stop() if watcher else []
    seconds = time.perf_counter() - t0
    result = _log_outputs(client, run_id, root_p, stage, cfg)
    client.log_artifact(run_id, str(log_path), "logs")
    tags = {"dvc.status": status, "seconds": round(seconds, 2), "checkpoints_logged": len(logged), **result.pop("tags")}
    if watcher and watcher.missed:  # deleted by the stage before they could be linked (never seen so far)
        tags["checkpoints_missed"] = ",".join(watcher.missed)
    if result["final_md5"]:
        tags["dvc.final_md5"] = result["final_md5"]
    tracking.set_tags(client, run_id, tags)
    tracking.end_run(client, run_id, True)
    report("done", name, status, f"{seconds:.1f} s" + (f", {len(logged)} checkpoints logged" if logged else ""))
    return {"stage": name, "run_id": run_id, "status": status, "out": str(out), "seconds": round(seconds, 2),
            "checkpoints": logged, **result}


OUT_ARTIFACTS = {".png": "plots", ".md": "reports"}  # cached outs that are also worth a look in MLflow


def _log_outputs(client, run_id: str, root: Path, stage, cfg) -> dict:
    """Metrics (summary + step-wise), plots, config and data sets of a finished stage; its final/ hash. A metrics
    file's text values (e.g. the ship stage's paths and sha256) become tags of the stage's run."""
    out = stage.out(cfg)
    metrics, tags = {}, {}
    for m in stage.metrics:
        p = root / resolve(m, cfg)
        if p.is_file():
            data = json.loads(p.read_text())
            metrics.update({k: v for k, v in data.items() if isinstance(v, (int, float))})
            tags.update({k: v for k, v in data.items() if isinstance(v, str)})
    tracking.log_metrics(client, run_id, metrics)
    tracking.log_step_metrics(client, run_id, root / out / "metrics.jsonl")
    files = [(resolve(p, cfg), "plots") for p, _ in stage.plots]
    files += [(resolve(o, cfg), OUT_ARTIFACTS[Path(o).suffix]) for o in stage.outs if Path(o).suffix in OUT_ARTIFACTS]
    for p, folder in files:
        if (root / p).is_file():
            client.log_artifact(run_id, str(root / p), folder)
    client.log_artifact(run_id, str(root / PARAMS_FILE), "config")
    rev = dvc.head(root)
    for d in stage.datasets:
        path = resolve(d, cfg)
        tracking.log_jsonl_dataset(client, run_id, root, path, dvc.out_md5(root, stage.name, path), rev, stage.name)
    final = str(out / "final") if stage.generator and (root / out / "final").is_dir() else None
    return {"metrics": metrics, "final": final, "tags": tags,
            "final_md5": dvc.out_md5(root, stage.name, final) if final else "",
            "git_files": [resolve(m, cfg) for m in stage.metrics] + [resolve(p, cfg) for p, _ in stage.plots]}


@task(name="register", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=2)
def register_task(root: str, results: list[dict], eval_metrics: dict, model_name: str, metric: str,
                  profile: str) -> dict:
    """Register each trained generator (once per DVC md5) with its evaluation score; `champion` moves
    only to a better-scoring one."""
    client = tracking.make_client(Path(root))
    versions, moved = {}, []
    for r in results:
        if not r.get("final"):
            continue
        score = eval_metrics.get(f"{r['stage']}_{metric}")
        version, promoted = tracking.register_generator(client, model_name, r["run_id"], Path(root) / r["final"],
                                                        r["final_md5"], score, {"stage": r["stage"], "profile": profile,
                                                                                "metric": metric})
        versions[r["stage"]] = version
        if promoted:
            moved.append(version)
    try:
        champion = client.get_model_version_by_alias(model_name, tracking.CHAMPION).version
    except Exception:
        champion = None
    return {"model": model_name, "versions": versions, "champion": champion, "moved_to": moved}


@task(name="finish", cache_policy=NO_CACHE)
def finish_task(root: str, flow: str, profile: str, parent_run_id: str, git_paths: list[str], tag_runs: bool,
                push: bool) -> dict:
    """Push the run's DVC outputs to the default remote, then commit dvc.lock, params.yaml and the metrics and
    plots files (DVC keeps those in git) and tag the commit `run/<date>-<shortid>` (the MLflow parent run id)."""
    root_p = Path(root)
    res: dict = {"lock_sha256": dvc.lock_sha256(root_p), "tag": None, "commit": None, "pushed": None}
    if push:
        res["pushed"] = dvc.push(root_p)
    if tag_runs:
        tag = f"run/{dt.date.today():%Y%m%d}-{parent_run_id[:8]}"
        res["commit"] = dvc.commit_and_tag(root_p, ["dvc.lock", PARAMS_FILE, *git_paths], tag,
                                           f"pipeline run {tag} (flow {flow}, profile {profile}, MLflow run "
                                           f"{parent_run_id})")
        res["tag"] = tag
    return res
