"""The open-loop rewrite baseline (loop mode "rewrite": the controller rewrites the prompt once into one grounded
step of every object, the generator runs once, nothing gates or corrects it) and the controller choice on the
command line (`--controller KEY`, `loop.controller_model`)."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest

from conftest import clvr
from clvr.config import ConfigError, LoopCfg, load_config, validate
from clvr.errors import CheckpointError
from clvr.generator import GenRequest
from clvr.loop import make_verifier, run_loop
from clvr.loop.controller import WorldController
from clvr.loop.oracle import OracleGenerator
from clvr.loop.run import build_controller, register_controllers, run_many
from clvr.probe import probe_prompts, run_geneval_world, run_probe

BUDGET = LoopCfg(max_iters=32, max_nfe=10_000, max_calls=0)
DENSE = "three red circles above a blue square and two green triangles"  # 6 objects


class Recording(OracleGenerator):
    """The oracle generator, keeping every request it was sent."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.requests: list[GenRequest] = []

    def generate(self, req):
        self.requests.append(req)
        return super().generate(req)


class DrawsNothing(Recording):
    """A generator whose every output is its input canvas (the worst generator): passive verification fails."""

    def generate(self, req):
        res = super().generate(req)
        res.image = req.reference.copy() if req.reference is not None else res.image * 0 + 255
        return res


def test_rewrite_plans_as_the_loop_and_emits_every_object_in_one_call():
    ctl = WorldController()
    loop_plan, rewrite_plan = ctl.plan(DENSE, "loop", 5), ctl.plan(DENSE, "rewrite", 5)
    assert rewrite_plan.mode == "rewrite" and rewrite_plan.steps == loop_plan.steps  # the same symbolic plan
    assert rewrite_plan.target == loop_plan.target and len(loop_plan.steps) == 6
    for budget in (BUDGET, replace(BUDGET, max_calls=4)):  # the call budget is forced to 1 whatever the config's
        gen = Recording()
        trace = run_loop(DENSE, ctl, gen, make_verifier("world"), budget, seed=5, mode="rewrite")
        assert len(gen.requests) == trace.calls == 1 and trace.ended_by == "max_calls" and trace.passed
        step = gen.requests[0].step
        assert step.op == "edit" and [p.to_dict() for p in step.ops] == loop_plan.steps  # all adds, one edit
        assert gen.requests[0].reference is not None and gen.requests[0].reference.min() == 255  # the blank canvas
        assert sorted(gen.requests[0].regions) == sorted(tuple(s["cell"]) for s in loop_plan.steps)
        assert [s.kind for s in trace.steps] == ["plan"]
    gen = Recording()
    trace = run_loop("a red circle", ctl, gen, make_verifier("world"), BUDGET, seed=1, mode="rewrite")
    assert trace.passed and trace.calls == 1 and gen.requests[0].step.op == "add"  # one object: a bare add


def test_rewrite_has_no_passive_gate_and_no_second_call():
    gen = DrawsNothing()
    trace = run_loop(DENSE, WorldController(), gen, make_verifier("world"), BUDGET, seed=2, mode="rewrite")
    [rec] = trace.steps
    assert len(gen.requests) == 1 and trace.calls == 1 and not trace.passed and trace.retries == 0
    assert rec.accepted and rec.passive["ok"] is False  # failed its passive check, kept anyway
    assert trace.final is not None and trace.final.min() == 255  # the (blank) output is the final canvas
    looped = run_loop(DENSE, WorldController(), DrawsNothing(), make_verifier("world"), BUDGET, seed=2, mode="loop")
    assert looped.calls > 1 and not any(s.accepted for s in looped.steps)  # the loop gates and retries


def test_a_rejected_rewrite_is_not_asked_again():
    class Garbage(WorldController):
        asked = 0

        def next(self, state):
            self.asked += 1
            return {"op": "paint", "cell": [9, 9]}

    ctl, gen = Garbage(), Recording()
    trace = run_loop(DENSE, ctl, gen, make_verifier("world"), BUDGET, seed=2, mode="rewrite")
    assert ctl.asked == 1 and trace.rejected == 1 and trace.calls == 0 and not gen.requests and not trace.passed


def test_rewrite_with_the_oracle_passes_every_tier_in_one_call():
    prompts = probe_prompts(2, 11, 4)
    traces = run_many([(md["prompt"], i) for i, md in enumerate(prompts)], WorldController(), OracleGenerator(),
                      make_verifier("world"), BUDGET, "rewrite")
    assert {md["tier"] for md in prompts} == set(range(1, 11))
    assert all(t.passed and t.calls == 1 and t.mode == "rewrite" for t in traces)


def test_rewrite_with_the_shipped_distilled_generator_is_one_call_and_fails_dense_prompts():
    """The shipped distilled generator mostly draws one op of a multi-op call: a tier-10 rewrite (>= 8 objects in
    one call) is not expected to pass; the loop, correcting, does."""
    cfg = load_config("ci")
    from clvr.loop.run import load_generator

    gen = load_generator(cfg, "distilled")
    prompts = probe_prompts(3, 5, 4, tiers=(10,))
    traces = run_many([(md["prompt"], i) for i, md in enumerate(prompts)], WorldController(), gen,
                      make_verifier("world"), BUDGET, "rewrite")
    assert all(t.calls == 1 and len(t.steps) == 1 and len(t.steps[0].step["ops"]) >= 8 for t in traces)
    assert sum(t.passed for t in traces) < len(traces)


def test_probe_and_geneval_world_have_the_rewrite_row(tmp_path):
    cfg = load_config("ci")
    assert cfg.eval.rewrite is True
    res = run_probe(cfg, OracleGenerator(), n_per_tier=1, tiers=(1, 5, 9), out=tmp_path / "p", log=lambda *_: None,
                    max_calls=[1])
    rw = res["rewrite"]
    assert rw["calls_mean"] == 1.0 and rw["pass"] == 1.0 and rw["auc"] == 100.0
    assert list(rw["per_tier"]) == ["1", "5", "9"]
    assert res["budgets"]["1"]["per_tier"]["9"] == 0.0  # the one-op-per-call loop at 1 call: the rewrite's counterpart
    on_disk = json.loads((tmp_path / "p" / "probe.json").read_text())
    assert on_disk["rewrite"]["per_tier"] == rw["per_tier"]
    rows = [json.loads(r) for r in (tmp_path / "p" / "probe_rows.jsonl").read_text().splitlines()]
    assert sum(r["mode"] == "rewrite" for r in rows) == 3
    gw = run_geneval_world(cfg, OracleGenerator(), n_per_tag=1, out=tmp_path / "g", log=lambda *_: None)
    assert gw["rewrite"]["calls_mean"] == 1.0 and gw["rewrite"]["overall"] == 1.0
    assert {"pass", "auc", "per_tag"} <= set(gw["rewrite"]) and len(gw["rewrite"]["per_tag"]) == 6
    assert (tmp_path / "g" / "geneval-world" / "rewrite" / "00000" / "samples" / "0000.png").exists()
    off = load_config("ci", ["eval.rewrite=false"])
    res = run_probe(off, OracleGenerator(), n_per_tier=1, tiers=(1,), out=tmp_path / "q", log=lambda *_: None)
    assert "rewrite" not in res and {"single", "loop"} <= set(res)


def test_eval_rewrite_must_be_a_bool():
    with pytest.raises(ConfigError):
        load_config("ci", ["eval.rewrite=maybe"])
    cfg = load_config("ci")
    with pytest.raises(ConfigError, match="eval.rewrite"):
        validate(replace(cfg, eval=replace(cfg.eval, rewrite="yes")))


# ---- the controller choice ----------------------------------------------------------------------------------

def test_controller_option_reaches_the_config():
    from clvr.cli.loop_cmd import EVAL_USES, GENERATE_USES, _cfg

    assert _cfg("ci", None, GENERATE_USES, "generate", "openai").loop.controller == "openai"
    cfg = _cfg("ci", ["loop.controller=openai"], EVAL_USES, "eval probe", "world")  # the option wins over --set
    assert cfg.loop.controller == "world"
    assert _cfg("ci", ["loop.controller=openai"], EVAL_USES, "eval probe").loop.controller == "openai"


def test_generate_rewrite_and_controller_on_the_cli(monkeypatch, capsys, tmp_path):
    code, out, _ = clvr(monkeypatch, capsys, "generate", DENSE, "--model", "oracle", "--mode", "rewrite",
                        "--controller", "world", "--out", str(tmp_path / "g"), "--seed", "3")
    assert code == 0 and out.strip().splitlines()[-1].startswith("PASS [rewrite] 6 objects: 1 generator call ")
    trace = json.loads((tmp_path / "g" / "trace.json").read_text())
    assert trace["mode"] == "rewrite" and len(trace["steps"][0]["step"]["ops"]) == 6


@pytest.mark.parametrize("command", [["generate", "a red circle"], ["eval", "probe", "-n", "1"],
                                     ["eval", "geneval-world", "--n", "1"]])
def test_unknown_controller_exits_2_listing_the_known_ones_before_weights_load(monkeypatch, capsys, tmp_path,
                                                                               command):
    import clvr.loop.run as run

    def no_weights(*a, **k):
        raise AssertionError("the generator loaded before the controller key was checked")

    monkeypatch.setattr(run, "load_generator", no_weights)
    code, out, err = clvr(monkeypatch, capsys, *command, "--profile", "ci", "--model", "distilled", "--controller",
                          "wizard", "--out", str(tmp_path / "o"))
    assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert "unknown controller 'wizard'" in err and "openai" in err and "world" in err
    assert not (tmp_path / "o").exists()


def test_learned_controller_gets_its_checkpoint_from_the_config(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the default folder is relative: runs/ci/... must not exist here
    with pytest.raises(CheckpointError, match="/ckpt/x"):
        build_controller(load_config("ci", ["loop.controller=learned", "loop.controller_model=/ckpt/x"]))
    with pytest.raises(CheckpointError, match="runs/ci/controller_sft/final"):  # conf/base.yaml: <controller_sft.out>/final
        build_controller(load_config("ci", ["loop.controller=learned"]))


def test_the_openai_controller_is_asked_once_for_the_whole_layout(monkeypatch):
    from fake_openai_server import FakeOpenAI, step_answer

    from clvr.config import ControllerCfg
    from clvr.loop.roles import make_controller

    for var in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    register_controllers()
    with FakeOpenAI() as server:
        ctl = make_controller("openai", grid=4, controller_cfg=ControllerCfg(
            base_url=server.url, model="fake-vlm", api_key_env="", timeout_s=0.5, max_retries=0))
        plan = ctl.plan(DENSE, "rewrite", 4)
        server.push(step_answer({"op": "edit", "ops": plan.steps}), step_answer({"op": "stop"}))
        trace = run_loop(DENSE, ctl, OracleGenerator(), make_verifier("world"), BUDGET, seed=4, mode="rewrite")
        assert trace.passed and trace.calls == 1 and len(server.requests) == 1
        assert "This is the only step" in server.requests[0]["json"]["messages"][1]["content"][0]["text"]
