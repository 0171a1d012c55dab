"""One pipeline run at a time per project: an exclusive `flock` on `runs/.pipeline.lock`.

Two runs of the pipeline in the same checkout would write the same DVC outputs, params.yaml, git commits and
tags and MLflow registry aliases. Whichever run comes second (a scheduled run while `clvr pipeline run` is
going, or the reverse) fails at once with a ClvrError naming the holder, before it writes anything.
The kernel drops the lock when its process dies, even by SIGKILL, so a crashed run never leaves a stale lock.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from pathlib import Path
from typing import Iterator

from clvr.errors import ClvrError

LOCK_FILE = Path("runs") / ".pipeline.lock"
_HELD: dict[Path, int] = {}  # project root -> fd of the lock this process holds


def held_fd(root: Path) -> int | None:
    """The lock's file descriptor while this process holds it for `root`. The stage commands (`dvc repro`)
    inherit it: if the flow process is killed outright (SIGKILL, OOM) while a stage runs, the lock stays held
    until that stage's dvc process is done, so no next run writes the same outputs meanwhile."""
    return _HELD.get(Path(root).resolve())


def _refuse(root: Path, path: Path, fd: int) -> ClvrError:
    holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "unknown"
    return ClvrError(f"another pipeline run is in progress in {root} (lock {path} held by {holder}); "
                     "it was left alone, try again when it has finished")


def check_free(root: Path) -> None:
    """Raise the ClvrError `pipeline_lock` would raise if a run holds the lock now (a check before starting
    a flow, so that the CLI can say it in one line; the flow still takes the lock itself)."""
    path = Path(root) / LOCK_FILE
    if not path.is_file():
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        fcntl.flock(fd, fcntl.LOCK_UN)
    except BlockingIOError:
        raise _refuse(Path(root), path, fd) from None
    finally:
        os.close(fd)


@contextlib.contextmanager
def pipeline_lock(root: Path, owner: dict) -> Iterator[Path]:
    """Hold the project's pipeline lock for the duration; `owner` (e.g. the Prefect flow run) is written
    into the lock file so that the run that is turned away can say who holds it."""
    path = Path(root) / LOCK_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise _refuse(Path(root), path, fd) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({"pid": os.getpid(), **owner}).encode(), 0)
        _HELD[Path(root).resolve()] = fd
        try:
            yield path
        finally:
            _HELD.pop(Path(root).resolve(), None)
            os.ftruncate(fd, 0)
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)
