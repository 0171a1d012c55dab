"""Trajectory SFT of the generator (`clvr world sft`, the `sft` stage): coarse steps in one call.

Starts from a released generator (`sft.init`, default the shipped base) and fine-tunes it on the engine
(clvr.train.loop.Trainer: DeepSpeed, resumable checkpoints, metrics.jsonl) with the pretraining loss
(clvr.train.pretrain.PretrainLoss, weights from the `sft` section). The model gets cell slots first
(`sft.cell_slots`, clvr.models.pipeline): the ops of a multi-op step are bound to their cells through the
rotary position ids, no new parameters.

Data, per sample (each from its own RNG, as every trainer's): with `sft.data` given, a data-engine example
(`clvr.trajectories.load_examples`: reference canvas, trace, step -> the verified target canvas) with
probability `data_frac`; else a sample made on the fly: a grounded multi-op edit (`multi_frac`), a layout
text-to-image (`layout_frac`), or today's pretraining sample (the guard against forgetting).

Modes (`sft.mode`):
* full: the transformer and the text encoder are trained.
* lora: a peft `LoraConfig` on the transformer's attention and MLP projections (`lora_targets`); the text
  encoder and the base weights stay frozen. A model folder (checkpoint `model/`, `final/`) is the merged
  diffusers pipeline, with the adapter in peft format beside the components in `adapter/`
  (`peft.PeftModel.from_pretrained(base_transformer, "<folder>/adapter")` reads it).
A resumed run rebuilds the model from `sft.init` and restores every trained weight from the checkpoint.
"""

from __future__ import annotations

import copy
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from clvr.config import Config
from clvr.errors import ClvrError
from clvr.io import load_png
from clvr.models.pipeline import WorldPipeline
from clvr.train.data import Batch, MultiMix, join_text, sample_batch
from clvr.train.loop import Trainer
from clvr.train.pretrain import PretrainLoss

ADAPTER = "adapter"  # the peft adapter's folder inside a LoRA run's model folders
# the transformer's attention and MLP projections (Flux2 double-stream and single-stream blocks)
LORA_LEAVES = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
               "to_qkv_mlp_proj", "linear_in", "linear_out")
EVAL_KS = (2, 4, 8)


def lora_targets(transformer: torch.nn.Module) -> list[str]:
    """Names of the Linear layers a LoRA adapts: attention and MLP projections of every transformer block (a
    single-stream block's `attn.to_out` included; the embedders, modulations and output projection not)."""
    out = []
    for name, m in transformer.named_modules():
        if not isinstance(m, torch.nn.Linear) or "transformer_blocks." not in name:
            continue
        if name.endswith(tuple("." + leaf for leaf in LORA_LEAVES)) or (
                name.startswith("single_transformer_blocks.") and name.endswith(".attn.to_out")):
            out.append(name)
    return out


def add_lora(pipe: WorldPipeline, rank: int, alpha: float, seed: int = 0):
    """Wrap the transformer with a peft LoRA (in place: pipe.transformer computes with it) -> the PeftModel.
    Freezes the text encoder. The adapter's random init comes from `seed` (a run is reproducible)."""
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, target_modules=lora_targets(pipe.transformer))
    pipe.text_encoder.requires_grad_(False)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return get_peft_model(pipe.transformer, cfg)


def merged_pipeline(pipe: WorldPipeline, peft_model) -> WorldPipeline:
    """A plain pipeline with the LoRA merged into a copy of the transformer (the live model is untouched)."""
    tr = copy.deepcopy(peft_model).merge_and_unload()
    return WorldPipeline(tr, pipe.text_encoder, pipe.tokenizer, pipe.scheduler, **_pipe_kwargs(pipe))


def _pipe_kwargs(pipe: WorldPipeline) -> dict:
    c = pipe.config
    return dict(grid=c.grid, cell=c.cell, max_text_len=c.max_text_len, default_steps=c.default_steps,
                default_guidance=c.default_guidance, cell_slots=c.cell_slots)


def build(cfg: Config) -> WorldPipeline:
    """The init model (`sft.init`), with cell slots turned on when `sft.cell_slots`."""
    from clvr.models.backend import load_pipeline

    s = cfg.sft
    pipe = load_pipeline(s.init)
    if (pipe.config.grid, pipe.config.cell) != (cfg.world.grid, cfg.world.cell):
        raise ClvrError(f"sft.init '{s.init}' is a {pipe.config.grid}x{pipe.config.grid} grid of {pipe.config.cell} px "
                        f"cells; world is {cfg.world.grid}x{cfg.world.grid} of {cfg.world.cell} px")
    if s.cell_slots and not pipe.config.cell_slots:
        pipe.use_cell_slots(s.max_text_len)
    elif s.max_text_len:
        pipe.register_to_config(max_text_len=s.max_text_len)
        pipe.tokenizer.model_max_length = s.max_text_len
    return pipe


@lru_cache(maxsize=4096)
def _png(path: Path) -> np.ndarray:
    return load_png(path)


def example_batch(ex, grid: int, cell: int, text_dropout: float, rng: np.random.Generator) -> Batch:
    """One data-engine example as a one-row batch (its canvases as images; regions = the step's cells)."""
    ref, tgt = _png(Path(ex.reference)), _png(Path(ex.target))
    side = grid * cell
    for p, im in ((ex.reference, ref), (ex.target, tgt)):
        if im.shape != (side, side, 3):
            raise ClvrError(f"example image {p} is {im.shape[1]}x{im.shape[0]}, not the world's {side}x{side}")
    region = np.zeros((1, grid * grid), np.float32)
    generate = ex.step.op == "generate"
    if not generate:
        for r, c in ex.step.regions():
            region[0, r * grid + c] = 1.0
    drop = rng.random() < text_dropout
    text = "" if drop else join_text(list(ex.trace), ex.step.instruction())
    zeros = np.zeros((1, grid * grid), np.int64)
    return Batch(zeros, zeros.copy(), region, np.zeros((1, grid * grid), np.float32), [text],
                 np.array([not generate]), [() if drop or generate else ex.step.parts()], [(ref, tgt)])


def evaluate(cfg: Config, pipe: WorldPipeline) -> dict[str, float]:
    """Single-op edits and single-step text-to-image (as pretrain), and multi-op step success at EVAL_KS."""
    from clvr.models.backend import WorldGenerator
    from clvr.train.bench import multi_op_success, quick_eval
    from clvr.train.pretrain import EVAL_TIERS

    s, g, c = cfg.sft, cfg.world.grid, cfg.world.cell
    out = quick_eval(pipe, s.eval_trials, s.eval_steps, 1.0, EVAL_TIERS, appearance=cfg.world.appearance)
    was = pipe.transformer.training
    pipe.transformer.eval()
    ks = [k for k in EVAL_KS if 2 * k <= g * g]
    multi = multi_op_success(WorldGenerator(pipe, s.eval_steps, 1.0), ks, s.eval_trials, g, c,
                             appearance=cfg.world.appearance)
    pipe.transformer.train(was)
    return {**out, **{f"multi_k{k}": v for k, v in multi.items()}}


def trainer(cfg: Config, out: Path | None) -> Trainer:
    s = cfg.sft
    examples = []
    if s.data:
        from clvr.trajectories import load_examples

        examples = load_examples(s.data)
        if not examples:
            raise ClvrError(f"sft.data '{s.data}' holds no training examples (no kept step of an accepted trajectory)")
    mix = MultiMix(s.multi_frac, s.max_k, s.layout_frac, s.max_layout)
    g, cell = cfg.world.grid, cfg.world.cell
    lora: dict = {}

    def build_pipe(resume: Path | None) -> WorldPipeline:
        pipe = build(cfg)  # a resume restores the trained weights from the checkpoint (Engine.load)
        if s.mode == "lora":
            lora["model"] = add_lora(pipe, s.lora_rank, s.lora_alpha, s.seed)
        return pipe

    def modules(pipe: WorldPipeline) -> dict[str, torch.nn.Module]:
        if s.mode == "lora":
            return {"transformer": lora["model"]}
        return {"transformer": pipe.transformer, "text_encoder": pipe.text_encoder}

    def save_model(pipe: WorldPipeline, d: Path) -> None:
        if s.mode == "full":
            pipe.save_pretrained(d)
            return
        merged_pipeline(pipe, lora["model"]).save_pretrained(d)
        lora["model"].save_pretrained(Path(d) / ADAPTER)

    def draw(rng: np.random.Generator) -> Batch:
        if examples and rng.random() < s.data_frac:
            return example_batch(examples[int(rng.integers(len(examples)))], g, cell, s.text_dropout, rng)
        return sample_batch(rng, 1, g, s.edit_frac, s.grounded_frac, s.text_dropout, s.max_objects, tr.prompts,
                            op_probs=tuple(s.op_probs), multi=mix)

    tr = Trainer("sft", cfg, s, build_pipe, PretrainLoss(cfg, s), lambda pipe: evaluate(cfg, pipe), out,
                 text_dropout=s.text_dropout, draw=draw, modules=modules, save_model=save_model)
    return tr


def run(cfg: Config) -> dict:
    torch.set_num_threads(cfg.sft.threads)
    return trainer(cfg, Path(cfg.sft.out)).fit()
