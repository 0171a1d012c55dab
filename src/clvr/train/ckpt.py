"""Training checkpoints and metric logs, without pickle.

A checkpoint is a folder `checkpoints/step-NNNNNN/`: `model/` (the pipeline in diffusers layout),
`optimizer.safetensors` (AdamW moments) + `state.json` (step, per-param AdamW step counts, numpy RNG state),
`torch_rng.safetensors`. It is written to a temporary folder and renamed, so a kill -9 leaves either the
previous checkpoint or the new one, never half of one.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from clvr.errors import CheckpointError
from clvr.io import atomic_dir, atomic_write_text

KEEP = 2  # newest checkpoints kept


def step_dir(root: Path, step: int) -> Path:
    return root / "checkpoints" / f"step-{step:06d}"


def latest(root: Path) -> Path | None:
    ckpts = sorted((root / "checkpoints").glob("step-[0-9]*")) if (root / "checkpoints").is_dir() else []
    return ckpts[-1] if ckpts else None


def save_checkpoint(root: Path, step: int, pipe, opt: torch.optim.Optimizer, rng: np.random.Generator,
                    gen: torch.Generator, extra: dict | None = None) -> Path:
    def write(d: Path) -> None:
        pipe.save_pretrained(d / "model")
        moments, counts = {}, {}
        for i, p in enumerate(_params(opt)):
            st = opt.state.get(p)
            if st:
                moments[f"{i}.exp_avg"] = st["exp_avg"].contiguous()
                moments[f"{i}.exp_avg_sq"] = st["exp_avg_sq"].contiguous()
                counts[str(i)] = float(st["step"])
        save_file(moments, str(d / "optimizer.safetensors"))
        save_file({"state": gen.get_state()}, str(d / "torch_rng.safetensors"))
        state = {"step": step, "adam_steps": counts, "np_rng": rng.bit_generator.state, **(extra or {})}
        (d / "state.json").write_text(json.dumps(state))

    out = atomic_dir(step_dir(root, step), write)
    for old in sorted((root / "checkpoints").glob("step-[0-9]*"))[:-KEEP]:
        shutil.rmtree(old, ignore_errors=True)
    return out


def load_checkpoint(d: Path, opt: torch.optim.Optimizer, rng: np.random.Generator, gen: torch.Generator) -> dict:
    """Restore optimizer + RNG states in place (the model is loaded from d/model by the caller)."""
    try:
        state = json.loads((d / "state.json").read_text())
        moments = load_file(str(d / "optimizer.safetensors"))
        gen.set_state(load_file(str(d / "torch_rng.safetensors"))["state"])
    except Exception as e:
        raise CheckpointError(f"corrupt training checkpoint '{d}': {e}") from None
    for i, p in enumerate(_params(opt)):
        if str(i) in state["adam_steps"]:
            opt.state[p] = {"step": torch.tensor(state["adam_steps"][str(i)]),
                            "exp_avg": moments[f"{i}.exp_avg"], "exp_avg_sq": moments[f"{i}.exp_avg_sq"]}
    rng.bit_generator.state = state["np_rng"]
    return state


def _params(opt: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [p for g in opt.param_groups for p in g["params"]]


class MetricsLog:
    """metrics.jsonl: one JSON object per logged step; on resume, lines after the resumed step are dropped."""

    def __init__(self, path: Path, resume_step: int = 0):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        keep = []
        if path.exists():
            for line in path.read_text().splitlines():
                try:
                    if json.loads(line)["step"] <= resume_step:
                        keep.append(line)
                except (ValueError, KeyError):
                    continue
        atomic_write_text(path, "".join(k + "\n" for k in keep))

    def log(self, step: int, split: str, **metrics: float) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps({"step": step, "split": split, **{k: float(v) for k, v in metrics.items()}}) + "\n")


def write_json(path: Path, data: dict) -> None:
    atomic_write_text(path, json.dumps(data, indent=2))
