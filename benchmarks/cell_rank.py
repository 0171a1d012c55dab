"""How many dimensions a generator needs per cell to draw the world's looks (issue 13's diagnosis).

The world generator has one image token per cell and a linear `proj_out` from the transformer's hidden size,
so every cell it can output lies in an affine subspace of the cell's pixels (16 * 16 * 3 = 768 values) whose
dimension is at most `generator.hidden`. The best such subspace of rank k is the PCA of all the looks' patches;
this script projects every look of every shape and colour onto it, rounds to pixels, runs the detector on the
cell, and reports the fraction of looks whose shape and colour still read right. A model can do no better
than that bound, whatever its training.

    PYTHONPATH=src python benchmarks/cell_rank.py [--no-offset] [--no-rotate] [--ranks 32,64,96,192]

Last line: one JSON object {"looks", "offset", "rotate", "shape_ok": {rank: fraction}}.
"""

from __future__ import annotations

import argparse
import json

import numpy as np

from clvr.world.detector import detect
from clvr.world.render import MARGIN, SYMMETRY, cell_patch
from clvr.world.scene import ANGLE_STEP, LOOK_UNIT, Look
from clvr.world.vocab import CELL, COLORS, SHAPES

SIZES = range(10, 15)  # circumradii in 1/32 cell: world.appearance.size's whole range [0.3125, 0.4375]


def every_look(shape: str, offset: bool, rotate: bool):
    for r in SIZES:
        room = LOOK_UNIT // 2 - MARGIN - r
        shifts = range(-room, room + 1) if offset else (0,)
        angles = range(0, SYMMETRY.get(shape, ANGLE_STEP), ANGLE_STEP) if rotate else (0,)
        for dy in shifts:
            for dx in shifts:
                for a in angles:
                    yield Look(r, dy, dx, a)


def patches(offset: bool, rotate: bool) -> tuple[np.ndarray, list[tuple[str, str]]]:
    """(n, CELL*CELL*3) float patches in [-1, 1] (the generator's pixel scale) and their (shape, colour)."""
    rows, labels = [], []
    for shape in SHAPES:
        for color in COLORS:
            for look in every_look(shape, offset, rotate):
                rows.append(cell_patch(shape, color, look, CELL).reshape(-1))
                labels.append((shape, color))
    return np.stack(rows).astype(np.float32) / 127.5 - 1.0, labels


def shape_ok(p: np.ndarray, labels: list, rank: int, sample: np.ndarray) -> float:
    """Fraction of the sampled looks that the detector still reads right after projection onto the best
    rank-`rank` affine subspace (PCA) of all patches."""
    mean = p.mean(0)
    basis = np.linalg.svd(p - mean, full_matrices=False)[2][:rank]  # (rank, 768)
    proj = (p[sample] - mean) @ basis.T @ basis + mean
    cells = np.clip(np.rint((proj + 1.0) * 127.5), 0, 255).astype(np.uint8).reshape(-1, CELL, CELL, 3)
    hits = 0
    for cell, i in zip(cells, sample):
        dets = detect(cell, 1)
        hits += len(dets) == 1 and (dets[0].shape, dets[0].color) == labels[i]
    return hits / len(sample)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--no-offset", action="store_true", help="looks without offsets (world.appearance.offset=false)")
    ap.add_argument("--no-rotate", action="store_true", help="looks without turns (world.appearance.rotate=false)")
    ap.add_argument("--ranks", default="32,64,96,192", help="comma-separated subspace ranks")
    ap.add_argument("--sample", type=int, default=1000, help="looks checked per rank (all when fewer)")
    a = ap.parse_args()
    p, labels = patches(not a.no_offset, not a.no_rotate)
    rng = np.random.default_rng(0)
    sample = rng.choice(len(p), min(a.sample, len(p)), replace=False)
    ok = {int(k): round(shape_ok(p, labels, int(k), sample), 4) for k in a.ranks.split(",")}
    print(json.dumps({"looks": len(p), "offset": not a.no_offset, "rotate": not a.no_rotate, "shape_ok": ok}))


if __name__ == "__main__":
    main()
