"""The stage registry, dvc.yaml generation, running stages alone (resume, evaluate), and the pipeline's
building blocks on real parts: MLflow (SQLite store in tmp), the model registry, the infra files."""

import base64
import fnmatch
import io
import json
import re
import shutil
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from clvr.config import FLOWS, Config, load_config
from clvr.errors import CheckpointError, ClvrError, ConfigError
from clvr.stages import STAGES, dvc_yaml, flow_stages, get_stage, prepare_resume, resolve, run_stage, upstream

ROOT = Path(__file__).resolve().parents[1]
CLVR = [sys.executable, "-m", "clvr"]


def ci_cfg(tmp: Path, *overrides: str) -> Config:
    return load_config("ci", [f"vae.out={tmp}/vae", f"pretrain.out={tmp}/pretrain", f"finetune.out={tmp}/finetune",
                              f"distill.out={tmp}/distill", f"ship.out={tmp}/ship", f"ship.root={tmp}/weights",
                              f"sft.out={tmp}/sft", f"eval.out={tmp}/eval", *overrides])


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The real foundation stages (vae, pretrain, finetune, distill, trajectory, rebalance, ship) on the ci profile, run
    in this process; ship installs into tmp/weights, never into the packaged weights."""
    from clvr.registry import SHIPPED, model_digest

    tmp = tmp_path_factory.mktemp("stages")
    cfg = ci_cfg(tmp)
    packaged = {name: model_digest(name) for name in SHIPPED}
    res = {s.name: run_stage(s.name, cfg) for s in flow_stages("foundation")}
    assert {name: model_digest(name) for name in SHIPPED} == packaged
    return tmp, cfg, res


# ---- registry and dvc.yaml ----------------------------------------------------------------------------------

def test_committed_dvc_yaml_matches_the_registry():
    assert (ROOT / "dvc.yaml").read_text() == dvc_yaml(), "run `clvr pipeline dvc-yaml`"


def test_registry_is_consistent():
    names = [s.name for s in STAGES]
    assert len(set(names)) == len(names)
    sections = {f.name for f in fields(Config)}
    cfg = load_config("ci")
    for s in STAGES:
        assert callable(s.function()), s.func
        assert s.section in sections and s.flow in FLOWS
        for key in s.params:  # a whole section or one key of it
            section, _, sub = key.partition(".")
            assert section in sections and (not sub or hasattr(getattr(cfg, section), sub)), key
        for dep in s.deps:  # code deps exist; config-named deps are outs of earlier stages of the same flow
            if "{" in dep:
                earlier = [t for t in STAGES[:STAGES.index(s)] if t.flow == s.flow]
                assert any(resolve(dep, cfg) in [resolve(o, cfg) for o in t.outs] for t in earlier), (s.name, dep)
            else:
                assert (ROOT / dep).exists(), dep


def test_two_flows_over_one_registry():
    """The foundation flow makes the released weights and lists no dependency on them; the retrain flow starts
    from them and has no pretrain or distill stage."""
    assert [s.name for s in flow_stages("foundation")] == ["vae", "pretrain", "finetune", "distill", "trajectory",
                                                           "rebalance", "ship"]
    assert [s.name for s in flow_stages("retrain")] == ["synthesize", "controller_sft", "sft", "evaluate"]
    assert sorted(s.name for f in FLOWS for s in flow_stages(f)) == sorted(s.name for s in STAGES)
    for s in STAGES:
        uses_weights = s.flow == "retrain" and s.name != "controller_sft"  # it reads the data set only
        assert ("src/clvr/weights" in s.deps) == uses_weights, s.name
    assert get_stage("ship").outs == () and "weights" in get_stage("evaluate").params
    assert [s.name for s in flow_stages("retrain", ["evaluate", "sft"])] == ["sft", "evaluate"]  # registry order


def test_stage_graph_from_the_registry():
    """Each stage runs after the stages whose outputs it reads; controller_sft and sft read only synthesize's data
    set, so a flow runs them at the same time."""
    def graph(flow, only=None):
        stages = flow_stages(flow, only)
        return {s.name: [u.name for u in upstream(s, stages)] for s in stages}

    assert graph("retrain") == {"synthesize": [], "controller_sft": ["synthesize"], "sft": ["synthesize"],
                                "evaluate": ["controller_sft", "sft"]}
    assert graph("foundation") == {"vae": [], "pretrain": ["vae"], "finetune": ["pretrain"], "distill": ["finetune"],
                                   "trajectory": ["finetune", "distill"], "rebalance": ["finetune", "trajectory"],
                                   "ship": ["finetune", "rebalance"]}
    assert graph("retrain", ["sft", "evaluate"]) == {"sft": [], "evaluate": ["sft"]}  # only the stages selected


def test_unknown_flow_or_a_stage_of_the_other_flow_is_a_clear_error():
    with pytest.raises(ClvrError, match=r"^unknown flow 'nope' \(known: foundation, retrain\)$"):
        flow_stages("nope")
    with pytest.raises(ClvrError, match="stage 'pretrain' is in the foundation flow, not in retrain"):
        flow_stages("retrain", ["pretrain"])
    p = subprocess.run(CLVR + ["pipeline", "run", "--flow", "nope"], capture_output=True, text=True, cwd=ROOT)
    assert p.returncode == 2 and p.stderr.strip() == "error: unknown flow 'nope' (known: foundation, retrain)", p.stderr


def covered(path: str, deps: tuple[str, ...]) -> bool:
    return any(path == d or path.startswith(d.rstrip("/") + "/") for d in deps)


def test_code_deps_cover_every_clvr_module_a_stage_imports():
    """In a fresh interpreter, import each stage's module: every clvr file it loads must be among the stage's
    deps (else editing it would leave the stage "up to date")."""
    code = ("import importlib, sys\nimportlib.import_module(sys.argv[1])\n"
            "print('\\n'.join(m.__file__ for n, m in list(sys.modules.items())"
            " if n.split('.')[0] == 'clvr' and getattr(m, '__file__', None)))")
    procs = {s.name: subprocess.Popen([sys.executable, "-c", code, s.func.partition(":")[0]], stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True) for s in STAGES}  # fresh interpreters, at once
    for s in STAGES:
        stdout, stderr = procs[s.name].communicate(timeout=300)
        assert procs[s.name].returncode == 0, stderr[-2000:]
        loaded = [str(Path(f).resolve().relative_to(ROOT)) for f in stdout.split()]
        assert loaded and all(covered(f, s.deps) for f in loaded), \
            (s.name, [f for f in loaded if not covered(f, s.deps)])


def test_code_deps_follow_lazy_imports_and_leave_out_unrelated_stages():
    deps = {s.name: s.deps for s in STAGES}
    # imported inside functions only (the in-training evaluation, the step text): a fresh import misses them
    assert covered("src/clvr/train/bench.py", deps["pretrain"]) and covered("src/clvr/steps.py", deps["pretrain"])
    for name in ("pretrain", "distill", "evaluate", "synthesize"):
        assert covered("src/clvr/steps.py", deps[name]) and covered("src/clvr/io.py", deps[name]), name
    assert not covered("src/clvr/synthesize/engine.py", deps["pretrain"])  # another stage's code does not rerun it
    assert "controller" in get_stage("evaluate").params


def test_dvc_yaml_uses_params_interpolation():
    stages = yaml.safe_load(dvc_yaml())["stages"]
    assert stages["pretrain"]["outs"] == ["${pretrain.out}/final"]
    assert stages["finetune"]["deps"][0] == "${pretrain.out}/final"
    assert stages["distill"]["deps"][0] == "${finetune.out}/final"  # the teacher: the fine-tune's final
    # the second part: the teacher (the fine-tune) and the student it goes on from
    assert stages["trajectory"]["deps"][:2] == ["${finetune.out}/final", "${distill.out}/final"]
    assert stages["rebalance"]["deps"][:2] == ["${finetune.out}/final", "${trajectory.out}/final"]
    assert "outs" not in stages["ship"] and stages["ship"]["deps"][:2] == ["${finetune.out}/final",
                                                                          "${rebalance.out}/final"]
    assert stages["evaluate"]["deps"][0] == "${sft.out}/final"
    assert stages["evaluate"]["metrics"] == [{"${eval.out}/metrics.json": {"cache": False}}]
    assert stages["pretrain"]["cmd"] == "clvr stage pretrain --params params.yaml"


def test_resolve_names_config_values(tmp_path):
    assert resolve("{pretrain.out}/final", ci_cfg(tmp_path)) == f"{tmp_path}/pretrain/final"


def test_unknown_stage_is_a_clear_error():
    with pytest.raises(ClvrError, match="unknown stage 'pprl' .*known: vae, pretrain, finetune, distill, trajectory, "
                                        "rebalance, ship, synthesize"):
        get_stage("pprl")


@pytest.mark.parametrize("args,needle", [
    (["stage", "nope"], "unknown stage 'nope'"),
    (["stage", "pretrain", "--profile", "nope"], "unknown profile 'nope'"),
    (["stage", "evaluate", "--params", "/nonexistent/params.yaml"], "no config file"),
    (["stage", "pretrain", "--set", "pretrain.stepz=3"], "pretrain.stepz"),
    (["pipeline", "serve", "--cron", "61 * * * *"], "bad cron schedule"),
])
def test_cli_bad_input_exits_2(args, needle):
    p = subprocess.run(CLVR + args, capture_output=True, text=True, cwd=ROOT)
    assert p.returncode == 2, p.stderr
    assert needle in p.stderr and "Traceback" not in p.stderr


def test_pipeline_commands_need_a_project(tmp_path):
    for args in (["pipeline", "run", "--profile", "ci"], ["reproduce", "run/x"]):
        p = subprocess.run(CLVR + args, capture_output=True, text=True, cwd=tmp_path)
        assert p.returncode == 2 and "not inside a clvr project" in p.stderr, p.stderr


def test_dvc_yaml_check(tmp_path):
    ok = subprocess.run(CLVR + ["pipeline", "dvc-yaml", "--check"], capture_output=True, text=True, cwd=ROOT)
    assert ok.returncode == 0 and "up to date" in ok.stdout
    (tmp_path / "dvc.yaml").write_text("stages: {}\n")
    stale = subprocess.run(CLVR + ["pipeline", "dvc-yaml", "--check"], capture_output=True, text=True, cwd=tmp_path)
    assert stale.returncode == 2 and "out of date" in stale.stderr


# ---- running stages alone --------------------------------------------------------------------------------

def test_stage_contract(trained):
    tmp, cfg, res = trained
    for name in ("pretrain", "finetune", "distill", "trajectory", "rebalance"):
        out = Path(getattr(cfg, name).out)
        assert res[name]["final"] == str(out / "final") and (out / "final" / "model_index.json").is_file()
        assert json.loads((out / "metrics.json").read_text()) == pytest.approx(res[name]["metrics"])
        curve = json.loads((out / "curve.json").read_text())  # the DVC plot, from metrics.jsonl's train lines
        assert [r["step"] for r in curve] == list(range(1, cfg.pretrain.steps + 1)) and "loss" in curve[0]


def test_killed_run_resumes_from_its_checkpoint_and_matches(trained, tmp_path):
    """A copy of the finished run cut back to its step-2 checkpoint (what a kill leaves) resumes from it and
    ends exactly where the uninterrupted run ended; a finished run or another config starts fresh."""
    src, _, res = trained
    shutil.copytree(src / "pretrain", tmp_path / "pretrain")
    cfg = ci_cfg(tmp_path)
    stage = get_stage("pretrain")
    shutil.rmtree(tmp_path / "pretrain" / "checkpoints" / "step-000004")
    shutil.rmtree(tmp_path / "pretrain" / "final")
    lines = (tmp_path / "pretrain" / "metrics.jsonl").read_text().splitlines()
    (tmp_path / "pretrain" / "metrics.jsonl").write_text("\n".join(lines[:3]) + "\n")  # the log went a bit further
    messages = []
    assert prepare_resume(stage, cfg, messages.append) == 2 and "resuming" in messages[0]
    again = run_stage("pretrain", cfg)
    steps = [json.loads(x)["step"] for x in (tmp_path / "pretrain" / "metrics.jsonl").read_text().splitlines()
             if json.loads(x)["split"] == "train"]
    assert steps == [1, 2, 3, 4]  # nothing lost, nothing twice
    timing = cfg.pipeline.reproduce_ignore
    deterministic = {k: v for k, v in res["pretrain"]["metrics"].items()
                     if not any(fnmatch.fnmatch(k, pat) for pat in timing)}
    assert "train_loss" in deterministic and "wall_s_this_run" not in deterministic
    assert {k: again["metrics"][k] for k in deterministic} == deterministic
    # finished -> fresh start; another config -> fresh start
    assert prepare_resume(stage, cfg, messages.append) == 0 and "finished run" in messages[-1]
    assert not (tmp_path / "pretrain" / "checkpoints").exists()


def test_other_config_starts_fresh(trained, tmp_path):
    src, _, _ = trained
    shutil.copytree(src / "pretrain", tmp_path / "pretrain")
    shutil.rmtree(tmp_path / "pretrain" / "checkpoints" / "step-000004")
    messages = []
    assert prepare_resume(get_stage("pretrain"), ci_cfg(tmp_path, "pretrain.lr=0.5"), messages.append) == 0
    assert "another config" in messages[-1] and not (tmp_path / "pretrain" / "metrics.jsonl").exists()


def test_finetune_and_distill_start_where_the_foundation_recipe_says(trained):
    from clvr.train.distill import teacher_path
    from clvr.io import MARKER
    from clvr.train.finetune import init_model

    tmp, cfg, _ = trained
    assert init_model(cfg) == str(tmp / "pretrain" / "final")  # finetune.init "" = <pretrain.out>/final
    assert teacher_path(cfg) == str(tmp / "finetune" / "final")  # distill.teacher "" = <finetune.out>/final
    with pytest.raises(CheckpointError, match=r"^finetune.init: no generator checkpoint at '/no/such'"):
        init_model(ci_cfg(tmp, "finetune.init=/no/such"))
    assert (tmp / "finetune" / MARKER).read_text().strip() == "world finetune"  # its own run folder, its own name


def test_the_second_distillation_part_goes_on_from_the_student_before_it(trained, tmp_path):
    """trajectory starts from distill's student and rebalance from trajectory's, both taught by the fine-tune; a bad
    start folder is an error naming the stage's own key, before anything loads."""
    from clvr.models.backend import load_pipeline
    from clvr.train.distill import trainer

    tmp, cfg, _ = trained
    fine = load_pipeline(str(tmp / "finetune" / "final")).transformer.state_dict()
    for name, start in (("trajectory", "distill"), ("rebalance", "distill-trajectory")):
        tr = trainer(cfg, None, name)
        teacher, student = tr.teacher.transformer.state_dict(), tr.pipe.transformer.state_dict()
        before = load_pipeline(str(tmp / start / "final")).transformer.state_dict()
        assert all(teacher[k].equal(v) for k, v in fine.items())
        assert all(student[k].equal(v) for k, v in before.items())
    with pytest.raises(CheckpointError, match=r"^rebalance.init: no generator checkpoint at '/no/such'"):
        run_stage("rebalance", ci_cfg(tmp, "rebalance.init=/no/such", f"rebalance.out={tmp_path}/r"))


def test_ship_installs_the_finetune_and_the_student_into_its_root(trained):
    from clvr.models.backend import load_pipeline
    from clvr.registry import model_digest

    tmp, cfg, res = trained
    receipt = json.loads((tmp / "ship" / "metrics.json").read_text())
    assert res["ship"]["metrics"] == receipt and res["ship"]["final"] is None
    for name, stage in (("base", "finetune"), ("distilled", "distill-rebalance")):  # the last distillation
        dest = tmp / "weights" / name
        assert receipt[f"{name}_source"] == str(tmp / stage / "final") and receipt[f"{name}_path"] == str(dest)
        assert receipt[f"{name}_sha256"] == model_digest(str(dest))
        shipped, trained_sd = (load_pipeline(p).transformer.state_dict() for p in (dest, tmp / stage / "final"))
        assert all(shipped[k].equal(v) for k, v in trained_sd.items())


def test_evaluate_stage(trained):
    """The retrain flow's sft and evaluate stages on pinned released weights (the ci foundation's, in tmp)."""
    from clvr.synthesize import resolve_model

    tmp, _, _ = trained
    cfg = ci_cfg(tmp, f"weights.base={tmp}/weights/base", f"weights.distilled={tmp}/weights/distilled",
                 "sft.data=")  # no synthesize run here: sft on its on-the-fly samples only
    assert cfg.sft.init == resolve_model(cfg) == f"{tmp}/weights/base"  # one key pins the base
    run_stage("sft", cfg)
    res = run_stage("evaluate", cfg)
    m = res["metrics"]
    assert res["final"] is None
    for model in ("base", "distilled", "sft"):
        tags = [k for k in m if k.startswith(f"{model}_geneval_") and k != f"{model}_geneval_overall"]
        assert len(tags) == 6 and 0.0 <= m[f"{model}_geneval_overall"] <= 1.0
        assert m[f"{model}_geneval_overall"] == pytest.approx(sum(m[t] for t in tags) / 6, abs=1e-3)
    prompts = (tmp / "eval" / "prompts.jsonl").read_text().splitlines()
    assert len(prompts) == 6 * cfg.eval.geneval_n and "include" in json.loads(prompts[0])
    rows = json.loads((tmp / "eval" / "geneval.json").read_text())
    assert {r["group"] for r in rows} >= {"distilled/overall", "base/counting", "sft/overall"}
    for png in ("geneval.png", "samples.png", "probe.png", "filmstrip.png"):
        assert (tmp / "eval" / png).read_bytes()[:4] == b"\x89PNG"
    probe = json.loads((tmp / "eval" / "probe.json").read_text())  # the probe ran on the released distilled model
    assert probe["n_per_tier"] == cfg.eval.probe_n_per_tier and probe["generator"].endswith("weights/distilled")
    assert m["probe_loop_auc"] == probe["loop"]["auc"] and m["probe_single_tier10"] == probe["single"]["per_tier"]["10"]
    assert m["probe_i_eff"] == probe["loop"]["i_eff"] == probe["single"]["i_eff"] > 0
    assert m["probe_rewrite_auc"] == probe["rewrite"]["auc"] and probe["rewrite"]["calls_mean"] == 1.0  # eval.rewrite
    assert json.loads((tmp / "eval" / "metrics.json").read_text()) == pytest.approx(m)


def test_evaluate_with_a_missing_released_model_is_a_clear_error(tmp_path):
    with pytest.raises(CheckpointError, match=r"^weights.distilled: no generator checkpoint at '/no/such'"):
        run_stage("evaluate", ci_cfg(tmp_path, "weights.distilled=/no/such"))
    assert not (tmp_path / "eval" / "prompts.jsonl").exists()  # checked before any work
    with pytest.raises(ConfigError, match="weights.base must be base | distilled | a checkpoint folder"):
        ci_cfg(tmp_path, "weights.base=oracle")


@pytest.mark.parametrize("override, key", [("eval.probe_n_per_tier=0", "eval.probe_n_per_tier"),
                                           ("eval.speed_batch=-1", "eval.speed_batch")])
def test_bad_eval_counts_are_clear_errors(tmp_path, override, key):
    with pytest.raises(ConfigError, match=key):  # range checks fail as the config loads
        run_stage("evaluate", load_config("ci", [override, f"eval.out={tmp_path / 'eval'}"]))
    assert not (tmp_path / "eval" / "prompts.jsonl").exists()  # checked before any work


# ---- MLflow building blocks (real SQLite store) --------------------------------------------------------------

@pytest.fixture
def client(tmp_path, monkeypatch):
    from tasks import tracking

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    c = tracking.make_client(tmp_path)
    assert c.tracking_uri == f"sqlite:///{tmp_path}/mlflow.db"
    return c, tracking.experiment_id(c, "t", tmp_path)


def test_checkpoint_watcher_logs_each_checkpoint_once(client, tmp_path, trained):
    from tasks.tracking import CheckpointWatcher, start_run

    c, exp = client
    src = trained[0] / "pretrain" / "checkpoints"
    out = tmp_path / "stage"
    (out / "checkpoints").mkdir(parents=True)
    run1 = start_run(c, exp, "a", {})
    w = CheckpointWatcher(c, run1, out, poll_s=0.05)
    w.start()
    shutil.copytree(src / "step-000002", out / "checkpoints" / "step-000002")
    shutil.copytree(src / "step-000004", out / "checkpoints" / "step-000004")
    assert w.stop() == ["step-000002", "step-000004"]
    logged = {f.path for f in c.list_artifacts(run1, "checkpoints/step-000004")}
    assert {"checkpoints/step-000004/model", "checkpoints/step-000004/state.json"} <= logged
    run2 = start_run(c, exp, "b", {})  # a later attempt: already logged checkpoints are not logged again
    w2 = CheckpointWatcher(c, run2, out, poll_s=0.05)
    w2.start()
    assert w2.stop() == [] and c.list_artifacts(run2) == []


def test_champion_moves_only_on_improvement(client, trained, monkeypatch):
    import mlflow.pyfunc

    from tasks.tracking import CHAMPION, register_generator, start_run

    c, exp = client
    tmp = trained[0]
    run = start_run(c, exp, "s", {})
    v1, moved1 = register_generator(c, "gen", run, tmp / "pretrain" / "final", "md5-a", 0.5, {"stage": "pretrain"})
    v2, moved2 = register_generator(c, "gen", run, tmp / "distill" / "final", "md5-b", 0.4, {"stage": "distill"})
    v1b, moved1b = register_generator(c, "gen", run, tmp / "pretrain" / "final", "md5-a", 0.5, {})  # same md5
    assert (moved1, moved2, v1b, moved1b) == (True, False, v1, False)
    assert c.get_model_version_by_alias("gen", CHAMPION).version == v1
    v3, moved3 = register_generator(c, "gen", run, tmp / "distill" / "final", "md5-c", 0.75, {})
    assert moved3 and c.get_model_version_by_alias("gen", CHAMPION).version == v3 != v2
    monkeypatch.setenv("MLFLOW_TRACKING_URI", c.tracking_uri)
    model = mlflow.pyfunc.load_model(f"models:/gen@{CHAMPION}")
    pngs = model.predict(["a photo of a red circle", "a photo of two blue squares"])
    images = [np.asarray(Image.open(io.BytesIO(base64.b64decode(s)))) for s in pngs]
    assert len(images) == 2 and images[0].shape == (64, 64, 3) and images[0].dtype == np.uint8


def test_reproduce_comparison_honours_tolerance_and_ignores_timings():
    from flows.reproduce import compare

    diff = {"m.json": {"loss": {"old": 1.0, "new": 1.0}, "acc": {"old": 0.5, "new": 0.5000001},
                       "wall_s_this_run": {"old": 3.0, "new": 9.0}, "gone": {"old": 1.0}}}
    rows, ignored = compare(diff, 0.0, ["*wall_s*"])
    assert ignored == ["m.json:wall_s_this_run"]
    assert {r["metric"]: r["ok"] for r in rows} == {"loss": True, "acc": False, "gone": False}
    assert all(r["ok"] for r in compare(diff, 1e-3, ["*wall_s*", "gone"])[0])


def test_progress_rows_survive_a_retry():
    from rich.console import Console

    from tasks import progress

    buf = io.StringIO()
    with progress.Reporter(["pretrain", "distill"], Console(file=buf, width=120, force_terminal=False)) as r:
        progress.REPORTER = r
        try:
            progress.report("start", "pretrain")
            progress.report("line", "pretrain", "pretrain:  50%|█████ | 2/4")
            progress.report("done", "pretrain", "failed", "stage 'pretrain' failed (dvc exit 255)")
            progress.report("start", "pretrain", "retry 1")
            progress.report("done", "pretrain", "ran", "3.0 s")
            progress.report("line", "unknown", "ignored")
        finally:
            progress.REPORTER = None
    final = buf.getvalue().splitlines()[-2:]
    assert "pretrain" in final[0] and "ran" in final[0] and "3.0 s" in final[0]
    assert "distill" in final[1] and "waiting" in final[1]


# ---- infra ------------------------------------------------------------------------------------------------

def test_prefect_yaml_deploys_retrain_on_cron_and_work_pools():
    from prefect.client.schemas.schedules import CronSchedule
    from prefect.flows import load_flow_from_entrypoint

    spec = yaml.safe_load((ROOT / "infra" / "prefect.yaml").read_text())
    deps = {d["name"]: d for d in spec["deployments"]}
    assert {d["work_pool"]["name"] for d in deps.values()} == {"clvr-process", "clvr-gpu"}
    for d in deps.values():
        assert load_flow_from_entrypoint(str(ROOT / d["entrypoint"])).name == "retrain"
        assert [CronSchedule(cron=s["cron"]).cron for s in d["schedules"]] == ["0 3 * * 0"]
        assert isinstance(d["parameters"]["profile"], str)
    load_config(deps["retrain-weekly"]["parameters"]["profile"])
    # the GPU pool's base job template declares every variable it uses and every one the deployment sets
    template = json.loads((ROOT / "infra" / "k8s-gpu-pool.json").read_text())
    declared = set(template["variables"]["properties"])
    used = set(re.findall(r"\{\{ *(\w+) *\}\}", json.dumps(template["job_configuration"])))
    assert used <= declared and "gpus" in used
    assert set(deps["retrain-gpu"]["work_pool"]["job_variables"]) <= declared
    assert "nvidia.com/gpu" in json.dumps(template["job_configuration"]["job_manifest"])


def test_local_cron_deployment():
    from flows.retrain import local_deployment

    dep = local_deployment("cpu", str(ROOT), cron="0 3 * * 0", overrides=["eval.n_per_tier=3"])
    assert dep.flow_name == "retrain" and dep.parameters == {"profile": "cpu", "root": str(ROOT),
                                                             "overrides": ["eval.n_per_tier=3"], "dry_run": False}
    assert [s.schedule.cron for s in dep.schedules] == ["0 3 * * 0"]
    assert dep.concurrency_limit == 1  # overlap policy: one run of the deployment at a time


def test_kubernetes_manifests_parse():
    docs = [d for name in ("deepspeed-job.yaml", "mlflow.yaml")
            for d in yaml.safe_load_all((ROOT / "infra" / name).read_text())]
    kinds = {d["kind"]: d for d in docs}
    assert {"Job", "Service", "Deployment", "PersistentVolumeClaim"} <= set(kinds)
    job = kinds["Job"]["spec"]
    assert job["completionMode"] == "Indexed" and job["completions"] == job["parallelism"] == 2
    assert "torchrun" in job["template"]["spec"]["containers"][0]["args"][0]
    assert (ROOT / "infra" / "Dockerfile").read_text().count("FROM ") == 1
