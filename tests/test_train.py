"""Training stages on the ci profile: a step learns, outputs are written, a killed run resumes exactly."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from clvr.config import load_config
from clvr.errors import ConfigError
from clvr.models import load_pipeline
from clvr.train import distill, pretrain
from clvr.train.data import EDIT_OPS, PromptSource, random_edit, sample_batch


def ci(tmp_path, *extra):
    return load_config("ci", [f"pretrain.out={tmp_path}/pre", f"distill.out={tmp_path}/dist", *extra])


def weights(path) -> dict[str, torch.Tensor]:
    p = load_pipeline(path)
    return {**{f"t.{k}": v for k, v in p.transformer.state_dict().items()},
            **{f"e.{k}": v for k, v in p.text_encoder.state_dict().items()}}


def test_one_training_step_changes_parameters(tmp_path):
    tr = pretrain.Trainer(ci(tmp_path), out=None)
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


def test_resume_after_interruption_continues_exactly(tmp_path, monkeypatch):
    straight = pretrain.run(ci(tmp_path / "a"))["final"]
    cfg = ci(tmp_path / "b")
    real_step = pretrain.Trainer.train_step

    def dying_step(self):  # the process dies during step 3, after the step-2 checkpoint
        if self.step == 2:
            raise KeyboardInterrupt
        return real_step(self)

    monkeypatch.setattr(pretrain.Trainer, "train_step", dying_step)
    with pytest.raises(KeyboardInterrupt):
        pretrain.run(cfg)
    assert not (tmp_path / "b" / "pre" / "final").exists()
    monkeypatch.setattr(pretrain.Trainer, "train_step", real_step)
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
