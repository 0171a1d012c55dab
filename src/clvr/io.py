"""Atomic file writes: a reader (or a rerun after a kill) sees the old file or the new one, never half.

Output folders: a command empties or replaces only a folder it made itself. `claim_dir` accepts a new or empty
folder, or one carrying the command's marker file (MARKER, written into every folder it makes); anything else is
refused with a ClvrError before any work starts, so a slip such as `--out .` or `--out ~/photos` loses nothing.
`check_out_file` / `check_out_dir` catch an output path that cannot be written (a file where a folder must go,
no permission) before the work, not after it.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Callable

import numpy as np

from clvr.errors import ClvrError

MARKER = ".clvr-output"  # "<command>\n": this folder was made by that clvr command and it may replace it


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
    try:
        write(tmp)
    except BaseException:  # nothing half-written is left behind; `final` is untouched
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if final.exists():
        old = final.parent / f".old-{final.name}-{os.getpid()}"
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    return final


def _nearest_existing(path: Path) -> Path:
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _writable_from(path: Path, what: str) -> None:
    """`path` (absent or a folder) can be made and written: its nearest existing ancestor is a writable folder."""
    anc = _nearest_existing(path)
    if not anc.is_dir():
        raise ClvrError(f"{what} '{path}': '{anc}' is a file, not a folder")
    if not os.access(anc, os.W_OK | os.X_OK):
        raise ClvrError(f"{what} '{path}': no permission to write in '{anc}'")


def check_out_file(path: Path, what: str = "output file") -> Path:
    """Before any work: `path` can be written as a file (not a folder, and its folder can be made and written)."""
    path = Path(path)
    if path.is_dir():
        raise ClvrError(f"{what} '{path}' is a folder, not a file")
    if path.exists() and not os.access(path, os.W_OK):
        raise ClvrError(f"{what} '{path}': no permission to overwrite it")
    _writable_from(path.parent, what)
    return path


def check_out_dir(path: Path, what: str = "output folder") -> Path:
    """Before any work: `path` is a folder (or can be made) that can be written, and so can its parent."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ClvrError(f"{what} '{path}' is a file, not a folder")
    _writable_from(path, what)
    _writable_from(path.absolute().parent, what)
    return path


def owner_of(path: Path) -> str | None:
    """The clvr command whose marker `path` carries, or None."""
    try:
        return (Path(path) / MARKER).read_text(encoding="utf-8").strip() or None
    except (OSError, UnicodeDecodeError):
        return None


def claim_dir(path: Path, owner: str, legacy: Callable[[Path], bool] | None = None,
              what: str = "output folder") -> bool:
    """May command `owner` empty or replace folder `path`? Yes when it is absent or empty, carries `owner`'s
    marker, or `legacy(path)` recognises an output of `owner` written before markers existed; otherwise a
    ClvrError naming the folder. Returns True when the folder holds an earlier output (which will be replaced).
    Call it before any work."""
    path = Path(path)
    check_out_dir(path, what)
    if not path.exists() or not any(path.iterdir()):
        return False
    here, target = Path.cwd().resolve(), path.resolve()
    if target == here or target in here.parents:
        raise ClvrError(f"{what} '{path}' holds the current folder; refusing to replace it")
    mark = owner_of(path)
    if mark == owner or (mark is None and legacy is not None and legacy(path)):
        return True
    whose = f"by `clvr {mark}`" if mark else "by someone else (no clvr marker file)"
    raise ClvrError(f"{what} '{path}' is not empty and was made {whose}; `clvr {owner}` only replaces "
                    f"folders it made: choose a new or empty folder")


def mark_dir(path: Path, owner: str) -> None:
    """Mark `path` as made by command `owner` (see claim_dir)."""
    atomic_write_text(Path(path) / MARKER, owner + "\n")


def empty_own_dir(path: Path, owner: str, legacy: Callable[[Path], bool] | None = None,
                  what: str = "output folder") -> bool:
    """Empty folder `path` if `claim_dir` allows it (else ClvrError, nothing touched) and mark it as `owner`'s.
    Returns True when an earlier output was removed."""
    path = Path(path)
    had = claim_dir(path, owner, legacy, what)
    if had:
        shutil.rmtree(path)
    path.mkdir(parents=True, exist_ok=True)
    mark_dir(path, owner)
    return had


def replace_own_dir(path: Path, owner: str, write: Callable[[Path], object],
                    legacy: Callable[[Path], bool] | None = None, what: str = "output folder") -> bool:
    """Build folder `path` whole: `claim_dir` first (before `write` runs), then write(tmp) into a fresh folder
    that is marked as `owner`'s and renamed over `path`; a reader sees the old folder or the complete new one.
    Returns True when an earlier output was replaced."""
    path = Path(path)
    had = claim_dir(path, owner, legacy, what)

    def build(tmp: Path) -> None:
        write(tmp)
        mark_dir(tmp, owner)

    atomic_dir(path, build)
    return had


def load_png(path: Path) -> np.ndarray:
    """An image file as (H, W, 3) uint8; a ClvrError naming the path if it is missing or unreadable."""
    from PIL import Image

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
