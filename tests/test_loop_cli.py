"""`clvr generate` end to end (oracle generator), and bad prompts -> exit code 2 with a one-line message."""

from __future__ import annotations

import json

import pytest

from conftest import clvr
from clvr.loop.trace import Trace


def test_generate_writes_final_filmstrip_and_trace(monkeypatch, capsys, tmp_path):
    prompt = "a red circle and a blue square"
    code, out, _ = clvr(monkeypatch, capsys, "generate", prompt, "--model", "oracle", "--out", str(tmp_path), "--seed", "3")
    assert code == 0
    line = out.strip().splitlines()[-1]
    assert line.startswith("PASS [loop] 2 objects: 2 generator calls")
    tr = Trace.load(tmp_path)
    assert tr.prompt == prompt and tr.passed and tr.calls == 2 and tr.seed == 3
    assert (tmp_path / "final.png").exists() and (tmp_path / "filmstrip.png").exists()
    code, out, _ = clvr(monkeypatch, capsys, "generate", prompt, "--model", "oracle", "--out", str(tmp_path / "s"),
                        "--mode", "single")
    assert code == 0 and "[single]" in out and "1 generator call " in out


@pytest.mark.parametrize("prompt,words", [
    ("", ["empty prompt"]),
    ("   ", ["empty prompt"]),
    ("a red circle " * 40, ["too long", "500"]),
    ("a purple circle", ["purple"]),
    ("sixteen red circles and a blue square", []),  # 17 objects on 16 cells
])
def test_bad_prompt_exits_2_with_one_line(monkeypatch, capsys, tmp_path, prompt, words):
    code, out, err = clvr(monkeypatch, capsys, "generate", prompt, "--model", "oracle", "--out", str(tmp_path))
    assert code == 2
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert all(w in err for w in words)
    assert not (tmp_path / "trace.json").exists()


def test_bad_mode_and_model_exit_2(monkeypatch, capsys, tmp_path):
    code, _, err = clvr(monkeypatch, capsys, "generate", "a red circle", "--mode", "twice", "--out", str(tmp_path))
    assert code == 2 and "mode" in err
    code, _, err = clvr(monkeypatch, capsys, "eval", "speed", "--models", "oracle")
    assert code == 2 and "two generators" in err


def test_probe_cli_last_line_is_json(monkeypatch, capsys, tmp_path):
    code, out, _ = clvr(monkeypatch, capsys, "eval", "probe", "--profile", "ci", "-n", "1", "--model", "noisy-oracle",
                        "--out", str(tmp_path))
    assert code == 0
    res = json.loads(out.strip().splitlines()[-1])
    for mode in ("single", "loop"):
        assert {"auc", "i_eff", "per_tier", "nfe_mean", "s_per_prompt"} <= set(res[mode])
        assert len(res[mode]["per_tier"]) == 10
    assert (tmp_path / "probe.json").exists() and (tmp_path / "probe.png").stat().st_size > 1000


def test_geneval_world_and_speed_cli_last_lines_are_json(monkeypatch, capsys, tmp_path):
    code, out, _ = clvr(monkeypatch, capsys, "eval", "geneval-world", "--profile", "ci", "--n", "1", "--model", "oracle",
                        "--out", str(tmp_path))
    res = json.loads(out.strip().splitlines()[-1])
    assert code == 0 and res["loop"]["overall"] == 1.0 and len(res["single"]["per_tag"]) == 6
    code, out, _ = clvr(monkeypatch, capsys, "eval", "speed", "--profile", "ci", "--n", "1", "--iters", "2",
                        "--models", "oracle,noisy-oracle")
    res = json.loads(out.strip().splitlines()[-1])
    assert code == 0 and [r["iterations"] for r in res["rows"]] == [1, 2] and "speedup" in res["rows"][0]


def test_probe_cli_max_calls_lists_and_bad_budgets(monkeypatch, capsys, tmp_path):
    code, out, _ = clvr(monkeypatch, capsys, "eval", "probe", "--profile", "ci", "-n", "1", "--model", "oracle",
                        "--out", str(tmp_path / "a"))
    res = json.loads(out.strip().splitlines()[-1])
    assert code == 0 and list(res["budgets"]) == ["1", "2", "3", "4", "unbounded"]  # the default list
    assert all({"pass", "auc", "per_tier"} <= set(b) for b in res["budgets"].values())
    assert res["budgets"]["1"]["calls_mean"] == 1.0 and res["budgets"]["unbounded"]["pass"] == 1.0
    code, out, _ = clvr(monkeypatch, capsys, "eval", "probe", "--profile", "ci", "-n", "1", "--model", "oracle",
                        "--out", str(tmp_path / "b"), "--max-calls", "2", "--max-calls", "4")
    assert code == 0 and list(json.loads(out.strip().splitlines()[-1])["budgets"]) == ["2", "4"]
    code, out, _ = clvr(monkeypatch, capsys, "eval", "probe", "--profile", "ci", "-n", "1", "--model", "oracle",
                        "--out", str(tmp_path / "c"), "--max-calls", "off")
    assert code == 0 and "budgets" not in json.loads(out.strip().splitlines()[-1])
    code, _, err = clvr(monkeypatch, capsys, "eval", "geneval-world", "--profile", "ci", "--n", "1", "--model", "oracle",
                        "--out", str(tmp_path / "d"), "--max-calls", "1,zero")
    assert code == 2 and err.startswith("error: --max-calls: 'zero'") and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "d").exists()


def test_call_budget_config_and_success_table_errors_exit_2(monkeypatch, capsys, tmp_path):
    code, _, err = clvr(monkeypatch, capsys, "generate", "a red circle", "--model", "oracle", "--out", str(tmp_path / "a"),
                        "--set", "loop.max_calls=-1")
    assert code == 2 and "loop.max_calls must be >= 0" in err
    code, _, err = clvr(monkeypatch, capsys, "generate", "a red circle", "--model", "oracle", "--out", str(tmp_path / "b"),
                        "--set", f"loop.k_success={tmp_path / 'nope.json'}")
    assert code == 2 and "loop.k_success: cannot read" in err and len(err.strip().splitlines()) == 1
    (tmp_path / "k.json").write_text(json.dumps({"1": 1.0, "2": 1.0}))
    code, out, _ = clvr(monkeypatch, capsys, "generate", "a red circle and a blue square", "--model", "oracle",
                        "--out", str(tmp_path / "c"), "--set", f"loop.k_success={tmp_path / 'k.json'}",
                        "--set", "loop.max_calls=1")
    assert code == 0 and out.strip().splitlines()[-1].startswith("PASS [loop] 2 objects: 1 generator call ")
    tr = Trace.load(tmp_path / "c")
    assert tr.steps[0].step["op"] == "edit" and tr.calls == 1
