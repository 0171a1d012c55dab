"""Pretrain the world generator (`clvr world pretrain`): flow matching with clean-image (x0) prediction.

Per sample: x_t = (1 - t) x0 + t eps, t ~ logit-normal with 15 % at t = 1 (the first sampling step, where
the edit gate is read); or, with `pretrain.train_sigmas` = k, t uniform over the k sigmas of a k-step sampler
(the naive baseline "base trained at 4 steps" of a distilled student, k = 4). Loss = MSE of the x0 prediction, `changed_weight` x on edited cells
+ `gate_weight` x BCE of the gate against the changed cells. Text dropout trains the unconditional branch for CFG.
Runs on the training engine (clvr.train.engine) through the one loop in clvr.train.loop.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from clvr.config import Config
from clvr.models.pipeline import Cond, WorldPipeline
from clvr.train.data import batch_tokens
from clvr.train.engine import Engine
from clvr.train.loop import Rows, Trainer

EVAL_TIERS = [1, 2, 3]


def build_pipeline(cfg: Config, init: str = "", seed: int | None = None) -> WorldPipeline:
    """From scratch at cfg.generator's sizes (weights seeded by `seed`, default pretrain.seed), or from a checkpoint
    ("base" = the shipped base weights)."""
    if init:
        from clvr.models.backend import load_pipeline

        return load_pipeline(init)
    g = cfg.generator
    vae = None
    if g.vae:
        from clvr.models.vae import load_cell_vae

        vae = load_cell_vae(g.vae, "generator.vae")
    return WorldPipeline.from_sizes(g.hidden, g.heads, g.double_layers, g.single_layers, g.text_hidden,
                                    g.text_layers, g.max_text_len, cfg.world.grid, cfg.world.cell,
                                    seed=cfg.pretrain.seed if seed is None else seed, default_steps=cfg.sample.steps,
                                    default_guidance=cfg.sample.guidance, cell_slots=g.cell_slots,
                                    head_width=g.head_width, vae=vae)


def noise(rows: Rows, shape: tuple[int, int], t_of: callable) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample (t, eps), both from each sample's own RNG: t_of(rng) -> float; eps ~ N(0, 1) of `shape`
    from a torch generator seeded by that RNG (torch draws normals ~2.5x faster than numpy)."""
    t = np.array([t_of(r) for r in rows.rngs], np.float32)
    seeds = [int(r.integers(2**62)) for r in rows.rngs]
    eps = torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(s)) for s in seeds])
    return torch.from_numpy(t), eps


def logit_normal_t(rng: np.random.Generator) -> float:
    """t = sigmoid(N(0, 1)), or exactly 1 with probability 0.15 (the first sampling step)."""
    z, u = rng.standard_normal(), rng.random()
    return 1.0 if u < 0.15 else float(1 / (1 + np.exp(-z)))


def sampler_sigmas(sched_config: dict, n: int) -> torch.Tensor:
    """(n + 1,) the sigmas `WorldPipeline.sample` visits at n steps, ending at 0."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    sched = FlowMatchEulerDiscreteScheduler.from_config(sched_config)
    sched.set_timesteps(n)
    return sched.sigmas.float()


def weighted_x0_loss(engine: Engine, new: torch.Tensor, target: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """This rank's share of sum(w * mse) / sum(w) over the global batch, times the world size (DeepSpeed
    averages gradients over ranks). With one rank: the plain weighted mean."""
    num = (w * ((new.float() - target) ** 2).mean(-1)).sum()
    den = engine.all_sum(w.sum())
    return num / den * engine.world


class PretrainLoss:
    """`section`: where the loss weights (changed_weight, gate_weight, train_sigmas) come from; default pretrain."""

    def __init__(self, cfg: Config, section=None):
        self.cfg, self.grid, self.s = cfg, None, section or cfg.pretrain

    def t_of(self, pipe: WorldPipeline) -> callable:
        """t's distribution: logit-normal, or (train_sigmas = k) uniform over the k sigmas of pipe's sampler."""
        k = self.s.train_sigmas
        if not k:
            return logit_normal_t
        if self.grid is None:
            self.grid = sampler_sigmas(pipe.scheduler.config, k)[:k].tolist()
        return lambda r: float(self.grid[r.integers(k)])

    def __call__(self, engine: Engine, pipe: WorldPipeline, rows: Rows) -> tuple[torch.Tensor, dict[str, float]]:
        b, p, dev = rows.batch, self.s, engine.to_device
        x0, ref, changed = batch_tokens(b, self.cfg.world.grid, self.cfg.world.cell)
        x0, ref = pipe.encode_cells(x0), pipe.encode_cells(ref)
        region = torch.from_numpy(b.region)
        t, eps = noise(rows, tuple(x0.shape[1:]), self.t_of(pipe))
        x_t = (1 - t[:, None, None]) * x0 + t[:, None, None] * eps
        new, gate = pipe.predict(dev(x_t), dev(t), Cond(dev(ref), dev(region), pipe.encode_text(b.texts, b.parts)))
        x0, changed = x0.to(new.device), changed.to(new.device)
        w = 1 + (p.changed_weight - 1) * changed
        loss_x = weighted_x0_loss(engine, new, x0, w)
        loss_g = F.binary_cross_entropy_with_logits(gate.float(), changed)
        gate_acc = ((gate > 0) == (changed > 0.5)).float().mean()
        return loss_x + p.gate_weight * loss_g, {"loss_x0": loss_x.item(), "loss_gate": loss_g.item(),
                                                 "gate_acc": gate_acc.item()}


def trainer(cfg: Config, out: Path | None, section: str = "pretrain", init: str | None = None) -> Trainer:
    """The pretrain trainer on config section `section` (pretrain, or finetune: a PretrainCfg too), starting from
    `init` (None = the section's own `init`)."""
    s = getattr(cfg, section)
    start = s.init if init is None else init

    def build(resume: Path | None) -> WorldPipeline:
        return build_pipeline(cfg, str(resume / "model") if resume else start, seed=s.seed)

    def evaluate(pipe: WorldPipeline) -> dict[str, float]:
        from clvr.train.bench import quick_eval

        return quick_eval(pipe, s.eval_trials, s.eval_steps, 1.0, EVAL_TIERS, appearance=cfg.world.appearance)

    return Trainer(section, cfg, s, build, PretrainLoss(cfg, s), evaluate, out, text_dropout=s.text_dropout)


def run(cfg: Config, section: str = "pretrain", init: str | None = None) -> dict:
    s = getattr(cfg, section)
    torch.set_num_threads(s.threads)
    return trainer(cfg, Path(s.out), section, init).fit()
