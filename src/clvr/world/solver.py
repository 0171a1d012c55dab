"""Solver: GenEval-format metadata -> a concrete Scene that the judge accepts, or `Unsatisfiable` with why.

1. Colours: coloured include clauses keep theirs; an uncoloured clause gets one colour that no exclude
   forbids and, where possible, that no coloured clause of the same class uses (so the judge's selections
   stay apart). Exclude counts are checked here: "two circles" with "no circles" is unsatisfiable.
2. Cells: depth-first search over objects, clause by clause (a position always points to an earlier
   clause, so its targets are placed first), with forward checking: after each placement every later
   clause must still have enough free cells that satisfy its relation to what is already placed.
   Relations are first required in the *strict* sense (inside the 45-degree cone of the direction, which
   GenEval's rule accepts with margin for every sprite size); if that fails, GenEval's exact rule on the
   rendered boxes is used.
3. Every complete layout is checked with the judge itself on its ground-truth detections.

rng=None gives a canonical layout (cells in raster order); a Generator gives a random one, deterministic
given its state. Search is bounded (`MAX_NODES`), which only matters for near-impossible prompts.

With a varied `appearance` (config `world.appearance`), the layout's objects get random looks (`dress`),
redrawn until the judge accepts the drawn boxes: an offset can move a diagonal neighbour out of GenEval's
relation, so looks are checked like layouts are, and the verdict of every prompt stays what it was.
"""

from __future__ import annotations

import itertools
from functools import lru_cache

import numpy as np

from clvr.errors import ClvrError
from clvr.world.scene import Cell, Obj, Scene
from clvr.world.vocab import CELL, COLORS, GRID, SHAPES, count_noun, plural

MAX_NODES = 4000  # search steps per relation mode (all colourings together)
MAX_COLORINGS = 4
LOOK_TRIES = 32  # random look sets tried per layout before the objects that break it are drawn canonically


class Unsatisfiable(ClvrError):
    """No layout on the grid satisfies the prompt's constraints; the message says why."""


def strict_relation(a: Cell, b: Cell, rel: str) -> bool:
    """Cell a stands `rel` to cell b inside the direction's 45-degree cone (a sufficient condition)."""
    dr, dc = a[0] - b[0], a[1] - b[1]
    if rel == "above":
        return dr < 0 and abs(dc) <= -dr
    if rel == "below":
        return dr > 0 and abs(dc) <= dr
    if rel == "left of":
        return dc < 0 and abs(dr) <= -dc
    if rel == "right of":
        return dc > 0 and abs(dr) <= dc
    raise ValueError(f"unknown relation {rel!r}")


def solve(metadata: dict, grid: int = GRID, rng: np.random.Generator | None = None, appearance=None) -> Scene:
    """A scene satisfying every include/exclude/position constraint of `metadata` under the judge's rules
    (with random looks the judge accepts, when `appearance` is varied)."""
    include = list(metadata.get("include", []))
    exclude = list(metadata.get("exclude", []))
    _check_vocabulary(include + exclude)
    total = sum(int(c["count"]) for c in include)
    if total > grid * grid:
        raise Unsatisfiable(f"{total} objects do not fit on the {grid}x{grid} grid ({grid * grid} cells)")
    colorings = list(itertools.islice(_colorings(include, exclude, rng), MAX_COLORINGS))
    for mode in ("strict", "exact"):
        budget = [MAX_NODES]
        for colors in colorings:
            scene = _place(metadata, include, colors, grid, rng, mode, budget)
            if scene is not None:
                return dress(metadata, scene, rng, appearance)
    rels = [f"{_desc(c)} {c['position'][0]} {_desc(include[c['position'][1]])}" for c in include if "position" in c]
    why = "; ".join(rels) if rels else "the prompt"
    raise Unsatisfiable(f"no layout of {total} objects on the {grid}x{grid} grid satisfies {why}")


def dress(metadata: dict, scene: Scene, rng: np.random.Generator | None, appearance) -> Scene:
    """`scene` (accepted by the judge) with random looks that the judge still accepts on their drawn boxes;
    after LOOK_TRIES refusals, the canonical drawing (accepted by construction). Unchanged when not varied."""
    from clvr.judge import judge
    from clvr.world.detector import scene_detections
    from clvr.world.render import vary

    if appearance is None or not appearance.varied:
        return scene
    rng = np.random.default_rng(0) if rng is None else rng
    for _ in range(LOOK_TRIES):
        dressed = vary(scene, rng, appearance)
        if judge(metadata, scene_detections(dressed))[0]:
            return dressed
    return scene


def _desc(c: dict) -> str:
    return count_noun(int(c["count"]), f"{c['color'] + ' ' if c.get('color') else ''}{c['class']}")


def _check_vocabulary(clauses: list[dict]) -> None:
    for c in clauses:
        if c["class"] not in SHAPES:
            raise Unsatisfiable(f"class '{c['class']}' is not in the world ({', '.join(SHAPES)})")
        if c.get("color") and c["color"] not in COLORS:
            raise Unsatisfiable(f"colour '{c['color']}' is not in the world ({', '.join(COLORS)})")


def _colorings(include: list[dict], exclude: list[dict], rng: np.random.Generator | None):
    """Colour assignments (one colour per include clause) that respect every exclude count."""
    options = []
    for c in include:
        if c.get("color"):
            options.append([c["color"]])
            continue
        taken = {d.get("color") for d in include if d["class"] == c["class"] and d.get("color")}
        free = [k for k in COLORS if k not in taken]
        if rng is not None:
            free = [str(k) for k in rng.permutation(free)]
        options.append(free + [k for k in COLORS if k in taken])
    first_violation = None
    found = False
    for colors in itertools.islice(itertools.product(*options), 256):
        bad = _exclude_violation(include, colors, exclude)
        if bad is None:
            found = True
            yield list(colors)
        elif first_violation is None:
            first_violation = bad
    if not found:
        raise Unsatisfiable(first_violation or "no colouring satisfies the exclusions")


def _exclude_violation(include: list[dict], colors, exclude: list[dict]) -> str | None:
    for e in exclude:
        n = sum(int(c["count"]) for c, k in zip(include, colors)
                if c["class"] == e["class"] and (not e.get("color") or e["color"] == k))
        if n >= int(e["count"]):
            what = f"{e['color']} {e['class']}" if e.get("color") else e["class"]
            limit = f"no {plural(what)}" if int(e["count"]) == 1 else f"fewer than {count_noun(int(e['count']), what)}"
            return f"the prompt asks for {count_noun(n, what)} but also for {limit}"
    return None


@lru_cache(maxsize=None)
def relation_masks(rel: str, shape_a: str, shape_b: str, grid: int, mode: str) -> tuple[int, ...]:
    """masks[t]: bit x set when cell x stands `rel` to cell t (cells numbered row-major)."""
    cells = [(r, c) for r in range(grid) for c in range(grid)]
    if mode == "strict":
        holds = lambda a, b: strict_relation(a, b, rel)  # noqa: E731
    else:
        from clvr.judge import relative_position
        from clvr.world.detector import object_detection

        box = lambda s, x: object_detection(Obj(s, "red", *x), CELL).bbox  # noqa: E731
        holds = lambda a, b: rel in relative_position(box(shape_a, a), box(shape_b, b))  # noqa: E731
    return tuple(sum(1 << x for x, a in enumerate(cells) if a != b and holds(a, b)) for b in cells)


def _place(metadata: dict, include: list[dict], colors: list[str], grid: int, rng, mode: str,
           budget: list[int]) -> Scene | None:
    """Depth-first search over cells (bitmasks) for every object; None if nothing passes within the budget."""
    from clvr.judge import judge
    from clvr.world.detector import scene_detections

    n_cells, full = grid * grid, (1 << grid * grid) - 1
    slots = [i for i, c in enumerate(include) for _ in range(int(c["count"]))]  # clause index per object
    ranked = list(range(n_cells)) if rng is None else [int(x) for x in rng.permutation(n_cells)]
    rank = {x: k for k, x in enumerate(ranked)}
    masks = {i: relation_masks(c["position"][0], c["class"], include[c["position"][1]]["class"], grid, mode)
             for i, c in enumerate(include) if "position" in c}
    subjects = {j: [i for i in masks if include[i]["position"][1] == j] for j in range(len(include))}
    by_clause: list[list[int]] = [[] for _ in include]
    used = 0

    def domain(i: int) -> int:
        m = full & ~used
        if i in masks:
            for t in by_clause[include[i]["position"][1]]:
                m &= masks[i][t]
        return m

    def room(x: int, j: int) -> int:
        return sum((masks[i][x] & ~used).bit_count() for i in subjects[j])

    def forward_ok(k: int) -> bool:
        if (full & ~used).bit_count() < len(slots) - k - 1:
            return False
        for i in masks:
            need = int(include[i]["count"]) - len(by_clause[i])
            if need and by_clause[include[i]["position"][1]] and domain(i).bit_count() < need:
                return False
        return True

    def search(k: int):
        nonlocal used
        if k == len(slots):
            yield
            return
        i = slots[k]
        dom = domain(i)
        after = rank[by_clause[i][-1]] if by_clause[i] else -1  # one clause's objects in rank order
        cand = [x for x in ranked[after + 1:] if dom >> x & 1]
        if subjects[i]:  # a target: first try cells that leave its subjects the most room
            cand.sort(key=lambda x: -room(x, i))
        for x in cand:
            budget[0] -= 1
            if budget[0] < 0:
                return
            used |= 1 << x
            by_clause[i].append(x)
            if forward_ok(k):
                yield from search(k + 1)
            by_clause[i].pop()
            used &= ~(1 << x)

    for _ in search(0):
        objs = tuple(sorted(Obj(include[i]["class"], colors[i], x // grid, x % grid)
                            for i, cells in enumerate(by_clause) for x in cells))
        scene = Scene(objs, grid)
        if judge(metadata, scene_detections(scene))[0]:
            return scene
    return None
