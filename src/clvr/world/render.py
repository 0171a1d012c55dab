"""Renderer: scene -> RGB uint8 image (H, W, 3). A pure function of the scene: same scene, same pixels.

Sprites are precomputed boolean masks, so rendering is a few array writes (microseconds per object).
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

from clvr.world.scene import Scene
from clvr.world.vocab import BACKGROUND, CELL, COLORS, SHAPES, SPRITE


@lru_cache(maxsize=None)
def sprite(shape: str, size: int = SPRITE) -> np.ndarray:
    """Boolean mask (size, size) of a shape, centred in its box."""
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
    """(x0, y0, x1, y1) of the sprite box inside a cell."""
    off = (cell - size) // 2
    x0, y0 = col * cell + off, row * cell + off
    return x0, y0, x0 + size, y0 + size


def render(scene: Scene, cell: int = CELL) -> np.ndarray:
    size = scene.grid * cell
    img = np.empty((size, size, 3), np.uint8)
    img[:] = BACKGROUND
    spr = max(4, round(cell * SPRITE / CELL))
    for o in scene.objects:
        x0, y0, x1, y1 = cell_box(o.row, o.col, cell, spr)
        img[y0:y1, x0:x1][sprite(o.shape, spr)] = COLORS[o.color]
    return img


def blank(grid: int, cell: int = CELL) -> np.ndarray:
    return render(Scene((), grid), cell)
