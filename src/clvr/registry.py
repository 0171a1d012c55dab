"""Two registries: the loop's roles and the generator models.

* Roles: one registry mechanism, a string key -> factory, filled by a decorator, read by `make(key, **kwargs)`
  with a clear error naming the unknown key and the known ones.
* Models: the one place that knows the generator model names: the shipped weights (`SHIPPED`, packaged under
  `WEIGHTS_DIR`), the oracle generators that need no model (`ORACLES`), where a name's files are
  (`model_path`), the released models the retrain flow starts from (`released`), where the foundation flow ships
  (`ship_root`), the distill stage's default teacher (`default_teacher`), and a model's content hash
  (`model_digest`).
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Callable, Generic, TypeVar

from clvr.errors import CheckpointError, ClvrError

T = TypeVar("T")


class Registry(dict, Generic[T]):
    """Factories of one role (generator, controller, verifier) by key."""

    def __init__(self, role: str):
        super().__init__()
        self.role = role

    def register(self, key: str) -> Callable[[Callable[..., T]], Callable[..., T]]:
        def deco(factory: Callable[..., T]) -> Callable[..., T]:
            self[key] = factory
            return factory
        return deco

    def make(self, key: str, **kwargs) -> T:
        if key not in self:
            raise ClvrError(f"unknown {self.role} '{key}' (known: {', '.join(sorted(self))})")
        return self[key](**kwargs)


# ---- generator models ----------------------------------------------------------------------------------------

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
SHIPPED = ("base", "distilled")  # packaged generator weights: WEIGHTS_DIR/<name>
ORACLES = ("oracle", "noisy-oracle")  # generator keys that draw from the scene itself: no model files
INDEX = "model_index.json"  # what makes a folder a (diffusers-layout) generator checkpoint


def model_path(model: str | Path) -> Path:
    """"base" | "distilled" -> the shipped folder; anything else is a checkpoint folder path."""
    return WEIGHTS_DIR / str(model) if str(model) in SHIPPED else Path(model)


def is_checkpoint(path: str | Path) -> bool:
    return (Path(path) / INDEX).is_file()


def default_teacher(*outs: str | Path) -> str:
    """The first `<out>/final` of `outs` that is a checkpoint (the distill stage passes finetune.out, then
    pretrain.out), else the shipped "base"."""
    for out in outs:
        if is_checkpoint(Path(out) / "final"):
            return str(Path(out) / "final")
    return "base"


def released(base: str, distilled: str, key: str = "weights") -> dict[str, str]:
    """The released models the retrain flow starts from ("base" | "distilled" | a checkpoint folder each, from
    config keys `<key>.base` and `<key>.distilled`), checked: {"base": ..., "distilled": ...}."""
    return {name: check_checkpoint(model, f"{key}.{name}") for name, model in zip(SHIPPED, (base, distilled))}


def ship_root(root: str | Path) -> Path:
    """Where the foundation flow's ship stage installs base/ and distilled/: `root`, or "" = `WEIGHTS_DIR`."""
    return Path(root) if str(root) else WEIGHTS_DIR


def check_model_name(model: str) -> None:
    """A model is a known name or an existing folder; otherwise a ClvrError listing the names (and the closest)."""
    import difflib

    names = (*SHIPPED, *ORACLES)
    if model in names or Path(model).exists():
        return
    close = difflib.get_close_matches(model, names, n=1)
    hint = f"did you mean '{close[0]}'? " if close else ""
    raise ClvrError(f"unknown model {model!r}: {hint}use one of {', '.join(names)} or a checkpoint folder")


def check_checkpoint(model: str, key: str) -> str:
    """`model` (named by config key `key`) is a shipped name, an oracle or a checkpoint folder; returns it."""
    if model not in (*SHIPPED, *ORACLES) and not is_checkpoint(model):
        raise CheckpointError(f"{key}: no generator checkpoint at '{model}' (missing {INDEX})")
    return model


def model_digest(model: str) -> str:
    """sha256 over the files of a model folder (shipped or given), names and bytes; "" for an oracle."""
    if model in ORACLES:
        return ""
    root = model_path(model)
    h = hashlib.sha256()
    for p in sorted(q for q in root.rglob("*") if q.is_file()):
        h.update(str(p.relative_to(root)).encode())
        h.update(p.read_bytes())
    return h.hexdigest()


def is_hub_id(model: str) -> bool:
    """Whether `model` reads as a hub id (owner/name) rather than a path: nothing of that name exists here, it does
    not start like a path, and it has exactly one slash."""
    return not Path(model).expanduser().exists() and not model.startswith((".", "/", "~")) and model.count("/") == 1


def resolve_device(device: str) -> str:
    """A config's device (auto | cpu | cuda | cuda:N, clvr.config.is_device): auto = cuda when visible, else cpu."""
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def local_model_folder(model: str, key: str) -> Path:
    """`model` (named by config key `key`) as a local folder: itself, or a hub id's snapshot in the local hub cache.
    Weights are never downloaded: a hub id with no local copy is a CheckpointError naming it."""
    p = Path(model).expanduser()
    if p.is_dir():
        return p
    if not is_hub_id(model):
        raise CheckpointError(f"{key} '{model}' is not a model folder (nor a hub id owner/name)")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id=model, local_files_only=True))
    except Exception as e:  # not in the cache, or not a valid id: never the hub client's traceback
        raise CheckpointError(f"{key} '{model}': weights must be present locally (they are never "
                              f"downloaded here; put the checkpoint in the local hub cache or give its folder): "
                              f"{type(e).__name__}") from None
