"""End to end on real parts: both Prefect flows (Prefect test harness) on the ci profile, in a copy of this project
in a fresh git repo under tmp (real DVC repo, default local remote, SQLite MLflow store in it).

First the `foundation` flow runs (vae, pretrain, finetune, distill, trajectory, rebalance, ship into a temporary
weights folder, never into src/clvr/weights); then one `retrain` flow run, on the shipped weights, is shared by
most assertions. In it, sft is given 12 steps (checkpoints at 4, 8, 12) and its process is killed with SIGKILL
once the first checkpoint exists: the Prefect task retries, the stage resumes from its checkpoint, and the run
still completes. controller_sft and sft run at the same time (both read only synthesize's data); Ctrl-C stops
both."""

import contextlib
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest
import yaml

from clvr.errors import ClvrError
from clvr.registry import SHIPPED, model_digest
from clvr.stages import flow_stages

ROOT = Path(__file__).resolve().parents[1]
PROJECT_FILES = ("src/", "conf/", "flows/", "tasks/", "dvc.yaml", ".dvc/config", ".dvc/.gitignore", ".dvcignore",
                 ".gitignore", "pyproject.toml")
MODEL = "clvr-world-generator"
NAMES = [st.name for st in flow_stages("retrain")]
FOUNDATION = [st.name for st in flow_stages("foundation")]
LONGER_SFT = ["sft.steps=12", "sft.ckpt_every=4", "sft.eval_every=12", "pipeline.retry_delay_s=0"]


def copy_project(dest: Path) -> Path:
    """This project's files (tracked and untracked, not ignored) as the first commit of a new git repo."""
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True,
                            text=True, check=True).stdout.split("\n")
    for rel in listed:
        if rel.startswith(PROJECT_FILES) and "__pycache__" not in rel and (ROOT / rel).is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            (dest / rel).write_bytes((ROOT / rel).read_bytes())
    for cmd in (["init", "-q"], ["add", "-A"], ["-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "init"]):
        subprocess.run(["git", *cmd], cwd=dest, check=True)
    return dest


def git(root: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, check=True).stdout.strip()


def clvr(root: Path, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    return subprocess.run([sys.executable, "-m", "clvr", *args], cwd=root, capture_output=True, text=True, env=env)


def kill_when(path: Path, name: str, timeout: float = 300.0) -> threading.Thread:
    """Kill this test's `clvr stage NAME` process (SIGKILL) as soon as `path` exists."""
    def watch():
        t0 = time.time()
        while time.time() - t0 < timeout:
            if path.exists():
                for p in psutil.Process().children(recursive=True):
                    try:
                        if "stage" in p.cmdline() and name in p.cmdline():
                            p.kill()
                            return
                    except psutil.NoSuchProcess:
                        continue
            time.sleep(0.05)

    t = threading.Thread(target=watch, daemon=True)
    t.start()
    return t


@pytest.fixture(scope="module")
def harness():
    from prefect.testing.utilities import prefect_test_harness

    old = os.environ.pop("MLFLOW_TRACKING_URI", None)
    with prefect_test_harness():
        yield
    if old is not None:
        os.environ["MLFLOW_TRACKING_URI"] = old


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    root = copy_project(tmp_path_factory.mktemp("project"))
    return root, git(root, "rev-parse", "HEAD")


@pytest.fixture(scope="module")
def foundation_run(harness, project, tmp_path_factory):
    """The foundation flow, shipping into a temporary folder outside the project."""
    from flows.foundation import foundation

    root, _ = project
    weights = tmp_path_factory.mktemp("shipped") / "weights"
    packaged = {name: model_digest(name) for name in SHIPPED}
    res = foundation(profile="ci", overrides=[f"ship.root={weights}"], root=str(root))
    assert {name: model_digest(name) for name in SHIPPED} == packaged  # this checkout's weights: untouched
    return root, weights, res


@pytest.fixture(scope="module")
def run1(harness, project, foundation_run):
    from flows.retrain import retrain

    root, first_commit = project
    killer = kill_when(root / "runs" / "ci" / "sft" / "checkpoints" / "step-000004", "sft")
    res = retrain(profile="ci", overrides=LONGER_SFT, root=str(root))
    killer.join(1)
    return root, foundation_run[2]["commit"], res


@pytest.fixture(scope="module")
def mlflow_client(harness, project):
    from tasks.tracking import make_client

    return make_client(project[0])


def attempts(client, parent_id: str) -> list:
    """Every stage attempt under a parent run, in the order they started."""
    runs = client.search_runs([client.get_run(parent_id).info.experiment_id],
                              f"tags.mlflow.parentRunId = '{parent_id}'")
    return sorted(runs, key=lambda r: r.info.start_time)


def nested(client, parent_id: str) -> dict:
    """Stage name -> its finished attempt."""
    return {r.data.tags["stage"]: r for r in attempts(client, parent_id) if r.info.status == "FINISHED"}


def evaluated(res: dict) -> dict:
    return next(r["metrics"] for r in res["stages"] if r["stage"] == "evaluate")


def test_foundation_flow_runs_its_stages_and_ships_into_the_configured_root(foundation_run, mlflow_client):
    root, weights, res = foundation_run
    c = mlflow_client
    assert res["flow"] == "foundation" and [(r["stage"], r["status"]) for r in res["stages"]] == [
        (n, "ran") for n in FOUNDATION]
    parent = c.get_run(res["mlflow_run_id"])
    assert parent.info.status == "FINISHED" and parent.data.tags["flow"] == "foundation"
    assert parent.data.tags["stages"] == ",".join(FOUNDATION) and res["registry"] is None  # nothing evaluated
    runs = nested(c, parent.info.run_id)
    assert set(runs) == set(FOUNDATION)
    receipt = json.loads((root / "runs" / "ci" / "ship" / "metrics.json").read_text())
    for name, stage in (("base", "finetune"), ("distilled", "distill-rebalance")):  # the last distillation
        assert receipt[f"{name}_source"] == f"runs/ci/{stage}/final" and receipt[f"{name}_path"] == str(weights / name)
        assert receipt[f"{name}_sha256"] == model_digest(str(weights / name))
        assert runs["ship"].data.tags[f"{name}_sha256"] == receipt[f"{name}_sha256"]  # text values: tags
        assert model_digest(str(root / "src" / "clvr" / "weights" / name)) == model_digest(name)  # the copy's: untouched
    lock = yaml.safe_load((root / "dvc.lock").read_text())["stages"]
    assert lock["distill"]["deps"][0]["path"] == "runs/ci/finetune/final"  # the teacher: the fine-tune
    rebalance_deps = {d["path"] for d in lock["rebalance"]["deps"]}  # dvc.lock sorts them
    assert {"runs/ci/finetune/final", "runs/ci/distill-trajectory/final"} <= rebalance_deps
    assert lock["finetune"]["deps"][0]["path"] == "runs/ci/pretrain/final"
    assert yaml.safe_load(git(root, "show", f"{res['tag']}:params.yaml"))["pipeline"]["flow"] == "foundation"
    assert "flow foundation" in git(root, "tag", "-l", "--format=%(contents)", res["tag"])


def test_run_records_parent_and_stage_runs(run1, mlflow_client):
    root, first_commit, res = run1
    c = mlflow_client
    assert [(r["stage"], r["status"]) for r in res["stages"]] == [(n, "ran") for n in NAMES]
    assert NAMES == ["synthesize", "controller_sft", "sft", "evaluate"]  # from the released weights: no pretrain, no distill
    assert res["tracking_uri"] == f"sqlite:///{root}/mlflow.db"  # the project's default store
    exp = c.get_experiment_by_name("clvr")
    assert exp.artifact_location == (root / "mlartifacts" / "clvr").as_uri()
    parent = c.get_run(res["mlflow_run_id"])
    tags = parent.data.tags
    assert parent.info.status == "FINISHED" and tags["profile"] == "ci" and tags["git.sha"] == first_commit
    assert tags["flow"] == "retrain" and res["flow"] == "retrain"
    assert tags["prefect.flow_run_id"] == res["flow_run_id"] and len(tags["prefect.flow_run_id"]) == 36
    assert tags["dvc.lock_sha256"] == hashlib.sha256((root / "dvc.lock").read_bytes()).hexdigest()
    assert tags["git.tag"] == res["tag"]
    assert {"evaluate/distilled_geneval_overall", "evaluate/sft_geneval_overall"} <= set(parent.data.metrics)
    runs = nested(c, parent.info.run_id)  # the finished attempt of each stage (sft had two)
    assert set(runs) == set(NAMES)
    for name, r in runs.items():
        assert r.info.status == "FINISHED" and r.data.tags["dvc.status"] == "ran", name
        assert r.data.params["sft.steps"] == "12" and r.data.params["profile"] == "ci"
        assert r.data.params["pipeline.flow"] == "retrain" and r.data.params["sft.init"] == "base"
    first = {r.data.tags["stage"]: r.info for r in reversed(attempts(c, parent.info.run_id))}  # each one's 1st attempt
    cs, sf = first["controller_sft"], first["sft"]  # both read only synthesize's data: they run at the same time
    assert cs.start_time < sf.end_time and sf.start_time < cs.end_time
    assert first["evaluate"].start_time >= max(runs["controller_sft"].info.end_time, runs["sft"].info.end_time)
    assert min(cs.start_time, sf.start_time) >= runs["synthesize"].info.end_time
    sft = runs["sft"]
    sft_result = next(s for s in res["stages"] if s["stage"] == "sft")
    assert sft.data.metrics["train_loss"] == pytest.approx(sft_result["metrics"]["train_loss"])
    history = c.get_metric_history(sft.info.run_id, "train/loss")
    assert sorted(m.step for m in history) == list(range(1, 13))
    ev = runs["evaluate"]  # the released models and the SFT model
    assert {"base_geneval_overall", "distilled_geneval_counting", "sft_geneval_overall"} <= set(ev.data.metrics)
    assert {"probe_loop_auc", "probe_single_auc", "probe_i_eff"} <= set(ev.data.metrics)
    assert {"plots/geneval.png", "plots/samples.png", "plots/geneval.json", "plots/probe.png", "plots/filmstrip.png"} <= {
        f.path for f in c.list_artifacts(ev.info.run_id, "plots")}
    syn = runs["synthesize"]  # the data engine: its card as a report, its data set as an input with its DVC md5
    assert syn.data.metrics["trajectories"] == 20 and {"accepted", "ab_win_or_tie"} <= set(syn.data.metrics)
    assert "reports/dataset_card.md" in {f.path for f in c.list_artifacts(syn.info.run_id, "reports")}
    (data,) = syn.inputs.dataset_inputs
    assert data.dataset.name == "trajectories" and "md5" in data.dataset.source


def test_killed_stage_is_retried_and_resumes_with_nothing_lost(run1, mlflow_client):
    root, _, res = run1
    out = root / "runs" / "ci" / "sft"
    sft = [r for r in attempts(mlflow_client, res["mlflow_run_id"]) if r.data.tags["stage"] == "sft"]
    assert [(r.data.tags["attempt"], r.info.status) for r in sft] == [("1", "FAILED"), ("2", "FINISHED")]
    assert "failed" in sft[0].data.tags["error"]
    log = (out / "stage.log").read_text().split("(attempt 2")[-1]
    assert "resuming from checkpoints/step-0000" in log
    steps = [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()
             if json.loads(x)["split"] == "train"]
    assert steps == list(range(1, 13))  # nothing lost, nothing twice
    logged = [f.path for r in sft for f in mlflow_client.list_artifacts(r.info.run_id, "checkpoints")]
    assert sorted(logged) == ["checkpoints/step-000004", "checkpoints/step-000008", "checkpoints/step-000012"]


def test_every_checkpoint_is_an_artifact(foundation_run, mlflow_client):
    root, _, res = foundation_run
    for stage in ("distill", "finetune"):
        run = nested(mlflow_client, res["mlflow_run_id"])[stage].info.run_id
        assert {f.path for f in mlflow_client.list_artifacts(run, "checkpoints")} == {
            "checkpoints/step-000002", "checkpoints/step-000004"}
        files = {f.path for f in mlflow_client.list_artifacts(run, "checkpoints/step-000002")}
        assert {"checkpoints/step-000002/state.json", "checkpoints/step-000002/model",
                "checkpoints/step-000002/ds"} <= files


def test_eval_suite_is_a_dataset_with_its_dvc_digest(run1, mlflow_client):
    root, _, res = run1
    ev = nested(mlflow_client, res["mlflow_run_id"])["evaluate"]
    (ds,) = ev.inputs.dataset_inputs
    md5 = next(o["md5"] for o in yaml.safe_load((root / "dvc.lock").read_text())["stages"]["evaluate"]["outs"]
               if o["path"].endswith("prompts.jsonl"))
    assert ds.dataset.source_type == "dvc" and json.loads(ds.dataset.source)["md5"] == md5
    assert ds.dataset.digest == md5[:16] and ds.dataset.name == "prompts"


def test_generators_registered_with_champion_alias(run1, mlflow_client):
    root, _, res = run1
    c = mlflow_client
    versions = {v.tags["stage"]: v for v in c.search_model_versions(f"name = '{MODEL}'")}
    assert set(versions) == {"sft"}  # the retrain flow's one trained generator, scored by evaluate
    lock = yaml.safe_load((root / "dvc.lock").read_text())["stages"]
    v = versions["sft"]
    assert v.tags["dvc_md5"] == next(o["md5"] for o in lock["sft"]["outs"] if o["path"].endswith("/final"))
    assert float(v.tags["score"]) == evaluated(res)["sft_geneval_overall"]
    champion = c.get_model_version_by_alias(MODEL, "champion")
    assert champion.version == res["registry"]["champion"] == v.version


def test_dvc_lock_tag_and_remote(run1):
    root, first_commit, res = run1
    lock = yaml.safe_load((root / "dvc.lock").read_text())["stages"]
    assert set(lock) == {*FOUNDATION, *NAMES}  # one dvc.lock: both flows' stages
    assert {"runs/ci/sft/final", "runs/ci/controller_sft/final"} <= {d["path"] for d in lock["evaluate"]["deps"]}
    assert lock["sft"]["params"]["params.yaml"]["sft"]["steps"] == 12
    assert any(d["path"] == "src/clvr/weights" for d in lock["synthesize"]["deps"])  # the released weights
    assert res["tag"].startswith("run/") and res["tag"] in git(root, "tag", "--list", "run/*").split()
    assert git(root, "rev-parse", f"{res['tag']}^{{commit}}") == res["commit"] != first_commit
    assert git(root, "show", f"{res['tag']}:dvc.lock") == (root / "dvc.lock").read_text().strip()
    assert json.loads(git(root, "show", f"{res['tag']}:runs/ci/eval/metrics.json")) == pytest.approx(evaluated(res))
    remote_files = [p for p in (root / "dvcstore").rglob("*") if p.is_file()]
    assert len(remote_files) >= 10  # pushed: model files, prompts, samples


def test_second_run_skips_up_to_date_stages(run1, mlflow_client):
    from flows.retrain import retrain

    root, _, res1 = run1
    res2 = retrain(profile="ci", overrides=LONGER_SFT, root=str(root))
    assert [r["status"] for r in res2["stages"]] == ["skipped"] * len(NAMES)
    assert res2["mlflow_run_id"] != res1["mlflow_run_id"] and res2["tag"] != res1["tag"]
    assert res2["lock_sha256"] == res1["lock_sha256"] and res2["commit"] == res1["commit"]
    assert res2["registry"]["champion"] == res1["registry"]["champion"]  # no new version for the same model
    assert len(mlflow_client.search_model_versions(f"name = '{MODEL}'")) == 1
    runs = nested(mlflow_client, res2["mlflow_run_id"])
    assert all(r.data.tags["dvc.status"] == "skipped" for r in runs.values())
    assert mlflow_client.list_artifacts(runs["sft"].info.run_id, "checkpoints") == []


def test_cli_run_shows_progress_and_where_to_look(run1):
    """`clvr pipeline run` (the main job's command) against the harness's Prefect server."""
    from prefect.settings import PREFECT_API_URL

    root = run1[0]
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env["PREFECT_API_URL"] = PREFECT_API_URL.value()
    args = ["pipeline", "run", "--profile", "ci", "--stage", "sft"]
    args += [a for o in LONGER_SFT for a in ("--set", o)]
    p = subprocess.run([sys.executable, "-m", "clvr", *args], cwd=root, capture_output=True, text=True, env=env)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "sft" in p.stderr and "skipped" in p.stderr  # the rich progress rows
    last = p.stdout.strip().splitlines()
    summary = json.loads(last[-4])
    assert summary["flow"] == "retrain" and summary["stages"]["sft"]["status"] == "skipped"
    assert last[-3].startswith("MLflow:  mlflow ui --backend-store-uri sqlite:///mlflow.db")
    assert last[-2].startswith("tag:     run/") and "clvr reproduce run/" in last[-2]
    assert last[-1].startswith("reports: runs/ci/sft/metrics.json")


def test_reproduce_from_tag_gives_identical_metrics(run1):
    """The retrain tag's dvc.lock also records the foundation stages (both flows ran here): only the retrain
    stages are rerun."""
    root, _, res = run1
    p = clvr(root, "reproduce", res["tag"], "--keep")
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    summary = json.loads(p.stdout.strip().splitlines()[-2])
    wt = Path(summary["worktree"])
    try:
        assert summary["ok"] and summary["different"] == 0 and summary["compared"] >= 40
        assert summary["flow"] == "retrain" and "reproduced:" in p.stdout
        rerun = [ln.split("'")[1] for ln in p.stdout.splitlines() if ln.strip().startswith("Running stage")]
        assert sorted(rerun) == sorted(NAMES), p.stdout[-3000:]
        # Every cached output is bit-identical, the killed-and-resumed sft's final/ included.
        assert summary["outs_differ"] == []
        weights = sorted(p.relative_to(root) for p in (root / "runs/ci/sft/final").rglob("*.safetensors"))
        assert weights and all((root / w).read_bytes() == (wt / w).read_bytes() for w in weights)
    finally:
        git(root, "worktree", "remove", "--force", str(wt))
        shutil.rmtree(wt.parent, ignore_errors=True)
    assert git(root, "worktree", "list").count("\n") == 0


def test_bad_input_is_a_clear_error(run1):
    from flows.foundation import foundation
    from flows.reproduce import reproduce
    from flows.retrain import retrain

    root = run1[0]
    with pytest.raises(ClvrError, match="unknown profile 'nope'"):
        retrain(profile="nope", root=str(root))
    with pytest.raises(ClvrError, match="unknown stage 'pprl'"):
        retrain(profile="ci", root=str(root), stages=["pprl"])
    with pytest.raises(ClvrError, match="stage 'sft' is in the retrain flow, not in foundation"):
        foundation(profile="ci", root=str(root), stages=["sft"])
    with pytest.raises(ClvrError, match="pipeline.flow is the flow being run"):
        retrain(profile="ci", root=str(root), overrides=["pipeline.flow=foundation"])
    with pytest.raises(ClvrError, match=r"unknown tag 'run/19990101-deadbeef' \(run tags: run/"):
        reproduce(root, "run/19990101-deadbeef")
    for args, needle in ((["pipeline", "run", "--profile", "nope"], "unknown profile 'nope'"),
                         (["pipeline", "run", "--stage", "pprl"], "unknown stage 'pprl'"),
                         (["pipeline", "run", "--stage", "pretrain"], "stage 'pretrain' is in the foundation flow"),
                         (["pipeline", "run", "--flow", "nope"], "unknown flow 'nope' (known: foundation, retrain)")):
        p = clvr(root, *args)
        assert p.returncode == 2 and needle in p.stderr and "Traceback" not in p.stderr, p.stderr
        assert len(p.stderr.strip().splitlines()) == 1, p.stderr


def test_ctrl_c_stops_every_stage_running_at_once(run1, tmp_path):
    """Ctrl-C (SIGINT to the CLI's process group, as a terminal sends it) while controller_sft and sft run at the
    same time, each in a Prefect worker thread that no signal reaches and in its own process group: both stage
    commands are stopped, the CLI exits, and the pipeline lock is free. In a copy of run1's project (synthesize up
    to date), with a fresh MLflow store."""
    from prefect.settings import PREFECT_API_URL

    from tasks.lock import check_free

    root = tmp_path / "project"
    shutil.copytree(run1[0], root, symlinks=True, ignore=shutil.ignore_patterns("mlflow.db", "mlartifacts"))
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env["PREFECT_API_URL"] = PREFECT_API_URL.value()
    env["PYTHONFAULTHANDLER"] = "1"
    args = ["pipeline", "run", "--profile", "ci", "--stage", "controller_sft", "--stage", "sft",
            "--set", "controller_sft.steps=5000", "--set", "sft.steps=5000"]
    log = tmp_path / "cli.log"
    # Started with SIGINT handled, as from a terminal: under a shell's background job (`nohup make test &`) this
    # process ignores SIGINT, and a child would inherit that.
    old = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with open(log, "w") as f:
            cli = subprocess.Popen([sys.executable, "-m", "clvr", *args], cwd=root, stdout=f, stderr=subprocess.STDOUT,
                                   env=env, start_new_session=True)
    finally:
        signal.signal(signal.SIGINT, old)
    stages: dict[str, psutil.Process] = {}
    t0 = time.monotonic()
    while len(stages) < 2 and cli.poll() is None and time.monotonic() - t0 < 240:
        for proc in psutil.Process(cli.pid).children(recursive=True):
            with contextlib.suppress(psutil.Error):
                cmd = proc.cmdline()
                if "stage" in cmd and cmd[-3] in ("controller_sft", "sft"):  # clvr stage NAME --params params.yaml
                    stages[cmd[-3]] = proc
        time.sleep(0.2)
    assert sorted(stages) == ["controller_sft", "sft"], log.read_text()[-3000:]
    os.killpg(cli.pid, signal.SIGINT)
    try:
        rc = cli.wait(60)
    except subprocess.TimeoutExpired:
        os.kill(cli.pid, signal.SIGABRT)  # PYTHONFAULTHANDLER: every thread's stack into the log
        time.sleep(2)
        os.killpg(cli.pid, signal.SIGKILL)
        pytest.fail("the CLI did not exit within 60 s of Ctrl-C:\n" + log.read_text()[-12000:])
    text = log.read_text()
    assert rc != 0 and "Traceback" not in text, text[-3000:]
    assert "stage 'sft' stopped: the flow was interrupted" in text, text[-3000:]
    gone, alive = psutil.wait_procs(list(stages.values()), timeout=5)
    assert alive == [], [p.cmdline() for p in alive]
    check_free(root)  # no process holds the project's pipeline lock any more
