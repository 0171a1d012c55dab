"""Oracle generators (no network): they draw exactly what a request asks for.

* `oracle`: the ceiling. An edit instruction is read back into its `Step` and applied to the detected
  reference canvas; a text-to-image prompt is parsed and solved (so its layout satisfies the prompt).
* `noisy-oracle`: a simulation for developing the loop and the probe before trained weights exist.
  Each object drawn by text-to-image is independently spoilt (recoloured or dropped) with probability
  `p_err`, so single-step success falls as (1 - p_err) ** objects; each edit fails with probability
  `p_err` (no change, wrong colour, or a stray extra object); in a multi-op edit each op fails on its own
  with probability `p_err` (not done, or done in the wrong colour), so all k succeed with (1 - p_err) ** k.
  Figures made with it are labelled as such.

Neither is a model: they exist as a ceiling and for tests; `nfe` is what they report per call (default 0).
With a varied `appearance` (config `world.appearance`), text-to-image objects get random looks, and an edit
redraws only the cells it changes (new objects with random looks), keeping every other pixel of the reference.
"""

from __future__ import annotations

import time

import numpy as np

from clvr.errors import ClvrError
from clvr.generator import GenRequest, GenResult, register_generator
from clvr.steps import SchemaError, Step
from clvr.world.render import redraw, render, vary
from clvr.world.scene import Obj, Scene
from clvr.world.vocab import COLORS, SHAPES

_EDIT_ARTICLE = {"add": "a", "remove": "the", "recolor": "the", "move": "the"}


def parse_instruction(text: str, grid: int = 4) -> Step:
    """Read an edit instruction (the text of `Step.instruction()`, multi-op ones included) back into its Step;
    SchemaError if it is not one."""
    pieces = text.split(". ")
    if len(pieces) == 1:
        return Step.from_dict(_parse_one(text), grid)
    return Step.from_dict({"op": "edit", "ops": [_parse_one(t) for t in pieces]}, grid)


def _parse_one(text: str) -> dict:
    w = text.split()
    if len(w) < 9 or w[0] not in _EDIT_ARTICLE or w[1] != _EDIT_ARTICLE[w[0]] or w[4:6] != ["at", "row"] \
            or w[7] != "column":
        raise SchemaError(f"not an edit instruction: {text!r}")
    d: dict = {"op": w[0], "color": w[2], "shape": w[3], "cell": [_int(w[6]), _int(w[8])]}
    rest = w[9:]
    if w[0] == "recolor" and len(rest) == 2 and rest[0] == "to":
        d["new_color"] = rest[1]
    elif w[0] == "move" and len(rest) == 5 and rest[:2] == ["to", "row"] and rest[3] == "column":
        d["to"] = [_int(rest[2]), _int(rest[4])]
    elif rest:
        raise SchemaError(f"not an edit instruction: {text!r}")
    return d


def _int(s: str) -> int | str:
    return int(s) if s.isdigit() else s


class OracleGenerator:
    name = "oracle"

    def __init__(self, grid: int = 4, cell: int = 16, p_err: float = 0.0, nfe: int = 0, appearance=None):
        self.grid, self.cell, self.p_err, self.nfe = grid, cell, p_err, nfe
        self.appearance = appearance if appearance is not None and appearance.varied else None

    def generate(self, req: GenRequest) -> GenResult:
        t = time.perf_counter()
        rng = np.random.default_rng(req.seed)
        scene = self.text_to_scene(req, rng) if req.reference is None else self.edit_scene(req, rng)
        if self.appearance is None:
            image = render(scene, self.cell)
        elif req.reference is None:
            image = render(vary(scene, rng, self.appearance), self.cell)
        else:
            before = self._detected(req.reference)
            image = redraw(req.reference, before, vary(scene, rng, self.appearance), self.cell)
        return GenResult(image, self.nfe, time.perf_counter() - t)

    def _detected(self, image: np.ndarray) -> Scene:
        from clvr.world.detector import detect, to_scene

        return to_scene(detect(image, self.grid), self.grid)

    def text_to_scene(self, req: GenRequest, rng: np.random.Generator) -> Scene:
        from clvr.world.parser import parse
        from clvr.world.solver import solve

        scene = solve(parse(req.instruction), self.grid, rng=rng, appearance=self.appearance)
        kept = []
        for o in scene.objects:
            if rng.random() >= self.p_err:
                kept.append(o)
            elif rng.random() < 0.5:  # spoilt: recoloured (else dropped)
                kept.append(Obj(o.shape, _other(o.color, rng), o.row, o.col))
        return Scene(tuple(kept), self.grid)

    def edit_scene(self, req: GenRequest, rng: np.random.Generator) -> Scene:
        before = self._detected(req.reference)
        step = parse_instruction(req.instruction, self.grid)
        try:
            after = step.apply(before)
        except ValueError as e:  # e.g. add onto an occupied cell: a real model would draw something odd
            raise ClvrError(f"oracle cannot apply {req.instruction!r}: {e}") from None
        if step.op == "edit":
            return self._noisy_parts(step, before, rng)
        if rng.random() >= self.p_err:
            return after
        mode = rng.integers(3)
        if mode == 0:  # nothing happens
            return before
        if mode == 1 and step.op in ("add", "recolor", "move"):  # the intended object, wrong colour
            cell = step.to or step.cell
            o = after.at(cell)
            return after.recolor(cell, _other(o.color, rng))
        free = after.free_cells()  # the intended change plus a stray object
        if not free:
            return before
        r, c = free[rng.integers(len(free))]
        return after.add(Obj(SHAPES[rng.integers(len(SHAPES))], list(COLORS)[rng.integers(len(COLORS))], r, c))


    def _noisy_parts(self, step: Step, scene: Scene, rng: np.random.Generator) -> Scene:
        """Each op of a multi-op edit done, or (probability p_err) not done or done in the wrong colour."""
        for part in step.ops:
            if rng.random() >= self.p_err:
                scene = part.apply(scene)
            elif rng.integers(2) and part.op != "remove":
                scene = part.apply(scene)
                cell = part.to or part.cell
                scene = scene.recolor(cell, _other(scene.at(cell).color, rng))
        return scene


def _other(color: str, rng: np.random.Generator) -> str:
    others = [c for c in COLORS if c != color]
    return others[rng.integers(len(others))]


@register_generator("oracle")
def oracle(grid: int = 4, cell: int = 16, nfe: int = 0, appearance=None) -> OracleGenerator:
    return OracleGenerator(grid, cell, 0.0, nfe, appearance)


@register_generator("noisy-oracle")
def noisy_oracle(grid: int = 4, cell: int = 16, p_err: float = 0.15, nfe: int = 0,
                 appearance=None) -> OracleGenerator:
    g = OracleGenerator(grid, cell, p_err, nfe, appearance)
    g.name = f"noisy-oracle(p_err={p_err})"
    return g
