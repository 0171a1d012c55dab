"""DVC and git as subprocesses in the project directory (their command lines are the stable interface).

Every command gets `project_env(root)`: this interpreter's bin/ first on PATH (so DVC's stage commands find
`clvr`), the project's own src/ first on PYTHONPATH (a temporary worktree runs its own code) and conf/.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Callable, Iterator

import yaml

from clvr.errors import ClvrError
from tasks.lock import held_fd


class StageFailed(RuntimeError):
    """A stage command failed for a reason that may be transient (killed, crashed): worth a retry."""


class StageBadInput(ClvrError):
    """A stage command rejected its input (`clvr stage` exits 2): a retry would fail the same way."""


class StageInterrupted(RuntimeError):
    """A stage command stopped because the flow was interrupted (`stopping`): not retried."""


def project_env(root: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env["PYTHONPATH"] = os.pathsep.join(p for p in [str(root / "src"), env.get("PYTHONPATH", "")] if p)
    env["CLVR_CONF_DIR"] = str(root / "conf")
    env["PYTHONUNBUFFERED"] = "1"
    for k in ("DVC_NO_ANALYTICS", "HF_HUB_OFFLINE", "HF_HUB_DISABLE_TELEMETRY", "DO_NOT_TRACK"):
        env.setdefault(k, "1")
    return env


def dvc_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "dvc", *args]


def run(cmd: list[str], root: Path, check: bool = True) -> subprocess.CompletedProcess:
    """Run a short command; on failure raise with its output."""
    p = subprocess.run(cmd, cwd=root, env=project_env(root), capture_output=True, text=True)
    if check and p.returncode != 0:
        raise RuntimeError(f"`{' '.join(cmd[2:] if cmd[0] == sys.executable else cmd)}` failed "
                           f"({p.returncode}): {(p.stderr or p.stdout).strip()[-2000:]}")
    return p


def stream(cmd: list[str], root: Path, log_path: Path, on_line: Callable[[str], None] | None = None) -> tuple[int, str]:
    """Run a long command, teeing its output (tqdm's \\r-updates included) to `log_path` and `on_line`."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    text = []
    # Its own process group, so that an interrupted flow (Ctrl-C, SIGTERM from Prefect's runner) can stop the
    # whole tree (dvc and the stage process it starts) instead of leaving it running without a parent. It
    # inherits the pipeline lock, if this process holds it (tasks/lock.py).
    lock_fd = held_fd(root)
    with open(log_path, "ab") as log, _started(cmd, root, lock_fd) as p:
        try:
            buf = b""
            while chunk := p.stdout.read1(4096):
                log.write(chunk)
                log.flush()
                buf += chunk
                *lines, buf = re.split(rb"[\r\n]", buf)
                for line in lines:
                    s = line.decode(errors="replace").strip()
                    if s:
                        text.append(s)
                        if on_line:
                            on_line(s)
            rc = p.wait()
        except BaseException:
            stop_group(p)
            raise
        finally:
            with _RUNNING_LOCK:
                _RUNNING.discard(p)
    if buf.strip():
        text.append(buf.decode(errors="replace").strip())
    return rc, "\n".join(text)


# The long commands running now, from any thread of this process (a flow runs independent stages at once, each
# in a Prefect worker thread). A signal reaches only the main thread: `stopping` stops the others' commands.
_RUNNING: set[subprocess.Popen] = set()
_RUNNING_LOCK = threading.Lock()
_STOPPING = threading.Event()


def _started(cmd: list[str], root: Path, lock_fd: int | None) -> subprocess.Popen:
    with _RUNNING_LOCK:
        if _STOPPING.is_set():
            raise StageInterrupted(f"not started, the flow is stopping: {' '.join(cmd[2:])}")
        p = subprocess.Popen(cmd, cwd=root, env=project_env(root), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             start_new_session=True, pass_fds=() if lock_fd is None else (lock_fd,))
        _RUNNING.add(p)
        return p


@contextlib.contextmanager
def stopping() -> Iterator[None]:
    """Stop every long command this process is running (`stream`, in any thread), and start none until the block
    ends: for an interrupted flow, whose stages run in worker threads that no signal reaches."""
    _STOPPING.set()
    try:
        with _RUNNING_LOCK:
            running = list(_RUNNING)
        stoppers = [threading.Thread(target=stop_group, args=(p,)) for p in running]
        for t in stoppers:
            t.start()
        for t in stoppers:
            t.join()
        yield
    finally:
        _STOPPING.clear()


def stop_group(p: subprocess.Popen, grace_s: float = 10.0) -> None:
    """SIGTERM the process group of `p` (started with start_new_session), SIGKILL it after `grace_s`."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(p.pid, sig)
        except ProcessLookupError:
            return
        try:
            p.wait(grace_s)
            return
        except subprocess.TimeoutExpired:
            continue


def repro(root: Path, stage: str, log_path: Path, on_line: Callable[[str], None] | None = None) -> str:
    """`dvc repro --single-item STAGE`: DVC decides whether the stage is up to date. Returns
    "ran", "skipped" (up to date) or "restored" (DVC's run cache had these exact deps and params)."""
    # --wait-for-lock: stages running at once each take DVC's repo lock briefly (to start, and to write dvc.lock)
    rc, out = stream(dvc_cmd("--wait-for-lock", "repro", "--single-item", stage), root, log_path, on_line)
    if rc != 0 and _STOPPING.is_set():
        raise StageInterrupted(f"stage '{stage}' stopped: the flow was interrupted (log: {log_path})")
    if rc != 0:
        tail = "\n".join(out.splitlines()[-15:])
        if re.search(r"exited with 2\b", out):
            msg = next((ln for ln in reversed(out.splitlines()) if ln.startswith("error:")), tail)
            raise StageBadInput(f"stage '{stage}': {msg.removeprefix('error: ')} (log: {log_path})")
        raise StageFailed(f"stage '{stage}' failed (dvc exit {rc}); log: {log_path}\n{tail}")
    if f"Running stage '{stage}'" in out:
        return "ran"
    if "is cached - skipping run" in out:
        return "restored"
    return "skipped"


def lock(root: Path) -> dict:
    p = root / "dvc.lock"
    return yaml.safe_load(p.read_text()) if p.is_file() else {}


def cached_outs(lock_data: dict) -> dict[str, str]:
    """path -> md5 of every output recorded in a dvc.lock (cached outs, metrics and plots)."""
    return {o["path"]: o.get("md5", "") for st in lock_data.get("stages", {}).values() for o in st.get("outs", [])}


def lock_sha256(root: Path) -> str:
    p = root / "dvc.lock"
    return hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else ""


def out_md5(root: Path, stage: str, path: str) -> str:
    """The md5 dvc.lock records for one output of a stage ("" if none)."""
    for o in lock(root).get("stages", {}).get(stage, {}).get("outs", []):
        if o["path"] == path:
            return o.get("md5", "")
    return ""


def push(root: Path) -> str:
    """`dvc push` to the default remote; returns DVC's summary line."""
    lines = run(dvc_cmd("push"), root).stdout.strip().splitlines()
    return lines[-1] if lines else ""


def metrics_diff(root: Path, rev: str = "HEAD") -> dict:
    """`dvc metrics diff --all --json REV`: {file: {metric: {"old", "new", "diff"}}} (REV vs workspace)."""
    out = run(dvc_cmd("metrics", "diff", "--all", "--json", rev), root).stdout.strip()
    data = json.loads(out) if out else {}
    return data.get("diff", data) if isinstance(data.get("diff"), dict) else data


# ---- git --------------------------------------------------------------------------------------------------

def git(root: Path, *args: str, check: bool = True) -> str:
    return run(["git", *args], root, check=check).stdout.strip()


def git_identity(root: Path) -> list[str]:
    """`-c user.name=... -c user.email=...` when the repo has no identity (commits must not fail on it)."""
    if git(root, "config", "user.email", check=False):
        return []
    return ["-c", "user.name=clvr pipeline", "-c", "user.email=clvr-pipeline@localhost"]


def head(root: Path) -> str:
    return git(root, "rev-parse", "HEAD", check=False)


def is_dirty(root: Path) -> bool:
    return bool(git(root, "status", "--porcelain", "--untracked-files=no", check=False))


def tag_exists(root: Path, tag: str) -> bool:
    p = run(["git", "rev-parse", "--verify", "--quiet", f"refs/tags/{tag}^{{commit}}"], root, check=False)
    return p.returncode == 0


def run_tags(root: Path) -> list[str]:
    return git(root, "tag", "--list", "run/*", "--sort=-creatordate", check=False).split()


def commit_and_tag(root: Path, paths: list[str], tag: str, message: str) -> str:
    """Commit exactly `paths` (run outputs git keeps: dvc.lock, params.yaml, metrics) and tag the result.
    Other staged or modified files stay as they are. Returns the tagged commit."""
    paths = [p for p in paths if (root / p).exists()]
    git(root, "add", "-f", "--", *paths)
    if run(["git", "diff", "--cached", "--quiet", "--", *paths], root, check=False).returncode != 0:
        git(root, *git_identity(root), "commit", "-q", "-m", message, "--only", "--", *paths)
    git(root, *git_identity(root), "tag", "-a", tag, "-m", message)
    return head(root)
