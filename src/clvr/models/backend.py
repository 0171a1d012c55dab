"""The `world` generator backend: one call = one step, on the shipped (or a given) WorldPipeline checkpoint.

`make_generator("world", model="base" | "distilled" | <checkpoint folder>, steps=None, guidance=None)`.
base samples at its recorded default (28 steps + CFG), distilled at 4 NFE without CFG (guidance folded in).
"""

from __future__ import annotations

import json
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from clvr.errors import CheckpointError
from clvr.generator import GenRequest, GenResult, register_generator
from clvr.io import atomic_dir
from clvr.models.pipeline import WorldPipeline
from clvr.train.data import join_text
from clvr.world.render import blank

from clvr.registry import SHIPPED, WEIGHTS_DIR, check_model_name, model_path as resolve_model  # noqa: F401  (model names: one place)


def load_pipeline(model: str | Path) -> WorldPipeline:
    """Load a WorldPipeline checkpoint folder (safetensors only, every weight finite); CheckpointError naming the
    path otherwise."""
    path = resolve_model(str(model))
    index = path / "model_index.json"
    if not index.is_file():
        raise CheckpointError(f"no generator checkpoint at '{path}' (missing {index.name})")
    try:
        if json.loads(index.read_text()).get("_class_name") != "WorldPipeline":
            raise CheckpointError(f"'{path}' is not a world generator checkpoint (model_index.json class)")
        with _quiet_loading():
            pipe = WorldPipeline.from_pretrained(str(path), use_safetensors=True)
    except CheckpointError:
        raise
    except Exception as e:  # corrupt / truncated / mismatched files
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"cannot load generator checkpoint '{path}': {msg}") from None
    _check_finite(pipe, path)
    _forget_source(pipe)
    pipe.transformer.eval()
    pipe.text_encoder.eval()
    if pipe.vae is not None:
        pipe.vae.eval().requires_grad_(False)
    return pipe


def _check_finite(pipe: WorldPipeline, path: Path) -> None:
    """Weights holding NaN or inf (a diverged run, a damaged file) would sample garbage without a word: refuse them."""
    for part in ("transformer", "text_encoder", "vae"):
        module = getattr(pipe, part)
        if module is None:  # a pixel-token generator has no autoencoder
            continue
        for name, t in module.state_dict().items():
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                raise CheckpointError(f"generator checkpoint '{path}' has non-finite weights (NaN or inf) in "
                                      f"{part}.{name}")


def _forget_source(pipe: WorldPipeline) -> None:
    """Drop what loading adds to the configs (diffusers' `_name_or_path`, the tokenizer loader's own keys), so a
    model saved after loading (a fine-tune, a resumed run) writes the same config files as a fresh one."""
    from diffusers.configuration_utils import FrozenDict

    for part in (pipe, pipe.transformer, pipe.scheduler, pipe.vae):
        if part is None:  # no autoencoder
            continue
        cfg = part._internal_dict
        if "_name_or_path" in cfg:
            part._internal_dict = FrozenDict({k: v for k, v in cfg.items() if k != "_name_or_path"})
    for key in _LOADER_TOKENIZER_KEYS:
        pipe.tokenizer.init_kwargs.pop(key, None)


_LOADER_TOKENIZER_KEYS = ("is_local", "local_files_only", "max_length", "stride", "truncation_strategy",
                          "pad_token_type_id", "pad_to_multiple_of")


def ship(src: str | Path, name: str, root: Path = WEIGHTS_DIR) -> Path:
    """Install a trained checkpoint as the packaged `name` ("base" | "distilled") weights: loaded (so a bad folder
    fails here, naming it), re-saved clean into a fresh folder, swapped in; the model card beside them is kept."""
    import shutil

    if name not in SHIPPED:
        raise CheckpointError(f"can only ship as {' or '.join(SHIPPED)}, not '{name}'")
    pipe, dest = load_pipeline(src), root / name
    card = dest / "MODEL_CARD.md"

    def write(tmp: Path) -> None:
        pipe.save_pretrained(tmp)
        if card.is_file():
            shutil.copy2(card, tmp / card.name)

    return atomic_dir(dest, write)


@contextmanager
def _quiet_loading():
    """No "Loading pipeline components" / "Loading weights" progress bars for a 4 MB checkpoint."""
    from diffusers.utils import logging as dlog
    from transformers.utils import logging as tlog

    dlog.disable_progress_bar(), tlog.disable_progress_bar()
    try:
        yield
    finally:
        dlog.enable_progress_bar(), tlog.enable_progress_bar()


class WorldGenerator:
    """Generator role on a WorldPipeline. `generate_batch` runs many requests in one batched sampling."""

    def __init__(self, pipe: WorldPipeline, steps: int | None = None, guidance: float | None = None,
                 name: str = "world"):
        self.pipe = pipe
        self.steps = int(steps or pipe.config.default_steps)
        self.guidance = float(pipe.config.default_guidance if guidance is None else guidance)
        self.name = name

    @property
    def nfe(self) -> int:
        return self.steps * (2 if self.guidance > 1.0 else 1)

    def generate(self, req: GenRequest) -> GenResult:
        return self.generate_batch([req])[0]

    def generate_batch(self, reqs: list[GenRequest], max_batch: int = 256) -> list[GenResult]:
        out: list[GenResult] = []
        for i in range(0, len(reqs), max_batch):
            out += self._batch(reqs[i:i + max_batch])
        return out

    def _batch(self, reqs: list[GenRequest]) -> list[GenResult]:
        t0 = time.perf_counter()
        g, cell = self.pipe.config.grid, self.pipe.config.cell
        refs = np.stack([blank(g, cell) if r.reference is None else np.asarray(r.reference, np.uint8) for r in reqs])
        if refs.shape[1:] != (g * cell, g * cell, 3):
            raise CheckpointError(f"reference canvas {refs.shape[1:]} does not match the model's "
                                  f"{g * cell}x{g * cell}x3")
        regions = np.zeros((len(reqs), g * g), np.float32)
        for i, r in enumerate(reqs):
            for row, col in r.regions:
                regions[i, row * g + col] = 1.0
        edit = np.array([r.reference is not None for r in reqs])
        texts = [join_text(list(r.trace), r.instruction) for r in reqs]
        parts = [() if r.step is None else r.step.parts() for r in reqs]
        with torch.inference_mode():
            images = self.pipe.sample(texts, refs, regions, edit, [r.seed for r in reqs], self.steps, self.guidance,
                                      parts)
        dt = (time.perf_counter() - t0) / len(reqs)
        return [GenResult(img, self.nfe, dt) for img in images]


@register_generator("world")
def world_generator(model: str = "base", steps: int | None = None, guidance: float | None = None,
                    **_: object) -> WorldGenerator:
    """Registry factory: `model` is base | distilled | a checkpoint folder (an unknown name is a ClvrError)."""
    check_model_name(model)
    name = f"world-{model}" if model in SHIPPED else f"world:{model}"
    return WorldGenerator(load_pipeline(model), steps, guidance, name=name)
