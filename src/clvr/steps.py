"""The step schema: the only operations the loop can run, with typed arguments, and their instruction text.

One source of truth for (a) what a controller may emit, (b) the instruction text the generator is
trained on and conditioned with, and (c) how a step changes a scene. Anything a controller emits is
parsed with `Step.from_dict`, which rejects every op or argument outside the schema.

A multi-op step, `{"op": "edit", "ops": [<add/remove/recolor/move step>, ...]}`, carries several single-cell
edits for ONE generator call: its instruction is the parts' instructions joined with ". ", its regions are
the parts' cells in order, and it applies the parts in order. No two parts may act on one cell, so the order
never changes the result. Whether it fits a scene (the objects it names are there, enough free cells) is the
loop's `transition_error`, which has the scene.
"""

from __future__ import annotations

from dataclasses import dataclass

from clvr.errors import ClvrError
from clvr.world.scene import Cell, Obj, Scene
from clvr.world.vocab import COLORS, EDIT_OPS, GRID, OPS, SHAPES


# The typed arguments each op takes (all required).
OP_ARGS: dict[str, tuple[str, ...]] = {
    "generate": ("prompt",),
    "add": ("shape", "color", "cell"),
    "remove": ("shape", "color", "cell"),
    "recolor": ("shape", "color", "cell", "new_color"),
    "move": ("shape", "color", "cell", "to"),
    "edit": ("ops",),  # a non-empty list of single-op edits (EDIT_OPS), no two on one cell
    "stop": (),
}


class SchemaError(ClvrError):
    """A controller output that is not a valid step. It is counted and never executed."""


@dataclass(frozen=True)
class Step:
    op: str  # one of OPS
    shape: str | None = None
    color: str | None = None
    cell: Cell | None = None  # where the op acts
    to: Cell | None = None  # move destination
    new_color: str | None = None  # recolor target
    prompt: str | None = None  # generate: the text-to-image prompt
    ops: tuple["Step", ...] | None = None  # edit: the single-op edits of one generator call

    def parts(self) -> tuple["Step", ...]:
        """The single-op steps this step is made of (a single-op step is its own one part)."""
        return self.ops if self.op == "edit" else (self,)

    def instruction(self) -> str:
        """The step's instruction text (what the generator reads); a multi-op step's joins its parts'."""
        if self.op == "edit":
            return ". ".join(p.instruction() for p in self.ops)
        if self.op == "generate":
            return self.prompt or ""
        if self.op == "stop":
            return "stop"
        what = f"{self.color} {self.shape} at {cell_text(self.cell)}"
        if self.op == "add":
            return f"add a {what}"
        if self.op == "remove":
            return f"remove the {what}"
        if self.op == "recolor":
            return f"recolor the {what} to {self.new_color}"
        return f"move the {what} to {cell_text(self.to)}"  # move

    def regions(self) -> tuple[Cell, ...]:
        """Cells this step may change (grounding for the generator); a multi-op step's: its parts', in order."""
        if self.op == "edit":
            return tuple(c for p in self.ops for c in p.regions())
        return tuple(c for c in (self.cell, self.to) if c is not None)

    def apply(self, scene: Scene) -> Scene:
        """The scene this step intends (the ground truth a perfect generator would draw)."""
        if self.op == "edit":
            for p in self.ops:
                scene = p.apply(scene)
            return scene
        if self.op == "add":
            return scene.add(Obj(self.shape, self.color, *self.cell))
        if self.op == "remove":
            return scene.remove(self.cell)
        if self.op == "recolor":
            return scene.recolor(self.cell, self.new_color)
        if self.op == "move":
            return scene.move(self.cell, self.to)
        return scene

    def to_dict(self) -> dict:
        if self.op == "edit":
            return {"op": "edit", "ops": [p.to_dict() for p in self.ops]}
        d = {"op": self.op}
        for k in ("shape", "color", "new_color", "prompt"):
            if getattr(self, k) is not None:
                d[k] = getattr(self, k)
        for k in ("cell", "to"):
            if getattr(self, k) is not None:
                d[k] = list(getattr(self, k))
        return d

    @staticmethod
    def from_dict(d: object, grid: int = GRID) -> "Step":
        """Validate an untrusted dict (e.g. a controller's JSON) into a Step, or raise SchemaError."""
        if not isinstance(d, dict):
            raise SchemaError(f"step must be an object, got {type(d).__name__}")
        op = d.get("op")
        if not (isinstance(op, str) and op in OPS):
            raise SchemaError(f"op {op!r} not in {OPS}")
        allowed = set(OP_ARGS[op])
        extra = set(d) - allowed - {"op"}
        if extra:
            raise SchemaError(f"op {op!r} takes no {sorted(extra)}")
        missing = allowed - set(d)
        if missing:
            raise SchemaError(f"op {op!r} needs {sorted(missing)}")
        if op == "edit":
            return Step(op="edit", ops=_edit_ops(d["ops"], grid))
        if op == "generate" and not (isinstance(d["prompt"], str) and 0 < len(d["prompt"]) <= 1000):
            raise SchemaError("generate needs a non-empty prompt string")
        if "shape" in d and not (isinstance(d["shape"], str) and d["shape"] in SHAPES):
            raise SchemaError(f"shape {d['shape']!r} not in {SHAPES}")
        for k in ("color", "new_color"):
            if k in d and not (isinstance(d[k], str) and d[k] in COLORS):
                raise SchemaError(f"{k} {d[k]!r} not in {tuple(COLORS)}")
        cells = {k: _cell(d[k], grid, k) for k in ("cell", "to") if k in d}
        return Step(op=op, shape=d.get("shape"), color=d.get("color"), cell=cells.get("cell"),
                    to=cells.get("to"), new_color=d.get("new_color"), prompt=d.get("prompt"))


def _edit_ops(raw: object, grid: int) -> tuple[Step, ...]:
    """The parts of a multi-op step: a non-empty list of single-op edits, no two acting on one cell."""
    if not isinstance(raw, list) or not raw:
        raise SchemaError(f"edit needs a non-empty list of ops, got {raw!r}"[:200])
    if len(raw) > grid * grid:  # each part needs its own cell: longer lists cannot be valid (and are not parsed)
        raise SchemaError(f"edit has {len(raw)} ops; at most {grid * grid} fit a {grid}x{grid} grid")
    parts: list[Step] = []
    owner: dict[Cell, int] = {}
    for i, d in enumerate(raw):
        if isinstance(d, dict) and d.get("op") not in EDIT_OPS:
            raise SchemaError(f"edit ops[{i}]: op {d.get('op')!r} cannot be inside an edit (only {EDIT_OPS})")
        try:
            p = Step.from_dict(d, grid)
        except SchemaError as e:
            raise SchemaError(f"edit ops[{i}]: {e}") from None
        for c in p.regions():
            if c in owner:
                raise SchemaError(f"edit ops[{owner[c]}] and ops[{i}] both act on cell {list(c)}")
            owner[c] = i
        parts.append(p)
    return tuple(parts)


def cell_text(cell: Cell | None) -> str:
    return f"row {cell[0]} column {cell[1]}"


def _cell(v: object, grid: int, name: str) -> Cell:
    if not (isinstance(v, (list, tuple)) and len(v) == 2 and all(isinstance(i, int) and not isinstance(i, bool) for i in v)):
        raise SchemaError(f"{name} must be [row, col] integers, got {v!r}")
    if not all(0 <= i < grid for i in v):
        raise SchemaError(f"{name} {list(v)} outside the {grid}x{grid} grid")
    return (v[0], v[1])


def step_json_schema(grid: int = GRID) -> dict:
    """JSON Schema of one step (for structured output of a VLM controller); mirrors `Step.from_dict`."""
    cell = {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": grid - 1},
            "minItems": 2, "maxItems": 2}
    props = {"shape": {"enum": list(SHAPES)}, "color": {"enum": list(COLORS)},
             "new_color": {"enum": list(COLORS)}, "cell": cell, "to": cell,
             "prompt": {"type": "string", "minLength": 1, "maxLength": 1000}}
    def variant(op: str) -> dict:
        return {"type": "object", "additionalProperties": False, "required": ["op", *OP_ARGS[op]],
                "properties": {"op": {"const": op}, **{k: props[k] for k in OP_ARGS[op]}}}

    # "edit": a list of single-op edits (that no two share a cell is beyond JSON Schema; from_dict checks it)
    props["ops"] = {"type": "array", "minItems": 1, "maxItems": grid * grid,
                    "items": {"anyOf": [variant(op) for op in EDIT_OPS]}}

    return {"title": "Step", "type": "object", "anyOf": [variant(op) for op in OPS]}
