"""The world's detector: image -> objects (shape, colour, cell, box). No learning.

1. Colour segmentation: every pixel snaps to the nearest palette colour (world colours + background),
   by a lookup table over 5-bit colours; a pixel farther than `MAX_COLOR_DIST` from every palette entry is
   off-palette and counts as background, so near-white noise and odd pixels of generated images are ignored.
2. Connected components per colour (scipy.ndimage.label, 4-connectivity); components smaller than
   `MIN_AREA_FRAC` of a sprite box are noise. A component larger than ~1.5 cells (two touching objects of
   one colour) is split along the cell grid.
3. Shape class from geometry: which corners of its box the shape fills (square: all, triangle: the bottom
   two, circle: none), with the fill ratio = area / box area as the tie-break.
4. Cell from the box centre; cell size = image side / grid.

Exact on renderer output: `detect(render(scene))` equals `scene_detections(scene)` (bench and tests check it).
Detections are returned in raster order of their cells (row, then column); GenEval orders by detector
confidence, and the judge's "first `count` of a class" reads this order.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from scipy import ndimage

from clvr.world.render import cell_box, sprite
from clvr.world.scene import Obj, Scene
from clvr.world.vocab import BACKGROUND, CELL, COLORS, GRID, SHAPES, SPRITE

MAX_COLOR_DIST = 90.0  # RGB distance beyond which a pixel is off-palette (background)
MIN_AREA_FRAC = 0.15  # components below this fraction of a sprite box are noise
SQUARE_FILL, TRIANGLE_FILL = 0.93, 0.65  # fill >= 0.93 square; < 0.65 triangle; else circle

_NAMES = tuple(COLORS)
_PALETTE = np.array([*COLORS.values(), BACKGROUND], np.int32)  # (5, 3); last = background
_FOUR = ndimage.generate_binary_structure(2, 1)  # 4-connectivity


@dataclass(frozen=True)
class Detection:
    shape: str
    color: str
    row: int
    col: int
    bbox: tuple[int, int, int, int]  # (x0, y0, x1, y1) pixels, x1/y1 exclusive
    area: int  # pixels

    @property
    def cell(self) -> tuple[int, int]:
        return (self.row, self.col)

    def to_dict(self) -> dict:
        return {"shape": self.shape, "color": self.color, "row": self.row, "col": self.col,
                "bbox": list(self.bbox), "area": self.area}


class WorldDetector:
    """The pluggable-detector interface the judge uses: `classes`, `colors`, and `__call__(image)`."""

    name = "world"
    classes: tuple[str, ...] = SHAPES
    colors: tuple[str, ...] = _NAMES

    def __init__(self, grid: int = GRID):
        self.grid = grid

    def __call__(self, image: np.ndarray) -> list[Detection]:
        return detect(image, self.grid)


@lru_cache(maxsize=1)
def _lut() -> np.ndarray:
    """Label of every colour quantised to 5 bits per channel (the centre of its bin), as `segment` uses."""
    q = (np.arange(32) << 3) + 4
    rgb = np.stack(np.meshgrid(q, q, q, indexing="ij"), -1).reshape(-1, 1, 3)
    d2 = ((rgb - _PALETTE[None]) ** 2).sum(-1)  # (32768, 5)
    idx = d2.argmin(1)
    far = d2[np.arange(len(idx)), idx] > MAX_COLOR_DIST ** 2
    idx[(idx == len(_NAMES)) | far] = -1
    return idx.astype(np.int8)


def segment(image: np.ndarray) -> np.ndarray:
    """(H, W) int8 label map: index into COLORS, or -1 for background / off-palette pixels.
    Nearest palette colour by a lookup table over 5-bit colours (error <= 4 per channel, far below the
    palette's spacing and the distance threshold)."""
    px = image.astype(np.int32) >> 3
    return _lut()[(px[..., 0] << 10) | (px[..., 1] << 5) | px[..., 2]]


def trim(mask: np.ndarray) -> np.ndarray:
    """Drop edge rows/columns holding a single pixel (a noise speck touching the shape), at most 2 per side."""
    for _ in range(2):
        rows, cols = mask.sum(1), mask.sum(0)
        y0, y1 = int(rows[0] <= 1), len(rows) - int(rows[-1] <= 1)
        x0, x1 = int(cols[0] <= 1), len(cols) - int(cols[-1] <= 1)
        if (y0, y1, x0, x1) == (0, len(rows), 0, len(cols)) or y1 - y0 < 3 or x1 - x0 < 3:
            break
        mask = mask[y0:y1, x0:x1]
    return mask


def classify(mask: np.ndarray) -> str:
    """Shape class of one component's boolean mask (cropped to its box), from its box corners: a square
    fills all four, a triangle (apex up) only the bottom two, a circle none. Corners ignore holes and
    noise inside the shape; the fill ratio (square ~1, circle ~pi/4, triangle ~1/2) settles odd cases."""
    mask = trim(mask)
    h, w = mask.shape
    k = max(1, int(0.25 * min(h, w)))  # corner patch side
    top = (mask[:k, :k].mean() + mask[:k, -k:].mean()) / 2
    bottom = (mask[-k:, :k].mean() + mask[-k:, -k:].mean()) / 2
    if bottom > 0.5:
        return "square" if top > 0.5 else "triangle"
    if top <= 0.5:
        return "circle"
    fill = mask.mean()
    if fill >= SQUARE_FILL:
        return "square"
    return "triangle" if fill < TRIANGLE_FILL else "circle"


def detect(image: np.ndarray, grid: int = GRID) -> list[Detection]:
    """Objects in an RGB uint8 image (H, W, 3), in raster order of their cells."""
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected an RGB image (H, W, 3), got shape {image.shape}")
    cell = image.shape[1] / grid
    min_area = MIN_AREA_FRAC * (cell * SPRITE / CELL) ** 2
    labels = segment(image)
    dets: list[Detection] = []
    for k, color in enumerate(_NAMES):
        mask = labels == k
        if mask.any():
            dets += _components(mask, color, cell, grid, min_area)
    return sorted(dets, key=lambda d: (d.row, d.col, -d.area))


def _components(mask: np.ndarray, color: str, cell: float, grid: int, min_area: float) -> list[Detection]:
    lab, _ = ndimage.label(mask, _FOUR)
    out = []
    for i, sl in enumerate(ndimage.find_objects(lab), start=1):
        if sl is None:
            continue
        comp = lab[sl] == i
        h, w = comp.shape
        if max(h, w) > 1.5 * cell:  # several touching objects of one colour: split along the grid
            out += _split_by_cells(comp, sl, color, cell, grid, min_area)
            continue
        area = int(comp.sum())
        if area >= min_area:
            out.append(_detection(comp, sl[0].start, sl[1].start, color, cell, grid))
    return out


def _split_by_cells(comp: np.ndarray, sl: tuple[slice, slice], color: str, cell: float, grid: int,
                    min_area: float) -> list[Detection]:
    y0, x0 = sl[0].start, sl[1].start
    out = []
    for r in range(int(y0 // cell), int(min(grid, np.ceil(sl[0].stop / cell)))):
        for c in range(int(x0 // cell), int(min(grid, np.ceil(sl[1].stop / cell)))):
            ys = slice(max(0, round(r * cell) - y0), max(0, round((r + 1) * cell) - y0))
            xs = slice(max(0, round(c * cell) - x0), max(0, round((c + 1) * cell) - x0))
            part = comp[ys, xs]
            if part.sum() < min_area:
                continue
            yy, xx = np.nonzero(part)
            crop = part[yy.min():yy.max() + 1, xx.min():xx.max() + 1]
            out.append(_detection(crop, y0 + ys.start + yy.min(), x0 + xs.start + xx.min(), color, cell, grid))
    return out


def _detection(comp: np.ndarray, y0: int, x0: int, color: str, cell: float, grid: int) -> Detection:
    h, w = comp.shape
    cy, cx = y0 + h / 2, x0 + w / 2
    row, col = min(grid - 1, int(cy // cell)), min(grid - 1, int(cx // cell))
    return Detection(classify(comp), color, row, col, (int(x0), int(y0), int(x0 + w), int(y0 + h)), int(comp.sum()))


def to_scene(dets: list[Detection], grid: int = GRID) -> Scene:
    """The scene the detections describe; where two detections share a cell the larger one wins."""
    best: dict[tuple[int, int], Detection] = {}
    for d in dets:
        if d.cell not in best or d.area > best[d.cell].area:
            best[d.cell] = d
    return Scene(tuple(sorted(Obj(d.shape, d.color, d.row, d.col) for d in best.values())), grid)


@lru_cache(maxsize=None)
def sprite_extent(shape: str, cell: int = CELL) -> tuple[int, int, int, int, int]:
    """(dx0, dy0, dx1, dy1, area) of a rendered sprite's pixels relative to its cell's top-left corner."""
    spr = max(4, round(cell * SPRITE / CELL))
    bx0, by0, _, _ = cell_box(0, 0, cell, spr)
    m = sprite(shape, spr)
    yy, xx = np.nonzero(m)
    return bx0 + int(xx.min()), by0 + int(yy.min()), bx0 + int(xx.max()) + 1, by0 + int(yy.max()) + 1, int(m.sum())


def object_detection(o: Obj, cell: int = CELL) -> Detection:
    """The detection the renderer's drawing of `o` yields (exact box and area), without rendering."""
    dx0, dy0, dx1, dy1, area = sprite_extent(o.shape, cell)
    x, y = o.col * cell, o.row * cell
    return Detection(o.shape, o.color, o.row, o.col, (x + dx0, y + dy0, x + dx1, y + dy1), area)


def scene_detections(scene: Scene, cell: int = CELL) -> list[Detection]:
    """Ground-truth detections of a scene (what `detect(render(scene, cell))` must return)."""
    return [object_detection(o, cell) for o in sorted(scene.objects, key=lambda o: o.cell)]
