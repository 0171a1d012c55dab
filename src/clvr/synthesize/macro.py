"""Macro-step examples: several verified one-op steps of an accepted trajectory merged into one multi-op step.

Proposing multi-op steps to a generator that draws one object per call starves (1 % at k = 2), so the data
engine composes them from what it already verified: a run of k consecutive kept steps of an accepted trajectory
(canvases c0 -> c1 -> ... -> ck, each step passed passive verification) becomes one example c0 -> ck with the
step {"op": "edit", "ops": [the k steps]}. The target ck is the generator's own verified output, never a rendered
ground truth. A run is merged only if the merged step is valid (every part a single-op edit, no two parts on one
cell: `Step.from_dict`) and the detector reads exactly the merged step's result: the scene of ck is the merged step
applied to the scene of c0, and neither canvas holds a detection beside its scene's objects (passive verification
lets unrelated new objects pass; an example must not teach them).
"""

from __future__ import annotations

import numpy as np

from clvr.steps import SchemaError, Step
from clvr.trajectories import Trajectory, TrajectoryStep
from clvr.world.scene import Scene
from clvr.world.vocab import EDIT_OPS


def macro_examples(steps: list[TrajectoryStep], canvases: dict[str, np.ndarray], grid: int,
                   max_k: int) -> list[dict]:
    """Every run of 2..max_k consecutive positive steps that merges into an exact multi-op example (the
    trajectory line's `macro` entries, clvr.trajectories), shortest first from each start. `canvases`: image
    path -> (H, W, 3) uint8 for every step input and output."""
    chain = [s for s in steps if s.positive and s.output is not None]
    scenes: dict[str, tuple[Scene, bool]] = {}

    def seen(path: str) -> tuple[Scene, bool]:
        """(detected scene, clean: one detection per object) of a canvas, detected once."""
        from clvr.world.detector import detect, to_scene

        if path not in scenes:
            dets = detect(canvases[path], grid)
            scene = to_scene(dets, grid)
            scenes[path] = (scene, len(dets) == len(scene.objects))
        return scenes[path]

    edit = [s.step["op"] in EDIT_OPS for s in chain]  # a text-to-image step cannot be part of an edit
    out = []
    for i in range(len(chain)):
        for j in range(i + 1, min(len(chain), i + max_k)):
            run = chain[i: j + 1]
            if not (edit[i] and edit[j]):
                break  # no longer run from i can be an edit either
            merged = {"op": "edit", "ops": [s.step for s in run]}
            try:
                step = Step.from_dict(merged, grid)
            except SchemaError:
                break  # two parts on one cell: every longer run from i has them too
            (before, clean_before), (after, clean_after) = seen(run[0].input), seen(run[-1].output)
            if clean_before and clean_after and after == step.apply(before):
                out.append({"steps": [s.index for s in run], "reference": run[0].input, "target": run[-1].output,
                            "step": merged})
    return out


def examples_per_k(trajs: list[Trajectory], max_k: int) -> dict[int, int]:
    """Training examples per k = 1..max_k (clvr.trajectories.load_examples): k = 1 the positive steps, k >= 2 the
    macro-step entries."""
    counts = dict.fromkeys(range(1, max(1, max_k) + 1), 0)
    counts[1] = sum(s.positive for t in trajs for s in t.steps)
    for m in (m for t in trajs for m in t.macro):
        k = len(m["step"]["ops"])
        counts[k] = counts.get(k, 0) + 1
    return counts
