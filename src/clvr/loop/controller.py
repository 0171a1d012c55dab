"""The symbolic world controller: prompt -> constraints (parser) -> target layout (solver) -> ordered steps,
then, after every step, the next step from the verifier's reports.

Planning choice: the canvas starts blank and every object is placed by its own grounded `add` (in reading
order of the target layout). Each step then names one cell, so the generator is grounded there (the
location signal that made edits work, DESIGN §6) and passive verification can check exactly that cell.
A first ungrounded text-to-image step would put its object at a cell the layout did not choose, and
single-step text-to-image already fails at 2+ objects. `generate` is the single-step mode's one step.

Policy after each step (`next`):
* judge passes on the whole canvas -> STOP;
* otherwise the steps that would turn the detected canvas into the target (`corrections`): recolour in
  place, move a misplaced object, remove what is extra, add what is missing; the first one that is legal
  now and has not used up its tries is emitted. A step that just failed passive verification is therefore
  retried first (the loop gives every call a new seed) up to `retries_per_step` times, then set aside while
  the others proceed, and tried once more per round later; when nothing is left to try -> STOP.
"""

from __future__ import annotations

import json
from functools import lru_cache

import numpy as np

from clvr.errors import ClvrError
from clvr.loop.roles import LoopState, Plan, register_controller
from clvr.loop.verify import scene_diff
from clvr.steps import Step
from clvr.world.scene import Scene

STOP = {"op": "stop"}


def step_key(step: Step | dict) -> str:
    d = step.to_dict() if isinstance(step, Step) else step
    return json.dumps(d, sort_keys=True)


def corrections(scene: Scene, target: Scene, crowded: list | tuple = ()) -> list[Step]:
    """Ordered steps that turn `scene` into `target` (a blank scene gives the plan: one add per object).
    `crowded`: cells where the detector saw more than the scene holds (debris); their object is removed
    and, if the target wants it, added again, which clears the cell."""
    missing, wrong = scene_diff(scene, target)
    for cell in map(tuple, crowded):
        o = scene.at(cell)
        if o is not None and o not in wrong:
            wrong.append(o)
            if target.at(cell) == o:
                missing.append(o)
    steps: list[Step] = []
    for o in list(wrong):  # same shape, wrong colour, right cell -> recolour
        t = target.at(o.cell)
        if t is not None and t.shape == o.shape and t.color != o.color:
            steps.append(Step("recolor", o.shape, o.color, o.cell, new_color=t.color))
            wrong.remove(o)
            missing.remove(t)
    for o in list(wrong):  # the object the target wants elsewhere, at a free cell -> move it there
        t = next((t for t in missing if (t.shape, t.color) == (o.shape, o.color) and scene.at(t.cell) is None), None)
        if t is not None:
            steps.append(Step("move", o.shape, o.color, o.cell, to=t.cell))
            wrong.remove(o)
            missing.remove(t)
    steps += [Step("remove", o.shape, o.color, o.cell) for o in wrong]
    steps += [Step("add", t.shape, t.color, t.cell) for t in sorted(missing, key=lambda t: t.cell)]  # reading order
    return steps


def check_prompt(prompt: str, max_chars: int) -> str:
    text = " ".join(prompt.split())
    if not text:
        raise ClvrError("empty prompt: describe the image, e.g. \"a red circle above a blue square\"")
    if len(text) > max_chars:
        raise ClvrError(f"prompt too long: {len(text)} characters (max {max_chars}, config loop.max_prompt_chars)")
    return text


@lru_cache(maxsize=256)
def _solved(prompt: str, grid: int, seed: int) -> tuple[str, Scene]:
    from clvr.world.parser import parse
    from clvr.world.solver import solve

    metadata = parse(prompt)
    return json.dumps(metadata), solve(metadata, grid, rng=np.random.default_rng(seed))


def solve_prompt(prompt: str, grid: int, seed: int) -> tuple[dict, Scene]:
    """(metadata, target layout) of a prompt; memoised, since the solver can take a second on dense
    prompts and `clvr generate` checks the prompt before it loads the generator, then plans again."""
    metadata, target = _solved(prompt, grid, seed)
    return json.loads(metadata), target


class WorldController:
    name = "world"

    def __init__(self, grid: int = 4, retries_per_step: int = 2, max_prompt_chars: int = 500):
        self.grid = grid
        self.retries = retries_per_step
        self.max_prompt_chars = max_prompt_chars

    def plan(self, prompt: str, mode: str = "loop", seed: int = 0) -> Plan:
        """Parse and solve (bad prompt -> ClvrError naming the problem), then plan the steps. Single-step
        mode only parses: it has no use for a layout (its target is empty)."""
        from clvr.world.parser import parse

        if mode not in ("loop", "single"):
            raise ClvrError(f"unknown mode '{mode}' (known: loop, single)")
        prompt = check_prompt(prompt, self.max_prompt_chars)
        if mode == "single":
            return Plan(prompt, parse(prompt), Scene((), self.grid), [{"op": "generate", "prompt": prompt}], mode)
        metadata, target = solve_prompt(prompt, self.grid, seed)
        return Plan(prompt, metadata, target, [s.to_dict() for s in corrections(Scene((), self.grid), target)], mode)

    def next(self, state: LoopState) -> dict:
        if state.plan.mode == "single":
            return STOP if state.calls else dict(state.plan.steps[0])
        if state.active is not None and state.active["ok"]:
            return STOP
        from clvr.loop.run import transition_error

        crowded = state.active.get("crowded", []) if state.active else []
        todo = [s for s in corrections(state.scene, state.plan.target, crowded)
                if transition_error(s, state.scene, state.calls) is None]
        tries = [state.failures.get(step_key(s), 0) for s in todo]
        for bound in (self.retries + 1, 2 * (self.retries + 1)):  # first round, then one more round each
            for s, n in zip(todo, tries):
                if n < bound:
                    return s.to_dict()
        return STOP  # nothing left worth trying: the loop ends and reports the judge's verdict


@register_controller("world")
def world_controller(grid: int = 4, retries_per_step: int = 2, max_prompt_chars: int = 500) -> WorldController:
    return WorldController(grid, retries_per_step, max_prompt_chars)
