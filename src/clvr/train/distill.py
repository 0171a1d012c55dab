"""Distill the base into a 4-NFE student with guidance folded in (`clvr world distill`).

Method: guidance distillation at the student's own timesteps (Meng et al. 2023, "On distillation of guided
diffusion models", stage 1, restricted to the `nfe` sigmas the student will sample at). The student (same
architecture, initialised from the base, so Delta_distill = student - base is a meaningful weight delta for
the later merge) learns to output, in one evaluation without CFG, the teacher's guided x0 prediction
x0_u + w (x0_c - x0_u) and the teacher's gate, at x_t drawn from the forward process at those sigmas.

Why this method and not progressive distillation / consistency / reflow: the base predicts clean images
(x0) with one token per grid cell, and its 4-step samples are already close to its 28-step ones; what 4 NFE
without CFG loses is the guidance (2 NFE per step) and fidelity at the four coarse sigmas. Matching the guided
teacher exactly there closes that gap at 2 teacher NFE per sample, whereas progressive distillation needs
log2(28/4) rounds of teacher sampling and consistency/reflow need full teacher trajectories, each costing more
CPU than the whole pretrain.

Every setting comes from the `distill` section (its data mix and loss weights included); it runs on the
training engine through the same loop as pretrain. Each rank holds a frozen copy of the teacher.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import FlowMatchEulerDiscreteScheduler

from clvr.config import Config
from clvr.models.pipeline import Cond, WorldPipeline
from clvr.train import ckpt
from clvr.train.data import tokens
from clvr.train.engine import Engine
from clvr.train.loop import Rows, Trainer
from clvr.train.pretrain import EVAL_TIERS, noise, weighted_x0_loss


def teacher_path(cfg: Config) -> str:
    """cfg.distill.teacher, else <pretrain.out>/final if present, else the shipped base."""
    if cfg.distill.teacher:
        return cfg.distill.teacher
    final = Path(cfg.pretrain.out) / "final"
    return str(final) if (final / "model_index.json").is_file() else "base"


class DistillLoss:
    def __init__(self, cfg: Config, teacher: WorldPipeline, sigmas: torch.Tensor):
        self.cfg, self.teacher, self.sigmas = cfg, teacher, sigmas

    def __call__(self, engine: Engine, pipe: WorldPipeline, rows: Rows) -> tuple[torch.Tensor, dict[str, float]]:
        b, d, dev = rows.batch, self.cfg.distill, engine.to_device
        cell, w = self.cfg.world.cell, d.guidance
        x0, ref = tokens(b.x0, cell), tokens(b.ref, cell)
        region = torch.from_numpy(b.region)
        t, eps = noise(rows, tuple(x0.shape[1:]), lambda r: float(self.sigmas[r.integers(len(self.sigmas))]))
        x_t = (1 - t[:, None, None]) * x0 + t[:, None, None] * eps
        with torch.no_grad():
            tp = self.teacher
            cond = Cond(ref, region, tp.encode_text(b.texts))
            new_c, gate_c = tp.predict(x_t, t, cond)
            new_u, _ = tp.predict(x_t, t, cond, tp.encode_text([""] * len(b.texts)))
            target = new_u + w * (new_c - new_u)
            gate_t = torch.sigmoid(gate_c)
        new, gate = pipe.predict(dev(x_t), dev(t), Cond(dev(ref), dev(region), pipe.encode_text(b.texts)))
        target, gate_t = target.to(new.device), gate_t.to(new.device)
        wt = 1 + (d.changed_weight - 1) * torch.from_numpy(b.changed).to(new.device)
        loss_x = weighted_x0_loss(engine, new, target, wt)
        loss_g = F.binary_cross_entropy_with_logits(gate.float(), gate_t)
        return loss_x + d.gate_weight * loss_g, {"loss_x0": loss_x.item(), "loss_gate": loss_g.item()}


def trainer(cfg: Config, out: Path | None) -> Trainer:
    from clvr.models.backend import load_pipeline

    d = cfg.distill
    teacher = load_pipeline(teacher_path(cfg))
    teacher.transformer.requires_grad_(False), teacher.text_encoder.requires_grad_(False)
    sched = FlowMatchEulerDiscreteScheduler.from_config(teacher.scheduler.config)
    sched.set_timesteps(d.nfe)
    sigmas = sched.sigmas[:-1].float()  # the student's sampling sigmas, e.g. 1, .75, .5, .25

    def build(resume: Path | None) -> WorldPipeline:
        student = load_pipeline(resume / "model" if resume else teacher_path(cfg))
        student.register_to_config(default_steps=d.nfe, default_guidance=1.0)
        return student

    def evaluate(pipe: WorldPipeline) -> dict[str, float]:
        from clvr.train.bench import quick_eval

        return quick_eval(pipe, d.eval_trials, d.nfe, 1.0, EVAL_TIERS)

    tr = Trainer("distill", cfg, d, build, DistillLoss(cfg, teacher, sigmas), evaluate, out, text_dropout=0.0)
    if tr.engine.device.name != "cpu":  # the frozen teacher (fp32) sits beside the student on this rank's GPU
        teacher.to(tr.engine.ds.device)
    tr.teacher = teacher
    return tr


def run(cfg: Config) -> dict:
    """Student metrics at `nfe` (no CFG); the teacher's at `teacher_steps` + CFG once, for the gap."""
    from clvr.train.bench import quick_eval

    torch.set_num_threads(cfg.distill.threads)
    out = Path(cfg.distill.out)
    out.mkdir(parents=True, exist_ok=True)
    tr = trainer(cfg, out)
    res = tr.fit()
    if tr.engine.is_main:
        t0 = time.perf_counter()
        teach = quick_eval(tr.teacher, cfg.distill.eval_trials, cfg.distill.teacher_steps, cfg.distill.guidance,
                           EVAL_TIERS)
        m = res["metrics"]
        m.update({f"teacher_{k}": v for k, v in teach.items()})
        gaps = [abs(m[f"eval_{k}"] - v) for k, v in teach.items() if k.startswith("edit_") and f"eval_{k}" in m]
        if gaps:
            m["edit_gap_max"] = max(gaps)
        m["teacher_eval_s"] = time.perf_counter() - t0
        ckpt.write_json(out / "metrics.json", m)
    tr.engine.barrier()
    return {"metrics": ckpt.read_json(out / "metrics.json"), "final": res["final"]}
