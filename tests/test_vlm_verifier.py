"""The "openai" verifier (a VLM judge) against a real local HTTP server (127.0.0.1) that speaks the
chat-completions protocol: the request it sends, the verdicts it reads, what it does with bad answers, and the
loop, `clvr generate` and the probe running with it."""

import json
from dataclasses import replace

import numpy as np
import pytest

from clvr.config import JudgeCfg, load_config
from clvr.errors import ConfigError
from clvr.judge import constraint_texts
from clvr.loop.roles import Plan
from clvr.loop.verify import WorldVerifier
from clvr.loop.vlm_verifier import VLMVerifier, verdict_schema
from clvr.world.render import render
from clvr.world.scene import Obj, Scene

from conftest import clvr
from fake_openai_server import Answer, FakeOpenAI, content_answer, request_image, verdict_answer, world_judge

KEY = "sk-test-JUDGE-77aa01"
PROMPT = "a red circle above a blue square and no green triangles"
MD = {"tag": "position", "prompt": PROMPT,
      "include": [{"class": "square", "count": 1, "color": "blue"},
                  {"class": "circle", "count": 1, "color": "red", "position": ["above", 0]}],
      "exclude": [{"class": "triangle", "count": 1, "color": "green"}]}
TARGET = Scene((Obj("circle", "red", 0, 1), Obj("square", "blue", 2, 1)), 4)


@pytest.fixture(autouse=True)
def _env(monkeypatch):
    monkeypatch.setenv("CLVR_TEST_KEY", KEY)
    for var in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(var, raising=False)  # loopback only


def judge_cfg(url: str, **kw) -> JudgeCfg:
    return replace(JudgeCfg(base_url=url, model="fake-judge", api_key_env="CLVR_TEST_KEY", timeout_s=0.5,
                            max_retries=1, backoff_s=0.001), **kw)


def _ver(srv) -> VLMVerifier:
    return VLMVerifier(judge_cfg(srv.url), WorldVerifier(4))


def plan() -> Plan:
    return Plan(PROMPT, MD, TARGET, [], "loop")


def test_constraints_use_the_judges_wording():
    assert constraint_texts(MD) == ["1 blue square", "1 red circle above the blue square", "no green triangles"]


def test_request_lists_constraints_attaches_the_canvas_and_reads_verdicts():
    canvas = render(Scene((Obj("square", "blue", 2, 1),), 4))
    with FakeOpenAI() as srv:
        srv.push(verdict_answer({"c1": True, "c2": False, "c3": True}))
        with _ver(srv) as ver:
            seen = ver.perceive(canvas)
            report = ver.active(seen, plan())
        req = srv.requests[0]
    body = req["json"]
    assert req["path"] == "/v1/chat/completions" and req["headers"]["Authorization"] == f"Bearer {KEY}"
    rf = body["response_format"]
    assert rf["type"] == "json_schema" and rf["json_schema"]["strict"] is True
    assert rf["json_schema"]["schema"] == verdict_schema(3)
    assert rf["json_schema"]["schema"]["additionalProperties"] is False
    text = body["messages"][-1]["content"][0]["text"]
    assert json.dumps(PROMPT) in text
    assert "c1: 1 blue square\nc2: 1 red circle above the blue square\nc3: no green triangles" in text
    assert np.array_equal(request_image(body), canvas)  # the canvas itself, losslessly
    assert KEY not in json.dumps(body)
    # active: the VLM's verdicts decide; the detector's scene diff is there for the controller
    assert report["ok"] is False and report["verdicts"] == [True, False, True]
    assert report["reason"] == "expected 1 red circle above the blue square"
    assert report["missing"] == [Obj("circle", "red", 0, 1).to_dict()] and report["wrong"] == []


def test_all_true_passes_even_where_the_detector_would_not():
    """The VLM's verdict is the active verdict (a blank canvas the detector fails)."""
    with FakeOpenAI() as srv:
        srv.push(verdict_answer({"c1": True, "c2": True, "c3": True}))
        with _ver(srv) as ver:
            report = ver.active(ver.perceive(render(Scene((), 4))), plan())
    assert report["ok"] is True and report["reason"] == "" and len(report["missing"]) == 2


@pytest.mark.parametrize("bad, category", [
    (verdict_answer({"c1": True, "c2": True}), "schema"),  # a key missing
    (verdict_answer({"c1": True, "c2": True, "c3": True, "c4": False}), "schema"),  # an extra key
    (verdict_answer({"c1": True, "c2": "yes", "c3": True}), "schema"),  # not a boolean
    (content_answer("[true, true, true]"), "schema"),  # not an object
    (content_answer("all good"), "bad_json"),
    (Answer(b"<html>oops</html>"), "bad_envelope"),
    (Answer(b'{"error": "overloaded"}', status=503), "http_5xx"),
])
def test_bad_answers_are_retried_then_reported_not_ok(bad, category):
    canvas = render(TARGET)
    with FakeOpenAI() as srv:
        srv.push(bad, verdict_answer({"c1": True, "c2": True, "c3": True}))  # the retry succeeds
        with _ver(srv) as ver:
            assert ver.active(ver.perceive(canvas), plan())["ok"] is True
            assert getattr(ver.stats, category) == 1 and ver.stats.retries == 1
        srv.push(bad, bad)  # every attempt fails: no pass without a verdict
        with _ver(srv) as ver:
            report = ver.active(ver.perceive(canvas), plan())
    assert report["ok"] is False and report["verdicts"] is None
    assert report["reason"].startswith("judge error: judge 'fake-judge'") and category in report["reason"]
    assert ver.stats.gave_up == 1 and KEY not in report["reason"]


def test_passive_is_the_detectors_and_perception_keeps_the_image():
    from clvr.steps import Step

    with FakeOpenAI() as srv, _ver(srv) as ver:
        before, after = ver.perceive(render(Scene((), 4))), ver.perceive(render(Scene((Obj("square", "blue", 2, 1),), 4)))
        step = Step.from_dict({"op": "add", "shape": "square", "color": "blue", "cell": [2, 1]}, 4)
        assert ver.passive(step, before, after, plan()) == WorldVerifier(4).passive(step, before, after, plan())
        assert srv.requests == []  # passive checks cost no request
        assert np.array_equal(after.image, render(Scene((Obj("square", "blue", 2, 1),), 4)))


def test_judge_config_checks(monkeypatch):
    cfg = load_config("ci", ["judge.base_url=http://10.0.0.1:9/v1", "judge.model=m"])
    assert cfg.judge.base_url == "http://10.0.0.1:9/v1" and cfg.judge.perception == "world"
    for bad, needle in (("judge.perception=openai", "judge.perception"), ("judge.timeout_s=0", "judge.timeout_s"),
                        ("judge.base_url=ftp://x", "judge.base_url")):
        with pytest.raises(ConfigError, match=needle):
            load_config("ci", [bad])
    monkeypatch.delenv("CLVR_TEST_KEY")
    from clvr.loop.run import build_verifier

    with pytest.raises(Exception, match="CLVR_TEST_KEY is not set.*judge.api_key_env"):
        build_verifier(load_config("ci", ["loop.verifier=openai", "judge.api_key_env=CLVR_TEST_KEY"]))


def test_the_loop_with_the_vlm_judge_matches_the_world_verifier():
    """With a truthful judge (the server answers by the world judge on the image it is sent), the loop takes the
    same steps as with the world verifier; one request per accepted canvas (and the blank one)."""
    from clvr.loop.controller import WorldController
    from clvr.loop.oracle import noisy_oracle
    from clvr.loop.run import run_loop
    from clvr.config import LoopCfg

    ctl = WorldController(4)
    md = ctl.plan(PROMPT).metadata
    with FakeOpenAI(world_judge(lambda p: md)) as srv, _ver(srv) as ver:
        vlm = run_loop(PROMPT, ctl, noisy_oracle(p_err=0.4), ver, LoopCfg(), seed=3)
        n = len(srv.requests)
    ref = run_loop(PROMPT, ctl, noisy_oracle(p_err=0.4), WorldVerifier(4), LoopCfg(), seed=3)
    assert vlm.passed and ref.passed
    assert [s.step for s in vlm.steps] == [s.step for s in ref.steps] and vlm.calls == ref.calls
    assert n == 1 + sum(s.accepted for s in vlm.steps if s.kind != "stop")


def cli_env(url: str) -> list[str]:
    return ["--set", f"judge.base_url={url}", "--set", "judge.api_key_env=CLVR_TEST_KEY", "--set",
            "judge.timeout_s=2", "--profile", "ci"]


def test_generate_and_probe_take_verifier_openai(monkeypatch, capsys, tmp_path):
    from clvr.world.parser import parse

    with FakeOpenAI(world_judge(parse)) as srv:
        code, out, err = clvr(monkeypatch, capsys, "generate", PROMPT, "--out", str(tmp_path / "g"), "--model",
                              "oracle", "--verifier", "openai", *cli_env(srv.url))
        assert code == 0, err
        trace = json.loads((tmp_path / "g" / "trace.json").read_text())
        assert trace["passed"] is True and len(srv.requests) >= 2
        code, out, err = clvr(monkeypatch, capsys, "eval", "probe", "-n", "1", "--max-calls", "off", "--model",
                              "oracle", "--verifier", "openai", "--out", str(tmp_path / "p"), "--set",
                              "eval.rewrite=false", *cli_env(srv.url))
        assert code == 0, err
        res = json.loads(out.strip().splitlines()[-1])
        assert res["loop"]["pass"] == 1.0
        assert all(r["path"] == "/v1/chat/completions" for r in srv.requests)


def test_unknown_verifier_exits_2_with_one_line(monkeypatch, capsys, tmp_path):
    for args in (["generate", PROMPT, "--out", str(tmp_path / "g")],
                 ["eval", "geneval-world", "--out", str(tmp_path / "w")]):
        code, out, err = clvr(monkeypatch, capsys, *args, "--verifier", "wizard", "--profile", "ci")
        assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err
        assert "unknown verifier 'wizard'" in err and "openai" in err and "world" in err
