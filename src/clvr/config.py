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


@dataclass
class AppearanceCfg:
    """How objects look inside their cells (clvr.world.render.draw_look) and how text-to-image layouts are
    chosen. `varied: false` is the fixed world: each object is the canonical sprite at its cell's centre and
    a prompt's training layout is the solver's canonical one. Every profile keeps it for now, because the
    shipped weights (src/clvr/weights) were trained on the fixed world and are not yet retrained; turn the
    varied world on with `world.appearance.varied=true`. The other keys only act when `varied` is true.
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
        need(self.grid >= 2, f"{name}.grid", ">= 2", self.grid)
        need(self.cell >= 8, f"{name}.cell", ">= 8 pixels", self.cell)
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


@dataclass
class PretrainCfg:
    out: str = "runs/pretrain"
    init: str = ""  # "" = from scratch, "base" = the shipped base weights, or a checkpoint folder
    steps: int = 2000
    batch_size: int = 128
    lr: float = 1e-3
    warmup: int = 100
    min_lr_frac: float = 0.1  # cosine decay to lr * min_lr_frac
    weight_decay: float = 0.0
    edit_frac: float = 0.7
    op_probs: list[float] = field(default_factory=lambda: [0.4, 0.2, 0.2, 0.2])  # edits: add, remove, recolor, move
    grounded_frac: float = 0.8  # edits whose target cells are marked (the loop always marks them)
    text_dropout: float = 0.1  # empty text, for classifier-free guidance
    max_objects: int = 10  # objects on an edit's reference canvas
    tier_weights: list[float] = field(default_factory=lambda: [8.0, 4.0, 2.0, 1.0, 1.0])  # text-to-image tiers 1..
    prompt_pool: int = 400  # prompts per tier made once (0 = a fresh grammar prompt per sample)
    changed_weight: float = 5.0  # loss weight of edited cells
    gate_weight: float = 0.5  # BCE weight of the gate
    log_every: int = 50
    eval_every: int = 500
    ckpt_every: int = 250
    eval_trials: int = 50
    eval_steps: int = 4  # sampling steps (no CFG) for the quick in-training evaluation
    threads: int = 1  # torch threads (1 is fastest on a small shared CPU)
    seed: int = 0

    def check(self, name: str) -> None:
        p = self.op_probs
        need(len(p) == 4 and min(p) >= 0 and abs(sum(p) - 1) <= 1e-6, f"{name}.op_probs",
             "4 probabilities (add, remove, recolor, move) summing to 1", list(p))


@dataclass
class DistillCfg:
    out: str = "runs/distill"
    teacher: str = ""  # "" = <pretrain.out>/final if present, else the shipped base; or a checkpoint folder
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
    ckpt_every: int = 250
    seed: int = 0


@dataclass
class SampleCfg:
    steps: int = 28
    guidance: float = 2.0
    distilled_steps: int = 4


@dataclass
class LoopCfg:
    """The closed loop (clvr.loop). Budgets always end it: `max_iters` controller outputs, `max_nfe`
    network evaluations (base at 28 steps + CFG spends 56 per call, distilled 4)."""

    max_iters: int = 32
    max_nfe: int = 1800
    retries_per_step: int = 2
    controller: str = "world"  # registry keys (clvr.loop.roles, clvr.generator)
    verifier: str = "world"
    generator: str = "world"
    model: str = "distilled"  # base | distilled | checkpoint folder | oracle | noisy-oracle
    max_prompt_chars: int = 500  # grammar prompts reach ~200 characters at tier 10


@dataclass
class ControllerCfg:
    """An OpenAI-compatible VLM controller endpoint (vLLM, hosted; clvr.vlm), used when the loop's
    controller key is "openai". The API key is read only from the environment variable named by
    `api_key_env` ("" = send no key, e.g. a local vLLM); it is never stored in the config."""

    base_url: str = "http://127.0.0.1:8000/v1"
    model: str = "Qwen/Qwen3-VL-8B-Instruct"
    api_key_env: str = "OPENAI_API_KEY"
    timeout_s: float = 30.0  # per attempt, whole answer included
    max_retries: int = 3  # extra attempts after the first
    backoff_s: float = 0.5  # first retry waits this, then doubles (capped at 8 s)
    max_tokens: int = 256
    temperature: float = 0.0
    max_response_bytes: int = 65536  # larger answers are rejected unread
    max_history: int = 16  # earlier steps shown to the model


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


@dataclass
class MainCfg:
    """`clvr run`, the main job (for now: render the world suite over the tiers and the six GenEval
    suites as ground truth, score it with the judge)."""

    out: str = "runs/cpu/main"
    n_per_tier: int = 20  # grammar prompts per complexity tier
    geneval_n: int = 20  # prompts per GenEval tag
    samples: int = 1  # images per prompt
    seed: int = 0


@dataclass
class SynthesizeCfg:
    """The data engine (`synthesize` stage, clvr.synthesize): verified loop trajectories over the 10 tiers.
    The work is a fixed list of jobs (prompt j: tier = tiers[j % len(tiers)]) cut into shards of `shard_size`;
    a shard is the unit of batching, of atomic commit and of resume, so the output depends only on the
    config, never on `workers` or on where a run was killed."""

    out: str = "runs/synthesize"
    generator: str = "world"  # generator registry key (clvr.generator)
    model: str = ""  # "" = <pretrain.out>/final (the base) if present, else the shipped base; base | distilled | folder | oracle | noisy-oracle
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


@dataclass
class PipelineCfg:
    """`clvr pipeline run` (flows/retrain.py): what happens around the stages. Stage settings stay in their
    own sections; this one is not a DVC param, so changing it never reruns a stage."""

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


@dataclass
class Config:
    profile: str = "cpu"
    seed: int = 0
    world: WorldCfg = field(default_factory=WorldCfg)
    generator: GeneratorCfg = field(default_factory=GeneratorCfg)
    pretrain: PretrainCfg = field(default_factory=PretrainCfg)
    distill: DistillCfg = field(default_factory=DistillCfg)
    sample: SampleCfg = field(default_factory=SampleCfg)
    loop: LoopCfg = field(default_factory=LoopCfg)
    controller: ControllerCfg = field(default_factory=ControllerCfg)
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


def load_config(profile: str = "cpu", overrides: list[str] | None = None) -> Config:
    """Resolve schema + base.yaml + <profile>.yaml + overrides into a typed, validated `Config`."""
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
        if "=" not in item:
            raise ConfigError(f"override '{item}' must look like key=value")
        cfg = _merge(cfg, OmegaConf.from_dotlist([item]), f"override '{item}'")
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
