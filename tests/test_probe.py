"""Probe metrics (AUC Pass, effective rank / I_eff) and the probe, GenEval-world and speed runs on oracles."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from clvr.config import load_config
from clvr.generator import make_generator
from clvr.loop.oracle import OracleGenerator
from clvr.probe import (auc_pass, effective_rank, i_eff, run_geneval_world, run_probe, run_speed)


def test_auc_pass_is_the_normalised_trapezoid():
    c = [2.0, 4.0, 6.0, 10.0]
    assert auc_pass(c, [1, 1, 1, 1]) == pytest.approx(100)
    assert auc_pass(c, [0, 0, 0, 0]) == pytest.approx(0)
    assert auc_pass([0, 10], [1, 0]) == pytest.approx(50)
    # unequal spacing: area = 2*1 + 2*0.75 + 4*0.25 = 4.5 over a width of 8
    assert auc_pass(c, [1, 1, 0.5, 0]) == pytest.approx(100 * 4.5 / 8)
    assert auc_pass(c[::-1], [0, 0.5, 1, 1]) == pytest.approx(100 * 4.5 / 8)  # order does not matter


def test_effective_rank_counts_used_directions():
    assert effective_rank(np.eye(6)) == pytest.approx(6)
    assert effective_rank(np.outer(np.arange(1, 5), np.arange(1, 4))) == pytest.approx(1)
    assert effective_rank(np.diag([1.0, 1.0, 0.0])) == pytest.approx(2)


class WithBackbone(OracleGenerator):
    """An oracle holding a real torch backbone, so I_eff has weights to measure."""

    def __init__(self):
        super().__init__()
        self.transformer = torch.nn.Sequential(torch.nn.Linear(8, 8, bias=False), torch.nn.Linear(8, 4, bias=True))
        with torch.no_grad():
            self.transformer[0].weight.copy_(torch.eye(8))
            self.transformer[1].weight.copy_(torch.eye(8)[:4])


def test_i_eff_sums_effective_ranks_of_backbone_matrices():
    assert i_eff(WithBackbone()) == pytest.approx(8 + 4)  # biases (1-D) are not matrices
    assert i_eff(OracleGenerator()) is None


def test_probe_single_vs_loop_on_a_noisy_oracle(tmp_path):
    cfg = load_config("ci")
    gen = WithBackbone()
    gen.p_err = 0.3
    res = run_probe(cfg, gen, n_per_tier=6, tiers=(1, 4, 8), out=tmp_path, log=lambda *_: None)
    single, loop = res["single"], res["loop"]
    assert single["i_eff"] == loop["i_eff"] == pytest.approx(12)  # same backbone, same capacity
    assert loop["per_tier"]["8"] >= 0.8 > single["per_tier"]["8"]
    assert loop["auc"] > single["auc"] and res["auc_ratio"] > 1
    assert single["calls_mean"] == 1 and loop["calls_mean"] > 3
    assert loop["median_c_task_passed"] >= single["median_c_task_passed"]
    assert json.loads((tmp_path / "probe.json").read_text())["loop"]["per_tier"] == loop["per_tier"]
    rows = (tmp_path / "probe_rows.jsonl").read_text().splitlines()
    assert len(rows) == 3 * 3 * 6  # single, rewrite, loop x 3 tiers x 6 prompts
    assert (tmp_path / "probe.png").read_bytes()[:4] == b"\x89PNG"


def test_geneval_world_with_the_oracle_passes_every_suite(tmp_path):
    cfg = load_config("ci")
    res = run_geneval_world(cfg, make_generator("oracle"), n_per_tag=2, out=tmp_path, log=lambda *_: None)
    assert len(res["loop"]["per_tag"]) == 6 and res["loop"]["overall"] == 1.0
    assert res["single"]["calls_mean"] == 1.0 and res["loop"]["calls_mean"] >= 1.0
    folders = sorted(p for p in (tmp_path / "geneval-world" / "loop").iterdir() if p.is_dir())  # + the .clvr-output marker
    assert len(folders) == 12 and (folders[0] / "samples" / "0000.png").exists()
    md = json.loads((folders[0] / "metadata.jsonl").read_text())
    assert {"prompt", "include", "tag"} <= set(md)


def test_speed_table_counts_iterations():
    cfg = load_config("ci")
    gens = {"slow": OracleGenerator(nfe=56), "fast": OracleGenerator(nfe=4)}
    res = run_speed(cfg, gens, n=2, max_iters=3, tier=8, log=lambda *_: None)
    assert [r["iterations"] for r in res["rows"]] == [1, 2, 3]
    assert [r["slow_nfe"] for r in res["rows"]] == [56, 112, 168]
    assert [r["fast_nfe"] for r in res["rows"]] == [4, 8, 12]
    assert all(r["speedup"] > 0 for r in res["rows"])
    assert all(r["speedup_batched"] > 0 and r["slow_s_batched"] > 0 for r in res["rows"])
    assert res["batch"] == cfg.eval.speed_batch and res["speedup_batched_mean"] > 0


def test_geneval_world_folders_score_the_same_with_the_judge(tmp_path):
    from clvr.judge import score_folder

    cfg = load_config("ci")
    res = run_geneval_world(cfg, make_generator("noisy-oracle", p_err=0.5), n_per_tag=3, out=tmp_path,
                            log=lambda *_: None)
    for mode in ("single", "loop"):
        scored = score_folder(tmp_path / "geneval-world" / mode)
        assert scored["overall"] == pytest.approx(res[mode]["overall"], abs=1e-3)
    assert res["single"]["overall"] < 1.0  # p_err 0.5 spoils some single-step images


def test_probe_and_geneval_world_report_each_call_budget(tmp_path):
    """Budgets 1, 2 and unbounded with a generator that does k ops per call (the oracle) and a success table
    saying so: pass and AUC per budget; without the table (one op per call) budget 1 passes only 1-op prompts."""
    from clvr.loop.oracle import OracleGenerator

    table = tmp_path / "k.json"
    table.write_text(json.dumps({str(k): 1.0 for k in (1, 2, 4, 8, 16)}))
    cfg = load_config("ci", [f"loop.k_success={table}"])
    res = run_probe(cfg, OracleGenerator(), n_per_tier=2, tiers=(1, 5, 9), out=tmp_path / "a",
                    log=lambda *_: None, max_calls=[1, 2, 0])
    assert list(res["budgets"]) == ["1", "2", "unbounded"]
    for b in res["budgets"].values():
        assert b["pass"] == 1.0 and b["auc"] == 100.0
    assert res["budgets"]["unbounded"] is res["loop"] or res["budgets"]["unbounded"] == res["loop"]
    assert res["budgets"]["1"]["calls_mean"] == 1.0 and res["loop"]["calls_mean"] == 1.0
    on_disk = json.loads((tmp_path / "a" / "probe.json").read_text())
    assert on_disk["budgets"]["2"]["per_tier"] == res["budgets"]["2"]["per_tier"] and "auc" in on_disk["loop"]
    from clvr.probe import plot_probe

    assert plot_probe(on_disk, tmp_path / "p.png") == ["single", "rewrite (1 call, open loop)", "loop, ≤ 1 call",
                                                        "loop, ≤ 2 calls", "loop, unbounded"]  # one curve per budget
    rows = [json.loads(r) for r in (tmp_path / "a" / "probe_rows.jsonl").read_text().splitlines()]
    assert len(rows) == 5 * 3 * 2 and sorted({r.get("max_calls", -1) for r in rows}) == [-1, 1, 2]

    one_op = run_probe(load_config("ci"), OracleGenerator(), n_per_tier=2, tiers=(1, 5, 9), out=tmp_path / "b",
                       log=lambda *_: None, max_calls=[1])
    b1 = one_op["budgets"]["1"]
    assert b1["per_tier"]["9"] == 0.0 and b1["pass"] < 1.0 and one_op["loop"]["pass"] == 1.0
    assert b1["auc"] < one_op["loop"]["auc"]

    gw = run_geneval_world(cfg, OracleGenerator(), n_per_tag=1, out=tmp_path / "c", log=lambda *_: None,
                           max_calls=[1, 0])
    assert gw["budgets"]["1"]["overall"] == gw["budgets"]["unbounded"]["overall"] == 1.0
    assert gw["budgets"]["1"]["calls_mean"] == 1.0 and {"pass", "auc", "per_tag"} <= set(gw["budgets"]["1"])
    assert gw["loop"]["overall"] == 1.0  # the mode results stay as they were


def test_parse_budgets():
    from clvr.errors import ClvrError
    from clvr.probe import parse_budgets

    assert parse_budgets(["1,2,3,4,unbounded"]) == [1, 2, 3, 4, 0]
    assert parse_budgets(["2", "2", "inf", "1"]) == [2, 0, 1]
    for bad in ("-1", "x", "1.5", ""):
        with pytest.raises(ClvrError, match="not a call budget"):
            parse_budgets([bad])


def test_held_out_split_draws_only_held_out_structures():
    from clvr.probe import probe_prompts
    from clvr.world.grammar import HELD_OUT_COMPOSITIONS, composition

    prompts = probe_prompts(2, 1000, 4, tiers=(1, 8, 9), split="held_out")
    assert [p["tier"] for p in prompts] == [8, 8, 9, 9]  # tier 1 has no such prompt: left out
    assert all(composition(p) in HELD_OUT_COMPOSITIONS for p in prompts)
    assert composition({"include": [{"class": "circle", "count": 2, "color": "red"},
                                    {"class": "square", "count": 1, "color": "blue", "position": ["above", 0]},
                                    {"class": "triangle", "count": 1, "color": "green"}],
                        "exclude": [{"class": "circle", "count": 3}, {"class": "square", "count": 1,
                                                                        "color": "yellow"}]}) == "rel+excl+3col"
    all_split = probe_prompts(2, 1000, 4, tiers=(8,))
    assert all_split != prompts[:2]  # the held-out split has its own seed stream


def test_probe_split_is_checked():
    from clvr.config import load_config
    from clvr.errors import ConfigError

    with pytest.raises(ConfigError, match="eval.split"):
        load_config("ci", ["eval.split=heldout"])
