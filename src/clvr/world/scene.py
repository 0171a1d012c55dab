"""Scenes: objects on a grid. A scene is immutable; edits return a new scene."""

from __future__ import annotations

from dataclasses import dataclass, replace

from clvr.world.vocab import COLORS, GRID, SHAPES

Cell = tuple[int, int]  # (row, col), row 0 at the top


@dataclass(frozen=True, order=True)
class Obj:
    shape: str
    color: str
    row: int
    col: int

    @property
    def cell(self) -> Cell:
        return (self.row, self.col)

    def to_dict(self) -> dict:
        return {"shape": self.shape, "color": self.color, "row": self.row, "col": self.col}

    @staticmethod
    def from_dict(d: dict) -> "Obj":
        return Obj(d["shape"], d["color"], int(d["row"]), int(d["col"]))


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
