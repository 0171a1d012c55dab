"""Pretrain the world generator (`clvr world pretrain`): flow matching with clean-image (x0) prediction.

Per sample: x_t = (1 - t) x0 + t eps, t ~ logit-normal with 15 % at t = 1 (the first sampling step, where
the edit gate is read). Loss = MSE of the x0 prediction, `changed_weight` x on edited cells
+ `gate_weight` x BCE of the gate against the changed cells. Text dropout trains the unconditional branch for CFG.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from clvr.config import Config, to_dict
from clvr.io import atomic_dir
from clvr.models.pipeline import Cond, WorldPipeline
from clvr.train import ckpt
from clvr.train.data import PromptSource, sample_batch, tokens

EVAL_TIERS = [1, 2, 3]


def build_pipeline(cfg: Config, init: str = "") -> WorldPipeline:
    """From scratch at cfg.generator's sizes, or from a checkpoint ("base" = the shipped base weights)."""
    if init:
        from clvr.models.backend import load_pipeline

        return load_pipeline(init)
    g = cfg.generator
    return WorldPipeline.from_sizes(g.hidden, g.heads, g.double_layers, g.single_layers, g.text_hidden,
                                    g.text_layers, g.max_text_len, cfg.world.grid, cfg.world.cell,
                                    seed=cfg.pretrain.seed, default_steps=cfg.sample.steps,
                                    default_guidance=cfg.sample.guidance)


class Trainer:
    """One training run: model, optimizer, RNGs, step counter; resumes from the newest checkpoint in `out`."""

    stage = "pretrain"

    def __init__(self, cfg: Config, out: Path | None):
        self.cfg, self.out = cfg, out
        self.scfg = getattr(cfg, self.stage)
        self.step = 0
        self.rng = np.random.default_rng(self.scfg.seed)
        self.gen = torch.Generator().manual_seed(self.scfg.seed)
        self.prompts = PromptSource(cfg.world.grid, cfg.pretrain.tier_weights, cfg.pretrain.prompt_pool,
                                    cfg.pretrain.seed)
        resume = ckpt.latest(out) if out is not None else None
        self.pipe = self.build(resume)
        self.params = [p for m in (self.pipe.transformer, self.pipe.text_encoder) for p in m.parameters()]
        self.opt = torch.optim.AdamW(self.params, lr=self.scfg.lr, betas=(0.9, 0.99),
                                     weight_decay=getattr(self.scfg, "weight_decay", 0.0))
        if resume is not None:
            self.step = ckpt.load_checkpoint(resume, self.opt, self.rng, self.gen)["step"]
        self.pipe.transformer.train(), self.pipe.text_encoder.train()

    def build(self, resume: Path | None) -> WorldPipeline:
        return build_pipeline(self.cfg, str(resume / "model") if resume else self.cfg.pretrain.init)

    def lr_at(self, step: int) -> float:
        s = self.scfg
        if step < s.warmup:
            return s.lr * (step + 1) / s.warmup
        frac = (step - s.warmup) / max(1, s.steps - s.warmup)
        floor = getattr(s, "min_lr_frac", 0.1)
        return s.lr * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, frac))))

    def batch(self, text_dropout: float | None = None):
        p = self.cfg.pretrain
        return sample_batch(self.rng, self.scfg.batch_size, self.cfg.world.grid, p.edit_frac, p.grounded_frac,
                            p.text_dropout if text_dropout is None else text_dropout, p.max_objects, self.prompts,
                            op_probs=tuple(p.op_probs))

    def sample_t(self, n: int) -> torch.Tensor:
        t = torch.sigmoid(torch.randn(n, generator=self.gen))
        return torch.where(torch.rand(n, generator=self.gen) < 0.15, torch.ones(n), t)

    def loss(self) -> tuple[torch.Tensor, dict[str, float]]:
        b, cell = self.batch(), self.cfg.world.cell
        x0, ref = tokens(b.x0, cell), tokens(b.ref, cell)
        changed, region = torch.from_numpy(b.changed), torch.from_numpy(b.region)
        t = self.sample_t(len(b.texts))
        x_t = (1 - t[:, None, None]) * x0 + t[:, None, None] * torch.randn(x0.shape, generator=self.gen)
        new, gate = self.pipe.predict(x_t, t, Cond(ref, region, self.pipe.encode_text(b.texts)))
        w = 1 + (self.cfg.pretrain.changed_weight - 1) * changed
        loss_x = (w * ((new - x0) ** 2).mean(-1)).sum() / w.sum()
        loss_g = F.binary_cross_entropy_with_logits(gate, changed)
        gate_acc = ((gate > 0) == (changed > 0.5)).float().mean()
        return loss_x + self.cfg.pretrain.gate_weight * loss_g, {"loss_x0": loss_x.item(), "loss_gate": loss_g.item(),
                                                                  "gate_acc": gate_acc.item()}

    def train_step(self) -> dict[str, float]:
        for g in self.opt.param_groups:
            g["lr"] = self.lr_at(self.step)
        loss, stats = self.loss()
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        gn = torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.opt.step()
        self.step += 1
        return {"loss": loss.item(), **stats, "grad_norm": float(gn), "lr": self.opt.param_groups[0]["lr"]}

    def evaluate(self) -> dict[str, float]:
        from clvr.train.bench import quick_eval

        p = self.cfg.pretrain
        return quick_eval(self.pipe, self.scfg.eval_trials, p.eval_steps, 1.0, EVAL_TIERS)

    def save(self) -> None:
        ckpt.save_checkpoint(self.out, self.step, self.pipe, self.opt, self.rng, self.gen,
                             {"config": to_dict(self.cfg)})

    def fit(self) -> dict:
        """Train to scfg.steps (from wherever the last checkpoint left off); write final/ and metrics.json."""
        s, out = self.scfg, self.out
        log = ckpt.MetricsLog(out / "metrics.jsonl", self.step)
        t0, n0, last, ev = time.perf_counter(), self.step, {}, {}
        bar = tqdm(total=s.steps, initial=self.step, desc=self.stage, dynamic_ncols=True, mininterval=2)
        while self.step < s.steps:
            stats = self.train_step()
            bar.update(1)
            if self.step % s.log_every == 0 or self.step == s.steps:
                sps = (self.step - n0) * s.batch_size / (time.perf_counter() - t0)
                last = {**stats, "samples_per_s": sps}
                log.log(self.step, "train", **last)
                bar.set_postfix(loss=f"{stats['loss']:.4f}", sps=f"{sps:.0f}")
            if self.step % s.eval_every == 0 or self.step == s.steps:
                ev = self.evaluate()
                log.log(self.step, "eval", **ev)
                bar.write(f"[{self.stage} step {self.step}] " + " ".join(f"{k}={v:.3f}" for k, v in ev.items()))
            if self.step % s.ckpt_every == 0 or self.step == s.steps:
                self.save()
        bar.close()
        final = atomic_dir(out / "final", lambda d: self.pipe.save_pretrained(d))
        metrics = {**{f"train_{k}": float(v) for k, v in last.items()}, **{f"eval_{k}": float(v) for k, v in ev.items()},
                   "steps": float(self.step), "wall_s_this_run": time.perf_counter() - t0}
        ckpt.write_json(out / "metrics.json", metrics)
        return {"metrics": metrics, "final": str(final)}


def run(cfg: Config) -> dict:
    torch.set_num_threads(cfg.pretrain.threads)
    out = Path(cfg.pretrain.out)
    out.mkdir(parents=True, exist_ok=True)
    return Trainer(cfg, out).fit()
