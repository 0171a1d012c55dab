"""The symbolic world controller: prompt -> constraints (parser) -> target layout (solver) -> ordered steps,
then, after every step, the next step from the verifier's reports.

Planning choice: the canvas starts blank and every object is placed by its own grounded `add` (in reading
order of the target layout). Each step then names one cell, so the generator is grounded there (the
location signal that made edits work, docs/DESIGN.md §4) and passive verification can check exactly that cell.
A first ungrounded text-to-image step would put its object at a cell the layout did not choose, and
single-step text-to-image already fails at 2+ objects. `generate` is the single-step mode's one step. The
rewrite mode (the open-loop baseline) plans as the loop does and emits the whole plan once, as one multi-op
step of every add (`rewrite_step`).

Policy after each step (`next`):
* judge passes on the whole canvas -> STOP;
* otherwise the steps that would turn the detected canvas into the target (`corrections`): recolour in
  place, move a misplaced object, remove what is extra, add what is missing; the first one that is legal
  now and has not used up its tries is emitted. A step that just failed passive verification is therefore
  retried first (the loop gives every call a new seed) up to `retries_per_step` times, then set aside while
  the others proceed, and tried once more per round later; when nothing is left to try -> STOP.

Ops per call (`ops_per_call`): the steps above are grouped, in that order, into one multi-op `edit` step of
k ops for one generator call. k comes from the generator's success per k (`k_success`, measured by
bench-generator; default {1: 1.0}: nothing is known about k > 1, so one op per call) and the calls left:
* no call budget: the k with the most ops done per call on average, k * success(k) (ties: the smaller k);
* `max_calls` set: the k whose plan (re-planned after every call, each call all-or-nothing) most likely
  finishes the remaining ops within the calls left, plus 1 % of the expected share of ops done, so that when
  no k can finish (too few calls) the one that gets the most done wins (ties: the most ops done per call,
  then the smaller k).
Both model a k-op call as all-or-nothing with the measured success (the loop keeps the ops that pass, so
this is the pessimistic case). A table that overrates the generator does not cost the prompt: every call
that keeps at least one op is progress, and its failed ops do not use up their tries (clvr.loop.run).
With today's shipped generators (success ~0.01 at k = 2) both rules keep one op per call; the one exception
is the last call with two ops left, where k = 2 is the only chance to finish.
"""

from __future__ import annotations

import json
from functools import lru_cache

import numpy as np

from clvr.errors import ClvrError
from clvr.loop.roles import MODES, LoopState, Plan, register_controller
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


KSuccess = dict[int, float]  # ops per call k -> share of k-op calls that do every op
ONE_OP: KSuccess = {1: 1.0}  # the default: nothing known about k > 1


def ops_per_call(n: int, calls_left: int | None, k_success: KSuccess = ONE_OP, progress_weight: float = 0.01) -> int:
    """How many of the `n` remaining ops to put into the next generator call (see the module docstring).
    `calls_left` None = no call budget. A k between measured ones gets the success of the next measured k
    above it (fewer ops are no harder); a k above every measured one is never chosen; k = 1 is assumed 1.0
    when not measured."""
    measured = {1: 1.0, **{int(k): float(v) for k, v in k_success.items() if int(k) >= 1}}
    p = {k: measured[min(m for m in measured if m >= k)] for k in range(1, max(n, 1) + 1) if k <= max(measured)}
    ks = [k for k in sorted(p) if p[k] > 0] or [1]
    if calls_left is None or n <= 1:
        return max(ks, key=lambda k: (k * p[k], -k))
    calls_left = max(calls_left, 1)
    # value[c][m]: best expected (finished + w * share done) with m ops left and c calls left
    w = progress_weight
    value = [[(1.0 if m == 0 else 0.0) + w * (n - m) / n for m in range(n + 1)]]
    best_k = 1
    for c in range(1, calls_left + 1):
        row = [value[c - 1][0]]
        for m in range(1, n + 1):
            scored = {k: p[k] * value[c - 1][m - k] + (1 - p[k]) * value[c - 1][m] for k in ks if k <= m}
            k_best = max(scored, key=lambda k: (round(scored[k], 9), k * p[k], -k))  # ties: fewer calls
            row.append(scored[k_best])
            if c == calls_left and m == n:
                best_k = k_best
        value.append(row)
    return best_k


def load_k_success(spec: str, where: str = "loop.k_success") -> KSuccess:
    """The per-k success table from a JSON file: `path` or `path#row`. The file is either the table itself
    ({"1": 1.0, "2": 0.99, ...}) or an object holding it under "multi_op_success" / "multi_op" / "k_success",
    possibly one table per row (generator), e.g. bench-generator's {"multi_op_success": {"distilled_4": {...}}};
    `#row` picks one (needed when there are several). "" = ONE_OP."""
    from pathlib import Path

    if not spec:
        return dict(ONE_OP)
    path, _, row = spec.partition("#")
    try:
        d = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise ClvrError(f"{where}: cannot read the per-k success table {path!r}: {e}") from None
    if not _is_table(d):
        for key in ("multi_op_success", "multi_op", "k_success"):
            if isinstance(d, dict) and key in d:
                d = d[key]
                break
    if not _is_table(d) and isinstance(d, dict) and d and all(isinstance(v, dict) for v in d.values()):
        if not row and len(d) == 1:
            row = next(iter(d))
        if row not in d:
            raise ClvrError(f"{where}: {path} has rows {sorted(d)}; pick one with {path}#<row>"
                            + (f" ({row!r} is not one)" if row else ""))
        d = d[row]
    if not _is_table(d):
        raise ClvrError(f"{where}: {path} holds no per-k success table ({{\"1\": 1.0, \"2\": 0.99, ...}}, "
                        f"each a share in 0..1)")
    return {int(k): float(v) for k, v in d.items()}


def _is_table(d: object) -> bool:
    return isinstance(d, dict) and bool(d) and all(
        isinstance(k, str) and k.isdigit() and int(k) >= 1 and isinstance(v, (int, float))
        and not isinstance(v, bool) and 0 <= v <= 1 for k, v in d.items())


class WorldController:
    name = "world"

    def __init__(self, grid: int = 4, retries_per_step: int = 2, max_prompt_chars: int = 500,
                 k_success: KSuccess | None = None):
        self.grid = grid
        self.retries = retries_per_step
        self.max_prompt_chars = max_prompt_chars
        self.k_success = dict(k_success or ONE_OP)

    def plan(self, prompt: str, mode: str = "loop", seed: int = 0) -> Plan:
        """Parse and solve (bad prompt -> ClvrError naming the problem), then plan the steps. Single-step
        mode only parses: it has no use for a layout (its target is empty). Rewrite mode plans as the loop does
        (the same target and steps); only `next` differs."""
        from clvr.world.parser import parse

        check_mode(mode)
        prompt = check_prompt(prompt, self.max_prompt_chars)
        if mode == "single":
            return Plan(prompt, parse(prompt), Scene((), self.grid), [{"op": "generate", "prompt": prompt}], mode)
        metadata, target = solve_prompt(prompt, self.grid, seed)
        return Plan(prompt, metadata, target, [s.to_dict() for s in corrections(Scene((), self.grid), target)], mode)

    def next(self, state: LoopState) -> dict:
        if state.plan.mode == "single":
            return STOP if state.calls else dict(state.plan.steps[0])
        if state.plan.mode == "rewrite":
            return rewrite_step(state)
        if state.active is not None and state.active["ok"]:
            return STOP
        from clvr.loop.run import transition_error

        crowded = state.active.get("crowded", []) if state.active else []
        todo = [s for s in corrections(state.scene, state.plan.target, crowded)
                if transition_error(s, state.scene, state.calls) is None]
        tries = [state.failures.get(step_key(s), 0) for s in todo]
        for bound in (self.retries + 1, 2 * (self.retries + 1)):  # first round, then one more round each
            ready = [s for s, n in zip(todo, tries) if n < bound]
            if ready:
                calls_left = state.max_calls - state.calls if state.max_calls else None
                k = ops_per_call(len(todo), calls_left, self.k_success)
                return group(ready, k, state.scene)
        return STOP  # nothing left worth trying: the loop ends and reports the judge's verdict


class ModelController:
    """A controller whose every loop step is a model's (`propose`), on the world controller's symbolic plan: the
    parser and solver give the constraints and the target layout the verifier checks against, and single-step
    mode (the baseline, no model) is the world controller's. When `propose` gives up on a trajectory (an endpoint
    error, a generation cut off), its record ends that trajectory: the loop rejects it (it is not a step) and
    the next call returns STOP."""

    def __init__(self, grid: int = 4, retries_per_step: int = 2, max_prompt_chars: int = 500):
        self.world = WorldController(grid, retries_per_step, max_prompt_chars)
        self._ended: dict[int, LoopState] = {}  # states given up on (held, so ids stay unique)

    def plan(self, prompt: str, mode: str = "loop", seed: int = 0) -> Plan:
        return self.world.plan(prompt, mode, seed)

    def next(self, state: LoopState) -> dict:
        if state.plan.mode == "single":
            return self.world.next(state)
        if self._ended.pop(id(state), None) is not None:
            return dict(STOP)
        step, gave_up = self.propose(state)
        if gave_up:
            self._ended[id(state)] = state
        return step

    def propose(self, state: LoopState) -> tuple[dict, bool]:
        """(the model's next step as an untrusted dict, whether it gave up on this trajectory)."""
        raise NotImplementedError


def check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ClvrError(f"unknown mode '{mode}' (known: {', '.join(MODES)})")


def rewrite_step(state: LoopState) -> dict:
    """The open-loop rewrite of the prompt (mode "rewrite"): every add of the plan, i.e. the whole target layout
    on the blank canvas, as one step (one multi-op edit; a bare add for one object), asked once; STOP after."""
    todo = corrections(Scene((), state.plan.target.grid), state.plan.target)
    if state.calls or not todo:
        return dict(STOP)
    return group(todo, len(todo), state.scene)


def group(ready: list[Step], k: int, scene: Scene) -> dict:
    """The first `k` of `ready` (in order) as one step: the bare step when k = 1, else a multi-op edit. A step
    whose cells another chosen one uses is skipped (it waits for a later call)."""
    from clvr.loop.run import transition_error

    chosen: list[Step] = []
    used: set = set()
    for s in ready:
        if len(chosen) == k:
            break
        if used.isdisjoint(s.regions()):
            chosen.append(s)
            used.update(s.regions())
    if len(chosen) == 1:
        return chosen[0].to_dict()
    step = Step("edit", ops=tuple(chosen))
    if transition_error(step, scene, 1) is not None:  # cannot happen for corrections(); stay safe
        return chosen[0].to_dict()
    return step.to_dict()


@register_controller("world")
def world_controller(grid: int = 4, retries_per_step: int = 2, max_prompt_chars: int = 500,
                     k_success: KSuccess | None = None, cfg=None) -> WorldController:
    """Registry factory; without `k_success`, the table `cfg.loop.k_success` names (none: one op per call)."""
    if k_success is None and cfg is not None:
        k_success = load_k_success(cfg.loop.k_success)
    return WorldController(grid, retries_per_step, max_prompt_chars, k_success)
