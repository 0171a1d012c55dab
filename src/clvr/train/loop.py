"""The one training loop (nanoGPT-style) that pretrain and distill run on the engine, with a pluggable loss.

Data: sample i of global step s is drawn from its own RNG, `default_rng([seed, s, i])` (the data mix and the
noise of the loss). Rank r of W draws samples [r*B/W, (r+1)*B/W) of the global batch B, so the ranks draw
disjoint samples and N processes train on exactly the data of one; no RNG state needs saving for a resume.
A loss returns its rank's share scaled so that DeepSpeed's gradient average over ranks is the gradient of
the global-batch loss (`Loss` below).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Protocol

import numpy as np
import torch
from tqdm import tqdm

from clvr.config import Config, launcher_env, to_dict
from clvr.io import atomic_dir, claim_dir, mark_dir
from clvr.models.pipeline import WorldPipeline
from clvr.train import ckpt, engine as eng_mod
from clvr.train.data import Batch, PromptSource, sample_batch
from clvr.train.engine import Engine


@dataclass
class Rows:
    """One rank's samples of one global batch: the batch and each sample's own RNG (for its noise)."""

    batch: Batch
    rngs: list[np.random.Generator]
    step: int = 0  # the global step these samples belong to (a loss may change with it, e.g. distill rounds)


def draw_rows(section: Any, prompts: PromptSource, grid: int, step: int, lo: int, hi: int,
              text_dropout: float, draw: Callable[[np.random.Generator], Batch] | None = None) -> Rows:
    """Samples [lo, hi) of global batch `step`, each from default_rng([section.seed, step, i]). `draw(rng)`, when
    given, makes each sample instead (e.g. sft's mix with data-engine examples)."""
    rngs = [np.random.default_rng([section.seed, step, i]) for i in range(lo, hi)]
    draw = draw or (lambda r: sample_batch(r, 1, grid, section.edit_frac, section.grounded_frac, text_dropout,
                                           section.max_objects, prompts, op_probs=tuple(section.op_probs)))
    return Rows(cat_batches([draw(r) for r in rngs]), rngs, step)


def cat_batches(parts: list[Batch]) -> Batch:
    """Batches -> one batch (rows in order)."""
    cat = lambda k: np.concatenate([getattr(p, k) for p in parts])  # noqa: E731
    flat = lambda k: [x for p in parts for x in getattr(p, k)]  # noqa: E731
    return Batch(cat("x0"), cat("ref"), cat("region"), cat("changed"), flat("texts"), cat("edit"), flat("parts"),
                 flat("images"))


class Loss(Protocol):
    """loss(engine, pipe, rows) -> (this rank's loss, stats). The mean over ranks of the returned loss (and of
    each stat) is the global-batch value; normalisers that span the batch go through `engine.all_sum`. A loss
    with phases of its own (progressive distillation's rounds) may define `schedule(step) -> (step within its
    phase, the phase's steps)`, the lr schedule's clock; without it the schedule spans the whole run."""

    def __call__(self, engine: Engine, pipe: WorldPipeline, rows: Rows) -> tuple[torch.Tensor, dict[str, float]]:
        ...


# What a training run (and the pipeline stage around it) writes into its out dir; names starting with "." are
# temporary folders of interrupted writes and DVC's .gitignore.
RUN_FILES = {"checkpoints", "final", "rounds", "metrics.jsonl", "metrics.json", "curve.json", "stage.log"}


def looks_like_a_run(out: Path) -> bool:
    """An out dir written before markers existed: only run files, its final/ a model folder, its checkpoints/
    only step folders."""
    def ok(c: Path) -> bool:
        if c.name == "final":
            return (c / "model_index.json").is_file()
        if c.name == "checkpoints":
            return all(k.name.startswith(("step-", ".")) for k in c.iterdir())
        return c.name in RUN_FILES or c.name.startswith(".")

    return all(ok(c) for c in out.iterdir())


def claim_run_dir(out: Path, owner: str, key: str) -> None:
    """Before any work: `out` must be new, empty, or an earlier run of this trainer (its marker, or only run
    files), since the run writes checkpoints/ and final/ over what is there. Anything else is a ClvrError."""
    claim_dir(out, owner, legacy=looks_like_a_run, what=key)
    out.mkdir(parents=True, exist_ok=True)
    if launcher_env()[0] == 0:
        mark_dir(out, owner)


def lr_at(step: int, lr: float, warmup: int, steps: int, min_lr_frac: float) -> float:
    """Linear warm-up, then cosine decay to lr * min_lr_frac."""
    if step < warmup:
        return lr * (step + 1) / warmup
    frac = (step - warmup) / max(1, steps - warmup)
    return lr * (min_lr_frac + (1 - min_lr_frac) * 0.5 * (1 + math.cos(math.pi * min(1.0, frac))))


class Trainer:
    """One training run: a pipeline on the engine, a loss, an evaluation; resumes from the newest checkpoint
    in `out` (None: no checkpoints, no outputs, e.g. a benchmark)."""

    def __init__(self, name: str, cfg: Config, section: Any, build: Callable[[Path | None], WorldPipeline],
                 loss: Loss, evaluate: Callable[[WorldPipeline], dict[str, float]], out: Path | None,
                 text_dropout: float = 0.0, draw: Callable[[np.random.Generator], Batch] | None = None,
                 modules: Callable[[WorldPipeline], dict[str, torch.nn.Module]] | None = None,
                 save_model: Callable[[WorldPipeline, Path], None] | None = None):
        self.name, self.cfg, self.s, self.out = name, cfg, section, out
        if out is not None:
            claim_run_dir(out, f"world {name}", f"{name}.out")
        self.loss, self.evaluate_fn, self.text_dropout, self.draw = loss, evaluate, text_dropout, draw
        self.save_model = save_model or (lambda pipe, d: pipe.save_pretrained(d))
        self.prompts = PromptSource(cfg.world.grid, section.tier_weights, section.prompt_pool, section.seed,
                                    appearance=cfg.world.appearance)
        self.step = 0
        # join the ranks first: under a launcher, rank 0 may still be clearing a stale run's checkpoints
        # (stages.prepare_resume) when the others start
        if eng_mod.init_dist(eng_mod.pick_device(cfg.engine.precision))[1] > 1:
            eng_mod.dist.barrier()
        resume = eng_mod.latest(out) if out is not None else None
        self.pipe = build(resume)
        trained = modules(self.pipe) if modules else {"transformer": self.pipe.transformer,
                                                       "text_encoder": self.pipe.text_encoder}
        self.engine = Engine(trained, cfg.engine, section.batch_size, section.lr, section.weight_decay)
        if resume is not None:
            self.step = self.engine.load(resume)["step"]
        self.params = self.engine.params
        self.pipe.transformer.train(), self.pipe.text_encoder.train()

    def rows(self, step: int) -> Rows:
        """This rank's share of global batch `step`."""
        e = self.engine
        lo = e.rank * e.micro_batch
        return draw_rows(self.s, self.prompts, self.cfg.world.grid, step, lo, lo + e.micro_batch, self.text_dropout,
                         draw=self.draw)

    def train_step(self) -> dict[str, float]:
        s = self.s
        at, span = self.loss.schedule(self.step) if hasattr(self.loss, "schedule") else (self.step, s.steps)
        lr = lr_at(at, s.lr, s.warmup, span, s.min_lr_frac)
        self.engine.set_lr(lr)
        loss, stats = self.loss(self.engine, self.pipe, self.rows(self.step))
        gn = self.engine.step(loss)
        self.step += 1
        return {"loss": loss.item(), **stats, "grad_norm": gn, "lr": lr}

    def evaluate(self) -> dict[str, float]:
        """Rank 0 evaluates the whole model; the others wait. Under ZeRO-3 the live modules run collectives in
        every forward, so rank 0 evaluates a plain copy: the gathered weights saved to a temporary folder."""
        e = self.engine
        if e.ecfg.zero_stage < 3:
            ev = self.evaluate_fn(self.pipe) if e.is_main else {}
        else:
            import tempfile

            from clvr.models.backend import load_pipeline

            with tempfile.TemporaryDirectory(prefix="clvr-eval-") as d:
                with e.full_params():
                    if e.is_main:
                        self.save_model(self.pipe, d)
                ev = self.evaluate_fn(load_pipeline(d)) if e.is_main else {}
        e.barrier()
        return ev

    def save(self) -> None:
        self.engine.save(self.out, self.step, lambda d: self.save_model(self.pipe, d), {"config": to_dict(self.cfg)})

    def fit(self) -> dict:
        """Train to section.steps (from wherever the last checkpoint left off). Rank 0 writes metrics.jsonl,
        final/ and metrics.json; every rank returns rank 0's metrics."""
        s, out, e = self.s, self.out, self.engine
        main = e.is_main
        log = ckpt.MetricsLog(out / "metrics.jsonl", self.step) if main else None
        t0, n0, last, ev = time.perf_counter(), self.step, {}, {}
        bar = tqdm(total=s.steps, initial=self.step, desc=self.name, dynamic_ncols=True, mininterval=2,
                   disable=not main)
        while self.step < s.steps:
            stats = self.train_step()
            bar.update(1)
            if self.step % s.log_every == 0 or self.step == s.steps:
                stats = e.mean_stats(stats)
                sps = (self.step - n0) * s.batch_size / (time.perf_counter() - t0)
                last = {**stats, "samples_per_s": sps}
                if main:
                    log.log(self.step, "train", **last)
                    bar.set_postfix(loss=f"{stats['loss']:.4f}", sps=f"{sps:.0f}")
            if self.step % s.eval_every == 0 or self.step == s.steps:
                ev = self.evaluate()
                if main:
                    log.log(self.step, "eval", **ev)
                    bar.write(f"[{self.name} step {self.step}] " + " ".join(f"{k}={v:.3f}" for k, v in ev.items()))
            if self.step % s.ckpt_every == 0 or self.step == s.steps:
                self.save()
        bar.close()
        metrics = {**{f"train_{k}": float(v) for k, v in last.items()},
                   **{f"eval_{k}": float(v) for k, v in ev.items()},
                   "steps": float(self.step), "wall_s_this_run": time.perf_counter() - t0}
        with e.full_params():
            if main:
                atomic_dir(out / "final", lambda d: self.save_model(self.pipe, d))
                ckpt.write_json(out / "metrics.json", metrics)
        e.barrier()
        return {"metrics": ckpt.read_json(out / "metrics.json"), "final": str(out / "final")}
