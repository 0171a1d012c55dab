"""Typed configuration: one schema (the dataclasses below), YAML profiles in conf/, CLI overrides.

Resolution order: schema defaults < conf/base.yaml < conf/<profile>.yaml < `key=value` overrides.
An unknown key or a value of the wrong type raises `ConfigError` naming the key path and its source.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from clvr.errors import ConfigError


def need(ok: bool, key: str, rule: str, value: Any) -> None:
    """Range check of one config value: a ConfigError naming the key, the rule and the value."""
    if not ok:
        raise ConfigError(f"{key} must be {rule}, got {value!r}")


def need_all(section: object, name: str, keys: str, ok, rule: str) -> None:
    """`need(ok(value), ...)` for each of the space-separated `keys` of one section."""
    for key in keys.split():
        value = getattr(section, key)
        need(ok(value), f"{name}.{key}", rule, value)


def at_least(low: float):
    """A finite number >= low (NaN and inf fail every rule)."""
    return lambda v: math.isfinite(v) and v >= low


def positive(v: float) -> bool:
    return math.isfinite(v) and v > 0


def fraction(v: float) -> bool:
    return math.isfinite(v) and 0 <= v <= 1


DEVICE_RULE = "auto | cpu | cuda | cuda:N"


def is_device(v: str) -> bool:
    """A device a model section may name (DEVICE_RULE; clvr.registry.resolve_device resolves auto)."""
    return v in ("auto", "cpu", "cuda") or (v.startswith("cuda:") and v[5:].isdigit())


def nonempty(v: str) -> bool:
    return bool(str(v).strip())


MAX_SEED = 2**32 - 1  # numpy and torch both take seeds in 0..2**32-1


@dataclass
class AppearanceCfg:
    """How objects look inside their cells (clvr.world.render.draw_look) and how text-to-image layouts are
    chosen. `varied: false` is the fixed world: each object is the canonical sprite at its cell's centre and
    a prompt's training layout is the solver's canonical one. The cpu and release profiles use the varied world
    (the shipped weights were trained on it); the schema default and the ci profile keep the fixed world, which
    the tests' tiny models learn fast. The other keys only act when `varied` is true.
    Cells, relations and the judge's rules do not depend on any of this."""

    varied: bool = False
    size: list[float] = field(default_factory=lambda: [0.3125, 0.4375])  # circumradius range, fraction of a cell
    offset: bool = True  # centre shifted at random, as far as the shape still keeps a 1/16-cell margin
    rotate: bool = True  # squares and triangles turned by a random multiple of 15 degrees (circles never)
    antialias: bool = False  # edge pixels blended with the background by their coverage
    random_layouts: bool = True  # training layouts drawn by the seeded solver, not its one canonical layout

    def check(self, name: str) -> None:
        s = self.size
        need(len(s) == 2 and 0.3125 <= s[0] <= s[1] <= 0.4375, f"{name}.size",
             "[low, high] with 0.3125 <= low <= high <= 0.4375 (a circumradius in cells: large enough for the "
             "detector, small enough to keep a margin in the cell)", list(s))
        need(len(s) == 2 and math.ceil(s[0] * 32 - 1e-9) <= math.floor(s[1] * 32 + 1e-9), f"{name}.size",
             "a range holding a whole multiple of 1/32 cell", list(s))


@dataclass
class WorldCfg:
    grid: int = 4  # cells per side
    cell: int = 16  # pixels per cell; canvas = grid * cell
    appearance: AppearanceCfg = field(default_factory=AppearanceCfg)

    def check(self, name: str) -> None:
        need(2 <= self.grid <= 16, f"{name}.grid", "in 2..16", self.grid)
        need(8 <= self.cell <= 128, f"{name}.cell", "in 8..128 pixels", self.cell)
        need(self.cell >= 16 or not self.appearance.varied, f"{name}.cell",
             ">= 16 pixels when world.appearance.varied is true (smaller turned shapes are not told apart)", self.cell)
        self.appearance.check(f"{name}.appearance")


@dataclass
class GeneratorCfg:
    """Tiny Flux2 transformer + tiny Qwen3 text encoder (sizes only; see clvr.models)."""

    hidden: int = 96
    heads: int = 4
    double_layers: int = 2
    single_layers: int = 2
    text_hidden: int = 64
    text_layers: int = 2
    max_text_len: int = 16  # tokens; trace + instruction is truncated from the left (the instruction stays)
    cell_slots: bool = False  # grid*grid*3 cell-slot tokens before the free text (clvr.models.pipeline)
    head_width: int = 0  # > 0: MLP output head of this width (clvr.models.transformer); 0: the stock Linear
    # a cell autoencoder folder (the vae stage's final/, clvr.models.vae): image tokens are its latents, so a new
    # generator trains in latent space; "" = pixel tokens. Only a generator built from scratch reads it (a
    # checkpoint carries its own autoencoder, or none)
    vae: str = ""

    def check(self, name: str) -> None:
        need_all(self, name, "hidden heads text_hidden text_layers max_text_len", at_least(1), ">= 1")
        need_all(self, name, "double_layers single_layers head_width", at_least(0), ">= 0")
        need(self.double_layers + self.single_layers >= 1, f"{name}.double_layers + single_layers", ">= 1",
             self.double_layers + self.single_layers)
        need(self.hidden % (8 * self.heads) == 0, f"{name}.hidden",
             f"a multiple of 8 x {name}.heads ({8 * self.heads}: 4 even RoPE axes per head)", self.hidden)
        need(self.text_hidden % 4 == 0, f"{name}.text_hidden", "a multiple of 4 (2 heads of even size)",
             self.text_hidden)


def check_data_mix(sec: Any, name: str) -> None:
    """The keys pretrain, distill and sft share: global batch, edit mix, text-to-image tier weights, schedule, loss
    weights, out dir, seed."""
    check_global_batch(sec.batch_size, f"{name}.batch_size")
    p = sec.op_probs
    need(len(p) == 4 and min(p) >= 0 and abs(sum(p) - 1) <= 1e-6, f"{name}.op_probs",
         "4 probabilities (add, remove, recolor, move) summing to 1", list(p))
    w = sec.tier_weights
    need(1 <= len(w) <= 10 and all(at_least(0)(x) for x in w) and sum(w) > 0, f"{name}.tier_weights",
         "1..10 weights >= 0 (tiers 1..) with a positive sum", list(w))
    need(nonempty(sec.out), f"{name}.out", "a folder", sec.out)
    need_all(sec, name, "steps log_every eval_every ckpt_every eval_trials threads max_objects", at_least(1), ">= 1")
    need_all(sec, name, "warmup prompt_pool weight_decay gate_weight", at_least(0), ">= 0")
    need_all(sec, name, "lr changed_weight", positive, "> 0")
    need_all(sec, name, "min_lr_frac edit_frac grounded_frac", fraction, "in 0..1")
    need(0 <= sec.seed <= MAX_SEED, f"{name}.seed", f"in 0..{MAX_SEED}", sec.seed)


@dataclass
class DataMixCfg:
    """The data mix and loss weights of a trainer's own batches, the same keys in pretrain, distill and sft (each
    section reads its own, never another's; `check_data_mix` checks them)."""

    edit_frac: float = 0.7
    op_probs: list[float] = field(default_factory=lambda: [0.4, 0.2, 0.2, 0.2])  # edits: add, remove, recolor, move
    grounded_frac: float = 0.8  # edits whose target cells are marked (the loop always marks them)
    max_objects: int = 10  # objects on an edit's reference canvas
    tier_weights: list[float] = field(default_factory=lambda: [8.0, 4.0, 2.0, 1.0, 1.0])  # text-to-image tiers 1..
    prompt_pool: int = 400  # prompts per tier made once (0 = a fresh grammar prompt per sample)
    changed_weight: float = 5.0  # loss weight of edited cells
    gate_weight: float = 0.5  # BCE weight of the gate
    min_lr_frac: float = 0.1  # cosine decay to lr * min_lr_frac
    weight_decay: float = 0.0


@dataclass
class PretrainCfg(DataMixCfg):
    out: str = "runs/pretrain"
    init: str = ""  # "" = from scratch, "base" = the shipped base weights, or a checkpoint folder
    steps: int = 2000
    batch_size: int = 128
    lr: float = 1e-3
    warmup: int = 100
    text_dropout: float = 0.1  # empty text, for classifier-free guidance
    log_every: int = 50
    eval_every: int = 500
    ckpt_every: int = 250
    eval_trials: int = 50
    eval_steps: int = 4  # sampling steps (no CFG) for the quick in-training evaluation
    # 0: t ~ logit-normal (+15 % at t = 1); k >= 1: t drawn only from the k sigmas a k-step sampler visits (the
    # baseline "base trained at 4 steps" with k = 4)
    train_sigmas: int = 0
    threads: int = 1  # torch threads (1 is fastest on a small shared CPU)
    seed: int = 0

    def check(self, name: str) -> None:
        check_data_mix(self, name)
        need(self.eval_steps >= 1, f"{name}.eval_steps", ">= 1", self.eval_steps)
        need(self.train_sigmas >= 0, f"{name}.train_sigmas", ">= 0", self.train_sigmas)
        need(0 <= self.text_dropout < 1, f"{name}.text_dropout", "in 0..1 (1 excluded)", self.text_dropout)


@dataclass
class VaeCfg(DataMixCfg):
    """The cell autoencoder (`vae` stage, clvr.train.vae): a tiny diffusers AutoencoderKL trained on random cells of
    the world's looks. Its batch is `batch_size` rows of grid*grid cells; the data-mix keys it inherits are unused."""

    out: str = "runs/vae"
    steps: int = 3000
    batch_size: int = 8
    lr: float = 1e-3
    warmup: int = 50
    latent_channels: int = 4  # a cell's latent: latent_channels x (cell / 8) x (cell / 8)
    width: int = 32  # channels of the three inner blocks (the first has width / 2)
    kl_weight: float = 1e-4  # per latent value
    log_every: int = 50
    eval_every: int = 500
    ckpt_every: int = 250
    eval_trials: int = 500  # random cells reconstructed per evaluation
    threads: int = 1
    seed: int = 0

    def check(self, name: str) -> None:
        check_data_mix(self, name)
        need_all(self, name, "latent_channels eval_trials threads", at_least(1), ">= 1")
        need(self.width >= 2 and self.width % 2 == 0, f"{name}.width", "an even number >= 2", self.width)
        need(at_least(0)(self.kl_weight), f"{name}.kl_weight", ">= 0", self.kl_weight)


@dataclass
class FinetuneCfg(PretrainCfg):
    """The foundation flow's move-heavy fine-tune (`finetune` stage): the pretrain trainer on this section, from
    `init` ("" = `<pretrain.out>/final`). Defaults: the fine-tune that made the shipped base (`make weights`)."""

    out: str = "runs/finetune"
    init: str = ""  # "" = <pretrain.out>/final; "base" = the shipped base weights, or a checkpoint folder
    steps: int = 1200
    lr: float = 3e-4
    warmup: int = 50
    edit_frac: float = 0.8
    op_probs: list[float] = field(default_factory=lambda: [0.25, 0.15, 0.15, 0.45])  # move-heavy
    eval_every: int = 1200
    ckpt_every: int = 200
    seed: int = 1


ZERO_STAGES = (0, 1, 2, 3)
PRECISIONS = ("auto", "fp32", "bf16")


def launcher_env(env: dict[str, str] | None = None) -> tuple[int, int, int]:
    """(rank, world size, local rank) from a torchrun/deepspeed launcher's environment; (0, 1, 0) without one.
    A partial environment (RANK without WORLD_SIZE, ...) is a ConfigError, not a hang at rendezvous."""
    env = dict(os.environ if env is None else env)
    keys = ("RANK", "WORLD_SIZE", "LOCAL_RANK")
    have = [k for k in keys if env.get(k, "") != ""]
    if not have:
        return 0, 1, 0
    if len(have) < len(keys):
        missing = ", ".join(k for k in keys if k not in have)
        raise ConfigError(f"partial launcher environment: {', '.join(have)} set but {missing} not "
                          "(run under torchrun/deepspeed, or unset them for one process)")
    try:
        rank, world, local = (int(env[k]) for k in keys)
    except ValueError:
        raise ConfigError(f"launcher environment: RANK/WORLD_SIZE/LOCAL_RANK must be integers, got "
                          f"{[env[k] for k in keys]}") from None
    if not (world >= 1 and 0 <= rank < world and 0 <= local <= rank):
        raise ConfigError(f"launcher environment: RANK={rank}, LOCAL_RANK={local} do not fit WORLD_SIZE={world}")
    if world > 1 and not (env.get("MASTER_ADDR") and env.get("MASTER_PORT")):
        raise ConfigError(f"launcher environment: WORLD_SIZE={world} needs MASTER_ADDR and MASTER_PORT")
    return rank, world, local


def check_global_batch(batch_size: int, key: str) -> None:
    """A global batch is split evenly over the launcher's ranks (checked when the config loads, on every rank)."""
    world = launcher_env()[1]
    need(batch_size >= 1 and batch_size % world == 0, key, f"a positive multiple of the world size {world}",
         batch_size)


@dataclass
class EngineCfg:
    """The training engine (clvr.train.engine, DeepSpeed) shared by every trainer. The device follows the
    machine: CUDA + NCCL when a GPU is visible, else CPU + gloo; DS_ACCELERATOR=cpu forces the CPU.
    The world size comes from the launcher (torchrun / deepspeed), never from the config."""

    zero_stage: int = 0  # ZeRO stage 0-3 (2 shards optimizer state + gradients, 3 also the parameters)
    precision: str = "auto"  # auto = bf16 on CUDA, fp32 on CPU; or fp32 | bf16
    grad_clip: float = 1.0  # global gradient-norm clip (0 = off)

    def check(self, name: str) -> None:
        need(self.zero_stage in ZERO_STAGES, f"{name}.zero_stage", f"one of {list(ZERO_STAGES)}", self.zero_stage)
        need(self.precision in PRECISIONS, f"{name}.precision", f"one of {list(PRECISIONS)}", self.precision)
        need(self.grad_clip >= 0, f"{name}.grad_clip", ">= 0", self.grad_clip)


DISTILL_METHODS = ("guidance", "progressive")


@dataclass
class DistillCfg(DataMixCfg):
    out: str = "runs/distill"
    teacher: str = ""  # "" = <finetune.out>/final, else <pretrain.out>/final if present, else the shipped base; or a folder
    init: str = ""  # the student's starting weights: "" = the teacher; or a model folder or shipped name
    steps: int = 1000
    batch_size: int = 128
    lr: float = 5e-4
    warmup: int = 20
    log_every: int = 50
    eval_every: int = 500
    eval_trials: int = 50
    threads: int = 1
    nfe: int = 4
    teacher_steps: int = 28
    guidance: float = 2.0
    edit_guidance: float = 0.0  # progressive only: the first teacher's CFG on edits (0 = `guidance`)
    ckpt_every: int = 250
    seed: int = 0
    # guidance: the guided teacher's x0 at the student's sigmas (Meng et al. 2023; the ci profile's);
    # progressive: one student step = two teacher steps, in `rounds` halving rounds (Salimans & Ho 2022), for a
    # multimodal target (the varied world; the cpu and release profiles', the shipped student). See clvr.train.distill.
    method: str = "guidance"
    rounds: int = 1  # progressive only: the first teacher samples at nfe * substeps**rounds steps (+ CFG `guidance`)
    # progressive only: each round's steps (summing to `steps`); [] = `steps` split evenly. Each round is its own
    # run of the lr schedule (warm-up, cosine)
    round_steps: list[int] = field(default_factory=list)
    # progressive only: the teacher's Euler steps per student step (2: the paper's halving; k with rounds=1: the
    # base's guided trajectory at nfe * k steps, learned in one phase as in TRACT, Berthelot et al. 2023)
    substeps: int = 2
    # The student's last sampling sigma, saved as its scheduler's `shift_terminal` (the grid is stretched to end
    # there, then steps to 0). 0 = the base's grid, whose last of `nfe` steps sits at sigma 0.001 and so only
    # reads off the picture; 1 / nfe = FLUX's grid linspace(1, 1/nfe, nfe): nfe steps that all denoise.
    final_sigma: float = 0.0

    def check(self, name: str) -> None:
        check_data_mix(self, name)
        need(0 <= self.final_sigma < 1, f"{name}.final_sigma", "in [0, 1) (0: the base's grid)", self.final_sigma)
        need(self.method in DISTILL_METHODS, f"{name}.method", f"one of {list(DISTILL_METHODS)}", self.method)
        need(1 <= self.rounds <= 6, f"{name}.rounds", "in 1..6", self.rounds)
        need(self.steps >= self.rounds, f"{name}.steps", f">= {name}.rounds ({self.rounds}: each round trains)",
             self.steps)
        r = self.round_steps
        need(not r or (len(r) == self.rounds and min(r) >= 1 and sum(r) == self.steps), f"{name}.round_steps",
             f"[] or {self.rounds} (= {name}.rounds) steps >= 1 summing to {name}.steps ({self.steps})", list(r))
        need_all(self, name, "nfe teacher_steps", at_least(1), ">= 1")
        need(2 <= self.substeps <= 64, f"{name}.substeps", "in 2..64", self.substeps)
        need_all(self, name, "guidance edit_guidance", at_least(0), ">= 0")


SFT_MODES = ("lora", "full")


@dataclass
class SftCfg(DataMixCfg):
    """Trajectory SFT (`sft` stage, clvr.train.sft): fine-tune a released generator on coarse steps (multi-op
    edits and layout text-to-image made on the fly, plus the data engine's examples when `data` is given),
    mixed with the pretraining samples so single-op edits and text-to-image are not forgotten (the rest of the mix:
    the `DataMixCfg` keys)."""

    out: str = "runs/sft"
    init: str = "base"  # the generator fine-tuned: base | distilled | a checkpoint folder (conf/base.yaml: ${weights.base})
    mode: str = "full"  # full: every weight; lora: a peft LoRA on the transformer's attention + MLP projections
    lora_rank: int = 16
    lora_alpha: float = 16.0
    cell_slots: bool = True  # turn on the cell slots (clvr.models.pipeline) if the init model has none
    max_text_len: int = 0  # free-text tokens (0 = the init model's); the cell slots carry the ops
    data: str = ""  # a data-engine data set (folder or JSONL) whose examples are mixed in; "" = none
    data_frac: float = 0.3  # share of samples drawn from `data`'s examples (when given)
    multi_frac: float = 0.6  # grounded multi-op edits of k = 2..max_k mixed ops
    max_k: int = 8
    layout_frac: float = 0.1  # layout text-to-image: 1..max_layout adds on a blank canvas
    max_layout: int = 12
    steps: int = 1000
    batch_size: int = 64
    lr: float = 3e-4
    warmup: int = 20
    text_dropout: float = 0.1
    train_sigmas: int = 0
    log_every: int = 50
    eval_every: int = 500
    ckpt_every: int = 250
    eval_trials: int = 50
    eval_steps: int = 4
    threads: int = 1
    seed: int = 0

    def check(self, name: str) -> None:
        check_data_mix(self, name)
        need(self.mode in SFT_MODES, f"{name}.mode", f"one of {list(SFT_MODES)}", self.mode)
        need(nonempty(self.init), f"{name}.init", "base | distilled | a checkpoint folder", self.init)
        need_all(self, name, "lora_rank eval_steps", at_least(1), ">= 1")
        need(positive(self.lora_alpha), f"{name}.lora_alpha", "> 0", self.lora_alpha)
        need_all(self, name, "max_text_len train_sigmas", at_least(0), ">= 0")
        need_all(self, name, "data_frac multi_frac layout_frac", fraction, "in 0..1")
        need(self.multi_frac + self.layout_frac <= 1, f"{name}.multi_frac + layout_frac", "<= 1",
             self.multi_frac + self.layout_frac)
        need(2 <= self.max_k <= 128, f"{name}.max_k", "in 2..128", self.max_k)
        need(1 <= self.max_layout <= 256, f"{name}.max_layout", "in 1..256", self.max_layout)
        need(0 <= self.text_dropout < 1, f"{name}.text_dropout", "in 0..1 (1 excluded)", self.text_dropout)


CONTROLLER_SFT_MODES = ("full", "lora")
CONTROLLER_MODEL_CLASSES = ("causal_lm", "vlm")


@dataclass
class ControllerSftCfg:
    """The learned controller's SFT (`controller_sft` stage, clvr.learned.train): a tiny causal LM trained on the
    data engine's trajectories, state -> the teacher's step. The teacher is the symbolic world controller with the
    per-k success table `k_success` and `loop.retries_per_step`; every decision state is asked at each calls-left
    budget in `budgets` (0 = unbounded). Trajectories of held-out compositions (clvr.world.grammar.held_out) are
    never trained on; `eval_frac` of the others are held out for the exact-match eval."""

    out: str = "runs/controller_sft"
    data: str = ""  # the data engine's data set (folder or JSONL); conf/base.yaml: ${synthesize.out}
    k_success: str = ""  # the teacher's per-k success table (as loop.k_success); conf/base.yaml: ${loop.k_success}
    budgets: list[int] = field(default_factory=lambda: [1, 2, 3, 4, 0])  # calls left per label (0 = unbounded)
    # causal_lm: a Qwen3ForCausalLM reading the state text (clvr.learned.model); vlm: a Qwen3VLForConditionalGeneration
    # reading the state text and the canvas image (clvr.learned.vlm, the real-scale path)
    model_class: str = "causal_lm"
    init: str = ""  # "" = a fresh model of the size below; or a controller folder to fine-tune (e.g. for lora); vlm:
    # also a pretrained VLM (a local folder, or a hub id whose weights are in the local hub cache; never fetched)
    mode: str = "full"  # full: every weight; lora: a peft LoRA on the attention and MLP projections
    lora_rank: int = 8
    lora_alpha: float = 16.0
    layers: int = 2  # model size (a fresh model): Qwen3 decoder layers, hidden size, attention / key-value heads
    hidden: int = 128
    heads: int = 4
    kv_heads: int = 2
    intermediate: int = 384
    min_share: float = 0.0  # each kind of step (its op) repeated to at least this share of the examples (0 = off)
    compose_init: bool = True  # a fresh model's output lexemes start as the sum of their words (clvr.learned.train)
    steps: int = 600  # optimizer steps of the first training (and of each DAgger round when dagger_steps is 0)
    batch_size: int = 64
    lr: float = 2e-3
    warmup: int = 30
    min_lr_frac: float = 0.1
    weight_decay: float = 0.0
    log_every: int = 50
    eval_every: int = 300
    ckpt_every: int = 200
    eval_frac: float = 0.05  # share of the (training-split) trajectories whose states are held out for the eval
    eval_max: int = 1000  # at most this many eval examples (a fixed random subset)
    dagger_rounds: int = 0  # DAgger rounds after training: the student's own states, labelled, added, trained on
    dagger_prompts: int = 200  # fresh training-split prompts the student runs per round
    dagger_steps: int = 0  # optimizer steps after each DAgger round (0 = steps)
    seed: int = 0
    threads: int = 1

    def check(self, name: str) -> None:
        need(nonempty(self.data), f"{name}.data", "a data-engine data set (folder or JSONL)", self.data)
        need(self.mode in CONTROLLER_SFT_MODES, f"{name}.mode", f"one of {list(CONTROLLER_SFT_MODES)}", self.mode)
        need(self.model_class in CONTROLLER_MODEL_CLASSES, f"{name}.model_class",
             f"one of {list(CONTROLLER_MODEL_CLASSES)}", self.model_class)
        need(self.model_class != "vlm" or self.dagger_rounds == 0, f"{name}.dagger_rounds",
             "0 with model_class vlm (the learned controller runs the causal LM only)", self.dagger_rounds)
        need(self.model_class != "vlm" or (self.hidden // max(self.heads, 1)) % 2 == 0, f"{name}.hidden",
             "hidden / heads even with model_class vlm (multimodal RoPE splits the head's rotary pairs)", self.hidden)
        need(bool(self.budgets) and all(isinstance(b, int) and b >= 0 for b in self.budgets), f"{name}.budgets",
             "a non-empty list of calls-left budgets >= 0 (0 = unbounded)", self.budgets)
        need_all(self, name, "lora_rank layers hidden heads kv_heads intermediate steps log_every eval_every "
                 "ckpt_every eval_max dagger_prompts threads", at_least(1), ">= 1")
        need(at_least(0)(self.dagger_steps), f"{name}.dagger_steps", ">= 0 (0 = steps)", self.dagger_steps)
        need(self.hidden % self.heads == 0, f"{name}.hidden", f"a multiple of heads ({self.heads})", self.hidden)
        need(self.heads % self.kv_heads == 0, f"{name}.heads", f"a multiple of kv_heads ({self.kv_heads})", self.heads)
        need(positive(self.lora_alpha), f"{name}.lora_alpha", "> 0", self.lora_alpha)
        need(positive(self.lr), f"{name}.lr", "> 0", self.lr)
        need_all(self, name, "warmup dagger_rounds weight_decay", at_least(0), ">= 0")
        need_all(self, name, "min_lr_frac min_share", fraction, "in 0..1")
        need(0 < self.eval_frac < 1, f"{name}.eval_frac", "in 0..1 (both excluded)", self.eval_frac)
        need(0 <= self.seed <= MAX_SEED, f"{name}.seed", f"in 0..{MAX_SEED}", self.seed)
        check_global_batch(self.batch_size, f"{name}.batch_size")


@dataclass
class SampleCfg:
    steps: int = 28
    guidance: float = 2.0
    distilled_steps: int = 4

    def check(self, name: str) -> None:
        need_all(self, name, "steps distilled_steps", at_least(1), ">= 1")
        need(at_least(0)(self.guidance), f"{name}.guidance", ">= 0 (<= 1 = no CFG)", self.guidance)


@dataclass
class LoopCfg:
    """The closed loop (clvr.loop). Budgets always end it: `max_iters` controller outputs, `max_nfe`
    network evaluations (base at 28 steps + CFG spends 56 per call, distilled 4), and `max_calls` generator
    calls (0 = no call budget). The world controller groups the remaining ops into multi-op steps from the
    calls left and the generator's success per ops-per-call k (`k_success`: a JSON file, e.g. bench-generator's
    output, `path#row` to pick a row; "" = only k = 1 is known to work, so one op per call)."""

    max_iters: int = 32
    max_nfe: int = 1800
    max_calls: int = 0
    k_success: str = ""
    retries_per_step: int = 2
    controller: str = "world"  # registry keys (clvr.loop.roles, clvr.generator): world | openai | learned
    controller_model: str = ""  # the learned controller (loop.controller=learned; conf/base.yaml: ${controller_sft.out}/final):
    # a causal LM folder, or a VLM's (save_vlm's, a pretrained Qwen3-VL's, or its hub id in the local cache; clvr.learned.vlm_controller)
    verifier: str = "world"
    generator: str = "world"
    model: str = "distilled"  # base | distilled | checkpoint folder | oracle | noisy-oracle
    max_prompt_chars: int = 500  # grammar prompts reach ~200 characters at tier 10

    def check(self, name: str) -> None:
        need_all(self, name, "max_iters max_nfe max_prompt_chars", at_least(1), ">= 1")
        need(at_least(0)(self.max_calls), f"{name}.max_calls", ">= 0 (0 = no call budget)", self.max_calls)
        need(at_least(0)(self.retries_per_step), f"{name}.retries_per_step", ">= 0", self.retries_per_step)
        need_all(self, name, "controller verifier generator model", nonempty, "a non-empty name")


@dataclass
class KleinCfg:
    """The `klein` generator backend (clvr.models.klein: diffusers' Flux2KleinPipeline, FLUX.2 [klein]), used when
    loop.generator = klein. `loop.model` names its checkpoint: base | distilled (the ids below) | a folder | a hub id
    present in the local hub cache (weights are never downloaded). A distilled checkpoint (`is_distilled` in its
    model_index.json) samples `distilled_steps` without CFG, a base one `base_steps` with CFG at `guidance`.
    Images are `resolution` pixels square (0 = the world canvas, world.grid * world.cell); a reference of another
    size is resized to it. A step's cells map to image rects on a `grid` x `grid` split of the image."""

    base: str = "black-forest-labs/FLUX.2-klein-base-4B"  # loop.model=base
    distilled: str = "black-forest-labs/FLUX.2-klein-4B"  # loop.model=distilled
    size: str = "4b"  # architecture of those checkpoints (clvr.models.klein.SIZES): tiny | 4b | 9b
    resolution: int = 0
    grid: int = 4  # conf/base.yaml: ${world.grid}
    max_sequence_length: int = 512  # text tokens (chat template included); the oldest trace steps are cut first
    base_steps: int = 28
    distilled_steps: int = 4
    guidance: float = 4.0  # CFG scale of a base checkpoint (> 1: two forwards per step)
    blend: bool = True  # edits with regions: latents outside the region follow the reference (Blended Latent Diffusion)
    paste: bool = False  # and after decoding, the reference's pixels outside the region (exact, may show a seam)
    dtype: str = "auto"  # auto (bfloat16 on CUDA, float32 on CPU) | float32 | bfloat16 | float16
    device: str = "auto"  # auto (cuda when available) | cpu | cuda | cuda:N
    max_batch: int = 8  # requests per pipeline call

    def check(self, name: str) -> None:
        need_all(self, name, "base distilled", nonempty, "a folder or hub id")
        need(self.size in ("tiny", "4b", "9b"), f"{name}.size", "tiny, 4b or 9b", self.size)
        need(self.resolution == 0 or 16 <= self.resolution <= 2048, f"{name}.resolution",
             "0 (the world canvas) or 16..2048 pixels", self.resolution)
        need(2 <= self.grid <= 16, f"{name}.grid", "in 2..16", self.grid)
        need_all(self, name, "max_sequence_length base_steps distilled_steps max_batch", at_least(1), ">= 1")
        need(at_least(1)(self.guidance), f"{name}.guidance", ">= 1 (1 = no CFG)", self.guidance)
        need(self.dtype in ("auto", "float32", "bfloat16", "float16"), f"{name}.dtype",
             "auto, float32, bfloat16 or float16", self.dtype)
        need(is_device(self.device), f"{name}.device", DEVICE_RULE, self.device)


@dataclass
class EndpointCfg:
    """An OpenAI-compatible chat-completions endpoint (vLLM, hosted; clvr.vlm.ChatClient). The API key is read
    only from the environment variable named by `api_key_env` ("" = send no key, e.g. a local vLLM); it is
    never stored in the config."""

    base_url: str = "http://127.0.0.1:8000/v1"
    model: str = "Qwen/Qwen3-VL-8B-Instruct"
    api_key_env: str = "OPENAI_API_KEY"
    timeout_s: float = 30.0  # per attempt, whole answer included
    max_retries: int = 3  # extra attempts after the first
    backoff_s: float = 0.5  # first retry waits this, then doubles (capped at 8 s)
    max_tokens: int = 256
    temperature: float = 0.0
    max_response_bytes: int = 65536  # larger answers are rejected unread

    def check(self, name: str) -> None:
        need(self.base_url.startswith(("http://", "https://")), f"{name}.base_url",
             "an http:// or https:// URL", self.base_url)
        need(nonempty(self.model), f"{name}.model", "the model the endpoint serves", self.model)
        need_all(self, name, "timeout_s max_tokens max_response_bytes", positive, "> 0")
        need_all(self, name, "max_retries backoff_s temperature", at_least(0), ">= 0")


@dataclass
class ControllerCfg(EndpointCfg):
    """The VLM controller's endpoint, used when the loop's controller key is "openai" (clvr.vlm)."""

    max_history: int = 16  # earlier steps shown to the model

    def check(self, name: str) -> None:
        super().check(name)
        need(at_least(0)(self.max_history), f"{name}.max_history", ">= 0", self.max_history)


@dataclass
class JudgeCfg(EndpointCfg):
    """The VLM judge's endpoint, used when the loop's verifier key is "openai" (clvr.loop.vlm_verifier): it
    answers one verdict per GenEval constraint of the prompt. `perception`: the verifier (registry key) whose
    detector gives the scene the controller corrects from and whose cell checks gate each step."""

    perception: str = "world"

    def check(self, name: str) -> None:
        super().check(name)
        need(nonempty(self.perception) and self.perception != "openai", f"{name}.perception",
             "a detector-based verifier key (e.g. world), not openai itself", self.perception)


DETECTOR_KINDS = ("world", "openvocab")
DETECTOR_CLASSES = ("geneval", "world")


@dataclass
class DetectorCfg:
    """The GenEval judge's detector (`clvr eval geneval`, `--detector` overrides `kind`) and the open-vocabulary
    one's weights and rules (clvr.openvocab; the loop verifier `openvocab` reads this section too). `model` and
    `clip_model` are local folders or hub ids whose weights are in the local hub cache (never downloaded). The
    rules default to GenEval's evaluate_images.py options (set for Mask2Former's scores: OWLv2's are on another
    scale)."""

    kind: str = "world"  # world: the world's exact detector (world classes only); openvocab: OWLv2 + CLIP
    model: str = ""  # an Owlv2ForObjectDetection checkpoint (conf/gpu-*.yaml: google/owlv2-base-patch16-ensemble)
    clip_model: str = ""  # the colour classifier, a CLIPModel (GenEval's: openai/clip-vit-large-patch14)
    classes: str = "geneval"  # what `eval geneval` queries: geneval (80 COCO classes, 10 colours) | world (the world's)
    query: str = "a photo of a {cls}"  # the detector's text query per class
    threshold: float = 0.3  # box score threshold (GenEval's)
    counting_threshold: float = 0.9  # the threshold for prompts tagged counting (GenEval's)
    max_objects: int = 16  # boxes per class (GenEval's)
    max_overlap: float = 1.0  # NMS: drop a box with IoU >= this with a better one of its class (1.0 = off, GenEval's)
    device: str = "auto"  # auto (cuda when visible) | cpu | cuda | cuda:N

    def check(self, name: str) -> None:
        need(self.kind in DETECTOR_KINDS, f"{name}.kind", f"one of {list(DETECTOR_KINDS)}", self.kind)
        need(self.classes in DETECTOR_CLASSES, f"{name}.classes", f"one of {list(DETECTOR_CLASSES)}", self.classes)
        need("{cls}" in self.query and self.query.count("{") == 1 and self.query.count("}") == 1, f"{name}.query",
             "a text with one {cls} placeholder", self.query)
        need_all(self, name, "threshold counting_threshold", lambda v: math.isfinite(v) and 0 <= v < 1,
                 "in 0..1 (1 excluded)")
        need(0 < self.max_overlap <= 1, f"{name}.max_overlap", "in 0..1 (0 excluded; 1 = no NMS)", self.max_overlap)
        need(self.max_objects >= 1, f"{name}.max_objects", ">= 1", self.max_objects)
        need(is_device(self.device), f"{name}.device", DEVICE_RULE, self.device)


PROBE_SPLITS = ("all", "held_out")


@dataclass
class EvalCfg:
    out: str = "runs/eval"
    n_per_tier: int = 50
    suite_samples: int = 1
    seed: int = 1000
    batch_size: int = 64  # probe / geneval-world: loops run in lockstep, generator calls batched
    geneval_n: int = 50  # prompts per GenEval tag in `clvr eval geneval-world`
    speed_n: int = 10  # prompts per row in `clvr eval speed` (one at a time: latency)
    speed_batch: int = 64  # prompts per row run together in `clvr eval speed` (throughput); 0 = skip
    probe_n_per_tier: int = 20  # the `evaluate` stage's probe (single step vs loop) on the last generator
    rewrite: bool = True  # probe / geneval-world also run the open-loop rewrite baseline (1 call per prompt)
    # the probe's prompts: "all" (every structure the grammar makes) or "held_out" (only the structures held out
    # of the learned controller's training, clvr.world.grammar.HELD_OUT_COMPOSITIONS; tiers without one are skipped)
    split: str = "all"

    def check(self, name: str) -> None:
        need(nonempty(self.out), f"{name}.out", "a folder", self.out)
        need(isinstance(self.rewrite, bool), f"{name}.rewrite", "true or false", self.rewrite)
        need(self.split in PROBE_SPLITS, f"{name}.split", f"one of {list(PROBE_SPLITS)}", self.split)
        need_all(self, name, "n_per_tier probe_n_per_tier geneval_n speed_n batch_size suite_samples",
                 at_least(1), ">= 1")
        need(self.speed_batch >= 0, f"{name}.speed_batch", ">= 0 (0 = no batched columns)", self.speed_batch)
        need(0 <= self.seed <= MAX_SEED, f"{name}.seed", f"in 0..{MAX_SEED}", self.seed)


@dataclass
class MainCfg:
    """`clvr run`, the main job (for now: render the world suite over the tiers and the six GenEval
    suites as ground truth, score it with the judge)."""

    out: str = "runs/cpu/main"
    n_per_tier: int = 20  # grammar prompts per complexity tier
    geneval_n: int = 20  # prompts per GenEval tag
    samples: int = 1  # images per prompt
    seed: int = 0

    def check(self, name: str) -> None:
        need(nonempty(self.out), f"{name}.out", "a folder", self.out)
        need_all(self, name, "n_per_tier geneval_n", at_least(0), ">= 0")
        need(self.n_per_tier + self.geneval_n >= 1, f"{name}.n_per_tier + geneval_n", ">= 1 (some prompts)",
             self.n_per_tier + self.geneval_n)
        need(self.samples >= 1, f"{name}.samples", ">= 1", self.samples)
        need(0 <= self.seed <= MAX_SEED, f"{name}.seed", f"in 0..{MAX_SEED}", self.seed)


@dataclass
class SynthesizeCfg:
    """The data engine (`synthesize` stage, clvr.synthesize): verified loop trajectories over the 10 tiers, and
    macro-step examples merged from their verified steps.
    The work is a fixed list of jobs (prompt j: tier = tiers[j % len(tiers)]) cut into shards of `shard_size`;
    a shard is the unit of batching, of atomic commit and of resume, so the output depends only on the
    config, never on `workers` or on where a run was killed."""

    out: str = "runs/synthesize"
    generator: str = "world"  # generator registry key (clvr.generator)
    model: str = ""  # "" = weights.base (the released base); base | distilled | folder | oracle | noisy-oracle
    steps: int = 0  # sampling steps per generator call (0 = the model's recorded default: base 28, distilled 4)
    guidance: float = -1.0  # CFG scale (< 0 = the model's recorded default: base 2.0; <= 1 = no CFG)
    n_per_tier: int = 220  # prompts per tier (trajectories attempted)
    tiers: list[int] = field(default_factory=lambda: list(range(1, 11)))
    shard_size: int = 220  # jobs per shard: the unit of commit and resume; its loops batch together
    batch_size: int = 64  # generator requests per batch (continuous batching within a shard)
    workers: int = 2  # processes; the output is identical for any value
    threads: int = 1  # torch threads per worker
    seed: int = 0
    ab_margin: float = 2.0  # A/B tie-break: artefact difference (mean |px|, 0..255) that counts as better
    macro_max_k: int = 8  # macro-step examples merge 2..macro_max_k consecutive verified steps (1 = none)

    def check(self, name: str) -> None:
        need(nonempty(self.out), f"{name}.out", "a folder", self.out)
        need(self.steps >= 0, f"{name}.steps", ">= 0 (0 = the model's default)", self.steps)
        need_all(self, name, "n_per_tier shard_size batch_size workers threads macro_max_k", at_least(1), ">= 1")
        t = list(self.tiers)
        need(bool(t) and len(set(t)) == len(t) and all(1 <= x <= 10 for x in t), f"{name}.tiers",
             "distinct tiers in 1..10", t)
        need(at_least(0)(self.ab_margin), f"{name}.ab_margin", ">= 0", self.ab_margin)
        need(not math.isnan(self.guidance), f"{name}.guidance", "a number (< 0 = the model's default)",
             self.guidance)
        need(nonempty(self.generator), f"{name}.generator", "a generator registry key", self.generator)
        need(0 <= self.seed <= MAX_SEED, f"{name}.seed", f"in 0..{MAX_SEED}", self.seed)


@dataclass
class WeightsCfg:
    """The released generators the retrain flow starts from, as CLVR starts from FLUX.2 [klein]: "base" |
    "distilled" (the packaged weights, src/clvr/weights) or a checkpoint folder, resolved by clvr.registry.
    `synthesize.model` "" means `base`, and conf/base.yaml sets `sft.init` to `${weights.base}` (OmegaConf
    interpolation), so one key pins the base every retrain stage uses."""

    base: str = "base"
    distilled: str = "distilled"

    def check(self, name: str) -> None:
        from clvr.registry import ORACLES

        for f in fields(self):
            value = getattr(self, f.name)
            need(nonempty(value) and value not in ORACLES, f"{name}.{f.name}",
                 "base | distilled | a checkpoint folder (not an oracle: it has no weights)", value)


@dataclass
class ShipCfg:
    """The foundation flow's `ship` stage (clvr.ship): installs `<finetune.out>/final` as the base and
    `<rebalance.out>/final` (the last distillation) as the distilled weights in `root` ("" = the packaged weights,
    src/clvr/weights), and writes what it shipped (paths, sha256) to `<out>/metrics.json`."""

    out: str = "runs/ship"
    root: str = ""

    def check(self, name: str) -> None:
        need(nonempty(self.out), f"{name}.out", "a folder", self.out)


FLOWS = ("foundation", "retrain")  # the pipeline's flows; clvr.stages gives each stage one of them


@dataclass
class PipelineCfg:
    """`clvr pipeline run` (flows/): what happens around the stages. Stage settings stay in their own sections;
    this one is not a DVC param, so changing it never reruns a stage."""

    flow: str = "retrain"  # the flow a run ran (set by `clvr pipeline run --flow`; `clvr reproduce` reads it)
    experiment: str = "clvr"  # MLflow experiment
    tag_runs: bool = True  # commit dvc.lock + params.yaml + metrics and tag the commit run/<date>-<shortid>
    push: bool = True  # `dvc push` the run's outputs to the default DVC remote
    retries: int = 2  # extra attempts of a stage task after a transient failure (not after bad input)
    retry_delay_s: float = 5.0
    register_model: str = "clvr-world-generator"  # MLflow registered model for the generator stages
    champion_metric: str = "geneval_overall"  # eval metric `<stage>_<name>` that moves the `champion` alias
    reproduce_tol: float = 0.0  # `clvr reproduce`: max |new - old| per metric (0 on CPU: runs are deterministic)
    reproduce_ignore: list[str] = field(default_factory=lambda: ["*wall_s*", "*_eval_s", "*samples_per_s",
                                                                 "*seconds*", "*s_per_prompt*"])

    def check(self, name: str) -> None:
        need(self.flow in FLOWS, f"{name}.flow", f"one of {list(FLOWS)}", self.flow)
        need_all(self, name, "experiment register_model champion_metric", nonempty, "a non-empty name")
        need(self.retries >= 0, f"{name}.retries", ">= 0", self.retries)
        need_all(self, name, "retry_delay_s reproduce_tol", at_least(0), ">= 0")


@dataclass
class Config:
    profile: str = "cpu"
    seed: int = 0
    world: WorldCfg = field(default_factory=WorldCfg)
    generator: GeneratorCfg = field(default_factory=GeneratorCfg)
    vae: VaeCfg = field(default_factory=VaeCfg)
    pretrain: PretrainCfg = field(default_factory=PretrainCfg)
    finetune: FinetuneCfg = field(default_factory=FinetuneCfg)
    distill: DistillCfg = field(default_factory=DistillCfg)
    # the distilled model's second part: two more distill runs on the base's own trajectory (conf/base.yaml), the
    # foundation stages of the same names, each from the one before (clvr.train.distill.run)
    trajectory: DistillCfg = field(default_factory=DistillCfg)
    rebalance: DistillCfg = field(default_factory=DistillCfg)
    weights: WeightsCfg = field(default_factory=WeightsCfg)
    ship: ShipCfg = field(default_factory=ShipCfg)
    sft: SftCfg = field(default_factory=SftCfg)
    controller_sft: ControllerSftCfg = field(default_factory=ControllerSftCfg)
    engine: EngineCfg = field(default_factory=EngineCfg)
    sample: SampleCfg = field(default_factory=SampleCfg)
    loop: LoopCfg = field(default_factory=LoopCfg)
    controller: ControllerCfg = field(default_factory=ControllerCfg)
    judge: JudgeCfg = field(default_factory=JudgeCfg)
    klein: KleinCfg = field(default_factory=KleinCfg)
    detector: DetectorCfg = field(default_factory=DetectorCfg)
    eval: EvalCfg = field(default_factory=EvalCfg)
    main: MainCfg = field(default_factory=MainCfg)
    synthesize: SynthesizeCfg = field(default_factory=SynthesizeCfg)
    pipeline: PipelineCfg = field(default_factory=PipelineCfg)


def conf_dir() -> Path:
    """conf/ of the project: $CLVR_CONF_DIR, else ./conf, else the repo root beside src/."""
    for cand in (os.environ.get("CLVR_CONF_DIR"), "conf", Path(__file__).resolve().parents[2] / "conf"):
        if cand and Path(cand).is_dir():
            return Path(cand)
    raise ConfigError("no conf/ directory found (set CLVR_CONF_DIR)")


def profiles() -> list[str]:
    return sorted(p.stem for p in conf_dir().glob("*.yaml") if p.stem != "base")


def _merge(base: DictConfig, layer: Any, source: str) -> DictConfig:
    try:
        return OmegaConf.merge(base, layer)
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None) or "?"
        raise ConfigError(f"{source}: bad config key '{key}': {_first_line(e)}") from None


def _first_line(e: Exception) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


def _load_yaml(path: Path) -> DictConfig:
    try:
        data = OmegaConf.load(path)
    except Exception as e:  # yaml syntax errors
        raise ConfigError(f"{path}: cannot parse YAML: {_first_line(e)}") from None
    if not isinstance(data, DictConfig):
        raise ConfigError(f"{path}: top level must be a mapping")
    return data


def _override(item: str) -> DictConfig:
    """One `key=value` override as a config layer; a value that is not valid YAML is a ConfigError naming it.
    `key=` (nothing after the sign) is the empty string, as a shell leaves `key=""`: YAML would read null."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like key=value")
    try:
        if item.endswith("="):
            return OmegaConf.from_dotlist([item + "''"])
        return OmegaConf.from_dotlist([item])
    except OmegaConfBaseException as e:
        raise ConfigError(f"override {item!r}: {_first_line(e)}") from None
    except Exception as e:  # yaml scanner/parser/constructor errors: an unclosed list, a tag, a stray newline
        raise ConfigError(f"override {item!r}: the value is not valid YAML ({_first_line(e)})") from None


def check_uses(overrides: list[str] | None, uses: tuple[str, ...], command: str) -> None:
    """An override of a section the command never reads would be silently ignored: refuse it, naming it and the
    sections the command does read (`uses`: top-level keys of Config)."""
    for item in overrides or []:
        top = item.split("=", 1)[0].strip().split(".", 1)[0]
        if top in {f.name for f in fields(Config)} and top not in uses:
            raise ConfigError(f"override {item!r}: `clvr {command}` does not read the '{top}' section "
                              f"(it reads: {', '.join(uses)})")


def load_config(profile: str = "cpu", overrides: list[str] | None = None,
                uses: tuple[str, ...] | None = None, command: str = "") -> Config:
    """Resolve schema + base.yaml + <profile>.yaml + overrides into a typed, validated `Config`. With `uses`
    (the sections a command reads), an override of any other section is a ConfigError (see check_uses)."""
    if uses is not None:
        check_uses(overrides, uses, command)
    cfg = OmegaConf.structured(Config)
    d = conf_dir()
    base = d / "base.yaml"
    if base.exists():
        cfg = _merge(cfg, _load_yaml(base), str(base))
    prof = d / f"{profile}.yaml"
    if not prof.exists():
        raise ConfigError(f"unknown profile '{profile}' (known: {', '.join(profiles())})")
    cfg = _merge(cfg, _load_yaml(prof), str(prof))
    for item in overrides or []:
        cfg = _merge(cfg, _override(item), f"override {item!r}")
    cfg.profile = profile
    return validate(OmegaConf.to_object(cfg))  # type: ignore[arg-type]


def load_config_file(path: str | Path) -> Config:
    """A resolved config written by `to_yaml` (e.g. the pipeline's params.yaml), validated like a profile."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"no config file '{p}'")
    return validate(OmegaConf.to_object(_merge(OmegaConf.structured(Config), _load_yaml(p), str(p))))  # type: ignore[arg-type]


def validate(cfg: Config) -> Config:
    """Range-check every section when the config loads, before any work: each section dataclass that has a
    `check(name)` method raises a ConfigError naming `section.key` (see `need`)."""
    need(0 <= cfg.seed <= MAX_SEED, "seed", f"in 0..{MAX_SEED}", cfg.seed)
    for f in fields(cfg):
        check = getattr(getattr(cfg, f.name), "check", None)
        if callable(check):
            check(f.name)
    return cfg


def to_yaml(cfg: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def to_dict(cfg: Any) -> dict:
    return OmegaConf.to_container(OmegaConf.structured(cfg))  # type: ignore[return-value]


def flat_params(cfg: Any, prefix: str = "") -> dict[str, Any]:
    """Flatten to dotted keys (for MLflow params and DVC)."""
    out: dict[str, Any] = {}
    for k, v in to_dict(cfg).items():
        if isinstance(v, dict):
            for kk, vv in _flatten(v, f"{prefix}{k}."):
                out[kk] = vv
        else:
            out[f"{prefix}{k}"] = v
    return out


def _flatten(d: dict, prefix: str):
    for k, v in d.items():
        if isinstance(v, dict):
            yield from _flatten(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}", v
