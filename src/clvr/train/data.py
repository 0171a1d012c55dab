"""Training samples for the world generator, made on the fly and batched (never data-bound).

A canvas is a (grid*grid,) array of cell contents (0 = empty, 1 + kind + N_KINDS * look code, kind =
shape*len(COLORS) + colour, look code 0 = the canonical sprite, else `Look.code()`), so a batch is rendered by
one table lookup: `tokens(contents)` -> (B, N, F). Rows are cut from `clvr.world.render` (every cell is drawn on
its own), so tokens are exactly the renderer's pixels; the fixed world's 13 contents form one fixed table, a
varied world's looks are drawn once and cached.

Appearance (config `world.appearance`, given to `PromptSource`): when varied, every object of a sample gets a
random look (an edit's untouched objects keep theirs, the edited one gets a fresh one where it is new) and a
text-to-image layout is drawn by the seeded solver from the valid layouts instead of its canonical one. When
fixed (the default), samples are exactly those of the fixed world.

Mix: `edit_frac` edits (add-heavy; the instruction text from `clvr.steps.Step`, the trace = the adds that
built the reference canvas, grounded regions with probability `grounded_frac`) and text-to-image samples
(prompt from the world grammar, layout from its solver; reference = blank canvas, no regions).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch

from clvr.steps import Step
from clvr.world.render import cell_patch, render, vary
from clvr.world.scene import Look, Obj, Scene
from clvr.world.vocab import COLORS, SHAPES

EDIT_OPS = ("add", "remove", "recolor", "move")
OP_PROBS = (0.4, 0.2, 0.2, 0.2)
N_KINDS = len(SHAPES) * len(COLORS)
N_CONTENTS = 1 + N_KINDS  # contents of the fixed world (canonical sprites)
_COLOR_NAMES = tuple(COLORS)


def content_of(o: Obj) -> int:
    kind = SHAPES.index(o.shape) * len(COLORS) + _COLOR_NAMES.index(o.color)
    return 1 + kind + N_KINDS * (0 if o.look is None else o.look.code())


def contents_of(scene: Scene) -> np.ndarray:
    out = np.zeros(scene.grid * scene.grid, np.int64)
    for o in scene.objects:
        out[o.row * scene.grid + o.col] = content_of(o)
    return out


@lru_cache(maxsize=8)
def cell_table(cell: int = 16) -> torch.Tensor:
    """(N_CONTENTS, cell*cell*3) float in [-1, 1]: each possible cell content, cut from the renderer."""
    rows = [render(Scene((), 1), cell)]
    rows += [render(Scene((Obj(s, c, 0, 0),), 1), cell) for s in SHAPES for c in COLORS]
    return torch.from_numpy(np.stack(rows).reshape(N_CONTENTS, -1)).float() / 127.5 - 1.0


@lru_cache(maxsize=16384)
def content_row(content: int, cell: int = 16) -> torch.Tensor:
    """(cell*cell*3,) float in [-1, 1]: one cell content with a look (content >= N_CONTENTS), drawn."""
    kind, code = (content - 1) % N_KINDS, (content - 1) // N_KINDS
    shape, color = SHAPES[kind // len(COLORS)], _COLOR_NAMES[kind % len(COLORS)]
    patch = cell_patch(shape, color, Look.from_code(code) if code else None, cell)
    return torch.from_numpy(patch.reshape(-1).astype(np.float32)) / 127.5 - 1.0


def tokens(contents: np.ndarray, cell: int = 16) -> torch.Tensor:
    """(B, N) cell contents -> (B, N, F) tokens (same layout as `WorldPipeline.to_tokens`)."""
    table = cell_table(cell)
    if contents.size == 0 or int(contents.max()) < N_CONTENTS:  # the fixed world: one table lookup
        return table[torch.from_numpy(contents)]
    uniq, inv = np.unique(contents, return_inverse=True)
    rows = torch.stack([table[c] if c < N_CONTENTS else content_row(int(c), cell) for c in uniq])
    return rows[torch.from_numpy(inv.reshape(contents.shape))]


@dataclass
class Batch:
    x0: np.ndarray  # (B, N) target cell contents
    ref: np.ndarray  # (B, N) reference cell contents (0 everywhere for text-to-image)
    region: np.ndarray  # (B, N) float 0/1 grounding flags
    changed: np.ndarray  # (B, N) float 0/1 cells where target != reference
    texts: list[str]
    edit: np.ndarray  # (B,) bool


def join_text(trace: list[str], instruction: str) -> str:
    """The text the generator reads: the reasoning trace, then this step's instruction."""
    return ". ".join([*trace, instruction])


def random_scene(rng: np.random.Generator, grid: int, n: int) -> tuple[Scene, list[Step]]:
    """A scene of n random objects and the adds that built it, in a random order."""
    cells = rng.choice(grid * grid, size=n, replace=False)
    objs = [Obj(SHAPES[rng.integers(len(SHAPES))], _COLOR_NAMES[rng.integers(len(COLORS))], int(c) // grid,
                int(c) % grid) for c in cells]
    adds = [Step("add", o.shape, o.color, o.cell) for o in objs]
    return Scene(tuple(sorted(objs)), grid), adds


def random_edit(rng: np.random.Generator, grid: int, max_objects: int, op: str | None = None,
                op_probs: tuple[float, ...] = OP_PROBS) -> tuple[Scene, Step, list[Step]]:
    """(reference scene, one valid edit step of it, the trace of adds) for `op`, else an op drawn from
    `op_probs` (over EDIT_OPS; add-heavy by default)."""
    op = op or EDIT_OPS[rng.choice(len(EDIT_OPS), p=op_probs)]
    lo = 0 if op == "add" else 1
    hi = min(max_objects, grid * grid - (0 if op in ("remove", "recolor") else 1))
    scene, adds = random_scene(rng, grid, int(rng.integers(lo, hi + 1)))
    free = scene.free_cells()
    if op == "add":
        r, c = free[rng.integers(len(free))]
        step = Step("add", SHAPES[rng.integers(len(SHAPES))], _COLOR_NAMES[rng.integers(len(COLORS))], (r, c))
    else:
        o = scene.objects[rng.integers(len(scene.objects))]
        if op == "remove":
            step = Step("remove", o.shape, o.color, o.cell)
        elif op == "recolor":
            new = [c for c in _COLOR_NAMES if c != o.color][rng.integers(len(COLORS) - 1)]
            step = Step("recolor", o.shape, o.color, o.cell, new_color=new)
        else:
            step = Step("move", o.shape, o.color, o.cell, to=free[rng.integers(len(free))])
    return scene, step, adds


class PromptSource:
    """Text-to-image prompts with a satisfying layout: the world grammar + solver when present, else a
    fallback of one-object and counted prompts."""

    def __init__(self, grid: int, tier_weights: list[float] | None = None, pool: int = 0, seed: int = 0,
                 appearance=None):
        self.grid = grid
        self.appearance = appearance  # config world.appearance (None = fixed); sample_batch reads it too
        self.random_layouts = bool(appearance is not None and appearance.varied and appearance.random_layouts)
        self.tier_weights = np.asarray(tier_weights or [1.0], float)
        self.tier_weights = self.tier_weights / self.tier_weights.sum()
        try:
            from clvr.world.grammar import sample_prompt
            from clvr.world.solver import solve
        except ImportError:
            sample_prompt = solve = None
        self._sample, self._solve = sample_prompt, solve
        self.pool_size, self.seed, self._pool, self._meta = pool, seed, None, None

    def pool(self) -> list[list[tuple[str, Scene]]]:
        """`pool` prompts per tier, made once from a fixed seed (sampling + solving costs ~5 ms a prompt; the
        pool keeps the trainer compute-bound and is the same after a resume)."""
        if self._pool is None:
            rng = np.random.default_rng([self.seed, 7])
            metas = [[self._sample(t + 1, rng, grid=self.grid) for _ in range(self.pool_size)]
                     for t in range(len(self.tier_weights))]
            self._meta = metas
            self._pool = [[(m["prompt"], self._solve(m, self.grid, np.random.default_rng(0))) for m in tier]
                          for tier in metas]
        return self._pool

    def __call__(self, rng: np.random.Generator) -> tuple[str, Scene]:
        if self._sample is None:
            return self._fallback(rng)
        tier = 1 + int(rng.choice(len(self.tier_weights), p=self.tier_weights))
        if self.pool_size:
            tier_pool = self.pool()[tier - 1]
            k = int(rng.integers(len(tier_pool)))
            meta = self._meta[tier - 1][k]
            if self.random_layouts:  # the pool fixes the prompt; its layout is drawn afresh
                return meta["prompt"], self._solve(meta, self.grid, rng, appearance=self.appearance)
            prompt, scene = tier_pool[k]
            return prompt, self._dress(meta, scene, rng)
        return self.fresh(tier, rng)

    def fresh(self, tier: int, rng: np.random.Generator) -> tuple[str, Scene]:
        meta = self._sample(tier, rng, grid=self.grid)
        if self.random_layouts:  # any valid layout, seeded by rng: many right pictures per prompt
            return meta["prompt"], self._solve(meta, self.grid, rng, appearance=self.appearance)
        # the canonical layout (the solver under one fixed seed): the text alone decides the picture, and
        # alike prompts get alike layouts (every one-object prompt lands in the same cell)
        scene = self._solve(meta, self.grid, np.random.default_rng(0))
        return meta["prompt"], self._dress(meta, scene, rng)

    def _dress(self, meta: dict, scene: Scene, rng: np.random.Generator) -> Scene:
        """Random looks the judge accepts (varied appearance), else the scene as it is."""
        from clvr.world.solver import dress

        return dress(meta, scene, rng, self.appearance)

    def _fallback(self, rng: np.random.Generator) -> tuple[str, Scene]:
        n = 1 if rng.random() < 0.6 else int(rng.integers(2, 5))
        shape, color = SHAPES[rng.integers(len(SHAPES))], _COLOR_NAMES[rng.integers(len(COLORS))]
        objs = tuple(Obj(shape, color, i // self.grid, i % self.grid) for i in range(n))
        noun = shape if n == 1 else shape + "s"
        count = "a" if n == 1 else ["zero", "one", "two", "three", "four"][n]
        return f"a photo of {count} {color} {noun}", Scene(objs, self.grid)


def sample_batch(rng: np.random.Generator, size: int, grid: int, edit_frac: float, grounded_frac: float,
                 text_dropout: float, max_objects: int, prompts: PromptSource, max_trace: int = 8,
                 op_probs: tuple[float, ...] = OP_PROBS, appearance=None) -> Batch:
    """`appearance` (config world.appearance): None = the one `prompts` was made with."""
    app = getattr(prompts, "appearance", None) if appearance is None else appearance
    n = grid * grid
    x0, ref, region = np.zeros((size, n), np.int64), np.zeros((size, n), np.int64), np.zeros((size, n), np.float32)
    edit = rng.random(size) < edit_frac
    texts = []
    for i in range(size):
        if edit[i]:
            scene, step, adds = random_edit(rng, grid, max_objects, op_probs=op_probs)
            scene = vary(scene, rng, app)
            ref[i], x0[i] = contents_of(scene), contents_of(vary(step.apply(scene), rng, app))
            if rng.random() < grounded_frac:
                for r, c in step.regions():
                    region[i, r * grid + c] = 1.0
            k = int(rng.integers(0, max_trace + 1))
            trace = [a.instruction() for a in adds[max(0, len(adds) - k):]] if k else []
            text = join_text(trace if rng.random() < 0.7 else [], step.instruction())
        else:
            text, scene = prompts(rng)  # looks (if varied) come with the layout: the judge accepted them
            x0[i] = contents_of(scene)
        texts.append("" if rng.random() < text_dropout else text)
    return Batch(x0, ref, region, (x0 != ref).astype(np.float32), texts, edit)
