"""The step schema: the only operations the loop can run, with typed arguments, and their instruction text.

One source of truth for (a) what a controller may emit, (b) the instruction text the generator is
trained on and conditioned with, and (c) how a step changes a scene. Anything a controller emits is
parsed with `Step.from_dict`, which rejects every op or argument outside the schema.
"""

from __future__ import annotations

from dataclasses import dataclass

from clvr.errors import ClvrError
from clvr.world.scene import Cell, Obj, Scene
from clvr.world.vocab import COLORS, GRID, OPS, SHAPES


# The typed arguments each op takes (all required).
OP_ARGS: dict[str, tuple[str, ...]] = {
    "generate": ("prompt",),
    "add": ("shape", "color", "cell"),
    "remove": ("shape", "color", "cell"),
    "recolor": ("shape", "color", "cell", "new_color"),
    "move": ("shape", "color", "cell", "to"),
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

    def instruction(self) -> str:
        """The step's instruction text (what the generator reads)."""
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
        """Cells this step may change (grounding for the generator)."""
        return tuple(c for c in (self.cell, self.to) if c is not None)

    def apply(self, scene: Scene) -> Scene:
        """The scene this step intends (the ground truth a perfect generator would draw)."""
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

    return {"title": "Step", "type": "object", "anyOf": [variant(op) for op in OPS]}
