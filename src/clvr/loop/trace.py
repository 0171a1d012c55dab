"""`Trace`: what one run of the loop did, step by step. It is the filmstrip a user looks at, the record the
data engine stores, and what training consumes. Saved as `trace.json` + one PNG per image; `Trace.load`
reads it back exactly (images included).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
from PIL import Image

from clvr.errors import ClvrError
from clvr.io import atomic_write_text, load_png, save_png

TRACE_VERSION = 1


@dataclass
class StepRecord:
    index: int  # position in the trace (one per controller output)
    kind: str  # "plan" | "retry" | "correction" | "generate" | "rejected" | "stop"
    step: dict | None  # the validated step (None when rejected)
    instruction: str = ""  # the step's instruction text (what the generator read)
    trace_text: str = ""  # the reasoning trace the generator was conditioned on (earlier accepted steps)
    seed: int | None = None
    input: np.ndarray | None = None  # canvas before the step (H, W, 3) uint8
    output: np.ndarray | None = None  # what the generator drew
    passive: dict | None = None  # passive verification of this step
    active: dict | None = None  # active verification of the canvas after this step
    accepted: bool = False  # output kept as the new canvas (a multi-op step: at least its passed ops' cells)
    nfe: int = 0
    seconds: float = 0.0  # generator + verification time of this step
    note: str = ""  # e.g. why a controller output was rejected, and the raw output
    raw: str = ""  # repr of the controller's raw output when rejected (recorded, never trusted)

    def caption(self) -> str:
        """e.g. "3. add a red circle at row 1 column 2 [retry, ok]"; "x" = failed passive verification,
        "kept 2/3" = a multi-op step of which 2 ops passed and were kept; a multi-op step: "0. 8 ops [ok]: add
        red square (0,0), ..."."""
        if self.kind in ("rejected", "stop"):
            return f"{self.index}. {self.instruction or 'rejected: ' + self.note}"
        tags = [self.kind] if self.kind in ("retry", "correction") else []
        tags.append("ok" if (self.passive or {}).get("ok") else "x")
        kept = (self.passive or {}).get("kept")
        if kept is not None and self.accepted:  # a multi-op step partly kept
            tags.append(f"kept {len(kept)}/{len((self.passive or {}).get('parts', ()))}")
        if not self.accepted:
            tags.append("undone")
        ops = (self.step or {}).get("ops")
        if ops:  # a multi-op step: its verdict first, then each op in short, as its full text would not fit
            return f"{self.index}. {len(ops)} ops [{', '.join(tags)}]: " + ", ".join(_short(o) for o in ops)
        return f"{self.index}. {self.instruction} [{', '.join(tags)}]"


def _short(op: dict) -> str:
    """One op of a multi-op step for a caption, e.g. "add red square (0,1)", "move blue circle (2,0)>(3,3)"."""
    where = "({},{})".format(*op["cell"]) + (">({},{})".format(*op["to"]) if op.get("to") else "")
    color = f"{op['color']}>{op['new_color']}" if op.get("new_color") else op.get("color") or ""
    return " ".join(w for w in (op["op"], color, op.get("shape") or "", where) if w)


@dataclass
class Trace:
    prompt: str
    mode: str  # "loop" | "single" | "rewrite" (clvr.loop.roles.MODES)
    seed: int
    generator: str = ""
    metadata: dict = field(default_factory=dict)
    target: list = field(default_factory=list)  # target layout (objects)
    plan: list = field(default_factory=list)  # the planned steps
    steps: list[StepRecord] = field(default_factory=list)
    final: np.ndarray | None = None
    passed: bool = False  # the judge's verdict on the final canvas
    reason: str = ""  # the judge's reason
    ended_by: str = ""  # "stop" | "max_iters" | "max_nfe" | "max_calls"
    nfe: int = 0
    seconds: float = 0.0
    calls: int = 0  # generator calls
    rejected: int = 0  # controller outputs rejected (never executed)

    @property
    def retries(self) -> int:
        return sum(s.kind == "retry" for s in self.steps)

    @property
    def corrections(self) -> int:
        return sum(s.kind == "correction" for s in self.steps)

    def summary(self) -> str:
        n = len(self.target)
        return (f"{'PASS' if self.passed else 'FAIL'} [{self.mode}] {n} object{'s' * (n != 1)}: "
                f"{self.calls} generator call{'s' * (self.calls != 1)} ({self.retries} retries, "
                f"{self.corrections} corrections, {self.rejected} rejected), {self.nfe} NFE, "
                f"{self.seconds:.2f} s, ended by {self.ended_by}" + ("" if self.passed else f" ({self.reason})"))

    def to_json(self) -> dict:
        """JSON-ready dict; images are replaced by file names (written by `save`)."""
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("steps", "final")}
        d["version"] = TRACE_VERSION
        d["final"] = "final.png" if self.final is not None else None
        d["steps"] = []
        for s in self.steps:
            sd = asdict(s)
            for k in ("input", "output"):
                name = {"input": "in", "output": "out"}[k]
                sd[k] = f"steps/{s.index:03d}_{name}.png" if getattr(s, k) is not None else None
            d["steps"].append(sd)
        return d

    def save(self, out: str | Path) -> Path:
        """Write trace.json, final.png and steps/NNN_{in,out}.png under `out` (each file atomically)."""
        out = Path(out)
        (out / "steps").mkdir(parents=True, exist_ok=True)
        d = self.to_json()
        for s, sd in zip(self.steps, d["steps"]):
            for k in ("input", "output"):
                if sd[k]:
                    save_png(out / sd[k], getattr(s, k))
        if self.final is not None:
            save_png(out / "final.png", self.final)
        atomic_write_text(out / "trace.json", json.dumps(d, indent=1, default=_jsonable))
        return out / "trace.json"

    @staticmethod
    def load(out: str | Path) -> "Trace":
        out = Path(out)
        path = out / "trace.json" if out.is_dir() else out
        root = path.parent
        try:
            d = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ClvrError(f"cannot read trace {path}: {e}") from None
        if d.pop("version", None) != TRACE_VERSION:
            raise ClvrError(f"{path}: not a version-{TRACE_VERSION} trace")
        steps = []
        for sd in d.pop("steps"):
            for k in ("input", "output"):
                sd[k] = load_png(root / sd[k]) if sd[k] else None
            steps.append(StepRecord(**sd))
        final = d.pop("final")
        return Trace(**d, steps=steps, final=load_png(root / final) if final else None)


def _jsonable(o: object):
    if isinstance(o, (np.integer, np.floating, np.bool_)):
        return o.item()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")




def filmstrip(trace: Trace, scale: int = 3, per_row: int = 6) -> Image.Image:
    """One tile per generator call (its output, a green frame if kept, red if undone) with its caption,
    under a header with the prompt and the summary."""
    from PIL import ImageDraw, ImageFont

    shots = [s for s in trace.steps if s.output is not None]
    font = ImageFont.load_default(size=11)
    h0 = trace.final.shape[0] if trace.final is not None else 64
    tile = h0 * scale
    pad, cap_lines, line_h = 6, 4, 13
    cols = max(1, min(per_row, len(shots)))
    rows = max(1, -(-len(shots) // cols))
    head = 2 * line_h + 2 * pad
    cell_h = tile + cap_lines * line_h + 2 * pad
    sheet = Image.new("RGB", (cols * (tile + pad) + pad, head + rows * cell_h), "white")
    draw = ImageDraw.Draw(sheet)
    draw.text((pad, pad), _clip(f"prompt: {trace.prompt}", draw, font, sheet.width - 2 * pad), fill="black", font=font)
    draw.text((pad, pad + line_h), _clip(trace.summary(), draw, font, sheet.width - 2 * pad), fill="black", font=font)
    for k, s in enumerate(shots):
        x = pad + (k % cols) * (tile + pad)
        y = head + (k // cols) * cell_h
        img = Image.fromarray(s.output).resize((tile, tile), Image.NEAREST)
        sheet.paste(img, (x, y))
        draw.rectangle([x - 2, y - 2, x + tile + 1, y + tile + 1], outline=(40, 160, 60) if s.accepted else (210, 40, 40), width=2)
        for j, line in enumerate(_wrap(s.caption(), draw, font, tile)[:cap_lines]):
            draw.text((x, y + tile + 4 + j * line_h), line, fill="black", font=font)
    return sheet


def _wrap(text: str, draw, font, width: int) -> list[str]:
    lines, cur = [], ""
    for w in text.split():
        cand = f"{cur} {w}".strip()
        if cur and draw.textlength(cand, font=font) > width:
            lines.append(cur)
            cur = w
        else:
            cur = cand
    return lines + [cur] if cur else lines


def _clip(text: str, draw, font, width: int) -> str:
    while text and draw.textlength(text, font=font) > width:
        text = text[:-4] + "..."
    return text
