"""Scenes: objects on a grid. A scene is immutable; edits return a new scene.

An object may carry a `Look` (its size, offset and orientation inside its cell, see clvr.world.render). The
look is appearance only: it takes no part in equality, hashing or order, so a scene read back by the detector
(no looks) equals the scene it was drawn from, and every prompt, relation and judge verdict ignores it.
Edits keep a look (recolour, move); an added object has none until `clvr.world.render.vary` gives it one.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from clvr.world.vocab import COLORS, GRID, SHAPES

Cell = tuple[int, int]  # (row, col), row 0 at the top

LOOK_UNIT = 32  # sizes and offsets are whole 1/32ths of a cell, so looks form a finite set
ANGLE_STEP = 15  # degrees


@dataclass(frozen=True)
class Look:
    """How one object is drawn inside its cell, in units of 1/LOOK_UNIT cell: `r` the circumradius (the
    shape, at any angle, lies inside the disc of radius r around its centre), `dy`/`dx` the centre's offset
    from the cell centre, `angle` the rotation in degrees (a multiple of ANGLE_STEP), `aa` anti-aliased edges."""

    r: int
    dy: int = 0
    dx: int = 0
    angle: int = 0
    aa: bool = False

    def to_list(self) -> list:
        return [self.r, self.dy, self.dx, self.angle, int(self.aa)]

    @staticmethod
    def from_list(v: list) -> "Look":
        r, dy, dx, angle, aa = v
        return Look(int(r), int(dy), int(dx), int(angle), bool(aa))

    def code(self) -> int:
        """A unique integer >= 1 per look (0 is left for the canonical sprite); `from_code` inverts it."""
        c = self.r
        c = c * LOOK_UNIT + (self.dy + LOOK_UNIT // 2)
        c = c * LOOK_UNIT + (self.dx + LOOK_UNIT // 2)
        c = c * (360 // ANGLE_STEP) + (self.angle % 360) // ANGLE_STEP
        return 1 + c * 2 + int(self.aa)

    @staticmethod
    def from_code(code: int) -> "Look":
        c, aa = divmod(code - 1, 2)
        c, a = divmod(c, 360 // ANGLE_STEP)
        c, dx = divmod(c, LOOK_UNIT)
        r, dy = divmod(c, LOOK_UNIT)
        return Look(r, dy - LOOK_UNIT // 2, dx - LOOK_UNIT // 2, a * ANGLE_STEP, bool(aa))


@dataclass(frozen=True, order=True)
class Obj:
    shape: str
    color: str
    row: int
    col: int
    look: Look | None = field(default=None, compare=False)  # None = the canonical sprite at the cell centre

    @property
    def cell(self) -> Cell:
        return (self.row, self.col)

    def to_dict(self) -> dict:
        d = {"shape": self.shape, "color": self.color, "row": self.row, "col": self.col}
        if self.look is not None:
            d["look"] = self.look.to_list()
        return d

    @staticmethod
    def from_dict(d: dict) -> "Obj":
        look = Look.from_list(d["look"]) if d.get("look") is not None else None
        return Obj(d["shape"], d["color"], int(d["row"]), int(d["col"]), look)


@dataclass(frozen=True)
class Scene:
    objects: tuple[Obj, ...] = ()
    grid: int = GRID

    def __post_init__(self) -> None:
        cells = [o.cell for o in self.objects]
        if len(set(cells)) != len(cells):
            raise ValueError(f"two objects share a cell: {sorted(cells)}")
        for o in self.objects:
            if o.shape not in SHAPES or o.color not in COLORS:
                raise ValueError(f"unknown shape/colour: {o}")
            if not (0 <= o.row < self.grid and 0 <= o.col < self.grid):
                raise ValueError(f"cell outside the {self.grid}x{self.grid} grid: {o}")

    def at(self, cell: Cell) -> Obj | None:
        return next((o for o in self.objects if o.cell == cell), None)

    def free_cells(self) -> list[Cell]:
        used = {o.cell for o in self.objects}
        return [(r, c) for r in range(self.grid) for c in range(self.grid) if (r, c) not in used]

    def add(self, obj: Obj) -> "Scene":
        return Scene(tuple(sorted((*self.objects, obj))), self.grid)

    def remove(self, cell: Cell) -> "Scene":
        return Scene(tuple(o for o in self.objects if o.cell != cell), self.grid)

    def recolor(self, cell: Cell, color: str) -> "Scene":
        return Scene(tuple(sorted(replace(o, color=color) if o.cell == cell else o for o in self.objects)), self.grid)

    def move(self, cell: Cell, to: Cell) -> "Scene":
        return Scene(tuple(sorted(replace(o, row=to[0], col=to[1]) if o.cell == cell else o for o in self.objects)), self.grid)

    def to_list(self) -> list[dict]:
        return [o.to_dict() for o in sorted(self.objects)]

    @staticmethod
    def from_list(items: list[dict], grid: int = GRID) -> "Scene":
        return Scene(tuple(sorted(Obj.from_dict(d) for d in items)), grid)
