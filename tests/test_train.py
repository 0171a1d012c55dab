"""Training stages on the ci profile: a step learns, outputs are written, a killed run resumes exactly, and
N ranks under torchrun (CPU, gloo) train the same model as one process."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from clvr.config import load_config
from clvr.errors import CheckpointError, ConfigError
from clvr.models import load_pipeline
from clvr.train import distill, loop, pretrain
from clvr.train.data import EDIT_OPS, PromptSource, random_edit, sample_batch


def ci(tmp_path, *extra):
    return load_config("ci", [f"pretrain.out={tmp_path}/pre", f"distill.out={tmp_path}/dist", *extra])


def weights(path) -> dict[str, torch.Tensor]:
    p = load_pipeline(path)
    return {**{f"t.{k}": v for k, v in p.transformer.state_dict().items()},
            **{f"e.{k}": v for k, v in p.text_encoder.state_dict().items()}}


def test_one_training_step_changes_parameters(tmp_path):
    tr = pretrain.trainer(ci(tmp_path), out=None)
    before = [p.detach().clone() for p in tr.params]
    stats = tr.train_step()
    assert np.isfinite(stats["loss"]) and tr.step == 1
    changed = [not torch.equal(a, b) for a, b in zip(before, tr.params)]
    assert sum(changed) > 0.9 * len(changed)


def test_batches_are_valid_edits_and_prompts():
    rng = np.random.default_rng(0)
    b = sample_batch(rng, 64, 4, 0.7, 0.8, 0.0, 10, PromptSource(4, [1.0, 1.0], pool=4))
    assert b.x0.shape == (64, 16) and len(b.texts) == 64
    assert (b.changed[b.edit].sum(1) >= 1).all() and (b.changed[b.edit].sum(1) <= 2).all()
    assert (b.region.sum(1) <= 2).all() and (b.region[~b.edit] == 0).all()
    for op in EDIT_OPS:
        scene, step, adds = random_edit(rng, 4, 10, op)
        assert step.op == op and step.apply(scene) != scene and len(adds) == len(scene.objects)


def test_edit_mix_follows_op_probs():
    """`pretrain.op_probs` sets the edit mix: all moves -> every edit text is a move, changing two cells."""
    b = sample_batch(np.random.default_rng(1), 64, 4, 1.0, 1.0, 0.0, 10, PromptSource(4, [1.0], pool=4),
                     op_probs=(0.0, 0.0, 0.0, 1.0))
    assert all(t.split(". ")[-1].startswith("move") for t in b.texts) and (b.changed.sum(1) == 2).all()
    with pytest.raises(ConfigError, match="pretrain.op_probs"):
        pretrain.run(load_config("ci", ["pretrain.op_probs=[0.5,0.5,0.5,0.5]"]))


def test_pretrain_writes_metrics_checkpoints_and_final(tmp_path):
    res = pretrain.run(ci(tmp_path))
    out = tmp_path / "pre"
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert {x["split"] for x in lines} == {"train", "eval"} and [x["step"] for x in lines if x["split"] == "train"] == [1, 2, 3, 4]
    ev = [x for x in lines if x["split"] == "eval"][0]
    assert {"edit_add", "edit_remove", "edit_recolor", "edit_move", "single_tier1"} <= set(ev)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000002", "step-000004"]
    assert res["final"] == str(out / "final") and (out / "final" / "model_index.json").is_file()
    summary = json.loads((out / "metrics.json").read_text())
    assert all(isinstance(v, float) for v in summary.values()) and summary["steps"] == 4.0


def test_resume_after_interruption_continues_exactly(tmp_path, die_at_step):
    straight = pretrain.run(ci(tmp_path / "a"))["final"]
    cfg = ci(tmp_path / "b")
    die_at_step(pretrain.run, cfg, 2)  # the process dies during step 3, after the step-2 checkpoint
    assert not (tmp_path / "b" / "pre" / "final").exists()
    resumed = pretrain.run(cfg)["final"]
    a, b = weights(straight), weights(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    steps = [json.loads(x)["step"] for x in (tmp_path / "b" / "pre" / "metrics.jsonl").read_text().splitlines()
             if json.loads(x)["split"] == "train"]
    assert steps == [1, 2, 3, 4]  # nothing logged twice


def test_distill_starts_from_the_teacher_and_folds_guidance(tmp_path):
    cfg = ci(tmp_path)
    pretrain.run(cfg)
    res = distill.run(cfg)
    student = load_pipeline(res["final"])
    assert student.config.default_steps == 4 and student.config.default_guidance == 1.0
    base, dist = weights(tmp_path / "pre" / "final"), weights(res["final"])
    assert base.keys() == dist.keys()  # same architecture: Delta_distill = student - base is defined
    assert any(not torch.equal(base[k], dist[k]) for k in base)
    m = json.loads((tmp_path / "dist" / "metrics.json").read_text())
    assert "edit_gap_max" in m and "teacher_edit_add" in m


def test_cli_pretrain_and_bad_checkpoint(tmp_path):
    from clvr.cli import _register, app

    _register()
    r = CliRunner().invoke(app, ["world", "pretrain", "--profile", "ci", f"pretrain.out={tmp_path}/p",
                                 "pretrain.eval_every=100"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout.strip().splitlines()[-1])["steps"] == 4.0
    import subprocess
    import sys

    bad = subprocess.run([sys.executable, "-m", "clvr", "world", "bench-generator", "--profile", "ci", "--model",
                          str(tmp_path / "none")], capture_output=True, text=True)
    assert bad.returncode == 2 and str(tmp_path / "none") in bad.stderr and "Traceback" not in bad.stderr


def test_the_steps_matter_benchmark_rates_each_sampler_against_the_models_own_cfg_sampling(monkeypatch, capsys):
    """benchmarks/steps_matter.py on the shipped base: a line per sampler, then each figure over the reference's."""
    import runpy
    from pathlib import Path

    bench = Path(__file__).resolve().parents[1] / "benchmarks"
    monkeypatch.setattr(sys, "path", [str(bench), *sys.path])  # as `python benchmarks/steps_matter.py` has it
    monkeypatch.setattr(sys, "argv", ["steps_matter.py", "--n", "3", "--steps", "1,4", "--tiers", "1-2"])
    runpy.run_path(str(bench / "steps_matter.py"), run_name="__main__")
    lines = [json.loads(s) for s in capsys.readouterr().out.strip().splitlines()]
    ref, rows, res = lines[0]["reference"], lines[1:3], lines[3]
    assert (ref["steps"], ref["guidance"]) == (28, 2.0)
    assert [(r["steps"], r["guidance"]) for r in rows] == [(1, 1.0), (4, 1.0)]
    for r in rows:
        got = res["ratio_no_cfg"][str(r["steps"])]
        assert set(got["edit"]) == set(EDIT_OPS) and set(got["single"]) == {"1", "2"}
        for op in EDIT_OPS:
            assert got["edit"][op] == (round(r["edit"][op] / ref["edit"][op], 3) if ref["edit"][op] else None)
        assert got["edit_mean"] == round(r["edit_mean"] / ref["edit_mean"], 3)
    with pytest.raises(SystemExit) as bad:
        monkeypatch.setattr(sys, "argv", ["steps_matter.py", "--model", "/no/such", "--n", "1"])
        runpy.run_path(str(bench / "steps_matter.py"), run_name="__main__")
    assert bad.value.code == 2 and "/no/such" in capsys.readouterr().err


# ---- the engine: ranks, ZeRO, kill -9 ------------------------------------------------------------------------

TOL = 1e-5  # max |parameter difference| after the ci run's 4 steps, N ranks vs 1 (float sums in another order)


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


def pretrain_cmd(out, ranks: int, *extra: str) -> list[str]:
    """`clvr world pretrain` on the ci profile: one process, or `ranks` processes under torchrun."""
    launch = [sys.executable, "-m", "clvr"] if ranks == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}", "-m", "clvr"]
    return [*launch, "world", "pretrain", "--profile", "ci", f"pretrain.out={out}", "pretrain.eval_trials=1", *extra]


def run_ok(cmd: list[str]) -> None:
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]


def progressive_rows(cfg, step: int = 0) -> loop.Rows:
    from clvr.train.data import PromptSource as PS

    src = PS(cfg.world.grid, cfg.distill.tier_weights, cfg.distill.prompt_pool, cfg.distill.seed)
    return loop.draw_rows(cfg.distill, src, cfg.world.grid, step, 0, 8, 0.0)


def test_progressive_target_is_two_teacher_steps_in_one(tmp_path):
    """Salimans & Ho: the student's x0 target is the x0 whose one Euler step from t lands where two teacher
    steps (via the midpoint) land; on the last interval (to sigma 0) it is the teacher's composed x0 at the
    midpoint. Checked against the teacher's own predict calls, at a fixed seed, grounded edits and
    text-to-image alike."""
    from clvr.models.pipeline import Cond
    from clvr.train.data import tokens

    cfg = ci(tmp_path)
    tp = pretrain.build_pipeline(cfg)
    tp.transformer.eval(), tp.text_encoder.eval()
    b = progressive_rows(cfg).batch
    x0, ref = tokens(b.x0), tokens(b.ref)
    region, edit = torch.from_numpy(b.region), torch.from_numpy(b.edit)
    assert edit.any() and (~edit).any()
    g = torch.Generator().manual_seed(0)
    x_t = 0.5 * x0 + 0.5 * torch.randn(x0.shape, generator=g)
    t, t_next = torch.full((8,), 0.5), torch.zeros(8)
    cond = Cond(ref, region, tp.encode_text(b.texts))
    out = distill.teacher_steps(tp, x_t, t, t_next, cond, 1.0, edit)
    with torch.no_grad():  # by hand: step a at t, step b at the midpoint 0.25, with the sampler's masks
        new_a, gate_a = tp.predict(x_t, t, cond)
        grounded = (edit & (region.sum(1) > 0))[:, None]
        hard = torch.where(grounded, region, (gate_a > 0).float())
        m_a = torch.where(edit[:, None], hard, torch.sigmoid(gate_a))
        x0_a = ref + m_a[..., None] * (new_a - ref)
        x_mid = x_t - 0.25 * (x_t - x0_a) / 0.5
        new_b, gate_b = tp.predict(x_mid, torch.full((8,), 0.25), cond)
        m_b = torch.where(edit[:, None], hard, torch.sigmoid(gate_b))
        x0_b = ref + m_b[..., None] * (new_b - ref)
    torch.testing.assert_close(out["x0"], x0_b, rtol=0, atol=1e-5)
    torch.testing.assert_close(out["x_next"], x0_b, rtol=0, atol=1e-5)
    assert (x0_b - x0_a).abs().max() > 1e-3  # two steps differ from one: the check could fail
    # an inner interval: one student Euler step with the target lands on the teacher's two-step result
    t2, t2n = torch.full((8,), 0.75), torch.full((8,), 0.5)
    inner = distill.teacher_steps(tp, x_t, t2, t2n, cond, 1.0, edit)
    torch.testing.assert_close(distill.euler(x_t, inner["x0"], t2, t2n), inner["x_next"], rtol=0, atol=1e-5)
    # nested grids: round r's student grid is round r+1's with every interval halved, so the teacher's two steps
    # are the previous student's own; the last round samples on the sampler's nfe-step grid
    grids = distill.ProgressiveLoss(ci(tmp_path, "distill.rounds=3"), tp, None).grids
    assert [len(g) for g in grids] == [17, 9, 5]
    assert torch.equal(grids[0][::2], grids[1]) and torch.equal(grids[1][::2], grids[2])
    assert torch.equal(grids[2], pretrain.sampler_sigmas(tp.scheduler.config, 4))
    # rounds split the steps evenly (4 in 3: round r starts at ceil(4r / 3)), or as distill.round_steps says; the
    # lr schedule's clock restarts at each round
    even = distill.ProgressiveLoss(ci(tmp_path, "distill.rounds=3"), tp, None)
    assert even.starts == [0, 2, 3] and [even.round_of(s) for s in range(4)] == [0, 0, 1, 2]
    own = distill.ProgressiveLoss(ci(tmp_path, "distill.rounds=2", "distill.round_steps=[1,3]"), tp, None)
    assert [own.round_of(s) for s in range(4)] == [0, 1, 1, 1] and own.first_step(1) == 1
    assert [own.schedule(s) for s in range(4)] == [(0, 1), (0, 3), (1, 3), (2, 3)]
    # with CFG the teacher's x0 is the guided one (w = 3 differs from w = 1)
    cond_u = Cond(ref, region, cond.text, tp.encode_text([""] * 8))
    guided = distill.teacher_steps(tp, x_t, t, t_next, cond_u, 3.0, edit)
    assert (guided["x0"] - out["x0"]).abs().max() > 1e-4
    # one CFG scale per row (distill.edit_guidance): 3 on the edits, 1 on text-to-image, as each alone
    per_row = distill.teacher_steps(tp, x_t, t, t_next, cond_u, torch.where(edit, 3.0, 1.0), edit)
    torch.testing.assert_close(per_row["x0"][edit], guided["x0"][edit], rtol=0, atol=1e-5)
    torch.testing.assert_close(per_row["x0"][~edit], out["x0"][~edit], rtol=0, atol=1e-5)
    # k teacher steps per student step (distill.substeps): 4 steps from .75 to .5 start as 2 steps from .75 to
    # .625 (same gate, same mask) and land elsewhere than 2; grids split every interval into k
    four = distill.teacher_steps(tp, x_t, t2, t2n, cond, 1.0, edit, 4)
    h1 = distill.teacher_steps(tp, x_t, t2, torch.full((8,), 0.625), cond, 1.0, edit)
    assert torch.equal(h1["gate"], four["gate"]) and torch.equal(h1["hard"], four["hard"])
    assert (four["x_next"] - inner["x_next"]).abs().max() > 1e-4  # finer steps land elsewhere: could fail
    torch.testing.assert_close(distill.euler(x_t, four["x0"], t2, t2n), four["x_next"], rtol=0, atol=1e-5)
    quads = distill.ProgressiveLoss(ci(tmp_path, "distill.rounds=2", "distill.substeps=4"), tp, None).grids
    assert [len(g) for g in quads] == [17, 5] and torch.allclose(quads[0][::4], quads[1])


def test_progressive_student_samples_on_its_own_grid_through_its_own_gate(tmp_path):
    """distill.final_sigma = 1/4: the student's saved scheduler samples FLUX's grid linspace(1, 1/4, 4) then 0,
    and the last round trains on it. Its text-to-image x0 is composed through its own soft gate, as its sampler
    composes it, so the x0 loss alone (gate BCE off) reaches the gate of every text-to-image row and of no edit
    row (an edit is held to its first-step mask)."""
    cfg = ci(tmp_path, "distill.method=progressive", "distill.gate_weight=0", "distill.final_sigma=0.25")
    tr = distill.trainer(cfg, out=None)
    grid = pretrain.sampler_sigmas(tr.pipe.scheduler.config, 4)
    assert grid.tolist() == [1.0, 0.75, 0.5, 0.25, 0.0] and torch.equal(tr.loss.grids[-1], grid)
    assert pretrain.sampler_sigmas(tr.teacher.scheduler.config, 4)[3] < 0.01  # the base's grid is unchanged
    gates = []
    predict = tr.pipe.predict

    def keep_gate(*args, **kw):
        new, gate = predict(*args, **kw)
        gate.retain_grad()
        gates.append(gate)
        return new, gate

    tr.pipe.predict = keep_gate
    rows = progressive_rows(cfg)
    loss, _ = tr.loss(tr.engine, tr.pipe, rows)
    loss.backward()
    reached = gates[0].grad.abs().sum(1) > 0
    edit = torch.from_numpy(rows.batch.edit)
    assert edit.any() and (~edit).any()
    assert torch.equal(reached, ~edit)


def test_progressive_rounds_train_and_a_killed_run_resumes_exactly(tmp_path, die_at_step):
    """Two rounds of 2 steps (teacher at 16 steps + CFG, then the round-1 student's copy at 8 -> student at 4):
    the round-1 teacher is saved at the boundary and is the student as it was then; a run that dies in round 1
    after the step-3 checkpoint resumes with that teacher and ends on the same weights as an unbroken run."""
    over = ["distill.method=progressive", "distill.rounds=2", "distill.ckpt_every=1"]
    pre = tmp_path / "pre"
    pretrain.run(ci(pre))
    teacher = f"distill.teacher={pre / 'pre' / 'final'}"
    straight = distill.run(ci(tmp_path / "a", teacher, *over))
    m = json.loads((tmp_path / "a" / "dist" / "metrics.json").read_text())
    assert m["train_round"] == 1.0 and np.isfinite(m["train_loss"])
    lrs = {r["step"]: r["lr"] for r in map(json.loads, (tmp_path / "a" / "dist" / "metrics.jsonl").read_text()
                                            .splitlines()) if r["split"] == "train"}
    assert lrs[3] == lrs[1]  # round 1's first step restarts the schedule (as one run it would be 0.78 of step 1's)
    rounds = tmp_path / "a" / "dist" / "rounds"
    assert [p.name for p in rounds.iterdir()] == ["round-1"]
    # the saved teacher is the student at step 2 (the boundary): the step-2 checkpoint's model
    # (only the newest 2 checkpoints are kept, so rerun to step 2 to compare)
    cfg_b = ci(tmp_path / "b", teacher, *over)
    die_at_step(distill.run, cfg_b, 3)  # dies during step 4, after the step-3 checkpoint (inside round 1)
    b_dist = tmp_path / "b" / "dist"
    at2 = weights(b_dist / "checkpoints" / "step-000002" / "model")
    assert max_diff(weights(b_dist / "rounds" / "round-1"), at2) == 0.0
    assert max_diff(weights(b_dist / "rounds" / "round-1"), weights(pre / "pre" / "final")) > 0
    resumed = distill.run(cfg_b)
    assert max_diff(weights(resumed["final"]), weights(straight["final"])) == 0.0
    # resuming inside round 1 without its teacher is a one-line error, not a silent wrong teacher
    import shutil

    shutil.rmtree(b_dist / "rounds")
    (b_dist / "final").rename(b_dist / "old-final")
    with pytest.raises(CheckpointError, match="round-1"):
        distill.run(ci(tmp_path / "b", teacher, *over, "distill.steps=5", "distill.rounds=2"))


def test_base_trained_at_4_steps_draws_t_only_at_the_sampler_sigmas(tmp_path):
    cfg = ci(tmp_path, "pretrain.train_sigmas=4")
    tr = pretrain.trainer(cfg, out=None)
    loss = tr.loss
    grid = pretrain.sampler_sigmas(tr.pipe.scheduler.config, 4)[:4].tolist()
    draws = {loss.t_of(tr.pipe)(np.random.default_rng(i)) for i in range(200)}
    assert draws == set(grid) and len(grid) == 4 and grid[0] == 1.0
    assert np.isfinite(tr.train_step()["loss"])
    assert pretrain.PretrainLoss(ci(tmp_path)).t_of(tr.pipe) is pretrain.logit_normal_t


def test_distill_init_starts_the_student_from_other_weights(tmp_path):
    """distill.init: the student starts from that model, the teacher stays the teacher; a bad folder is a
    one-line error naming the key, before anything loads."""
    pre = tmp_path / "pre"
    pretrain.run(ci(pre))
    first = sorted((pre / "pre" / "checkpoints").iterdir())[0] / "model"
    teacher = f"distill.teacher={pre / 'pre' / 'final'}"
    tr = distill.trainer(ci(tmp_path, teacher, f"distill.init={first}"), out=None)
    student = {f"t.{k}": v for k, v in tr.pipe.transformer.state_dict().items()}
    assert max_diff({k: v for k, v in weights(first).items() if k.startswith("t.")}, student) == 0.0
    assert max_diff({k: v for k, v in weights(pre / "pre" / "final").items() if k.startswith("t.")}, student) > 0
    with pytest.raises(CheckpointError, match="distill.init: no generator checkpoint at '/nowhere'"):
        distill.trainer(ci(tmp_path, teacher, "distill.init=/nowhere"), out=None)


def test_distill_method_and_rounds_are_checked():
    with pytest.raises(ConfigError, match="distill.method"):
        load_config("ci", ["distill.method=reflow"])
    with pytest.raises(ConfigError, match="distill.rounds"):
        load_config("ci", ["distill.rounds=0"])
    with pytest.raises(ConfigError, match="distill.steps"):
        load_config("ci", ["distill.rounds=5"])  # ci distills 4 steps: a round would get none
    for bad in ("[1,2]", "[4]", "[0,4]"):  # must sum to 4, one per round, each >= 1
        with pytest.raises(ConfigError, match="distill.round_steps"):
            load_config("ci", ["distill.rounds=2", f"distill.round_steps={bad}"])
    with pytest.raises(ConfigError, match="distill.edit_guidance"):
        load_config("ci", ["distill.edit_guidance=-1"])
    with pytest.raises(ConfigError, match="distill.substeps"):
        load_config("ci", ["distill.substeps=1"])
    for bad in ("1.0", "-0.1"):
        with pytest.raises(ConfigError, match="distill.final_sigma"):
            load_config("ci", [f"distill.final_sigma={bad}"])
    rel = load_config("release").distill  # the shipped student: progressive, 3 rounds
    assert (rel.method, rel.rounds) == ("progressive", 3) and load_config("ci").distill.method == "guidance"


KILLABLE = "pretrain.ckpt_every=1"  # checkpoints change nothing in the run (per-sample seeded data, no RNG state)


def kill_after_checkpoint(cmd: list[str], out, delay: float) -> None:
    """Start `cmd` in its own process group; `delay` s after the step-1 checkpoint appears, SIGKILL every
    process of it (launcher and ranks alike). `cmd` checkpoints every step (KILLABLE), so 3 more steps and 3
    more checkpoint saves stand between that moment and the end: the kill always lands mid-run."""
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while not (out / "checkpoints" / "step-000001").exists():
            assert p.poll() is None, "the run ended before its first checkpoint"
            assert time.monotonic() < deadline
            time.sleep(0.02)
        time.sleep(delay)
    finally:
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()


@pytest.fixture(scope="module")
def one_rank(tmp_path_factory) -> dict:
    """The reference: the ci pretrain as one plain process (ZeRO-0)."""
    out = tmp_path_factory.mktemp("one") / "pre"
    run_ok(pretrain_cmd(out, 1))
    return weights(out / "final")


def test_a_killed_single_process_run_resumes_exactly(tmp_path, one_rank):
    out = tmp_path / "pre"
    kill_after_checkpoint(pretrain_cmd(out, 1, KILLABLE), out, delay=0.05)
    assert not (out / "final").exists()
    run_ok(pretrain_cmd(out, 1, KILLABLE))
    assert max_diff(weights(out / "final"), one_rank) == 0.0


def test_two_ranks_train_what_one_process_trains(tmp_path, one_rank):
    """torchrun --nproc-per-node 2 at the same global batch: the same parameters within TOL; only rank 0
    wrote the run's files, and each checkpoint holds the ZeRO-0 state once."""
    out = tmp_path / "pre"
    run_ok(pretrain_cmd(out, 2))
    assert max_diff(weights(out / "final"), one_rank) <= TOL
    state = json.loads((out / "checkpoints" / "step-000004" / "state.json").read_text())
    assert state["world_size"] == 2 and state["zero_stage"] == 0
    steps = [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps.count(4) == 2  # one train and one eval line, written once


def test_zero2_on_two_ranks_matches_zero0_and_its_shards_need_two_ranks(tmp_path, one_rank):
    out = tmp_path / "pre"
    run_ok(pretrain_cmd(out, 2, "engine.zero_stage=2"))
    assert max_diff(weights(out / "final"), one_rank) <= TOL
    shards = sorted(p.name for p in (out / "checkpoints" / "step-000004" / "ds").glob("zero_pp_rank_*"))
    assert len(shards) == 2  # each rank saved its share of the optimizer state
    cfg = load_config("ci", [f"pretrain.out={out}", "pretrain.steps=6", "engine.zero_stage=2"])
    with pytest.raises(CheckpointError, match="2 rank"):
        pretrain.run(cfg)  # one process cannot read two ranks' ZeRO-2 shards


def test_a_killed_two_rank_run_resumes(tmp_path, one_rank):
    out = tmp_path / "pre"
    kill_after_checkpoint(pretrain_cmd(out, 2, KILLABLE), out, delay=0.05)
    assert not (out / "final").exists()
    run_ok(pretrain_cmd(out, 2, KILLABLE))
    assert max_diff(weights(out / "final"), one_rank) <= TOL
    steps = [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()
             if json.loads(x)["split"] == "train"]
    assert steps == [1, 2, 3, 4]


def test_engine_config_errors_name_the_key(monkeypatch):
    with pytest.raises(ConfigError, match="engine.zero_stage"):
        load_config("ci", ["engine.zero_stage=4"])
    monkeypatch.setenv("RANK", "0")  # a launcher environment set only partly
    with pytest.raises(ConfigError, match="WORLD_SIZE"):
        load_config("ci")
    monkeypatch.setenv("WORLD_SIZE", "3")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "29500")
    with pytest.raises(ConfigError, match="vae.batch_size"):  # 2 does not split over 3 ranks
        load_config("ci")
    with pytest.raises(ConfigError, match="pretrain.batch_size"):  # 8 does not either
        load_config("ci", ["vae.batch_size=9"])
    assert load_config("ci", ["vae.batch_size=9", "pretrain.batch_size=9", "finetune.batch_size=9", "distill.batch_size=9",
                                "sft.batch_size=9", "controller_sft.batch_size=9"]).pretrain.batch_size == 9


def test_ranks_draw_disjoint_slices_of_one_seeded_global_batch(tmp_path):
    cfg = ci(tmp_path)
    src = loop.PromptSource(4, cfg.pretrain.tier_weights, cfg.pretrain.prompt_pool, cfg.pretrain.seed)
    whole = loop.draw_rows(cfg.pretrain, src, 4, 7, 0, 8, 0.1).batch
    halves = [loop.draw_rows(cfg.pretrain, src, 4, 7, lo, lo + 4, 0.1).batch for lo in (0, 4)]
    assert whole.texts == halves[0].texts + halves[1].texts
    assert np.array_equal(whole.x0, np.concatenate([h.x0 for h in halves]))
    assert loop.draw_rows(cfg.pretrain, src, 4, 8, 0, 8, 0.1).batch.texts != whole.texts  # another step, other samples


def test_zero3_on_two_ranks_gathers_a_whole_final_folder(tmp_path, one_rank):
    """ZeRO-3 shards the parameters themselves; final/ is still the whole diffusers model, gathered."""
    out = tmp_path / "pre"
    run_ok(pretrain_cmd(out, 2, "engine.zero_stage=3"))
    assert max_diff(weights(out / "final"), one_rank) <= TOL
    assert len(list((out / "checkpoints" / "step-000004" / "ds").glob("zero_pp_rank_*_model_states.pt"))) == 2


def test_a_run_refuses_a_folder_it_did_not_make(tmp_path):
    """pretrain.out / distill.out holding someone's files: refused before any work, nothing touched. A folder
    of an earlier run (its own files only, as before markers existed) is taken, and marked."""
    from clvr.errors import ClvrError
    from clvr.io import MARKER, owner_of

    mine = tmp_path / "notes"
    mine.mkdir()
    (mine / "final").mkdir()
    (mine / "final" / "thesis.tex").write_text("years of work")
    for section in ("pretrain", "distill"):
        with pytest.raises(ClvrError, match=f"{section}.out '.*notes' is not empty"):
            getattr({"pretrain": pretrain, "distill": distill}[section], "run")(
                load_config("ci", [f"{section}.out={mine}"]))
    assert sorted(p.name for p in mine.rglob("*")) == ["final", "thesis.tex"]

    earlier = tmp_path / "earlier"
    (earlier / "checkpoints").mkdir(parents=True)
    (earlier / "metrics.jsonl").write_text("")
    loop.claim_run_dir(earlier, "world pretrain", "pretrain.out")
    assert owner_of(earlier) == "world pretrain" and (earlier / MARKER).is_file()
    with pytest.raises(ClvrError, match="made by `clvr world pretrain`"):
        loop.claim_run_dir(earlier, "world distill", "distill.out")
