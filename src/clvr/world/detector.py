"""The world's detector: image -> objects (shape, colour, cell, box). No learning.

1. Colour segmentation: every pixel snaps to the nearest palette colour (world colours + background),
   by a lookup table over 6-bit colours; a pixel farther than `MAX_COLOR_DIST` from every palette entry is
   off-palette. An off-palette pixel that lies on the line from the background to a world colour (an
   anti-aliased edge: background + a * (colour - background)) takes that colour when a >= `EDGE_ALPHA`
   (about half covered), else it counts as background, like near-white noise and odd pixels of generated
   images. Images made only of palette colours (the fixed world, the generators' snapped output) never
   reach the edge rule.
2. Connected components per colour (scipy.ndimage.label, 4-connectivity); components smaller than
   `MIN_AREA_FRAC` of a canonical sprite box are noise. A component larger than ~1.5 cells (two touching
   objects of one colour) is split along the cell grid.
3. Shape class from geometry, robust to size, offset and orientation: a component that fills all four
   corners of its box is a square (an upright square at any size or offset), one that fills both bottom
   corners and no top one an apex-up triangle (no turned square or disc does). Otherwise analysis by
   synthesis: for each class, the shape with the component's area and centroid, turned to the
   orientation its n-fold angular moment gives (n = 4 square, 3 triangle), is drawn on the component's box,
   and the class whose drawing overlaps the component best (IoU) wins.
4. Cell from the box centre; cell size = image side / grid.

Exact on renderer output, fixed or varied (`world.appearance`): `detect(render(scene))` equals
`scene_detections(scene)` (bench and tests check it; every look at cell 16 is checked by a test).
Detections are returned in raster order of their cells (row, then column); GenEval orders by detector
confidence, and the judge's "first `count` of a class" reads this order.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from scipy import ndimage

from clvr.world.render import cell_box, look_mask, sprite
from clvr.world.scene import Obj, Scene
from clvr.world.vocab import BACKGROUND, CELL, COLORS, GRID, SHAPES, SPRITE

MAX_COLOR_DIST = 90.0  # RGB distance beyond which a pixel is off-palette (background)
EDGE_ALPHA = 0.47  # an edge pixel this much of the way from background to a colour takes the colour
EDGE_DIST = 24.0  # how far (RGB) an edge pixel may lie off the background-to-colour line
MIN_AREA_FRAC = 0.15  # components below this fraction of a sprite box are noise

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
    """Label of every colour quantised to 6 bits per channel (the centre of its bin), as `segment` uses."""
    q = (np.arange(64) << 2) + 2
    rgb = np.stack(np.meshgrid(q, q, q, indexing="ij"), -1).reshape(-1, 1, 3)
    d2 = ((rgb - _PALETTE[None]) ** 2).sum(-1)  # (262144, 5)
    idx = d2.argmin(1)
    far = d2[np.arange(len(idx)), idx] > MAX_COLOR_DIST ** 2
    idx[(idx == len(_NAMES)) | far] = -1
    # anti-aliased edges: off-palette colours near the segment background -> colour, at least EDGE_ALPHA along
    bg = _PALETTE[-1]
    d = (_PALETTE[:-1] - bg).astype(np.float64)  # (4, 3)
    v = (rgb[:, 0] - bg).astype(np.float64)  # (M, 3)
    a = v @ d.T / (d * d).sum(1)  # (M, 4) position along each segment
    off = np.linalg.norm(v[:, None] - a[..., None] * d[None], axis=-1)  # (M, 4) distance from each line
    off[(a < EDGE_ALPHA) | (a > 1.0)] = np.inf
    k = off.argmin(1)
    edge = far & (off[np.arange(len(k)), k] <= EDGE_DIST)
    idx[edge] = k[edge]
    return idx.astype(np.int8)


def segment(image: np.ndarray) -> np.ndarray:
    """(H, W) int8 label map: index into COLORS, or -1 for background / off-palette pixels.
    Nearest palette colour by a lookup table over 6-bit colours (error <= 2 per channel, far below the
    palette's spacing and the distance thresholds)."""
    px = image.astype(np.int32) >> 2
    return _lut()[(px[..., 0] << 12) | (px[..., 1] << 6) | px[..., 2]]


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
    """Shape class of one component's boolean mask (cropped to its box). A mask filling all four corners of
    its box is a square (after trimming edge rows/columns of single pixels: noise specks touching the shape);
    otherwise the class whose synthesised shape overlaps the untrimmed mask best (see the module doc; a
    turned shape's tip can be a single-pixel row, and a speck moves the overlap by a pixel only)."""
    trimmed = trim(mask)
    h, w = trimmed.shape
    k = max(1, int(0.25 * min(h, w)))  # corner patch side
    corners = (trimmed[:k, :k].mean(), trimmed[:k, -k:].mean(), trimmed[-k:, :k].mean(), trimmed[-k:, -k:].mean())
    if min(corners) > 0.5:
        return "square"
    if min(corners[2:]) > 0.5 and max(corners[:2]) <= 0.5:  # both bottom corners, no top one: apex-up triangle
        return "triangle"
    scores = {shape: _iou(mask, m) for shape, m in synthesise(mask).items()}
    return max(scores, key=scores.get)


_SIDES = {"square": 4, "triangle": 3}


def synthesise(mask: np.ndarray) -> dict[str, np.ndarray]:
    """Per class, the shape with the mask's area and centroid, turned as the mask's n-fold angular moment
    says, drawn (pixel centres) on the mask's box: a disc, or a regular polygon with an edge at the bottom
    at angle 0 (the renderer's convention: triangle apex up)."""
    h, w = mask.shape
    yy, xx = np.nonzero(mask)
    area = len(yy)
    cy, cx = yy.mean() + 0.5, xx.mean() + 0.5
    y = (np.arange(h) + 0.5)[:, None] - cy
    x = (np.arange(w) + 0.5)[None, :] - cx
    z = (xx + 0.5 - cx) + 1j * (yy + 0.5 - cy)
    out = {"circle": x * x + y * y <= area / math.pi}
    for shape, n in _SIDES.items():
        r = math.sqrt(2 * area / (n * math.sin(2 * math.pi / n)))  # circumradius of a regular n-gon of this area
        moment = float(np.angle((z ** n).sum()))
        theta = (moment - math.pi) / n if n == 4 else (moment - math.pi / 2) / 3  # the vertices' n-fold phase
        inside = np.ones((h, w), bool)
        for j in range(n):
            phi = math.pi / 2 + theta + 2 * math.pi * j / n  # outward normal of edge j
            inside &= x * math.cos(phi) + y * math.sin(phi) <= r * math.cos(math.pi / n)
        out[shape] = inside
    return out


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum()) / max(1, int((a | b).sum()))


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


@lru_cache(maxsize=16384)
def look_extent(shape: str, look, cell: int = CELL) -> tuple[int, int, int, int, int]:
    """(dx0, dy0, dx1, dy1, area) of an object drawn with a look, relative to its cell's top-left corner."""
    m = look_mask(shape, look, cell)
    yy, xx = np.nonzero(m)
    return int(xx.min()), int(yy.min()), int(xx.max()) + 1, int(yy.max()) + 1, int(m.sum())


def object_detection(o: Obj, cell: int = CELL) -> Detection:
    """The detection the renderer's drawing of `o` yields (exact box and area), without rendering."""
    ext = sprite_extent(o.shape, cell) if o.look is None else look_extent(o.shape, o.look, cell)
    dx0, dy0, dx1, dy1, area = ext
    x, y = o.col * cell, o.row * cell
    return Detection(o.shape, o.color, o.row, o.col, (x + dx0, y + dy0, x + dx1, y + dy1), area)


def scene_detections(scene: Scene, cell: int = CELL) -> list[Detection]:
    """Ground-truth detections of a scene (what `detect(render(scene, cell))` must return)."""
    return [object_detection(o, cell) for o in sorted(scene.objects, key=lambda o: o.cell)]
