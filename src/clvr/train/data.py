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

`MultiMix` (the sft stage) puts coarse steps in front of that mix: with probability `multi_frac` a grounded
multi-op edit (one `Step(op="edit")` of k = 2..max_k mixed ops on distinct cells), with probability
`layout_frac` a layout text-to-image sample (1..max_layout adds on the blank canvas, grounded, no trace); the
rest are the samples above (the guard against forgetting single-op edits and text-to-image).
Each sample carries its step's single-op parts (`Batch.parts`: a cell-slot model's slots).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np
import torch

from clvr.steps import Step
from clvr.world.render import cell_patch, render, vary
from clvr.world.scene import Look, Obj, Scene
from clvr.world.vocab import COLORS, EDIT_OPS, SHAPES

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
    parts: list[tuple[Step, ...]] = field(default_factory=list)  # each sample's single-op steps (() = none)
    # (reference, target) canvases (H, W, 3) uint8 of samples given as images (data-engine examples), else None;
    # empty = none. Such a sample's x0/ref contents are unused (see `batch_tokens`).
    images: list[tuple[np.ndarray, np.ndarray] | None] = field(default_factory=list)


@dataclass(frozen=True)
class MultiMix:
    """Coarse-step samples (see the module docstring); the rest of a batch is today's mix."""

    multi_frac: float = 0.0  # grounded multi-op edits, k = 2..max_k
    max_k: int = 8
    layout_frac: float = 0.0  # layout text-to-image: 1..max_layout adds on a blank canvas
    max_layout: int = 12


def image_tokens(images: np.ndarray, grid: int, cell: int) -> torch.Tensor:
    """(B, H, W, 3) uint8 -> (B, grid*grid, cell*cell*3) in [-1, 1] (the layout of `tokens`)."""
    x = torch.from_numpy(np.ascontiguousarray(images)).float() / 127.5 - 1.0
    b = x.shape[0]
    return x.view(b, grid, cell, grid, cell, 3).permute(0, 1, 3, 2, 4, 5).reshape(b, grid * grid, cell * cell * 3)


def batch_tokens(b: Batch, grid: int, cell: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x0, ref, changed) of a batch: tokens of the cell contents, or of the canvases for samples given as
    images (changed = cells whose pixels differ)."""
    x0, ref, changed = tokens(b.x0, cell), tokens(b.ref, cell), torch.from_numpy(b.changed)
    for i, im in enumerate(b.images):
        if im is not None:
            ref[i], x0[i] = image_tokens(np.stack(im), grid, cell)
            changed[i] = (x0[i] != ref[i]).any(-1).float()
    return x0, ref, changed


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


def random_multi_edit(rng: np.random.Generator, grid: int, k: int, max_objects: int,
                      op_probs: tuple[float, ...] = OP_PROBS, n_objects: int | None = None
                      ) -> tuple[Scene, Step, list[Step]]:
    """(reference scene, one multi-op `Step(op="edit")` of k ops on distinct cells, the trace of adds): each op
    drawn from `op_probs` among those the cells left allow (an add needs a free cell, a remove or recolor an
    object, a move both). k ops always fit when 2k <= grid*grid; else the step may hold fewer. The reference
    holds `n_objects` objects (None: 0..max_objects at random)."""
    n = int(rng.integers(0, min(max_objects, grid * grid) + 1)) if n_objects is None else n_objects
    scene, adds = random_scene(rng, grid, n)
    objs = [scene.objects[i] for i in rng.permutation(len(scene.objects))]
    free = [scene.free_cells()[i] for i in rng.permutation(len(scene.free_cells()))]
    probs = np.asarray(op_probs, float)
    parts: list[Step] = []
    for _ in range(k):
        ok = np.array([bool(free), bool(objs), bool(objs), bool(objs and free)])
        if not (ok & (probs > 0)).any():
            break
        p = probs * ok
        op = EDIT_OPS[rng.choice(len(EDIT_OPS), p=p / p.sum())]
        if op == "add":
            shape, color = SHAPES[rng.integers(len(SHAPES))], _COLOR_NAMES[rng.integers(len(COLORS))]
            parts.append(Step("add", shape, color, free.pop()))
            continue
        o = objs.pop()
        if op == "remove":
            parts.append(Step("remove", o.shape, o.color, o.cell))
        elif op == "recolor":
            new = [c for c in _COLOR_NAMES if c != o.color][rng.integers(len(COLORS) - 1)]
            parts.append(Step("recolor", o.shape, o.color, o.cell, new_color=new))
        else:
            parts.append(Step("move", o.shape, o.color, o.cell, to=free.pop()))
    return scene, Step("edit", ops=tuple(parts)), adds


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
                 op_probs: tuple[float, ...] = OP_PROBS, appearance=None, multi: MultiMix | None = None) -> Batch:
    """`appearance` (config world.appearance): None = the one `prompts` was made with. `multi`: coarse-step
    samples first (None: today's mix, drawn exactly as before)."""
    app = getattr(prompts, "appearance", None) if appearance is None else appearance
    n = grid * grid
    x0, ref, region = np.zeros((size, n), np.int64), np.zeros((size, n), np.int64), np.zeros((size, n), np.float32)
    kind = rng.random(size) if multi is not None else np.ones(size)
    edit = rng.random(size) < edit_frac
    texts, parts = [], []
    for i in range(size):
        coarse = None
        if multi is not None and kind[i] < multi.multi_frac:
            coarse = random_multi_edit(rng, grid, int(rng.integers(2, multi.max_k + 1)), max_objects, op_probs)
        elif multi is not None and kind[i] < multi.multi_frac + multi.layout_frac:
            coarse = random_multi_edit(rng, grid, int(rng.integers(1, multi.max_layout + 1)), 0, (1.0, 0, 0, 0), 0)
        if coarse is not None or edit[i]:
            edit[i] = True
            scene, step, adds = coarse or random_edit(rng, grid, max_objects, op_probs=op_probs)
            scene = vary(scene, rng, app)
            ref[i], x0[i] = contents_of(scene), contents_of(vary(step.apply(scene), rng, app))
            if coarse is not None or rng.random() < grounded_frac:  # coarse steps: always grounded (as the loop)
                for r, c in step.regions():
                    region[i, r * grid + c] = 1.0
            k = int(rng.integers(0, max_trace + 1))
            trace = [a.instruction() for a in adds[max(0, len(adds) - k):]] if k else []
            text = join_text(trace if rng.random() < 0.7 else [], step.instruction())
            step_parts = step.parts()
        else:
            text, scene = prompts(rng)  # looks (if varied) come with the layout: the judge accepted them
            x0[i] = contents_of(scene)
            step_parts = ()
        drop = rng.random() < text_dropout
        texts.append("" if drop else text)
        parts.append(() if drop else step_parts)
    return Batch(x0, ref, region, (x0 != ref).astype(np.float32), texts, edit, parts, [None] * size)
