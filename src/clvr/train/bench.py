"""Generator evaluation and the `clvr world bench-generator` benchmark.

* per-edit success: a random reference canvas (+ the trace of adds that built it), one grounded edit step
  (as the loop sends it: `Step.instruction()` + `Step.regions()`); success = the detected scene of the output
  equals `step.apply(reference scene)` exactly (the edit done, nothing else changed).
* single-step pass per tier: a grammar prompt of that tier, text-to-image in one call, judged by the world judge.
* multi-op step success by k: a random reference canvas, one grounded `Step(op="edit")` of k mixed ops (add,
  remove, recolor, move on distinct cells; `clvr.train.data.random_multi_edit`); success as for a single edit.
* layout text-to-image success by object count: one grounded step of that many adds on a blank canvas.

`bench-generator` rows: `base_28_cfg` (base at `sample.steps` + CFG), `base_4` (the same base at
`sample.distilled_steps` without CFG: what distillation must beat) and `distilled_4`, plus `sft` (the SFT model at
its recorded default sampling) and `sft_4` (at `sample.distilled_steps` without CFG) when one is given. With a
varied `world.appearance`, reference canvases are drawn with random looks.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from clvr.generator import GenRequest
from clvr.train.data import EDIT_OPS, random_edit, random_multi_edit
from clvr.world.detector import detect, to_scene
from clvr.world.render import render, vary


def step_requests(draw, rng: np.random.Generator, n: int, cell: int, seed: int, appearance=None):
    """n grounded requests as the loop sends them (reference canvas, the trace of adds that built it, one step)
    and the scenes they should give; `draw(rng)` -> (reference scene, step, adds)."""
    reqs, targets = [], []
    for i in range(n):
        scene, step, adds = draw(rng)
        scene = vary(scene, rng, appearance)
        reqs.append(GenRequest(step.instruction(), [a.instruction() for a in adds], render(scene, cell),
                               step.regions(), seed=seed * 1000 + i, step=step))
        targets.append(step.apply(scene))
    return reqs, targets


def edit_requests(op: str, n: int, grid: int, cell: int, seed: int, max_objects: int = 10, appearance=None):
    rng = np.random.default_rng([seed, EDIT_OPS.index(op)])
    return step_requests(lambda r: random_edit(r, grid, max_objects, op), rng, n, cell, seed, appearance)


def multi_requests(k: int, n: int, grid: int, cell: int, seed: int, max_objects: int = 10, appearance=None):
    """n grounded multi-op steps of k mixed ops (as the loop sends them) and the scenes they should give."""
    rng = np.random.default_rng([seed, 100 + k])
    return step_requests(lambda r: random_multi_edit(r, grid, k, max_objects), rng, n, cell, seed, appearance)


def layout_requests(n_objects: int, n: int, grid: int, cell: int, seed: int):
    """n layout text-to-image steps: one grounded multi-op step of `n_objects` adds on a blank canvas."""
    rng = np.random.default_rng([seed, 200 + n_objects])
    return step_requests(lambda r: random_multi_edit(r, grid, n_objects, 0, (1.0, 0.0, 0.0, 0.0), n_objects=0),
                         rng, n, cell, seed)


def success_rate(gen, requests: tuple[list, list], grid: int) -> float:
    """Share of (request, target scene) pairs whose output the detector reads as exactly the target scene."""
    reqs, targets = requests
    res = gen.generate_batch(reqs)
    return float(np.mean([to_scene(detect(r.image, grid), grid) == t for r, t in zip(res, targets)]))


def layout_success(gen, sizes, n: int, grid: int, cell: int, seed: int = 1234) -> dict[str, float]:
    """Layout text-to-image success per object count (keys "4", "8", ...): every object drawn where the step
    puts it, nothing else."""
    return {str(k): success_rate(gen, layout_requests(k, n, grid, cell, seed), grid) for k in sizes}


def multi_op_success(gen, ks, n: int, grid: int, cell: int, seed: int = 1234, appearance=None) -> dict[str, float]:
    """Multi-op step success per k (keys "1", "2", ...)."""
    return {str(k): success_rate(gen, multi_requests(k, n, grid, cell, seed, appearance=appearance), grid)
            for k in ks}


def edit_success(gen, n: int, grid: int, cell: int, seed: int = 1234, appearance=None) -> dict[str, float]:
    return {op: success_rate(gen, edit_requests(op, n, grid, cell, seed, appearance=appearance), grid)
            for op in EDIT_OPS}


def tier_prompts(tier: int, n: int, grid: int, seed: int) -> list[dict]:
    from clvr.world.grammar import sample_prompt

    rng = np.random.default_rng([seed, tier])
    return [sample_prompt(tier, rng, grid=grid) for _ in range(n)]


def single_step_pass(gen, n: int, grid: int, tiers: range | list[int], seed: int = 4321) -> dict[str, float]:
    """Pass rate per tier (keys "1".."10"); {} when the world grammar is not installed."""
    try:
        from clvr.judge import judge_image  # noqa: F401  (the guard: is the world's judge installed)
        tier_prompts(1, 1, grid, seed)
    except ImportError:
        return {}
    return {str(tier): float(single_step_outcomes(gen, tier_prompts(tier, n, grid, seed), seed).mean())
            for tier in tiers}


def single_step_outcomes(gen, metas: list[dict], seed: int) -> np.ndarray:
    """(len(metas),) bool: whether the judge passes each prompt's single text-to-image call (prompt i on noise seed
    `seed` + i, so two generators given the same prompts and seed are compared sample for sample)."""
    from clvr.judge import judge_image

    res = gen.generate_batch([GenRequest(m["prompt"], seed=seed + i) for i, m in enumerate(metas)])
    return np.array([judge_image(m, r.image)[0] for m, r in zip(metas, res)], bool)


def quick_eval(pipe, trials: int, steps: int, guidance: float, tiers: list[int], seed: int = 99,
               appearance=None, edit_guidance: float = 0.0) -> dict[str, float]:
    """The in-training evaluation: flat metrics {edit_<op>, edit_mean, single_tier<k>}; edits at CFG
    `edit_guidance` when it is not 0 (a distillation teacher's other scale on edits)."""
    from clvr.models.backend import WorldGenerator

    was_training = pipe.transformer.training
    pipe.transformer.eval(), pipe.text_encoder.eval()
    gen = WorldGenerator(pipe, steps, guidance)
    g, c = pipe.config.grid, pipe.config.cell
    es = edit_success(WorldGenerator(pipe, steps, edit_guidance) if edit_guidance else gen, trials, g, c, seed,
                      appearance)
    out = {f"edit_{k}": v for k, v in es.items()}
    out["edit_mean"] = float(np.mean(list(es.values())))
    out.update({f"single_tier{k}": v for k, v in single_step_pass(gen, trials, g, tiers, seed).items()})
    if was_training:
        pipe.transformer.train(), pipe.text_encoder.train()
    return out


def ms_per_image(gen, n: int, grid: int, cell: int, batch: int = 64) -> float:
    reqs, _ = edit_requests("add", n, grid, cell, seed=777)
    gen.generate_batch(reqs[:4])  # warm-up
    t = time.perf_counter()
    for i in range(0, n, batch):
        gen.generate_batch(reqs[i:i + batch])
    return 1000 * (time.perf_counter() - t) / n


def train_samples_per_s(cfg, seconds: float = 10.0) -> float:
    """Throughput of the pretrain step (data + forward + backward + optimiser) at cfg's model size/batch."""
    from clvr.train.pretrain import trainer

    tr = trainer(cfg, out=None)
    tr.train_step()  # warm-up
    n, t = 0, time.perf_counter()
    while time.perf_counter() - t < seconds:
        tr.train_step()
        n += cfg.pretrain.batch_size
    return n / (time.perf_counter() - t)


MULTI_KS = (1, 2, 3, 4, 6, 8)
LAYOUT_SIZES = (4, 8, 12)


def run_bench(cfg, base: str = "base", distilled: str = "distilled", trials: int = 100, prompts: int = 50,
              tiers: int = 10, seed: int = 1234, sft: str | None = None, multi_trials: int | None = None,
              speed: bool = True) -> dict:
    """`sft`: an SFT model folder, benchmarked beside base and distilled; `multi_trials`: steps per k (default
    `trials`); `speed`: also time training and sampling."""
    from clvr.models.backend import WorldGenerator, load_pipeline

    torch.manual_seed(0)
    g, c, app = cfg.world.grid, cfg.world.cell, cfg.world.appearance
    base_pipe, dist_pipe = load_pipeline(base), load_pipeline(distilled)
    gens = {"base_28_cfg": WorldGenerator(base_pipe, cfg.sample.steps, cfg.sample.guidance),
            "base_4": WorldGenerator(base_pipe, cfg.sample.distilled_steps, 1.0),
            "distilled_4": WorldGenerator(dist_pipe, cfg.sample.distilled_steps, 1.0)}
    if sft:
        sft_pipe = load_pipeline(sft)
        gens["sft"] = WorldGenerator(sft_pipe)
        gens["sft_4"] = WorldGenerator(sft_pipe, cfg.sample.distilled_steps, 1.0)
    params = sum(p.numel() for p in base_pipe.transformer.parameters()) + \
        sum(p.numel() for p in base_pipe.text_encoder.parameters())
    edits = {k: edit_success(gen, trials, g, c, seed, app) for k, gen in gens.items()}
    ks = [k for k in MULTI_KS if 2 * k <= g * g]
    multi = {k: multi_op_success(gen, ks, multi_trials or trials, g, c, seed, app) for k, gen in gens.items()}
    sizes = [k for k in LAYOUT_SIZES if k <= g * g]
    layout = {k: layout_success(gen, sizes, multi_trials or trials, g, c, seed) for k, gen in gens.items()}
    single = {k: single_step_pass(gen, prompts, g, range(1, tiers + 1), seed) for k, gen in gens.items()}
    eb, ed = edits["base_28_cfg"], edits["distilled_4"]
    out = {
        "params": params,
        "appearance": "varied" if app.varied else "fixed",
        "edit_trials": trials,
        "edit_success": edits,
        "distill_gap_max": max(abs(eb[k] - ed[k]) for k in eb),
        "multi_op_trials": multi_trials or trials,
        "multi_op_success": multi,
        "layout_success": layout,
        "single_step_prompts": prompts,
        "single_step_pass": single,
        "models": {"base": str(base), "distilled": str(distilled), **({"sft": str(sft)} if sft else {})},
    }
    if speed:
        out.update(train_samples_per_s=round(train_samples_per_s(cfg), 1),
                   ms_per_image_4=round(ms_per_image(gens["distilled_4"], 128, g, c), 2),
                   ms_per_image_28=round(ms_per_image(gens["base_28_cfg"], 128, g, c), 2))
    return out
