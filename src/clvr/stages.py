"""The stage registry: the one list of pipeline stages, each in one of two flows. `dvc.yaml` is generated from it
(`clvr pipeline dvc-yaml`, every stage of both flows), each Prefect flow runs its own stages in order, `clvr stage
NAME` runs one alone.

* foundation (`clvr pipeline run --flow foundation`, `make weights`): vae -> pretrain -> finetune -> distill ->
  trajectory -> rebalance -> ship. It makes the released weights (at real scale these are downloaded: FLUX.2
  [klein] base and distilled), so its stages list no dependency on them.
* retrain (`clvr pipeline run`, `make run`): synthesize -> controller_sft -> sft -> evaluate, starting from the
  released weights (`weights.base`, `weights.distilled`: the shipped ones or registry-pinned folders).

Stage contract: `run(cfg: Config) -> {"metrics": {name: float}, "final": path | None}`, writing under its own
out dir (`cfg.<section>.out`): `metrics.json` (final summary), and for training stages `metrics.jsonl` (one line
per logged step), `checkpoints/step-NNNNNN/` and `final/` (a diffusers-layout model folder).

Paths in the registry may name config values as `{section.key}`; dvc.yaml gets them as DVC `${...}`
interpolations of `params.yaml`, the resolved config of the run (`write_params`), and every stage command
reads that same file, so what DVC tracks is exactly what runs.
"""

from __future__ import annotations

import ast
import functools
import importlib
import json
import os
import random
import re
import shutil
import sys
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Callable

import numpy as np
import yaml

from clvr.config import FLOWS, Config, SynthesizeCfg, launcher_env, load_config, to_dict, to_yaml
from clvr.errors import ClvrError
from clvr.io import atomic_write_text

PARAMS_FILE = "params.yaml"
DVC_YAML_HEADER = "# Generated from src/clvr/stages.py by `clvr pipeline dvc-yaml`: edit the registry, not this file.\n"
PARAMS_HEADER = ("# The resolved config of the last `clvr pipeline run` (written by clvr.stages.write_params).\n"
                 "# DVC tracks its keys and every stage reads it; edit conf/ instead.\n")

PKG = Path(__file__).resolve().parent  # src/clvr
REPO = PKG.parents[1]
_CLVR_NAME = re.compile(r"^clvr(?:\.\w+)+(?::\w+)?$")  # a module named in a string, e.g. "clvr.train.pretrain:run"


# ---- code deps: the import graph -------------------------------------------------------------------------

def module_path(name: str) -> Path | None:
    """src/clvr/a/b.py or src/clvr/a/b/__init__.py for module "clvr.a.b"; None when it is not a clvr module."""
    parts = name.split(".")
    if parts[0] != "clvr":
        return None
    base = PKG.joinpath(*parts[1:])
    for cand in (base.with_suffix(".py"), base / "__init__.py"):
        if cand.is_file():
            return cand
    return None


@functools.cache  # the registry asks for most files once per stage: parse each once per process
def _imported_names(path: Path) -> frozenset[str]:
    """Every clvr module a file imports, at module level or inside a function (lazy imports included), and
    every "clvr.x.y[:fn]" string it names (registries that import by name)."""
    pkg = ".".join(["clvr", *path.relative_to(PKG).with_suffix("").parts])
    if path.name == "__init__.py":
        pkg = pkg.rsplit(".", 1)[0]
        pkg_parts = pkg.split(".")
    else:
        pkg_parts = pkg.split(".")[:-1]
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join([*pkg_parts[: len(pkg_parts) - node.level + 1], *([base] if base else [])])
            names.add(base)
            names.update(f"{base}.{a.name}" for a in node.names)  # `from clvr.train import ckpt`
        elif (isinstance(node, ast.Constant) and isinstance(node.value, str) and _CLVR_NAME.match(node.value)
              and path != Path(__file__).resolve()):  # this registry names every stage: not an import
            names.add(node.value.split(":")[0])
    return frozenset(n for n in names if n == "clvr" or n.startswith("clvr."))


def import_closure(*modules: str) -> set[Path]:
    """The files of `modules` and of every clvr module they import, transitively, with their packages'
    __init__.py (importing clvr.a.b runs clvr/__init__.py and clvr/a/__init__.py)."""
    seen: set[Path] = set()
    todo = list(modules)
    while todo:
        name = todo.pop()
        parts = name.split(".")
        for i in range(1, len(parts) + 1):
            path = module_path(".".join(parts[:i]))
            if path is not None and path not in seen:
                seen.add(path)
                todo.extend(_imported_names(path))
    return seen


def code_deps(*modules: str) -> tuple[str, ...]:
    """The import closure as repo-relative paths; a package folder whose every module is in it is listed as
    the folder (a new file there then reruns the stage too, which errs on the safe side)."""
    files = import_closure("clvr.stages", *modules)

    def whole(d: Path) -> bool:
        return all(p in files for p in d.glob("*.py")) and all(whole(s) for s in d.iterdir()
                                                               if s.is_dir() and (s / "__init__.py").is_file())

    out: set[Path] = set()
    for f in files:
        d, top = f.parent, None
        while d != PKG and (d / "__init__.py").is_file() and whole(d):
            top, d = d, d.parent
        out.add(top or f)
    return tuple(sorted(str(p.relative_to(REPO)) for p in out))


WEIGHTS = "src/clvr/weights"  # the shipped generators: data, not code (what the retrain flow starts from)


def _keys(schema: type, section: str, but: tuple[str, ...]) -> tuple[str, ...]:
    """A section's params keys less those that cannot change the output (e.g. the process count)."""
    return tuple(f"{section}.{f.name}" for f in fields(schema) if f.name not in but)


@dataclass(frozen=True)
class Stage:
    name: str
    flow: str  # the flow that runs it (clvr.config.FLOWS)
    func: str  # "module:function"
    section: str  # config section with this stage's `out` (and `steps`, for resumable stages)
    params: tuple[str, ...]  # params.yaml keys DVC tracks (changing one reruns the stage)
    deps: tuple[str, ...]  # code and data the stage reads
    outs: tuple[str, ...]  # cached outputs (DVC versions them)
    metrics: tuple[str, ...] = ()  # JSON summaries, kept in git (cache: false)
    plots: tuple[tuple[str, dict], ...] = ()  # (path, DVC plot props); cache: false
    resumable: bool = False  # writes checkpoints/ and resumes from the newest one after a kill
    generator: bool = False  # its final/ is a world generator (registered in MLflow, evaluated)
    datasets: tuple[str, ...] = ()  # outs that are data sets (logged with their DVC digest)

    def function(self) -> Callable[[Config], dict]:
        mod, _, fn = self.func.partition(":")
        return getattr(importlib.import_module(mod), fn)

    def out(self, cfg: Config) -> Path:
        return Path(getattr(cfg, self.section).out)

    def cmd(self) -> str:
        return f"clvr stage {self.name} --params {PARAMS_FILE}"


def _train_stage(name: str, flow: str, func: str, params: tuple[str, ...], extra_deps: tuple[str, ...] = ()) -> Stage:
    o = f"{{{name}.out}}"
    weights = (WEIGHTS,) if flow == "retrain" else ()  # the foundation flow makes them: no dependency on them
    return Stage(name=name, flow=flow, func=func, section=name, params=params,
                 deps=(*extra_deps, *code_deps(func.partition(":")[0]), *weights),
                 outs=(f"{o}/final",), metrics=(f"{o}/metrics.json",),
                 plots=((f"{o}/curve.json", {"x": "step", "y": "loss", "title": f"{name}: training loss"}),),
                 resumable=True, generator=True)


TRAIN_PARAMS = ("seed", "world", "generator", "sample", "engine")

STAGES: list[Stage] = [
    # ---- foundation: the released weights
    replace(_train_stage("vae", "foundation", "clvr.train.vae:run", ("seed", "world", "engine", "vae")),
            generator=False),  # its final/ is a cell autoencoder (clvr.models.vae), read through generator.vae
    _train_stage("pretrain", "foundation", "clvr.train.pretrain:run", (*TRAIN_PARAMS, "pretrain"),
                 extra_deps=("{vae.out}/final",)),
    _train_stage("finetune", "foundation", "clvr.train.finetune:run", (*TRAIN_PARAMS, "finetune"),
                 extra_deps=("{pretrain.out}/final",)),
    _train_stage("distill", "foundation", "clvr.train.distill:run", (*TRAIN_PARAMS, "distill"),
                 extra_deps=("{finetune.out}/final",)),
    # the distilled model's second part: the student goes on learning the fine-tune's own trajectory (the teacher)
    _train_stage("trajectory", "foundation", "clvr.train.distill:run_trajectory", (*TRAIN_PARAMS, "trajectory"),
                 extra_deps=("{finetune.out}/final", "{distill.out}/final")),
    _train_stage("rebalance", "foundation", "clvr.train.distill:run_rebalance", (*TRAIN_PARAMS, "rebalance"),
                 extra_deps=("{finetune.out}/final", "{trajectory.out}/final")),
    Stage(name="ship", flow="foundation", func="clvr.ship:run", section="ship", params=("ship",),
          deps=("{finetune.out}/final", "{rebalance.out}/final", *code_deps("clvr.ship")),
          outs=(), metrics=("{ship.out}/metrics.json",)),
    # ---- retrain: from the released weights
    Stage(name="synthesize", flow="retrain", func="clvr.synthesize:run", section="synthesize",
          params=("world", "loop", "controller", "weights.base", *_keys(SynthesizeCfg, "synthesize", but=("workers",))),
          deps=(*code_deps("clvr.synthesize"), WEIGHTS),
          outs=("{synthesize.out}/trajectories.jsonl", "{synthesize.out}/images", "{synthesize.out}/dataset_card.md"),
          metrics=("{synthesize.out}/metrics.json",),
          datasets=("{synthesize.out}/trajectories.jsonl",)),
    Stage(name="controller_sft", flow="retrain", func="clvr.learned.train:run", section="controller_sft",
          params=("seed", "world", "engine", "loop.retries_per_step", "loop.max_prompt_chars", "loop.verifier",
                  "controller_sft"),
          deps=("{synthesize.out}/trajectories.jsonl", *code_deps("clvr.learned.train")),  # controller_sft.data
          outs=("{controller_sft.out}/final",), metrics=("{controller_sft.out}/metrics.json",),
          plots=(("{controller_sft.out}/curve.json", {"x": "step", "y": "loss", "title": "controller_sft: training loss"}),),
          resumable=True),  # its final/ is a learned controller (clvr.learned.model), not a generator
    _train_stage("sft", "retrain", "clvr.train.sft:run", ("seed", "world", "sample", "engine", "sft"),
                 extra_deps=("{synthesize.out}/trajectories.jsonl", "{synthesize.out}/images")),  # sft.data
    Stage(name="evaluate", flow="retrain", func="clvr.evaluate:run", section="eval",
          params=("seed", "world", "sample", "loop", "controller", "weights", "eval", "controller_sft.k_success"),
          deps=("{sft.out}/final", "{controller_sft.out}/final", *code_deps("clvr.evaluate"), WEIGHTS),
          outs=("{eval.out}/prompts.jsonl", "{eval.out}/samples.png"),
          metrics=("{eval.out}/metrics.json",),
          plots=(("{eval.out}/geneval.json", {"template": "bar_horizontal", "x": "accuracy", "y": "group",
                                              "title": "GenEval (world), single step"}),
                 ("{eval.out}/geneval.png", {}), ("{eval.out}/probe.png", {}),
                 ("{eval.out}/filmstrip.png", {})),  # not outs: it shows seconds, which no rerun repeats
          datasets=("{eval.out}/prompts.jsonl",)),
]


def stage_names() -> list[str]:
    return [s.name for s in STAGES]


def get_stage(name: str) -> Stage:
    for s in STAGES:
        if s.name == name:
            return s
    raise ClvrError(f"unknown stage '{name}' (known: {', '.join(stage_names())})")


def flow_stages(flow: str, only: list[str] | None = None) -> list[Stage]:
    """The stages `flow` runs, in registry order; `only` limits them to some of its stages (names)."""
    if flow not in FLOWS:
        raise ClvrError(f"unknown flow '{flow}' (known: {', '.join(FLOWS)})")
    for name in only or ():
        if get_stage(name).flow != flow:
            raise ClvrError(f"stage '{name}' is in the {get_stage(name).flow} flow, not in {flow} "
                            f"(its stages: {', '.join(s.name for s in STAGES if s.flow == flow)})")
    return [s for s in STAGES if s.flow == flow and (not only or s.name in only)]


def upstream(stage: Stage, among: list[Stage]) -> list[Stage]:
    """The stages of `among` whose outputs `stage` reads (a dep under their `{section.out}`): DVC's graph, for
    running each stage once those are done and stages that read nothing of each other at the same time."""
    return [s for s in among if s is not stage and any(d.startswith(f"{{{s.section}.out}}/") for d in stage.deps)]


def flow_config(flow: str, profile: str, overrides: list[str] | None) -> Config:
    """A flow run's config: the profile and overrides, with `pipeline.flow` = `flow` (params.yaml records it for
    `clvr reproduce`); the flow is chosen by the run, never by an override."""
    flow_stages(flow)
    if any(o.split("=", 1)[0].strip() == "pipeline.flow" for o in overrides or []):
        raise ClvrError("pipeline.flow is the flow being run: choose it with `clvr pipeline run --flow`, not --set")
    return load_config(profile, [*(overrides or []), f"pipeline.flow={flow}"])


# ---- paths with config references ------------------------------------------------------------------------

_REF = re.compile(r"\{([a-z_]+(?:\.[a-z_]+)*)\}")


def resolve(path: str, cfg: Config) -> str:
    """'{pretrain.out}/final' -> 'runs/ci/pretrain/final' for this config."""
    def value(m: re.Match) -> str:
        v = to_dict(cfg)
        for k in m.group(1).split("."):
            v = v[k]
        return str(v)

    return _REF.sub(value, path)


def _dvc_path(path: str) -> str:
    return _REF.sub(r"${\1}", path)


# ---- dvc.yaml ----------------------------------------------------------------------------------------------

def dvc_stages(stages: list[Stage] | None = None) -> dict:
    """The `stages:` mapping of dvc.yaml."""
    out = {}
    for s in stages or STAGES:
        d: dict = {"cmd": s.cmd(), "deps": [_dvc_path(p) for p in s.deps], "params": list(s.params)}
        if s.outs:
            d["outs"] = [_dvc_path(p) for p in s.outs]
        if s.metrics:
            d["metrics"] = [{_dvc_path(p): {"cache": False}} for p in s.metrics]
        if s.plots:
            d["plots"] = [{_dvc_path(p): {"cache": False, **props}} for p, props in s.plots]
        out[s.name] = d
    return out


def dvc_yaml(stages: list[Stage] | None = None) -> str:
    return DVC_YAML_HEADER + yaml.safe_dump({"stages": dvc_stages(stages)}, sort_keys=False, width=120)


def write_params(root: Path, cfg: Config) -> Path:
    """Write the resolved config as params.yaml (atomically): what DVC tracks and what every stage reads."""
    path = Path(root) / PARAMS_FILE
    atomic_write_text(path, PARAMS_HEADER + to_yaml(cfg))
    return path


# ---- running one stage -------------------------------------------------------------------------------------

def seed_everything(seed: int) -> None:
    """Same seeds and deterministic kernels in every stage process (reproduce compares with tolerance 0)."""
    import torch

    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True, warn_only=True)


def latest_checkpoint(out: Path) -> Path | None:
    ckpts = sorted((out / "checkpoints").glob("step-[0-9]*"))
    return ckpts[-1] if ckpts else None


def _param(cfg: dict, key: str):
    """A params key ("section" or "section.key") of a config dict; None when absent."""
    for part in key.split("."):
        cfg = cfg.get(part) if isinstance(cfg, dict) else None
    return cfg


def prepare_resume(stage: Stage, cfg: Config, log: Callable[[str], None] = print) -> int:
    """Keep the newest checkpoint only when it belongs to an unfinished run of this same config; then the
    stage resumes from it. A finished run or another config means DVC asked for a fresh run, so the old
    checkpoints and step log (already in MLflow) are cleared. Returns the step the stage will start from."""
    out = stage.out(cfg)
    ck = latest_checkpoint(out)
    if ck is None:
        return 0
    try:
        state = json.loads((ck / "state.json").read_text())
        step = int(state["step"])
    except (OSError, ValueError, KeyError):
        state, step = {}, -1
    now, then = to_dict(cfg), state.get("config")
    same = then is None or all(_without_out(_param(then, k)) == _without_out(_param(now, k)) for k in stage.params)
    steps = getattr(getattr(cfg, stage.section), "steps", None)
    if step >= 0 and same and (steps is None or step < steps):
        log(f"[{stage.name}] resuming from {ck.relative_to(out)} (step {step})")
        return step
    why = "a finished run" if same and step >= 0 else "another config" if step >= 0 else "an unreadable checkpoint"
    log(f"[{stage.name}] starting fresh: the checkpoints in {out} are from {why}")
    shutil.rmtree(out / "checkpoints")
    (out / "metrics.jsonl").unlink(missing_ok=True)
    return 0


def _without_out(section):
    """A config section minus where it writes (a moved run folder is still the same run)."""
    return {k: v for k, v in section.items() if k != "out"} if isinstance(section, dict) else section


def write_curve(out: Path) -> Path | None:
    """metrics.jsonl's train lines as a JSON list (DVC plots read .json, not .jsonl)."""
    src = out / "metrics.jsonl"
    if not src.is_file():
        return None
    rows = []
    for line in src.read_text().splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if row.get("split") == "train":
            rows.append({k: v for k, v in row.items() if k != "split"})
    path = out / "curve.json"
    atomic_write_text(path, json.dumps(rows))
    return path


def run_stage(name: str, cfg: Config) -> dict:
    """Run one stage in this process: seeds, resume-or-fresh, the stage function, the DVC plot of its curve."""
    stage = get_stage(name)
    seed_everything(cfg.seed)
    out = stage.out(cfg)
    out.mkdir(parents=True, exist_ok=True)
    main = launcher_env()[0] == 0  # under torchrun / deepspeed only rank 0 clears and writes the run's files
    if stage.resumable and main:
        prepare_resume(stage, cfg, log=lambda m: print(m, file=sys.stderr, flush=True))
    result = stage.function()(cfg)
    if not isinstance(result, dict) or not isinstance(result.get("metrics"), dict):
        raise TypeError(f"stage '{name}' returned {type(result).__name__}, not {{'metrics': ..., 'final': ...}}")
    if stage.resumable and main:
        write_curve(out)
    return result
