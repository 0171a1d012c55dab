"""GenEval-format judge: GenEval's rules over detected objects, and GenEval's folder layout.

Metadata (one prompt): `{"tag", "prompt", "include": [{"class", "count", "color"?, "position"?: [rel, i]}],
"exclude": [{"class", "count", "color"?}]}`; extra keys (`tier`, `c_task`) are carried along.

Rules (GenEval's `evaluate`, detector-agnostic):
* include: the first `count` detections of the class must exist (count >= N). Exactness comes from exclude
  clauses: an exclude `{class, count: M}` fails when the image holds M or more of the class.
* colour: those detections must have the clause's colour.
* position `[rel, i]`: every selected object must stand in `rel` to every object selected for include
  clause `i` (which must itself have matched), by GenEval's relative-position rule: the centre offset
  shrunk by 0.1 x the summed box sizes, normalised by the offset length; a component beyond 0.5 is a relation.

World extensions (documented, used by the world grammar's prompts):
* When an include clause has a colour, it selects the class's detections *of that colour* (GenEval takes the
  first `count` of the class and then checks their colours, which cannot express "two red circles and a blue
  circle"). Without a colour, the clause takes the first `count` of the class (detections in raster order).
* An exclude clause may carry a colour; it then counts only objects of that colour ("no yellow squares").

A prompt whose class or colour the detector does not know is *unsupported*: reported with a reason, not scored.
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import numpy as np

from clvr.errors import ClvrError
from clvr.io import MARKER, atomic_write_text, check_out_file, load_png, replace_own_dir, save_png
from clvr.world.vocab import GRID, RELATIONS, count_noun, plural

POSITION_THRESHOLD = 0.1
# The 553 prompts of the public GenEval benchmark (djghosh13/geneval, MIT), carried in the repository with their
# licence and source (benchmarks/geneval/README.md). A source checkout's path: the installed package omits them.
GENEVAL_METADATA = Path(__file__).resolve().parents[2] / "benchmarks" / "geneval" / "evaluation_metadata.jsonl"
CLAUSE_KEYS = {"include": ("class", "count", "color", "position"), "exclude": ("class", "count", "color")}

Box = tuple[float, float, float, float]


# ---- GenEval's rules ----------------------------------------------------------------------------------

def relative_position(box_a: Box, box_b: Box) -> set[str]:
    """Relations of box A to box B (x0, y0, x1, y1; y grows downwards), by GenEval's rule."""
    a, b = np.asarray(box_a, float).reshape(2, 2), np.asarray(box_b, float).reshape(2, 2)
    offset = a.mean(0) - b.mean(0)
    dims = (a[1] - a[0]) + (b[1] - b[0])
    revised = np.maximum(np.abs(offset) - POSITION_THRESHOLD * dims, 0) * np.sign(offset)
    if np.all(np.abs(revised) < 1e-3):
        return set()
    dx, dy = revised / np.linalg.norm(offset)
    rels = set()
    if dx < -0.5:
        rels.add("left of")
    if dx > 0.5:
        rels.add("right of")
    if dy < -0.5:
        rels.add("above")
    if dy > 0.5:
        rels.add("below")
    return rels


def describe(clause: dict) -> str:
    """'red circle' / 'circle' for a clause."""
    return f"{clause['color']} {clause['class']}" if clause.get("color") else str(clause["class"])


def select(detections: Iterable, clause: dict) -> list:
    """Detections a clause looks at: its class, and its colour when it names one (world extension)."""
    color = clause.get("color")
    return [d for d in detections if d.shape == clause["class"] and (color is None or d.color == color)]


@dataclass(frozen=True)
class Failure:
    """One broken constraint, as the judge found it; `text()` is its human-readable reason.

    kind      "count" (include clause: too few), "exclude" (exclude clause: too many), "position" (include clause:
              an object not in the relation), "anchor" (include clause: the clause its relation points to failed)
    clause    index of the clause in the metadata's `include` list ("exclude": in its `exclude` list)
    objects   what the clause selects, e.g. "red circle"
    expected  count: at least this many; exclude: fewer than this many; position / anchor: the relation
    found     count / exclude: how many there are; position: the relations seen ("" = none); anchor: 0
    anchor    position / anchor: what the relation is to, e.g. "blue square"
    at        position: ((row, col) of the object, (row, col) of the anchor object) that broke it
    """

    kind: str
    clause: int
    objects: str
    expected: int | str
    found: int | str
    anchor: str = ""
    at: tuple[tuple[int, int], ...] = ()

    def text(self) -> str:
        if self.kind == "count":
            return f"expected {count_noun(int(self.expected), self.objects)}, found {self.found}"
        if self.kind == "exclude":
            return f"expected {exclude_limit(int(self.expected), self.objects)}, found {self.found}"
        if self.kind == "anchor":
            return f"no {self.anchor} for the {self.objects} to be {self.expected}"
        (r, c), (ar, ac) = self.at
        return (f"expected {self.objects} {self.expected} {self.anchor}, found {self.found or 'no clear relation'}"
                f" ({self.objects} at row {r} column {c}, {self.anchor} at row {ar} column {ac})")

    def to_dict(self) -> dict:
        d = {"kind": self.kind, "clause": self.clause, "objects": self.objects, "expected": self.expected,
             "found": self.found}
        if self.anchor:
            d["anchor"] = self.anchor
        if self.at:
            d["at"] = [list(a) for a in self.at]
        return d


def exclude_limit(n: int, objects: str) -> str:
    """What an exclude clause allows: 'no red circles' (count 1), 'fewer than 3 circles'."""
    return f"no {plural(objects)}" if n == 1 else f"fewer than {count_noun(n, objects)}"


def constraint_texts(metadata: dict) -> list[str]:
    """Every clause as one constraint in the judge's wording (what its Failure says was expected): the include
    clauses in order ('2 red circles', '1 circle above the blue square'), then the exclude clauses ('no red
    circles'). A VLM judge answers one verdict per line (clvr.loop.vlm_verifier)."""
    include = metadata.get("include", [])
    out = []
    for c in include:
        text = count_noun(int(c["count"]), describe(c))
        if "position" in c:
            rel, j = c["position"]
            text += f" {rel} the {describe(include[j])}"
        out.append(text)
    return out + [exclude_limit(int(c["count"]), describe(c)) for c in metadata.get("exclude", [])]


def constraint_of(failure: Failure, metadata: dict) -> int:
    """The index in `constraint_texts(metadata)` of the constraint a Failure breaks."""
    return len(metadata.get("include", [])) + failure.clause if failure.kind == "exclude" else failure.clause


def failures(metadata: dict, detections: list) -> list[Failure]:
    """Every broken constraint of one image's detections, one per broken clause, in clause order ([] = pass)."""
    out: list[Failure] = []
    include = metadata.get("include", [])
    groups: list[list | None] = []
    for i, req in enumerate(include):
        n, desc = int(req["count"]), describe(req)
        pool = select(detections, req)
        found = pool[:n]
        ok = len(found) >= n
        if not ok:
            out.append(Failure("count", i, desc, n, len(pool)))
        elif "position" in req:
            broken = _position_failure(i, req, found, include, groups)
            ok = broken is None
            out += [] if ok else [broken]
        groups.append(found if ok else None)
    for i, req in enumerate(metadata.get("exclude", [])):
        m = len(select(detections, req))
        if m >= int(req["count"]):
            out.append(Failure("exclude", i, describe(req), int(req["count"]), m))
    return out


def reason_text(broken: list[Failure]) -> str:
    """The judge's reason: every failure's text, '; '-joined ('' when none)."""
    return "; ".join(f.text() for f in broken)


def judge(metadata: dict, detections: list) -> tuple[bool, str]:
    """(correct, reason) for one image's detections; the reason names every broken constraint ('' if none).
    `failures` gives the same verdict as structure."""
    broken = failures(metadata, detections)
    return not broken, reason_text(broken)


def _position_failure(i: int, req: dict, found: list, include: list, groups: list) -> Failure | None:
    rel, j = req["position"]
    desc, target_desc = describe(req), describe(include[j])
    target = groups[j] if j < len(groups) else None
    if target is None:
        return Failure("anchor", i, desc, rel, 0, target_desc)
    for a in found:
        for b in target:
            rels = relative_position(a.bbox, b.bbox)
            if rel not in rels:
                return Failure("position", i, desc, rel, " and ".join(sorted(rels)), target_desc,
                               ((int(a.row), int(a.col)), (int(b.row), int(b.col))))
    return None


# ---- images and detectors -----------------------------------------------------------------------------

def default_detector(grid: int = GRID):
    from clvr.world.detector import WorldDetector

    return WorldDetector(grid)


def unsupported(metadata: dict, detector) -> str | None:
    """Why the detector cannot judge this prompt (unknown class or colour), or None."""
    classes, colors = getattr(detector, "classes", None), getattr(detector, "colors", None)
    bad = []
    for kind in ("include", "exclude"):
        for c in metadata.get(kind, []):
            if classes is not None and c["class"] not in classes:
                bad.append(f"class '{c['class']}'")
            if colors is not None and c.get("color") and c["color"] not in colors:
                bad.append(f"colour '{c['color']}'")
    if not bad:
        return None
    name = getattr(detector, "name", type(detector).__name__)
    return f"the {name} detector does not know {', '.join(dict.fromkeys(bad))}"


def detect_for(metadata: dict, image: np.ndarray, detector: Callable) -> list:
    """The detections the judge reads for one prompt's image. A detector whose rules depend on the prompt
    offers `for_prompt(metadata)` (the open-vocabulary one: GenEval's counting threshold for the counting tag)."""
    for_prompt = getattr(detector, "for_prompt", None)
    return (for_prompt(metadata) if for_prompt is not None else detector)(image)


def judge_image(metadata: dict, image: np.ndarray, detector: Callable | None = None,
                grid: int = GRID) -> tuple[bool, str]:
    """Detect, then judge. `detector`: any callable image -> detections (default: the world's, on `grid`)."""
    detector = detector or default_detector(grid)
    why = unsupported(metadata, detector)
    if why:
        raise ClvrError(f"unsupported prompt '{metadata.get('prompt', '')}': {why}")
    return judge(metadata, detect_for(metadata, image, detector))


# ---- metadata files -----------------------------------------------------------------------------------

def validate_metadata(md: object, where: str = "metadata") -> dict:
    """Check one GenEval metadata record (every field); raise ClvrError naming the field, else return it."""
    if not isinstance(md, dict):
        kind = {list: "a JSON array", str: "a string", int: "a number", float: "a number", bool: "true/false",
                type(None): "null"}.get(type(md), type(md).__name__)
        raise ClvrError(f"{where}: expected a JSON object {{\"tag\": ..., \"prompt\": ..., \"include\": [...]}}, "
                        f"got {kind}")
    for key in ("tag", "prompt"):
        if not isinstance(md.get(key), str) or not md[key].strip():
            raise ClvrError(f"{where}: '{key}' must be a non-empty string")
    include = md.get("include")
    if not isinstance(include, list) or not include:
        raise ClvrError(f"{where}: 'include' must be a non-empty list")
    exclude = md.get("exclude", [])
    if not isinstance(exclude, list):
        raise ClvrError(f"{where}: 'exclude' must be a list")
    for kind, clauses in (("include", include), ("exclude", exclude)):
        for i, c in enumerate(clauses):
            _validate_clause(c, kind, i, f"{where}: {kind}[{i}]")
    return md


def _validate_clause(c: object, kind: str, i: int, where: str) -> None:
    if not isinstance(c, dict):
        raise ClvrError(f"{where} must be an object")
    extra = set(c) - set(CLAUSE_KEYS[kind])
    if extra:
        raise ClvrError(f"{where}: unknown field(s) {sorted(extra)} (allowed: {', '.join(CLAUSE_KEYS[kind])})")
    if not isinstance(c.get("class"), str) or not c["class"].strip():
        raise ClvrError(f"{where}.class must be a non-empty string")
    n = c.get("count")
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ClvrError(f"{where}.count must be an integer >= 1, got {n!r}")
    if "color" in c and (not isinstance(c["color"], str) or not c["color"].strip()):
        raise ClvrError(f"{where}.color must be a non-empty string")
    if "position" in c:
        p = c["position"]
        if not (isinstance(p, list) and len(p) == 2 and p[0] in RELATIONS and isinstance(p[1], int)
                and not isinstance(p[1], bool)):
            raise ClvrError(f"{where}.position must be [relation, index] with relation in {RELATIONS}, got {p!r}")
        if not 0 <= p[1] < i:
            raise ClvrError(f"{where}.position index {p[1]} must point to an earlier include clause (0..{i - 1})")


def read_jsonl(path: str | Path) -> list[dict]:
    """Metadata records of a JSONL file, validated; a malformed line raises ClvrError with its line number."""
    path = Path(path)
    if path.is_dir():
        raise ClvrError(f"metadata file {path} is a folder; give a JSONL file (one JSON object per line)")
    if not path.is_file():
        raise ClvrError(f"metadata file not found: {path}")
    out = []
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise ClvrError(f"{path}:{lineno}: not UTF-8 text (byte {e.object[e.start]:#04x} at column "
                                f"{e.start + 1})") from None
            if not line.strip():
                continue
            try:
                md = json.loads(line)
            except json.JSONDecodeError as e:
                raise ClvrError(f"{path}:{lineno}: malformed JSON line: {e.msg} (column {e.colno})") from None
            except RecursionError:
                raise ClvrError(f"{path}:{lineno}: JSON nested too deeply") from None
            out.append(validate_metadata(md, f"{path}:{lineno}"))
    if not out:
        raise ClvrError(f"{path}: no metadata lines")
    return out


def write_jsonl(path: str | Path, rows: Iterable[dict]) -> None:
    atomic_write_text(Path(path), "".join(json.dumps(r) + "\n" for r in rows))


# ---- GenEval folder layout: DIR/00000/metadata.jsonl, DIR/00000/samples/0000.png ----------------------

def is_geneval_layout(root: Path) -> bool:
    """Only prompt folders (00000, ...) and results.jsonl: a GenEval folder some clvr command wrote."""
    names = [p.name for p in Path(root).iterdir()]
    return bool(names) and all((n.isdigit() and (Path(root) / n).is_dir()) or n in ("results.jsonl", MARKER)
                               for n in names)


def write_geneval_folder(root: str | Path, metadata: list[dict], images: list[list[np.ndarray]],
                         owner: str = "world render-suite", legacy: Callable[[Path], bool] | None = None) -> bool:
    """Write prompts and their samples in GenEval's layout as one new folder that replaces `root` whole (never
    mixed with an earlier, larger suite). `root` must be new, empty or made by command `owner` (clvr.io.claim_dir).
    Returns True when an earlier suite was replaced."""

    def write(tmp: Path) -> None:
        for i, (md, samples) in enumerate(zip(metadata, images, strict=True)):
            d = tmp / f"{i:05d}"
            for k, img in enumerate(samples):
                save_png(d / "samples" / f"{k:04d}.png", img)
            atomic_write_text(d / "metadata.jsonl", json.dumps(md) + "\n")

    return replace_own_dir(Path(root), owner, write, legacy)


def read_geneval_folder(root: str | Path,
                        metadata_file: str | Path | None = None) -> list[tuple[str, dict, list[Path]]]:
    """[(prompt folder name, metadata, sample paths)]. With `metadata_file`, its line i is folder i's prompt."""
    root = Path(root)
    if not root.is_dir():
        raise ClvrError(f"not a folder: {root}")
    dirs = {p.name: p for p in root.iterdir() if p.is_dir() and p.name.isdigit()}
    if metadata_file is not None:
        entries = [(f"{i:05d}", md) for i, md in enumerate(read_jsonl(metadata_file))]
    else:
        if not dirs:
            raise ClvrError(f"{root}: no prompt folders (expected {root}/00000/metadata.jsonl)")
        entries = [(name, _folder_metadata(dirs[name])) for name in sorted(dirs)]
    out = []
    for name, md in entries:
        samples = sorted((root / name / "samples").glob("*.png")) if name in dirs else []
        out.append((name, md, samples))
    return out


def _folder_metadata(d: Path) -> dict:
    path = d / "metadata.jsonl"
    if not path.is_file():
        raise ClvrError(f"{d}: missing metadata.jsonl (or pass --metadata FILE)")
    return read_jsonl(path)[0]


def score_folder(root: str | Path, metadata_file: str | Path | None = None, detector=None, grid: int = GRID,
                 out: str | Path | None = None, require_scored: bool = False) -> dict:
    """Judge every sample of a GenEval-layout folder; write results.jsonl; return the summary. The results file
    is checked before any work: writable, and not one of the files the judge reads. `require_scored`: when no
    image could be scored, raise a ClvrError (with the first reason) instead of writing an empty result."""
    root = Path(root)
    out_path = check_out_file(Path(out) if out else root / "results.jsonl", "results file")
    entries = read_geneval_folder(root, metadata_file)
    _check_not_an_input(out_path, root, metadata_file, [name for name, _, _ in entries])
    detector = detector or default_detector(grid)
    rows = []
    for name, md, samples in entries:
        base = {"tag": md["tag"], "prompt": md["prompt"], **({"tier": md["tier"]} if "tier" in md else {})}
        why = unsupported(md, detector)
        if why or not samples:
            status = "unsupported" if why else "missing"
            reason = why or f"no images in {root / name / 'samples'}"
            rows.append({"filename": f"{name}/samples", **base, "correct": None, "status": status, "reason": reason})
            continue
        for path in samples:
            rows.append({"filename": str(path.relative_to(root)), **base, **_score_one(md, path, detector)})
    summary = summarize(rows)
    if require_scored and summary["images"] == 0:
        first = next((r["reason"] for r in rows if r.get("reason")), "")
        raise ClvrError(f"no image in {root} could be scored ({summary['missing']} prompt(s) without images, "
                        f"{summary['error']} unreadable, {summary['unsupported']} unsupported); first: {first}")
    write_jsonl(out_path, rows)
    return summary


def _check_not_an_input(out: Path, root: Path, metadata_file: str | Path | None, names: list[str]) -> None:
    """The results file must not overwrite what the judge reads: a prompt folder's files or the metadata file."""
    target = out.resolve()
    if metadata_file is not None and target == Path(metadata_file).resolve():
        raise ClvrError(f"results file '{out}' is the metadata file; choose another --out")
    for name in names:
        d = (root / name).resolve()
        if target == d or d in target.parents:
            raise ClvrError(f"results file '{out}' is inside prompt folder '{root / name}'; choose another --out")


def _score_one(md: dict, path: Path, detector) -> dict:
    try:
        image = load_png(path)
    except ClvrError as e:  # unreadable file: reported for this image, the rest still scored
        return {"correct": None, "status": "error", "reason": str(e)}
    ok, reason = judge(md, detect_for(md, image, detector))
    return {"correct": bool(ok), "status": "scored", "reason": reason}


def summarize(rows: list[dict]) -> dict:
    """`overall` = mean over tags of each tag's accuracy (GenEval's summary); `per_tier` when tiers exist."""
    scored = [r for r in rows if r.get("status", "scored") == "scored"]
    by_tag, by_tier = defaultdict(list), defaultdict(list)
    for r in scored:
        by_tag[r["tag"]].append(bool(r["correct"]))
        if r.get("tier") is not None:
            by_tier[int(r["tier"])].append(bool(r["correct"]))
    per_tag = {t: round(float(np.mean(v)), 4) for t, v in sorted(by_tag.items())}
    summary = {"overall": round(float(np.mean(list(per_tag.values()))), 4) if per_tag else None,
               "per_tag": per_tag}
    if by_tier:
        summary["per_tier"] = {str(t): round(float(np.mean(v)), 4) for t, v in sorted(by_tier.items())}
    summary["images"] = len(scored)
    summary["correct"] = sum(bool(r["correct"]) for r in scored)
    for status in ("unsupported", "missing", "error"):
        summary[status] = sum(r.get("status") == status for r in rows)
    return summary
