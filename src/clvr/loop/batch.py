"""Batch generation in GenEval's folder layout (`clvr generate --metadata FILE --outdir DIR`).

For line i of FILE (a GenEval metadata record) and K samples:
    DIR/NNNNN/metadata.jsonl       the record, as GenEval's evaluation reads it
    DIR/NNNNN/samples/KKKK.png     sample k, from the loop run with seed `seed + i * K + k`
    DIR/NNNNN/generation.json      how the samples were made (settings) and each one's trace summary
`clvr eval geneval DIR` scores the folder. Every prompt runs through `run_many` (the loops in lockstep, their
generator calls batched), `eval.batch_size` loops at a time.

Resumable, and nothing is lost: each prompt folder is built in a temporary folder and renamed into place when
all its samples are done, so a folder is either absent, complete, or a skipped prompt's. A rerun keeps every
complete folder (same record, same settings, all K samples) and generates the others; a complete folder that
holds another prompt or was made with other settings (mode, generator, model, controller, verifier, samples,
seed) is refused before any work, never overwritten: use a new DIR. A folder from a killed run's temporary
files is removed (it was never complete).

Modes. "single": the record already holds the constraints, so nothing is parsed; the plan is one text-to-image
step of the prompt text, so every GenEval prompt ("a photo of a bench") runs with any generator that can draw
it (the world's tokenizer maps unknown words to <unk>; the oracles draw only world prompts). "loop" and
"rewrite": the controller plans from the prompt text, as for a user's prompt (the benchmark's record is what
the images are scored against, not an input of the system). A prompt the controller cannot plan (a class or
phrase outside its vocabulary) is skipped: its folder gets metadata.jsonl and skipped.txt (the controller's
reason) and no samples, the other prompts are generated, and the command exits 1 naming how many were skipped
(`clvr eval geneval` counts them as missing). A rerun tries skipped prompts again. When no prompt left to do can
be planned, the command fails before the generator loads and writes nothing.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from clvr.config import MAX_SEED, Config
from clvr.errors import ClvrError
from clvr.generator import Generator
from clvr.io import atomic_dir, atomic_write_text, claim_dir, mark_dir, owner_of, save_png
from clvr.judge import read_jsonl
from clvr.loop.controller import STOP, check_prompt
from clvr.loop.roles import Controller, LoopState, Plan, Verifier
from clvr.loop.run import run_many
from clvr.world.scene import Scene

OWNER = "generate --metadata"  # the marker of a batch output folder (clvr.io.claim_dir)
SETTINGS = ("mode", "generator", "model", "controller", "verifier", "samples", "seed")
SKIPPED = "skipped.txt"
RECORD = "generation.json"


class RecordPlans:
    """A controller whose single-step plans come from the metadata records (no parse): `records` maps a job's
    seed to its record. Loop and rewrite plans, and every later step, are the wrapped controller's."""

    def __init__(self, inner: Controller, records: dict[int, dict], grid: int, max_prompt_chars: int):
        self.inner, self.records, self.grid, self.max_prompt_chars = inner, records, grid, max_prompt_chars
        self.name = getattr(inner, "name", type(inner).__name__)

    def plan(self, prompt: str, mode: str = "loop", seed: int = 0) -> Plan:
        if mode != "single":
            return self.inner.plan(prompt, mode, seed)
        text = check_prompt(prompt, self.max_prompt_chars)
        return Plan(text, self.records[seed], Scene((), self.grid), [{"op": "generate", "prompt": text}], mode)

    def next(self, state: LoopState) -> dict:
        if state.plan.mode == "single":
            return dict(STOP) if state.calls else dict(state.plan.steps[0])
        return self.inner.next(state)


@dataclass
class Todo:
    index: int  # line of the metadata file (0-based) = folder number
    record: dict
    skip: str = ""  # why the controller cannot plan it ("" = it can)


def sample_seed(seed: int, index: int, samples: int, k: int) -> int:
    return seed + index * samples + k


def folder(root: Path, index: int) -> Path:
    return root / f"{index:05d}"


def check_folder(root: Path, records: list[dict], settings: dict, source: str) -> list[int]:
    """The prompt indices still to do; a ClvrError (before any work) for a folder this run must not touch: a
    complete folder of another prompt or other settings, or a prompt folder beyond the metadata file."""
    extra = sorted(p.name for p in root.iterdir() if p.is_dir() and p.name.isdigit() and int(p.name) >= len(records)) \
        if root.is_dir() else []
    if extra:
        raise ClvrError(f"{root / extra[0]} is beyond the {len(records)} prompts of {source}: this folder was made "
                        f"from another metadata file; use a new --outdir")
    todo = []
    for i, md in enumerate(records):
        d = folder(root, i)
        if not d.exists():
            todo.append(i)
            continue
        if not (d / "metadata.jsonl").is_file():  # every folder this command writes has one
            raise ClvrError(f"{d} has no metadata.jsonl: it was not made by `clvr generate --metadata`; move it "
                            f"away or use a new --outdir")
        old = read_jsonl(d / "metadata.jsonl")[0]
        if old != md:
            raise ClvrError(f"{d} holds prompt {old['prompt']!r} but line {i + 1} of {source} is {md['prompt']!r}: "
                            f"this folder was made from another metadata file; use a new --outdir")
        if (d / SKIPPED).is_file():
            todo.append(i)  # tried again
            continue
        try:
            made = json.loads((d / RECORD).read_text(encoding="utf-8"))["settings"]
        except (OSError, ValueError, KeyError, TypeError):
            made = None
        if made is not None:
            diff = [k for k in SETTINGS if made.get(k) != settings[k]]
            if diff:
                k = diff[0]
                raise ClvrError(f"{d} was generated with {k} {made.get(k)!r}, this run has {settings[k]!r}: use a new "
                                f"--outdir (or the same settings to resume)")
        if made is None or not all((d / "samples" / f"{k:04d}.png").is_file() for k in range(settings["samples"])):
            todo.append(i)  # not complete (written by hand, or files removed): made again, seeds unchanged
    return todo


def plan_check(controller: Controller, todo: list[Todo], mode: str, seed: int, samples: int) -> None:
    """Loop / rewrite: mark each prompt the controller cannot plan (`skip` = its reason)."""
    if mode == "single":
        return
    for t in todo:
        try:
            controller.plan(t.record["prompt"], mode, sample_seed(seed, t.index, samples, 0))
        except ClvrError as e:
            name = getattr(controller, "name", type(controller).__name__)
            t.skip = f"controller {name!r} cannot plan this prompt in mode {mode}: {e}"


def write_prompt(root: Path, index: int, record: dict, images: list, rows: list[dict], settings: dict) -> None:
    """One complete prompt folder, renamed into place (replacing a skipped or incomplete one)."""

    def write(tmp: Path) -> None:
        for k, img in enumerate(images):
            save_png(tmp / "samples" / f"{k:04d}.png", img)
        atomic_write_text(tmp / RECORD, json.dumps({"settings": settings, "samples": rows}, indent=1))
        atomic_write_text(tmp / "metadata.jsonl", json.dumps(record) + "\n")

    atomic_dir(folder(root, index), write)


def write_skipped(root: Path, t: Todo) -> None:
    def write(tmp: Path) -> None:
        atomic_write_text(tmp / SKIPPED, t.skip + "\n")
        atomic_write_text(tmp / "metadata.jsonl", json.dumps(t.record) + "\n")

    atomic_dir(folder(root, t.index), write)


def prepare(cfg: Config, records: list[dict], root: Path, settings: dict, controller: Controller,
            source: str) -> list[Todo]:
    """Every check before the generator loads: the folder may be written and resumed, the seeds fit, and (loop,
    rewrite) which prompts the controller can plan. Returns the prompts to do; raises when none can be planned."""
    claim_dir(root, OWNER, what="--outdir")
    n, k, seed = len(records), settings["samples"], settings["seed"]
    if sample_seed(seed, n - 1, k, k - 1) > MAX_SEED:
        raise ClvrError(f"--seed {seed}: seeds up to {sample_seed(seed, n - 1, k, k - 1)} exceed {MAX_SEED}")
    todo = [Todo(i, records[i]) for i in check_folder(root, records, settings, source)]
    plan_check(controller, todo, settings["mode"], seed, k)
    if todo and all(t.skip for t in todo):
        raise ClvrError(f"none of the {len(todo)} prompt(s) left in {source} can be planned; first: {todo[0].skip} "
                        f"(--mode single needs no plan)")
    return todo


def generate_folder(cfg: Config, records: list[dict], root: Path, todo: list[Todo], settings: dict,
                    roles: tuple[Controller, Verifier], generator: Generator,
                    log: Callable[[str], object] = print) -> dict:
    """Generate every prompt of `todo` into `root` (see the module docstring); returns the summary."""
    controller, verifier = roles
    mode, k, seed = settings["mode"], settings["samples"], settings["seed"]
    root.mkdir(parents=True, exist_ok=True)
    if owner_of(root) != OWNER:
        mark_dir(root, OWNER)
    for stale in root.glob(".tmp-*"):  # a killed run's unfinished prompt folders
        shutil.rmtree(stale, ignore_errors=True)
    skipped = [t for t in todo if t.skip]
    for t in skipped:
        write_skipped(root, t)
    work = [t for t in todo if not t.skip]
    plans = RecordPlans(controller, {sample_seed(seed, t.index, k, j): t.record for t in work for j in range(k)},
                        cfg.world.grid, cfg.loop.max_prompt_chars)
    per_chunk = max(1, cfg.eval.batch_size // k)
    passed = calls = 0
    for start in range(0, len(work), per_chunk):
        chunk = work[start:start + per_chunk]
        jobs = [(t.record["prompt"], sample_seed(seed, t.index, k, j)) for t in chunk for j in range(k)]
        traces = run_many(jobs, plans, generator, verifier, cfg.loop, mode, cfg.world.grid, cfg.world.cell,
                          cfg.eval.batch_size)
        for n, t in enumerate(chunk):
            mine = traces[n * k:(n + 1) * k]
            rows = [{"seed": s, "passed": tr.passed, "reason": tr.reason, "calls": tr.calls, "nfe": tr.nfe,
                     "ended_by": tr.ended_by} for (_, s), tr in zip(jobs[n * k:(n + 1) * k], mine)]
            write_prompt(root, t.index, t.record, [tr.final for tr in mine], rows, settings)
            passed += sum(tr.passed for tr in mine)
            calls += sum(tr.calls for tr in mine)
        log(f"{min(start + per_chunk, len(work))}/{len(work)} prompts generated")
    return {"prompts": len(records), "kept": len(records) - len(todo), "generated": len(work),
            "skipped": len(skipped), "skipped_folders": [folder(root, t.index).name for t in skipped],
            "samples": k, "mode": mode, "verifier_pass": round(passed / (len(work) * k), 3) if work else None,
            "calls_mean": round(calls / (len(work) * k), 3) if work else None, "out": str(root)}
