"""The "openai" controller backend in the closed loop, against the fake OpenAI-compatible server on 127.0.0.1:
good steps drive a loop to a pass; a step the state forbids is rejected by the loop, never executed; an endpoint
that gives no valid step ends the trajectory with a clear status; the data engine records all of it."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from clvr import synthesize
from clvr.config import ControllerCfg, LoopCfg, load_config
from clvr.loop import make_verifier, run_loop
from clvr.loop.oracle import OracleGenerator
from clvr.loop.roles import make_controller
from clvr.loop.vlm_controller import VLMController, controller_error
from clvr.trajectories import load_trajectories

from fake_openai_server import FakeOpenAI, content_answer, step_answer

PROMPT = "a red circle and a blue square"
BUDGET = LoopCfg(max_iters=8, max_nfe=10_000, retries_per_step=2)


@pytest.fixture(autouse=True)
def _env(monkeypatch):
    monkeypatch.setenv("CLVR_TEST_KEY", "sk-test-vlm-loop")
    for var in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(var, raising=False)


@pytest.fixture
def server():
    with FakeOpenAI() as srv:
        yield srv


def endpoint(server) -> ControllerCfg:
    return ControllerCfg(base_url=server.url, model="fake-vlm", api_key_env="CLVR_TEST_KEY", timeout_s=0.5,
                         max_retries=1, backoff_s=0.001)


def controller(server) -> VLMController:
    import clvr.loop.vlm_controller  # noqa: F401  (registers "openai")

    return make_controller("openai", grid=4, controller_cfg=endpoint(server))


def target_steps(ctl: VLMController, prompt: str, seed: int) -> list[dict]:
    """The steps that build the symbolic plan's target layout (what a good VLM would answer)."""
    return ctl.plan(prompt, "loop", seed).steps


def test_good_answers_drive_the_loop_to_a_pass_and_the_vlm_sees_canvas_and_history(server):
    ctl = controller(server)
    steps = target_steps(ctl, PROMPT, 3)
    server.push(*[step_answer(s) for s in steps], step_answer({"op": "stop"}))
    trace = run_loop(PROMPT, ctl, OracleGenerator(), make_verifier("world"), BUDGET, seed=3)
    assert trace.passed and trace.ended_by == "stop" and trace.calls == len(steps) == 2
    assert [s.step for s in trace.steps] == [*steps, {"op": "stop"}]
    assert ctl.stats.ok == 3 and ctl.stats.rejected() == 0
    last = server.requests[-1]["json"]["messages"][1]["content"]
    assert last[1]["image_url"]["url"].startswith("data:image/png;base64,")
    assert steps[1]["shape"] in last[0]["text"] and "[kept]" in last[0]["text"]  # the history it was shown


def test_a_step_the_state_forbids_is_rejected_by_the_loop_and_never_run(server):
    ctl = controller(server)
    steps = target_steps(ctl, PROMPT, 3)
    bogus = {"op": "remove", "shape": "triangle", "color": "green", "cell": [3, 3]}  # valid schema, nothing there
    server.push(step_answer(bogus), *[step_answer(s) for s in steps], step_answer({"op": "stop"}))
    gen = OracleGenerator()
    calls = []
    gen.generate = lambda req, inner=gen.generate: calls.append(req.instruction) or inner(req)
    trace = run_loop(PROMPT, ctl, gen, make_verifier("world"), BUDGET, seed=3)
    assert trace.passed and trace.rejected == 1 and trace.steps[0].kind == "rejected"
    assert "holds nothing" in trace.steps[0].note
    assert all("triangle" not in c for c in calls) and len(calls) == 2


def test_no_valid_step_ends_the_trajectory_with_a_clear_status(server):
    ctl = controller(server)
    steps = target_steps(ctl, PROMPT, 3)
    server.push(step_answer(steps[0]), content_answer("sure! here is the step: add a circle"),
                content_answer("{not json"))
    gen = OracleGenerator()
    trace = run_loop(PROMPT, ctl, gen, make_verifier("world"), BUDGET, seed=3)
    assert not trace.passed and trace.ended_by == "stop" and trace.calls == 1
    assert [s.kind for s in trace.steps] == ["plan", "rejected", "stop"]
    err = controller_error(trace)
    assert err and "no valid step after 2 attempt(s)" in err and "bad_json" in err
    assert ctl.stats.bad_json == 2 and ctl.stats.gave_up == 1
    assert len(server.requests) == 3  # no request after giving up


def test_data_engine_with_the_vlm_controller_records_accepted_and_errored_trajectories(server, tmp_path):
    out = tmp_path / "vlm"
    cfg = load_config("ci", [f"synthesize.out={out}", "synthesize.generator=oracle", "synthesize.n_per_tier=1",
                             "synthesize.tiers=[2,3]", "synthesize.shard_size=2", "loop.controller=openai"])
    cfg = replace(cfg, controller=endpoint(server))
    ctl = controller(server)
    s = cfg.synthesize
    plans = [target_steps(ctl, synthesize.job_prompt(s, 4, j)["prompt"], synthesize.job_seed(s, j)) for j in (0, 1)]
    # lockstep: the two loops ask in turn. Job 0 (tier 2: two objects or more) gets its plan's steps; job 1 gets
    # its first step, then two unusable answers (max_retries=1: two attempts), so its controller gives up.
    assert len(plans[0]) >= 2
    nope = [content_answer("nope")] * 2
    script = [step_answer(plans[0][0]), step_answer(plans[1][0]), step_answer(plans[0][1]), *nope,
              *[step_answer(st) for st in plans[0][2:]], step_answer({"op": "stop"})]
    server.push(*script)
    res = synthesize.run(cfg, workers=1, log=lambda m: None)
    t0, t1 = load_trajectories(out)
    assert t0.controller == "openai" and t0.status == "accepted" and t0.ab is not None
    assert t1.status == "controller_error" and not t1.accepted and t1.ab is None
    assert any(st.kind == "rejected" and "no valid step" in st.note for st in t1.steps)
    assert res["metrics"]["controller_errors"] == 1
    assert "sk-test-vlm-loop" not in (out / "trajectories.jsonl").read_text()
    assert "sk-test-vlm-loop" not in json.dumps(res["metrics"])
