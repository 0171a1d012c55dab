"""`clvr pipeline run|dvc-yaml|serve`, `clvr stage NAME`, `clvr reproduce TAG`.

The pipeline commands launch the Prefect flows in the project's flows/ (found from the current directory): flow
NAME is the function NAME in flows/NAME.py (`retrain`, the default, and `foundation`). `clvr stage` runs one
registry stage in this process (it is also the command DVC runs for each stage).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import List, Optional

import typer

from clvr.cli import ProfileOpt, app
from clvr.errors import ClvrError
from clvr.io import atomic_write_text

pipeline_app = typer.Typer(help="The training pipeline: DVC stages run by Prefect flows (retrain, foundation), "
                                "tracked in MLflow.", no_args_is_help=True)
app.add_typer(pipeline_app, name="pipeline")

SetOpt = typer.Option(None, "--set", help="config override key=value (repeatable)")
QUIET_ENV = {"MLFLOW_DISABLE_TELEMETRY": "true", "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1",
             "DVC_NO_ANALYTICS": "1", "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1",
             # Prefect's temporary server can take longer than its default 20 s to start on 2 busy cores
             "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120"}


def project_root() -> Path:
    """The clvr project around the current directory (the folder holding .dvc/ and flows/)."""
    here = Path.cwd().resolve()
    for d in (here, *here.parents):
        if (d / ".dvc").is_dir() and (d / "flows").is_dir():
            return d
    raise ClvrError(f"not inside a clvr project: no folder with .dvc/ and flows/ above {here}")


def _flows(root: Path, flow: str = "retrain"):
    """Import flows/ and tasks/ of the project at `root`; the module flows/<flow>.py."""
    import importlib

    for k, v in QUIET_ENV.items():
        os.environ.setdefault(k, v)
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    return importlib.import_module(f"flows.{flow}")


@pipeline_app.command("run")
def run(profile: str = ProfileOpt, overrides: Optional[List[str]] = SetOpt,
        flow: str = typer.Option("retrain", "--flow", help="retrain (synthesize, controller_sft, sft, evaluate "
                                 "from the released weights) | foundation (vae, pretrain, finetune, distill, "
                                 "trajectory, rebalance, ship: makes them)"),
        stages: Optional[List[str]] = typer.Option(None, "--stage", "-s",
                                                   help="only these stages of the flow (repeatable)")) -> None:
    """Run a pipeline flow (Prefect flow `retrain`, the default, or `foundation`) locally on Prefect's ephemeral
    server; DVC skips stages that are up to date. Ends with where to look: the MLflow UI, the run's git tag, the
    report files."""
    from clvr.stages import flow_config, flow_stages

    root = project_root()
    os.environ["CLVR_CONF_DIR"] = str(root / "conf")
    names = [s.name for s in flow_stages(flow, list(stages or []))]  # an unknown flow or stage fails here
    flow_config(flow, profile, overrides)  # a bad profile or key fails here, before anything starts
    mod = _flows(root, flow)
    from tasks import progress
    from tasks.lock import check_free

    check_free(root)  # a run in progress (scheduled or manual): say so in one line, before the flow starts

    from tasks.dvc import StageFailed

    with progress.Reporter(names) as progress.REPORTER:
        try:
            res = getattr(mod, flow)(profile=profile, overrides=list(overrides or []), root=str(root),
                                     stages=list(stages) if stages else None)
        except StageFailed as e:  # retries spent; the next run resumes from the newest checkpoint
            typer.echo(f"error: {e}", err=True)
            raise typer.Exit(1)
        finally:
            progress.REPORTER = None
    _print_where_to_look(res, root)


REPORTS = ("metrics.json", "geneval.png", "samples.png", "probe.png", "filmstrip.png", "dataset_card.md")


def _print_where_to_look(res: dict, root: Path) -> None:
    summary = {k: res[k] for k in ("flow", "profile", "mlflow_run_id", "tag", "commit", "lock_sha256")}
    summary["stages"] = {r["stage"]: {"status": r["status"], "seconds": r["seconds"]} for r in res["stages"]}
    summary["champion"] = (res.get("registry") or {}).get("champion")
    typer.echo(json.dumps(summary))
    uri = res["tracking_uri"]
    ui = ("mlflow ui --backend-store-uri sqlite:///mlflow.db" if uri == f"sqlite:///{root / 'mlflow.db'}"
          else f"mlflow ui --backend-store-uri {uri}")
    reports = [str(Path(r["out"]) / f) for r in res["stages"] for f in REPORTS if (root / r["out"] / f).is_file()]
    typer.echo(f"MLflow:  {ui}   (experiment {res['experiment_id']}, parent run {res['mlflow_run_id']})")
    if res.get("registry"):
        reg = res["registry"]
        typer.echo(f"model:   models:/{reg['model']}@champion = version {reg['champion']}")
    typer.echo(f"tag:     {res['tag']}   (clvr reproduce {res['tag']})" if res["tag"]
               else "tag:     none (pipeline.tag_runs=false)")
    typer.echo(f"reports: {', '.join(reports)}")


@pipeline_app.command("dvc-yaml")
def dvc_yaml_cmd(check: bool = typer.Option(False, "--check", help="only check that dvc.yaml is up to date")) -> None:
    """Write dvc.yaml from the stage registry (src/clvr/stages.py)."""
    from clvr.stages import dvc_yaml

    path = Path("dvc.yaml")
    text = dvc_yaml()
    if check:
        if not path.is_file() or path.read_text() != text:
            raise ClvrError("dvc.yaml is out of date with the stage registry: run `clvr pipeline dvc-yaml`")
        typer.echo("dvc.yaml is up to date")
        return
    atomic_write_text(path, text)
    typer.echo(f"wrote {path.resolve()}")


@pipeline_app.command("serve")
def serve(cron: Optional[str] = typer.Option(None, "--cron", help="cron schedule, UTC (default: \"0 3 * * 0\", "
                                             "Sundays 03:00)"),
          interval: Optional[float] = typer.Option(None, "--interval", help="seconds between runs (the first one that long after serving), "
                                                 "instead of --cron"),
          profile: str = ProfileOpt, overrides: Optional[List[str]] = SetOpt,
          name: str = typer.Option("retrain-local", "--name", help="deployment name"),
          port: int = typer.Option(4200, "--port", help="port of the Prefect server started here (127.0.0.1) "
                                   "when PREFECT_API_URL is not set"),
          dry_run: bool = typer.Option(False, "--dry-run", help="scheduled runs check the project and config and "
                                       "take the pipeline lock, but run no stage (to try a schedule)")) -> None:
    """Serve the retrain flow as a scheduled deployment from this machine (blocks; Ctrl-C or SIGTERM stops it).
    The foundation flow is run by hand (`clvr pipeline run --flow foundation`), not scheduled.
    Starts a Prefect server with its scheduler (database in runs/prefect/) unless PREFECT_API_URL names one."""
    from clvr.config import load_config

    root = project_root()
    os.environ["CLVR_CONF_DIR"] = str(root / "conf")
    load_config(profile, overrides)  # a bad profile or key fails here, before anything starts
    if cron is not None and interval is not None:
        raise ClvrError("give --cron or --interval, not both")
    if interval is not None and not interval > 0:
        raise ClvrError(f"--interval must be > 0 seconds, got {interval}")
    if cron is None and interval is None:
        cron = "0 3 * * 0"
    if cron is not None:
        check_cron(cron)
    if not 0 < port < 65536:
        raise ClvrError(f"--port must be in 1..65535, got {port}")
    os.chdir(root)  # the deployment's entrypoint (flows/retrain.py) is relative to the project root
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in [str(root / "src"), str(root),
                                                           os.environ.get("PYTHONPATH", "")] if p)
    retrain = _flows(root)
    from flows.serve import serve as serve_deployment

    deployment = retrain.local_deployment(profile, str(root), name, cron=cron, interval=interval,
                                          overrides=list(overrides or []), dry_run=dry_run)
    when = f"cron '{cron}' (UTC)" if cron else f"every {interval:g} s"
    serve_deployment(root, deployment, when, port, log=typer.echo)


def check_cron(cron: str) -> None:
    from prefect.client.schemas.schedules import CronSchedule

    from pydantic import ValidationError

    try:
        CronSchedule(cron=cron)
    except ValidationError as e:
        raise ClvrError(f"bad cron schedule '{cron}': {e.errors()[0]['msg'].removeprefix('Value error, ')}") from None


@app.command("stage")
def stage(name: str = typer.Argument(..., help="stage name from the registry (clvr pipeline dvc-yaml lists them)"),
          profile: str = ProfileOpt, overrides: Optional[List[str]] = SetOpt,
          params: Optional[Path] = typer.Option(None, "--params", help="a resolved config file (DVC passes "
                                                "params.yaml); replaces --profile and --set")) -> None:
    """Run one pipeline stage alone, in this process (no DVC, no MLflow). Last line: one JSON object."""
    from clvr.config import load_config, load_config_file
    from clvr.stages import get_stage, run_stage

    get_stage(name)
    cfg = load_config_file(params) if params else load_config(profile, overrides)
    res = run_stage(name, cfg)
    typer.echo(json.dumps({"stage": name, "final": res.get("final"), **res["metrics"]}))


@app.command("reproduce")
def reproduce(tag: str = typer.Argument(..., help="a run tag, e.g. run/20260101-1a2b3c4d (git tag --list 'run/*')"),
              tol: Optional[float] = typer.Option(None, "--tol", help="max |difference| per metric "
                                                  "(default: the tag's pipeline.reproduce_tol)"),
              keep: bool = typer.Option(False, "--keep", help="keep the temporary worktree")) -> None:
    """Rerun a tagged pipeline run in a temporary worktree and compare its metrics (dvc metrics diff).
    Exit 0 when every metric matches within the tolerance, 1 otherwise."""
    root = project_root()
    _flows(root)
    from flows.reproduce import reproduce as run_reproduce

    res = run_reproduce(root, tag, tol, keep, log=typer.echo)
    for r in res["rows"]:
        if not r["ok"]:
            typer.echo(f"DIFFERENT {r['file']}:{r['metric']} old={r['old']} new={r['new']}")
    typer.echo(json.dumps({k: v for k, v in res.items() if k != "rows"}))
    verdict = "reproduced" if res["ok"] else "NOT reproduced"
    typer.echo(f"{verdict}: {res['compared'] - res['different']}/{res['compared']} metrics within tol {res['tol']} "
               f"({len(res['ignored'])} timing metrics ignored); cached outputs "
               + (f"differ: {', '.join(res['outs_differ'])}" if res["outs_differ"] else "identical"))
    if not res["ok"]:
        raise typer.Exit(1)
