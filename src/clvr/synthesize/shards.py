"""Shards: the unit of batching, atomic commit and resume. A shard writes its images first, then its lines to
`shards/shard-NNNNN.jsonl` in one atomic, fsynced commit; `prepare` resumes or starts afresh, `merge` writes
`trajectories.jsonl` from the shards in order, every job exactly once."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

from clvr.config import Config, SynthesizeCfg
from clvr.errors import ClvrError
from clvr.io import atomic_write_text
from clvr.synthesize.jobs import Log, n_jobs, n_shards, shard_jobs, traj_id
from clvr.trajectories import FILE, Trajectory

WORK = "shards"
BLANK = "images/blank.png"


def shard_file(out: Path, shard: int) -> Path:
    return out / WORK / f"shard-{shard:05d}.jsonl"


def write_png(path: Path, image: np.ndarray) -> None:
    """A PNG written in place: images are only ever referenced after their shard commits, and a redone shard
    wipes its folders first, so a half-written one is never read."""
    Image.fromarray(np.asarray(image, np.uint8), "RGB").save(path, format="PNG", compress_level=1)


def commit_shard(path: Path, trajs: list[Trajectory]) -> None:
    """Commit a shard: its lines are checked against the schema, then written atomically and fsynced. Its
    images are already on disk (not fsynced one by one, which costs more than the generator on some disks: a
    resumed run decodes every image of the shards it keeps, so an image lost in an OS crash redoes its shard)."""
    text = "".join(t.to_line() for t in trajs)
    for line in text.splitlines():
        Trajectory.from_dict(json.loads(line), f"{path.name} (before commit)")
    atomic_write_text(path, text, durable=True)


def _image_paths(t: Trajectory) -> list[str]:
    return [p for s in t.steps for p in (s.input, s.output) if p] + [t.final, t.baseline["image"]]


def read_shard(out: Path, s: SynthesizeCfg, shard: int, check_images: bool = False) -> list[Trajectory]:
    """A committed shard's trajectories, checked: the schema, exactly its jobs in order, and with
    `check_images` every image it names present and whole."""
    path = shard_file(out, shard)
    lines = path.read_text().splitlines()
    trajs = [Trajectory.from_dict(json.loads(line), f"{path}:{n}") for n, line in enumerate(lines, 1)]
    want = [traj_id(j) for j in shard_jobs(s, shard)]
    if [t.id for t in trajs] != want:
        raise ClvrError(f"{path}: holds {len(trajs)} trajectories that are not exactly jobs {want[0]}..{want[-1]}")
    if check_images:
        for p in sorted({p for t in trajs for p in _image_paths(t)}):
            try:
                with Image.open(out / p) as im:
                    im.verify()  # PNG signature and chunk CRCs
            except (OSError, SyntaxError) as e:
                raise ClvrError(f"{path}: image {p} is missing or damaged ({e})") from None
    return trajs


def prepare(out: Path, cfg: Config, fp: str, log: Log) -> list[int]:
    """Resume or start afresh; returns the shards still to do. Resume only an unfinished run of the same
    fingerprint, and only its shards whose lines and images check out."""
    work = out / WORK
    manifest = work / "manifest.json"
    try:
        old = json.loads(manifest.read_text()).get("fingerprint")
    except (OSError, ValueError):
        old = None
    if old == fp:
        done = []
        for sh in range(n_shards(cfg.synthesize)):
            if not shard_file(out, sh).is_file():
                continue
            try:
                read_shard(out, cfg.synthesize, sh, check_images=True)
                done.append(sh)
            except (ClvrError, ValueError, OSError) as e:
                log(f"[synthesize] redoing shard {sh}: {e}")
                shard_file(out, sh).unlink()
        if done:
            log(f"[synthesize] resuming: {len(done)}/{n_shards(cfg.synthesize)} shards already committed")
    else:
        if work.exists() or (out / FILE).exists():
            log(f"[synthesize] starting afresh in {out}" + (" (config or model changed)" if old else ""))
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(out / "images", ignore_errors=True)
        for name in (FILE, "metrics.json", "dataset_card.md"):
            (out / name).unlink(missing_ok=True)
        work.mkdir(parents=True)
        atomic_write_text(manifest, json.dumps({"fingerprint": fp, "n_shards": n_shards(cfg.synthesize)}), durable=True)
    (out / "images").mkdir(exist_ok=True)
    from clvr.world.render import blank

    write_png(out / BLANK, blank(cfg.world.grid, cfg.world.cell))
    for tmp in work.glob("*.tmp*"):  # torn temporary files of a killed commit
        tmp.unlink()
    return [sh for sh in range(n_shards(cfg.synthesize)) if not shard_file(out, sh).is_file()]


def merge(out: Path, s: SynthesizeCfg) -> list[Trajectory]:
    """All shards, in order, into trajectories.jsonl (atomically); every job exactly once."""
    trajs: list[Trajectory] = []
    for sh in range(n_shards(s)):
        trajs += read_shard(out, s, sh)
    ids = [t.id for t in trajs]
    if ids != [traj_id(j) for j in range(n_jobs(s))]:
        raise ClvrError(f"{out}: merged shards do not hold every job exactly once")
    atomic_write_text(out / FILE, "".join(t.to_line() for t in trajs), durable=True)
    return trajs
