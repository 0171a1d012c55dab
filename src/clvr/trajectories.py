"""The trajectory data set (what the `synthesize` stage writes and training reads): a versioned schema and its loader.

A data set is a folder:

    trajectories.jsonl   one JSON object per line, one line per trajectory (accepted or not), in job order
    images/blank.png     the empty canvas every trajectory starts from
    images/<id>/NN.png   what the generator drew at step NN (kept or undone)
    images/<id>/baseline.png   the single-step baseline for the same prompt and seed
    dataset_card.md, metrics.json

Image paths in a line are relative to the folder. A step's `input` is the canvas it edited: the previous kept
step's `output` (or `images/blank.png`), so each distinct canvas is stored once.

Schema `clvr.trajectory`, version 2 (`SCHEMA_VERSION`); every key is required, no other key is allowed. This
loader also reads version 1 lines (`READS`), which lack `grid` and `macro` (read as the default world's grid
and no macro-step examples) and the judge's `failures`:

    schema, version     "clvr.trajectory", 2
    id                  "t000123": the job index; unique in the data set
    shard, job          the shard that made it and its job index (job order = line order)
    tier, c_task        complexity tier 1..10 and C_task of the prompt (clvr.world.grammar)
    prompt, metadata    the prompt and its GenEval-format constraints (the ground truth the judge uses)
    seed                the loop's seed (its i-th generator call uses seed * 100003 + i; the baseline the same)
    generator, controller   backend names
    target              the controller's target layout [{shape, color, row, col}]
    steps               every controller output, in order (`TrajectoryStep` below)
    final               image path of the final canvas (the last kept output)
    accepted            the final canvas passes the judge, re-checked on the written PNG (never assumed)
    status              "accepted" | "failed" (the loop ended without a passing canvas) | "controller_error"
                        (the controller gave no valid step, see the rejected step's note) | "judge_mismatch"
                        (the loop's verifier passed it but the re-check did not: never accepted)
    judge               {"passed", "reason", "failures"}: the re-check of `final` against `metadata`; `failures`
                        lists the broken constraints (clvr.judge.Failure.to_dict), `reason` is their text
    ended_by            "stop" | "max_iters" | "max_nfe" | "max_calls"
    calls, nfe, retries, corrections, rejected    generator calls, network evaluations, retried steps,
                        correction steps, controller outputs rejected by the schema or the state
    baseline            {"image", "passed", "reason", "failures"}: the single-step image for the same prompt and
                        seed, judged
    ab                  the A/B verdict of `final` against the baseline (accepted trajectories; else null):
                        {"verdict": "win" | "tie" | "loss", "reason", "loop": score, "baseline": score} with
                        score = {"passed", "satisfied", "constraints", "artefact"} (see clvr.synthesize.ab_verdict)
    grid                the world's grid size, which the steps' cells refer to (version 2)
    macro               macro-step examples (version 2): each merges k >= 2 consecutive positive steps (the
                        trajectory's kept steps, accepted) into one multi-op step for one generator call:
                        {"steps": [their indices], "reference": the first one's input, "target": the last one's
                        output, "step": {"op": "edit", "ops": [their steps]}}. The target is a verified generator
                        output, never a rendered ground truth, and the detected scene of the target is exactly the
                        multi-op step applied to the detected scene of the reference (clvr.synthesize.macro).

A step (`TrajectoryStep`):

    index, kind         position; "plan" | "correction" | "retry" | "generate" | "rejected" | "stop"
    step                the validated step {op, shape, color, cell, ...} (null when rejected)
    instruction         the instruction text the generator read
    trace_text          the reasoning trace it was conditioned on (the earlier kept steps' instructions)
    seed                the generator seed of this call (null for rejected / stop)
    input, output       image paths (null for rejected / stop); the output of a partly kept multi-op step
                        (passive "kept", clvr.loop.run) is the canvas it left: its kept ops' cells, the rest unchanged
    passive             passive verification of this step {"ok", "detail", ...}: the gate
    active              active verification of the canvas after this step {"ok", "reason", "missing", ...}
    kept                passed passive verification; its output became the canvas
    positive            usable as a positive training example: kept AND the trajectory accepted. A step that
                        failed passive verification is recorded (flagged kept=false) and never positive.
    nfe                 network evaluations of this call
    note                why a controller output was rejected (and its raw text), else ""

Training reads examples through `load_examples` (both versions): one `Example` per positive step (k = 1) and one
per macro-step entry (k >= 2), each the canvas before the call, the verified canvas after it, the trace (the
instructions of the kept steps before it, oldest first) and the step.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Iterator

import numpy as np

from clvr.errors import ClvrError
from clvr.io import load_png
from clvr.steps import SchemaError, Step
from clvr.world.vocab import GRID

SCHEMA = "clvr.trajectory"
SCHEMA_VERSION = 2
READS = (1, 2)  # the versions this loader reads
V2_KEYS = ("grid", "macro")  # keys version 1 lines lack
MACRO_KEYS = ("steps", "reference", "target", "step")
FILE = "trajectories.jsonl"
STATUSES = ("accepted", "failed", "controller_error", "judge_mismatch")
KINDS = ("plan", "correction", "retry", "generate", "rejected", "stop")
VERDICTS = ("win", "tie", "loss")


class SchemaVersionError(ClvrError):
    """A line written under another schema (or version) than this loader reads."""


@dataclass
class TrajectoryStep:
    index: int
    kind: str
    step: dict | None
    instruction: str
    trace_text: str
    seed: int | None
    input: str | None
    output: str | None
    passive: dict | None
    active: dict | None
    kept: bool
    positive: bool
    nfe: int
    note: str


@dataclass
class Trajectory:
    schema: str
    version: int
    id: str
    shard: int
    job: int
    tier: int
    c_task: float
    prompt: str
    metadata: dict
    seed: int
    generator: str
    controller: str
    target: list
    steps: list[TrajectoryStep]
    final: str
    accepted: bool
    status: str
    judge: dict
    ended_by: str
    calls: int
    nfe: int
    retries: int
    corrections: int
    rejected: int
    baseline: dict
    ab: dict | None
    grid: int
    macro: list

    def to_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in fields(self) if self.version > 1 or f.name not in V2_KEYS}
        d["steps"] = [{f.name: getattr(s, f.name) for f in fields(s)} for s in self.steps]
        return d

    def kept(self) -> list[TrajectoryStep]:
        """The steps whose output became the canvas, in order (each one's input is the previous one's output)."""
        return [s for s in self.steps if s.kept and s.output is not None]

    def to_line(self) -> str:
        return json.dumps(self.to_dict(), separators=(",", ":"), default=_plain) + "\n"

    @staticmethod
    def from_dict(d: object, where: str = "trajectory") -> "Trajectory":
        """Validate one decoded line (schema and version first, then every key and its type)."""
        if not isinstance(d, dict):
            raise ClvrError(f"{where}: expected a JSON object, got {type(d).__name__}")
        if d.get("schema") != SCHEMA or d.get("version") not in READS or isinstance(d.get("version"), bool):
            raise SchemaVersionError(
                f"{where}: schema {d.get('schema')!r} version {d.get('version')!r}; this loader reads "
                f"{SCHEMA!r} versions {', '.join(map(str, READS))} (clvr.trajectories) - regenerate the data set "
                "with `clvr synthesize` or use the clvr release that wrote it")
        if d["version"] == 1:
            if any(k in d for k in V2_KEYS):
                raise ClvrError(f"{where}: version 1 lines have no {[k for k in V2_KEYS if k in d]}")
            d = {**d, "grid": GRID, "macro": []}
        _check_keys(d, Trajectory, where)
        steps = d["steps"]
        if not isinstance(steps, list):
            raise ClvrError(f"{where}: 'steps' must be a list")
        parsed = []
        for i, s in enumerate(steps):
            if not isinstance(s, dict):
                raise ClvrError(f"{where}: steps[{i}] must be an object")
            _check_keys(s, TrajectoryStep, f"{where}: steps[{i}]")
            parsed.append(TrajectoryStep(**s))
        t = Trajectory(**{**d, "steps": parsed})
        _check_values(t, where)
        return t


def _plain(o: object):
    """numpy scalars (e.g. from the detector) as plain JSON numbers."""
    if isinstance(o, (np.integer, np.floating, np.bool_)):
        return o.item()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


_TYPES = {"int": (int,), "float": (int, float), "str": (str,), "bool": (bool,), "dict": (dict,), "list": (list,)}


def _check_keys(d: dict, cls: type, where: str) -> None:
    """Exactly the dataclass's keys, each of its annotated type (null only where the annotation allows it)."""
    names = [f.name for f in fields(cls)]
    missing = [n for n in names if n not in d]
    extra = [k for k in d if k not in names]
    if missing or extra:
        raise ClvrError(f"{where}: " + "; ".join(
            ([f"missing {missing}"] if missing else []) + ([f"unknown {extra}"] if extra else [])))
    for f in fields(cls):
        v, hint = d[f.name], str(f.type)  # e.g. "int", "dict | None", "list[TrajectoryStep]"
        base = hint.split("|")[0].split("[")[0].strip()
        if v is None and "None" in hint:
            continue
        if v is None or not isinstance(v, _TYPES[base]) or (isinstance(v, bool) and base in ("int", "float")):
            raise ClvrError(f"{where}: '{f.name}' must be {hint}, got {type(v).__name__}")


def _check_values(t: Trajectory, where: str) -> None:
    if t.status not in STATUSES:
        raise ClvrError(f"{where}: status {t.status!r} not in {STATUSES}")
    if t.accepted != (t.status == "accepted"):
        raise ClvrError(f"{where}: accepted={t.accepted} contradicts status {t.status!r}")
    if t.accepted and not t.judge.get("passed"):
        raise ClvrError(f"{where}: accepted but its final canvas did not pass the judge")
    for s in t.steps:
        if s.kind not in KINDS:
            raise ClvrError(f"{where}: step {s.index} kind {s.kind!r} not in {KINDS}")
        if s.positive and not (s.kept and t.accepted):
            raise ClvrError(f"{where}: step {s.index} is positive but not kept in an accepted trajectory")
    if t.ab is not None and t.ab.get("verdict") not in VERDICTS:
        raise ClvrError(f"{where}: ab verdict {t.ab.get('verdict')!r} not in {VERDICTS}")
    trace: list[str] = []
    for s in t.steps:
        if s.output is not None and s.trace_text != ". ".join(trace):
            raise ClvrError(f"{where}: step {s.index} trace_text is not the instructions of the kept steps before it")
        if s.kept and s.output is not None:
            trace.append(kept_instruction(s, t.grid))
    if t.version > 1:
        for key in ("judge", "baseline"):
            f = getattr(t, key).get("failures")
            if not isinstance(f, list) or (not f) != bool(getattr(t, key).get("passed")):
                raise ClvrError(f"{where}: {key}.failures must list the broken constraints (none iff passed)")
        chain = t.kept()
        for i, m in enumerate(t.macro):
            _check_macro(t, chain, m, f"{where}: macro[{i}]")


def kept_step(s: TrajectoryStep, grid: int) -> Step:
    """What a kept step did to the canvas: its step, or for a partly kept multi-op step (`passive["kept"]`,
    clvr.loop.run) the ops it kept (one op: that op's own step)."""
    step = Step.from_dict(s.step, grid)
    kept = (s.passive or {}).get("kept")
    if kept is None or step.op != "edit":
        return step
    ops = tuple(step.ops[i] for i in kept)
    return ops[0] if len(ops) == 1 else Step("edit", ops=ops)


def kept_instruction(s: TrajectoryStep, grid: int) -> str:
    """What a kept step added to the reasoning trace: the instruction of what it kept (`kept_step`)."""
    return s.instruction if "kept" not in (s.passive or {}) else kept_step(s, grid).instruction()


def _check_macro(t: Trajectory, chain: list[TrajectoryStep], m: object, where: str) -> None:
    """A macro-step entry merges consecutive positive steps: its reference, target and step follow from them."""
    if not isinstance(m, dict) or sorted(m) != sorted(MACRO_KEYS):
        raise ClvrError(f"{where}: expected an object with keys {list(MACRO_KEYS)}")
    pos = {s.index: n for n, s in enumerate(chain)}
    idx = m["steps"]
    if not (isinstance(idx, list) and len(idx) >= 2
            and all(isinstance(i, int) and not isinstance(i, bool) and i in pos for i in idx)):
        raise ClvrError(f"{where}: steps must name >= 2 kept steps, got {idx!r}")
    run = [chain[pos[i]] for i in idx]
    if [pos[i] for i in idx] != list(range(pos[idx[0]], pos[idx[0]] + len(idx))) or not all(s.positive for s in run):
        raise ClvrError(f"{where}: steps {idx} are not consecutive positive steps")
    if m["reference"] != run[0].input or m["target"] != run[-1].output:
        raise ClvrError(f"{where}: reference/target must be step {idx[0]}'s input and step {idx[-1]}'s output")
    if m["step"] != {"op": "edit", "ops": [s.step for s in run]}:
        raise ClvrError(f"{where}: step must be the edit of steps {idx}' ops in order")
    try:
        Step.from_dict(m["step"], t.grid)
    except SchemaError as e:
        raise ClvrError(f"{where}: {e}") from None


# ---- reading -------------------------------------------------------------------------------------------------

def dataset_file(path: str | Path) -> Path:
    """The JSONL of a data set given its folder or the file itself."""
    p = Path(path)
    p = p / FILE if p.is_dir() else p
    if not p.is_file():
        raise ClvrError(f"no trajectory data set at '{path}' (expected {FILE} or a folder holding it)")
    return p


def load_trajectories(path: str | Path, accepted_only: bool = False) -> Iterator[Trajectory]:
    """Trajectories of a data set (folder or JSONL), validated line by line; a line of another schema version,
    a torn or malformed line raises ClvrError naming the file and line."""
    p = dataset_file(path)
    with p.open() as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{p}:{n}"
            if not line.endswith("\n"):
                raise ClvrError(f"{where}: torn last line (no newline): the data set was not written completely")
            try:
                d = json.loads(line)
            except ValueError as e:
                raise ClvrError(f"{where}: not JSON ({e})") from None
            t = Trajectory.from_dict(d, where)
            if t.accepted or not accepted_only:
                yield t


def load_image(root: str | Path, rel: str) -> np.ndarray:
    """An image of the data set at `root` as (H, W, 3) uint8."""
    return load_png(Path(root) / rel)


@dataclass(frozen=True)
class Example:
    """One generator call to learn from (the interface training reads)."""

    reference: Path  # PNG: the canvas before the call
    target: Path  # PNG: the verified canvas after it (generator output, never rendered ground truth)
    trace: tuple[str, ...]  # instruction texts of the earlier steps (the reasoning trace), oldest first
    step: Step  # single- or multi-op step; k = len(step.parts())

    @property
    def k(self) -> int:
        return len(self.step.parts())


def trajectory_examples(t: Trajectory, root: Path) -> list[Example]:
    """An accepted trajectory's examples: each positive step (k = 1), then each macro-step entry (k >= 2)."""
    if not t.accepted:
        return []
    trace: dict[int, tuple[str, ...]] = {}  # step index -> instructions of the kept steps before it
    done: list[str] = []
    for s in t.kept():
        trace[s.index] = tuple(done)
        done.append(kept_instruction(s, t.grid))
    out = [Example(root / s.input, root / s.output, trace[s.index], kept_step(s, t.grid))
           for s in t.kept() if s.positive]
    out += [Example(root / m["reference"], root / m["target"], trace[m["steps"][0]], Step.from_dict(m["step"], t.grid))
            for m in t.macro]
    return out


def load_examples(path: str | Path) -> list[Example]:
    """Every training example of a data set (folder or JSONL, schema version 1 or 2): per accepted trajectory, its
    positive steps (k = 1), then its macro-step examples (k >= 2; version 1 data sets have none)."""
    root = dataset_file(path).parent
    return [e for t in load_trajectories(path, accepted_only=True) for e in trajectory_examples(t, root)]
