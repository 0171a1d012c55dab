"""Renderer: scene -> RGB uint8 image (H, W, 3). A pure function of the scene: same scene, same pixels.

An object without a look is the canonical sprite at its cell's centre (the fixed world). An object with a
`Look` (clvr.world.scene) is a regular polygon or disc of the look's size, offset and angle, rasterised by
4x4 supersampling: a pixel belongs to the shape when at least half its samples fall inside, and with `aa`
its colour is blended with the background by its coverage. Every shape keeps a 1/16-cell margin inside its
cell, so cells never touch and each is drawn on its own. Sprites are cached per (shape, look, cell), so
rendering is a few array writes per object.

`draw_look` / `vary` give objects looks from a config (`world.appearance`) and a seeded generator.
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
from scipy import ndimage

from clvr.world.scene import ANGLE_STEP, LOOK_UNIT, Look, Obj, Scene
from clvr.world.vocab import BACKGROUND, CELL, COLORS, SHAPES, SPRITE

MARGIN = LOOK_UNIT // 16  # free border of every cell, in look units (1/16 cell)
SIDES = {"square": 4, "triangle": 3}  # regular polygons; a circle has no corners
SYMMETRY = {"square": 90, "triangle": 120}  # degrees after which a turned shape looks the same
CIRCLE_SCALE = 0.85  # a circle's radius, as a fraction of the look's r (so its area sits near the others')
_SS = 4  # supersamples per pixel side
_FOUR = ndimage.generate_binary_structure(2, 1)


@lru_cache(maxsize=None)
def sprite(shape: str, size: int = SPRITE) -> np.ndarray:
    """Boolean mask (size, size) of a canonical shape, centred in its box."""
    yy, xx = np.mgrid[0:size, 0:size] + 0.5
    c = size / 2
    if shape == "circle":
        m = (yy - c) ** 2 + (xx - c) ** 2 <= c * c
    elif shape == "square":
        inset = size * 0.1
        m = (yy >= inset) & (yy <= size - inset) & (xx >= inset) & (xx <= size - inset)
    elif shape == "triangle":  # apex up, base at the bottom
        m = (yy >= 0) & (np.abs(xx - c) <= yy / 2)
    else:
        raise ValueError(f"unknown shape '{shape}' (known: {', '.join(SHAPES)})")
    m.flags.writeable = False
    return m


def cell_box(row: int, col: int, cell: int = CELL, size: int = SPRITE) -> tuple[int, int, int, int]:
    """(x0, y0, x1, y1) of the canonical sprite box inside a cell."""
    off = (cell - size) // 2
    x0, y0 = col * cell + off, row * cell + off
    return x0, y0, x0 + size, y0 + size


@lru_cache(maxsize=16384)
def coverage(shape: str, look: Look, cell: int = CELL) -> np.ndarray:
    """(cell, cell) float32 in {0, 1/16, .., 1}: the fraction of each pixel of the cell the shape covers.
    Pixels of the half-covered mask outside its largest 4-connected part are cleared, so the shape the
    detector sees is one component (a turned corner can touch the rest only diagonally)."""
    if shape not in SHAPES:
        raise ValueError(f"unknown shape '{shape}' (known: {', '.join(SHAPES)})")
    u = cell / LOOK_UNIT
    cy, cx, r = cell / 2 + look.dy * u, cell / 2 + look.dx * u, look.r * u
    s = (np.arange(cell * _SS) + 0.5) / _SS
    y, x = s[:, None] - cy, s[None, :] - cx
    if shape == "circle":
        inside = x * x + y * y <= (CIRCLE_SCALE * r) ** 2
    else:  # regular polygon: inside every edge's half-plane (outward normals, apex up at angle 0)
        n = SIDES[shape]
        inside = np.ones(y.shape[0:1] + x.shape[1:], bool)
        for k in range(n):
            phi = math.radians(90 + look.angle + 360 * k / n)
            inside &= x * math.cos(phi) + y * math.sin(phi) <= r * math.cos(math.pi / n)
    cov = inside.reshape(cell, _SS, cell, _SS).mean((1, 3)).astype(np.float32)
    mask = cov >= 0.5
    lab, k = ndimage.label(mask, _FOUR)
    if k > 1:
        sizes = ndimage.sum(mask, lab, range(1, k + 1))
        cov[mask & (lab != 1 + int(np.argmax(sizes)))] = 0.0
    cov.flags.writeable = False
    return cov


def look_mask(shape: str, look: Look, cell: int = CELL) -> np.ndarray:
    """(cell, cell) bool: the pixels that belong to the shape (coverage >= 1/2)."""
    return coverage(shape, look, cell) >= 0.5


@lru_cache(maxsize=16384)
def cell_patch(shape: str, color: str, look: Look | None, cell: int = CELL) -> np.ndarray:
    """(cell, cell, 3) uint8: one cell holding one object, as `render` draws it."""
    patch = np.empty((cell, cell, 3), np.uint8)
    patch[:] = BACKGROUND
    if look is None:
        spr = max(4, round(cell * SPRITE / CELL))
        x0, y0, x1, y1 = cell_box(0, 0, cell, spr)
        patch[y0:y1, x0:x1][sprite(shape, spr)] = COLORS[color]
    else:
        cov = coverage(shape, look, cell)
        a = cov if look.aa else (cov >= 0.5).astype(np.float32)
        bg, fg = np.array(BACKGROUND, np.float32), np.array(COLORS[color], np.float32)
        patch[:] = np.rint(bg + a[..., None] * (fg - bg)).astype(np.uint8)
    patch.flags.writeable = False
    return patch


def render(scene: Scene, cell: int = CELL) -> np.ndarray:
    size = scene.grid * cell
    img = np.empty((size, size, 3), np.uint8)
    img[:] = BACKGROUND
    for o in scene.objects:
        img[o.row * cell:(o.row + 1) * cell, o.col * cell:(o.col + 1) * cell] = cell_patch(o.shape, o.color, o.look, cell)
    return img


def blank(grid: int, cell: int = CELL) -> np.ndarray:
    return render(Scene((), grid), cell)


# ---- looks from the config -------------------------------------------------------------------------------

def draw_look(shape: str, rng: np.random.Generator, appearance) -> Look | None:
    """A random look for `shape` under `appearance` (config `world.appearance`); None when it is not varied."""
    if appearance is None or not appearance.varied:
        return None
    lo = math.ceil(appearance.size[0] * LOOK_UNIT - 1e-9)
    hi = math.floor(appearance.size[1] * LOOK_UNIT + 1e-9)
    r = int(rng.integers(lo, hi + 1))
    room = LOOK_UNIT // 2 - MARGIN - r  # the disc of radius r stays MARGIN inside the cell
    dy = dx = 0
    if appearance.offset and room > 0:
        dy, dx = (int(v) for v in rng.integers(-room, room + 1, size=2))
    angle = 0
    if appearance.rotate and shape in SYMMETRY:
        angle = ANGLE_STEP * int(rng.integers(SYMMETRY[shape] // ANGLE_STEP))
    return Look(r, dy, dx, angle, bool(appearance.antialias))


def vary(scene: Scene, rng: np.random.Generator, appearance) -> Scene:
    """The scene with a random look for every object that has none (unchanged when not varied). Objects
    that already carry a look keep it, so an edit's untouched objects look as they did."""
    if appearance is None or not appearance.varied or all(o.look is not None for o in scene.objects):
        return scene
    objs = tuple(o if o.look is not None else Obj(o.shape, o.color, o.row, o.col, draw_look(o.shape, rng, appearance))
                 for o in scene.objects)
    return Scene(objs, scene.grid)


def plain(scene: Scene) -> Scene:
    """The scene with every look dropped (the fixed world's drawing of it)."""
    return Scene(tuple(Obj(o.shape, o.color, o.row, o.col) for o in scene.objects), scene.grid)


def redraw(image: np.ndarray, before: Scene, after: Scene, cell: int = CELL) -> np.ndarray:
    """`image` (a drawing of `before`) changed into `after` in place of a fresh render: only the cells whose
    object differs are drawn again (as `after` has them, looks included); every other pixel is kept."""
    out = np.array(image, np.uint8, copy=True)
    for r in range(after.grid):
        for c in range(after.grid):
            o = after.at((r, c))
            if o == before.at((r, c)):
                continue
            ys, xs = slice(r * cell, (r + 1) * cell), slice(c * cell, (c + 1) * cell)
            out[ys, xs] = BACKGROUND if o is None else cell_patch(o.shape, o.color, o.look, cell)
    return out
