"""Scheduled retraining on real parts, in a copy of this project (see test_pipeline.copy_project):

- `clvr pipeline serve` starts its own Prefect server (with the scheduler service) on a free port, serves the
  retrain deployment on a 5 s interval schedule, and a run the scheduler created fires and completes. The
  deployment is served with `--dry-run` (the flow checks the project and config and takes the pipeline lock,
  then returns without running a stage), so this costs seconds, not a pipeline run. Ctrl-C (SIGINT to the
  process group, as a terminal sends it) stops runner and server: exit 0, no traceback.
- The same server accepts infra/prefect.yaml through `prefect deploy --all`, as its header says.
- The project's pipeline lock turns away a second run (flow or CLI) before it writes anything, and a killed
  holder leaves no stale lock.
- infra/prefect.yaml passes Prefect's own schema, and its entrypoints and parameters match the flow.
"""

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from clvr.errors import ClvrError
from clvr.stages import flow_stages
from test_pipeline import ROOT, copy_project

DEPLOYMENT = "sched-test"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def clean_env(**extra: str) -> dict:
    """This environment without a configured Prefect API or MLflow store (the project's own are used)."""
    env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_API_URL", "MLFLOW_TRACKING_URI")}
    return {**env, **extra}


def flow_runs(api_url: str) -> list:
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: api_url}), get_client(sync_client=True) as c:
        return c.read_flow_runs()


def wait_for(pred, proc: subprocess.Popen, log: Path, timeout: float):
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        got = pred()
        if got:
            return got
        assert proc.poll() is None, f"serve exited with {proc.returncode}:\n{log.read_text()[-3000:]}"
        time.sleep(1)
    raise AssertionError(f"timed out after {timeout} s; serve output:\n{log.read_text()[-3000:]}")


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """`clvr pipeline serve --interval 5 --dry-run` in a copy of the project; stopped with Ctrl-C at the end."""
    root = copy_project(tmp_path_factory.mktemp("project"))
    shutil.copytree(ROOT / "infra", root / "infra")  # for deploy_infra (copy_project takes the pipeline's files)
    port = free_port()
    log = root.parent / "serve.log"
    env = clean_env(PREFECT_RUNNER_POLL_FREQUENCY="2",  # the runner's poll and the server's look at new deployments
                    PREFECT_SERVER_SERVICES_SCHEDULER_RECENT_DEPLOYMENTS_LOOP_SECONDS="1")
    cmd = [sys.executable, "-m", "clvr", "pipeline", "serve", "--interval", "5", "--profile", "ci", "--dry-run",
           "--port", str(port), "--name", DEPLOYMENT]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, cwd=root, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    api = f"http://127.0.0.1:{port}/api"
    try:
        yield root, proc, log, api
    finally:
        if proc.poll() is None:  # a failed test: stop it as a user would, then for sure
            os.killpg(proc.pid, signal.SIGINT)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def test_infra_prefect_yaml_deploys(served):
    """infra/prefect.yaml deployed the way its header says (both work pools, `prefect deploy --all`), against
    the served server: Prefect's loader resolves each entrypoint and checks the parameters against the flow."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.serve import healthy

    root, proc, log, api = served
    wait_for(lambda: healthy(api), proc, log, timeout=150)

    env = clean_env(PREFECT_API_URL=api, CLVR_ROOT=str(root), CLVR_GIT_URL="https://git.example/clvr.git")
    prefect = [sys.executable, "-m", "prefect", "--no-prompt"]
    for args in (["work-pool", "create", "clvr-process", "--type", "process"],
                 ["work-pool", "create", "clvr-gpu", "--type", "kubernetes", "--base-job-template",
                  "infra/k8s-gpu-pool.json"],
                 ["deploy", "--all", "--prefect-file", "infra/prefect.yaml"]):
        p = subprocess.run(prefect + args, cwd=root, env=env, capture_output=True, text=True)
        assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    with temporary_settings(updates={PREFECT_API_URL: api}), get_client(sync_client=True) as c:
        weekly = c.read_deployment_by_name("retrain/retrain-weekly")
        gpu = c.read_deployment_by_name("retrain/retrain-gpu")
        served_d = c.read_deployment_by_name(f"retrain/{DEPLOYMENT}")
    for d, profile, pool in ((weekly, "cpu", "clvr-process"), (gpu, "gpu-4b", "clvr-gpu")):
        assert d.entrypoint == "flows/retrain.py:retrain" and d.parameters == {"profile": profile}
        assert d.work_pool_name == pool and [s.schedule.cron for s in d.schedules] == ["0 3 * * 0"]
        assert set(d.parameter_openapi_schema["properties"]) >= {"profile", "overrides", "root", "dry_run"}
    # CLVR_ROOT is read when deploying: the process worker runs the flow in that checkout
    assert weekly.pull_steps[0]["prefect.deployments.steps.set_working_directory"]["directory"] == str(root)
    assert gpu.pull_steps[0]["prefect.deployments.steps.git_clone"]["repository"] == env["CLVR_GIT_URL"]
    # The served deployment's overlap policy: one run at a time, a run that comes due meanwhile is cancelled.
    assert served_d.global_concurrency_limit.limit == 1
    assert served_d.concurrency_options.collision_strategy.value == "CANCEL_NEW"


def test_schedule_fires_and_ctrl_c_stops_cleanly(served):
    from flows.serve import healthy

    root, proc, log, api = served
    done = wait_for(lambda: [r for r in flow_runs(api) if r.state and r.state.is_completed()] if healthy(api)
                    else None, proc, log, timeout=150)
    run = done[0]
    assert run.auto_scheduled  # created by the server's scheduler, not by this test
    assert run.parameters["dry_run"] is True and run.parameters["profile"] == "ci"
    assert run.parameters["root"] == str(root)
    text = log.read_text()
    assert f"Prefect server: UI http://127.0.0.1:{api.split(':')[2].split('/')[0]}" in text
    assert (root / "runs" / "prefect" / "prefect.db").is_file()  # the server's database is project-local

    os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C in a terminal: the whole foreground process group
    rc = proc.wait(90)
    text = log.read_text()
    assert rc == 0, text[-3000:]
    assert "Traceback" not in text and "stopped" in text.splitlines()[-1], text[-3000:]
    assert f"Flow run '{run.name}' - Finished in state Completed()" in text  # its log, streamed by the runner
    assert not healthy(api)  # the managed server is gone


def hold_lock(root: Path, body: str = "time.sleep(600)") -> subprocess.Popen:
    """Another process holding the project's pipeline lock (as a run in progress does) while it runs `body`."""
    code = ("import os, sys, time; from pathlib import Path; from tasks.lock import pipeline_lock; from tasks import dvc\n"
            "with pipeline_lock(Path(sys.argv[1]), {'prefect_flow_run': 'other-run'}):\n"
            f"    print('held', flush=True); {body}\n")
    p = subprocess.Popen([sys.executable, "-c", code, str(root)], cwd=ROOT, stdout=subprocess.PIPE, text=True,
                         env={**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT)])})
    assert p.stdout.readline().strip() == "held"
    return p


def test_pipeline_lock_turns_a_second_run_away(tmp_path):
    from flows.retrain import retrain

    root = copy_project(tmp_path)
    holder = hold_lock(root)
    try:
        with pytest.raises(ClvrError, match=r"another pipeline run is in progress .*other-run"):
            retrain.fn(profile="ci", root=str(root))
        assert not (root / "params.yaml").exists() and not (root / "mlflow.db").exists()  # nothing written
        p = subprocess.run([sys.executable, "-m", "clvr", "pipeline", "run", "--profile", "ci"], cwd=root,
                           capture_output=True, text=True, env=clean_env())
        assert p.returncode == 2 and "another pipeline run is in progress" in p.stderr, p.stderr[-2000:]
        assert "Traceback" not in p.stderr and len(p.stderr.strip().splitlines()) == 1
    finally:
        holder.kill()  # SIGKILL: the kernel drops the lock with the process
        holder.wait()
    res = retrain.fn(profile="ci", root=str(root), dry_run=True)
    assert res["dry_run"] and res["stages"] == [s.name for s in flow_stages("retrain")] == ["synthesize", "controller_sft", "sft", "evaluate"]
    from flows.foundation import foundation

    res = foundation.fn(profile="ci", root=str(root), dry_run=True)
    assert res["flow"] == "foundation" and res["stages"] == ["vae", "pretrain", "finetune", "distill", "trajectory",
                                                             "rebalance", "ship"]


def test_lock_outlives_a_killed_flow_while_its_stage_command_runs(tmp_path):
    """The flow process killed outright mid-stage: its stage command (here a stand-in for `dvc repro`, started
    the same way) still holds the lock, so no next run can write the same outputs until it is done."""
    from tasks.lock import check_free

    root = copy_project(tmp_path)
    stage = "[sys.executable, '-c', 'import os, time; print(os.getpid(), flush=True); time.sleep(600)']"
    holder = hold_lock(root, f"dvc.stream({stage}, Path(sys.argv[1]), Path(sys.argv[1]) / 'stage.log', "
                             "on_line=lambda s: print(s, flush=True))")
    stage_pid = int(holder.stdout.readline())
    holder.kill()
    holder.wait()
    try:
        with pytest.raises(ClvrError, match="another pipeline run is in progress"):
            check_free(root)
    finally:
        os.kill(stage_pid, signal.SIGKILL)
    t0 = time.monotonic()
    while os.path.exists(f"/proc/{stage_pid}") and time.monotonic() - t0 < 10:  # reaped by init
        time.sleep(0.05)
    check_free(root)  # the last holder is gone: free


def test_infra_prefect_yaml_matches_the_flows():
    """Prefect's own prefect.yaml schema, then every entrypoint loaded and its parameters checked."""
    from prefect.cli.deploy._models import PrefectYamlModel
    from prefect.flows import load_flow_from_entrypoint

    from clvr.config import load_config

    model = PrefectYamlModel.model_validate(yaml.safe_load((ROOT / "infra" / "prefect.yaml").read_text()))
    assert {d.name for d in model.deployments} == {"retrain-weekly", "retrain-gpu"}
    cwd = os.getcwd()
    os.chdir(ROOT)  # entrypoints are relative to the repository root, as `prefect deploy` runs there
    try:
        for d in model.deployments:
            flow = load_flow_from_entrypoint(d.entrypoint)
            assert flow.name == "retrain", d.name
            flow.validate_parameters(d.parameters)  # unknown names or wrong types raise
            assert set(d.parameters) <= set(flow.parameters.properties), d.name
            profile = d.parameters["profile"]
            if not (ROOT / "conf" / f"{profile}.yaml").is_file():
                pytest.skip(f"conf/{profile}.yaml (named by deployment {d.name}) is not in this checkout")
            load_config(profile)
    finally:
        os.chdir(cwd)


def test_serve_bad_input_is_a_clear_error():
    for args, needle in ((["--cron", "61 * * * *"], "bad cron schedule '61 * * * *': Invalid cron string"),
                         (["--cron", "* * * * *", "--interval", "60"], "give --cron or --interval, not both"),
                         (["--profile", "nope"], "unknown profile 'nope'")):
        p = subprocess.run([sys.executable, "-m", "clvr", "pipeline", "serve", *args], cwd=ROOT, capture_output=True,
                           text=True, env=clean_env())
        assert p.returncode == 2 and p.stderr.strip() == f"error: {p.stderr.strip().removeprefix('error: ')}", p.stderr
        assert needle in p.stderr and len(p.stderr.strip().splitlines()) == 1, p.stderr
