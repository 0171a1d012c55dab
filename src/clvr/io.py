"""Atomic file writes: a reader (or a rerun after a kill) sees the old file or the new one, never half."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Callable

import numpy as np


def _tmp(path: Path, suffix: str = "") -> Path:
    return path.with_name(f".{path.name}.tmp{os.getpid()}{suffix}")


def atomic_write_text(path: Path, text: str, durable: bool = False) -> None:
    """Write `text` to a temporary file and rename it over `path`. `durable`: fsync the file and its folder
    too, so the write also survives a machine crash (the data engine's commits)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp(path)
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        if durable:
            f.flush()
            os.fsync(f.fileno())
    os.replace(tmp, path)
    if durable:
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_dir(final: Path, write: Callable[[Path], object]) -> Path:
    """Call write(tmp_dir), then rename tmp_dir to `final` (replacing an older folder of that name)."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".tmp-{final.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    write(tmp)
    if final.exists():
        old = final.parent / f".old-{final.name}-{os.getpid()}"
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    return final


def load_png(path: Path) -> np.ndarray:
    """An image file as (H, W, 3) uint8; a ClvrError naming the path if it is missing or unreadable."""
    from PIL import Image

    from clvr.errors import ClvrError

    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"))
    except (OSError, SyntaxError, ValueError) as e:  # missing, truncated, not an image
        raise ClvrError(f"cannot read image {path}: {e}") from None


def save_png(path: Path, image: np.ndarray) -> None:
    from PIL import Image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp(path, ".png")
    Image.fromarray(np.asarray(image, np.uint8)).save(tmp)
    os.replace(tmp, path)


def save_figure(fig, path: Path, **savefig_kw) -> None:
    """A matplotlib figure saved atomically (format from `path`'s suffix), then closed."""
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp(path, path.suffix)
    fig.savefig(tmp, **savefig_kw)
    plt.close(fig)
    os.replace(tmp, path)
