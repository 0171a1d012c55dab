"""THE loop: plan -> generate -> verify -> correct -> stop, written out in one function (`loop`).

`loop` is a coroutine so that one body serves two drivers: `run_loop` (one prompt, one generator call at a
time) and `run_many` (many prompts in lockstep, their generator calls batched). It yields each
`GenRequest` and is sent back the `GenResult`; it returns the `Trace`.

Guards, in the loop itself (a controller cannot get past them):
* every controller output is validated by `Step.from_dict` (the schema) and `transition_error` (the state:
  remove/recolor/move need that object at that cell, add needs a free cell, generate only first, move to a
  free cell); anything else is rejected, counted and recorded, never executed;
* budgets: `max_iters` controller outputs (rejected ones count), `max_nfe` network evaluations (a call is
  not started when the largest call so far would overrun it) and `max_calls` generator calls (0 = none)
  always end the loop;
* a step that fails passive verification is undone (the canvas stays the previous one); the controller
  then decides to retry it (every call gets a new seed) or to correct.

Modes (clvr.loop.roles.MODES): "loop" as above; "single" (the single-step baseline: the controller's one
text-to-image step, kept whatever passive verification says); "rewrite" (the open-loop rewrite baseline: the
controller is asked once, on the blank canvas with `state.max_calls` = 1 whatever `budget.max_calls` is, and
rewrites the prompt into one grounded step; the generator runs once, its output is kept ungated, and the loop
ends; a rejected rewrite is not asked again, so the blank canvas is judged).

A multi-op step is one generator call (its joined instruction, all its cells as regions). When only some
of its ops pass, the step is *partly kept* (`keep_parts`): the new canvas is the previous one with the
cells of the ops that passed taken from the output, and every other pixel kept. Why not undo it all: a
call costs budget, and the ops that passed are exactly as good as the same ops done one per call (their
cells are verified again on the composed canvas, and no other cell changes, so nothing already right can
break); undoing them would spend calls redoing verified work, while the failed ops are simply still to
do. A failed op counts one failed try (the controller sets an op aside after `retries_per_step` + 1) only
when its call kept nothing: ops a call could not fit beside the ones it kept are no evidence against
themselves, and every such call is progress. (Measured with the shipped distilled generator, which mostly
draws one op of a multi-op instruction, and a table claiming every k works: the unbounded loop still passes
every probe prompt, in 4.5 calls instead of 5.9, and at <= 4 calls passes 0.57 instead of 0.37; counting
those tries made it give up on dense prompts.) Cells are disjoint (a sprite never leaves its cell), so
composing by cells is exact in the world.
"""

from __future__ import annotations

import time
from typing import Generator as Coroutine, Iterable

import numpy as np

from clvr.config import Config, LoopCfg
from clvr.errors import ClvrError
from clvr.generator import GenRequest, GenResult, Generator
from clvr.loop.controller import step_key
from clvr.loop.roles import (CONTROLLERS, VERIFIERS, Controller, LoopState, Perception, Verifier, make_controller,
                             make_verifier)
from clvr.loop.trace import StepRecord, Trace
from clvr.registry import ORACLES
from clvr.steps import SchemaError, Step
from clvr.world.render import blank
from clvr.world.scene import Scene


def transition_error(step: Step, scene: Scene, calls: int) -> str | None:
    """Why `step` may not run on a canvas holding `scene` after `calls` generator calls (None = allowed).
    A multi-op step is checked part by part against the scene (its parts never share a cell), after a count:
    its adds and move destinations need that many free cells."""
    if step.op == "edit":
        need, free = sum(p.op in ("add", "move") for p in step.ops), len(scene.free_cells())
        if need > free:
            return f"edit needs {need} free cells (adds and move destinations) but the scene has {free}"
        for i, part in enumerate(step.ops):
            err = transition_error(part, scene, calls)
            if err:
                return f"edit ops[{i}]: {err}"
        return None
    if step.op == "stop":
        return None
    if step.op == "generate":
        return None if calls == 0 else "generate is only allowed as the first step"
    here = scene.at(step.cell)
    if step.op == "add":
        return None if here is None else f"add needs a free cell; {step.cell} holds a {here.color} {here.shape}"
    if here is None or (here.shape, here.color) != (step.shape, step.color):
        what = "nothing" if here is None else f"a {here.color} {here.shape}"
        return f"{step.op} names a {step.color} {step.shape} at {step.cell}, but it holds {what}"
    if step.op == "recolor" and step.new_color == step.color:
        return f"recolor to the same colour {step.color}"
    if step.op == "move" and scene.at(step.to) is not None:
        return f"move needs a free destination; {step.to} is taken"
    return None


def loop(prompt: str, controller: Controller, verifier: Verifier, budget: LoopCfg, seed: int = 0,
         mode: str = "loop", grid: int = 4, cell: int = 16) -> Coroutine[GenRequest, GenResult, Trace]:
    t_own = time.perf_counter()
    plan = controller.plan(prompt, mode, seed)  # bad prompt -> ClvrError before any work
    trace = Trace(prompt=plan.prompt, mode=mode, seed=seed, metadata=plan.metadata,
                  target=plan.target.to_list(), plan=plan.steps)
    canvas = blank(grid, cell)
    seen = verifier.perceive(canvas)  # each canvas is detected once; both verifications reuse it
    rewrite = mode == "rewrite"  # open loop: one controller output, one call, no gate
    max_calls = 1 if rewrite else budget.max_calls
    state = LoopState(plan, seen.scene, canvas, active=verifier.active(seen, plan), max_calls=max_calls)
    accepted: list[str] = []  # instructions of the steps on the canvas: the reasoning trace
    max_call_nfe = 0
    trace.ended_by = "max_iters"
    while state.iteration < budget.max_iters:
        if state.nfe >= budget.max_nfe or state.nfe + max_call_nfe > budget.max_nfe:
            trace.ended_by = "max_nfe"
            break
        if max_calls and state.calls >= max_calls:  # the controller is not even asked
            trace.ended_by = "max_calls"
            break
        if rewrite and state.iteration:  # its one output was rejected: the rewrite is not asked again
            break
        state.iteration += 1
        index = len(trace.steps)

        # 1. the controller proposes; the schema and the state decide whether it may run
        raw = controller.next(state)
        try:
            step = Step.from_dict(raw, grid)
            err = transition_error(step, state.scene, state.calls)
            if err:
                raise SchemaError(err)
        except (SchemaError, TypeError, ValueError) as e:  # TypeError: e.g. an unhashable value in a field
            state.rejected += 1
            trace.steps.append(StepRecord(index, "rejected", None, note=str(e), raw=repr(raw)[:500]))
            continue
        if step.op == "stop":
            trace.steps.append(StepRecord(index, "stop", step.to_dict(), instruction="stop"))
            trace.ended_by = "stop"
            break
        parts = step.parts()
        kind = ("generate" if step.op == "generate" else "retry" if any(state.failures.get(step_key(p)) for p in parts)
                else "plan" if all(p.to_dict() in plan.steps for p in parts) else "correction")

        # 2. generate: one step (one call, all its ops), grounded at the cells it names, conditioned on the
        #    trace and the canvas
        req = GenRequest(step.instruction(), trace=list(accepted),
                         reference=None if step.op == "generate" else canvas,
                         regions=step.regions(), seed=seed * 100_003 + state.iteration, step=step)
        t_own = _add_time(trace, t_own)
        result = yield req
        t_own = time.perf_counter()

        # 3. verify: passive gates the step (undo on failure); active reads the whole canvas
        after = verifier.perceive(result.image)
        passive = verifier.passive(step, seen, after, plan)
        keep = passive["ok"] or mode in ("single", "rewrite")  # the baselines have no gate
        new_canvas, kept = result.image, parts if keep else ()
        if not keep and step.op == "edit":
            new_canvas, after, kept = keep_parts(step, passive, canvas, result.image, seen, verifier, plan, grid)
        if kept and len(kept) < len(parts):
            passive["kept"] = [i for i, p in enumerate(parts) if p in kept]
        state.calls += 1
        state.nfe += result.nfe
        max_call_nfe = max(max_call_nfe, result.nfe)
        record = StepRecord(index, kind, step.to_dict(), step.instruction(), ". ".join(accepted), req.seed,
                            canvas, result.image, passive, None, bool(kept), result.nfe, result.seconds)
        if kept:
            canvas, seen = new_canvas, after
            accepted.append(". ".join(p.instruction() for p in kept))
            state.scene, state.canvas = seen.scene, canvas
            state.active = verifier.active(seen, plan)
        for p in parts:  # a failed try each, except the ops a multi-op call could not fit beside the ones it kept
            if p not in kept and not (kept and step.op == "edit"):
                state.failures[step_key(p)] = state.failures.get(step_key(p), 0) + 1
        if "kept" in passive:
            record.note = f"partly kept: ops {passive['kept']} of {len(parts)} passed; the others undone"
        record.active = state.active
        state.last_step, state.last_passive = step.to_dict(), passive
        state.history.append({"step": step.to_dict(), "accepted": bool(kept), "passive": passive})
        trace.steps.append(record)
        record.seconds += time.perf_counter() - t_own
        trace.seconds += result.seconds

    trace.final = canvas
    trace.passed, trace.reason = bool(state.active["ok"]), state.active["reason"]
    trace.nfe, trace.calls, trace.rejected = state.nfe, state.calls, state.rejected
    _add_time(trace, t_own)
    return trace


def keep_parts(step: Step, passive: dict, canvas: np.ndarray, output: np.ndarray, seen: Perception,
               verifier: Verifier, plan, grid: int) -> tuple[np.ndarray, Perception, tuple[Step, ...]]:
    """A multi-op step that failed as a whole: the previous `canvas` with the cells of the ops that passed
    (`passive["parts"]`) taken from `output`, if those ops pass again on that composed canvas; else the
    previous canvas unchanged and no op kept. Returns (canvas, its perception, the ops kept). A cell is the
    image side / `grid` (a real-scale generator draws at its own resolution); a canvas of another size than the
    output (the blank one) cannot be composed with it, and nothing is kept."""
    ok = tuple(p for p, good in zip(step.parts(), passive.get("parts", ())) if good)
    if not ok or canvas.shape != output.shape:
        return canvas, seen, ()
    cell = output.shape[0] // grid
    composed = canvas.copy()
    for r, c in (cell_ for p in ok for cell_ in p.regions()):
        composed[r * cell:(r + 1) * cell, c * cell:(c + 1) * cell] = output[r * cell:(r + 1) * cell, c * cell:(c + 1) * cell]
    after = verifier.perceive(composed)
    sub = ok[0] if len(ok) == 1 else Step("edit", ops=ok)
    if not verifier.passive(sub, seen, after, plan)["ok"]:
        return canvas, seen, ()
    return composed, after, ok


def _add_time(trace: Trace, since: float) -> float:
    """Add the loop's own time (planning, verification) since `since` to the trace; return now."""
    now = time.perf_counter()
    trace.seconds += now - since
    return now


def timed_generate(generator: Generator, req: GenRequest) -> GenResult:
    t = time.perf_counter()
    res = generator.generate(req)
    res.seconds = time.perf_counter() - t
    return res


def run_loop(prompt: str, controller: Controller, generator: Generator, verifier: Verifier, budget: LoopCfg,
             seed: int = 0, mode: str = "loop", grid: int = 4, cell: int = 16) -> Trace:
    """Run the loop for one prompt, one generator call at a time."""
    co = loop(prompt, controller, verifier, budget, seed, mode, grid, cell)
    try:
        req = next(co)
        while True:
            req = co.send(timed_generate(generator, req))
    except StopIteration as done:
        trace = done.value
    trace.generator = getattr(generator, "name", type(generator).__name__)
    return trace


def run_many(jobs: Iterable[tuple[str, int]], controller: Controller, generator: Generator, verifier: Verifier,
             budget: LoopCfg, mode: str | list[str] = "loop", grid: int = 4, cell: int = 16,
             batch_size: int = 64) -> list[Trace]:
    """Run the loop for many (prompt, seed) jobs in lockstep, their generator calls batched (`generate_batch`
    when the backend has it). `mode` is one for all jobs or one per job (loops and single-step baselines can
    share batches). Continuous batching: every job starts at once and each round takes the next `batch_size`
    pending requests round-robin, so batches stay full until fewer than `batch_size` loops are left. Each
    trace's generator seconds are its share of the batch time, so seconds per prompt stay comparable."""
    jobs = list(jobs)
    modes = [mode] * len(jobs) if isinstance(mode, str) else list(mode)
    if len(modes) != len(jobs):
        raise ValueError(f"run_many: {len(modes)} modes for {len(jobs)} jobs")
    traces: list[Trace | None] = [None] * len(jobs)
    pending: dict[int, tuple[Coroutine, GenRequest]] = {}
    for i, ((prompt, seed), m) in enumerate(zip(jobs, modes)):
        co = loop(prompt, controller, verifier, budget, seed, m, grid, cell)
        _advance(i, co, None, pending, traces)
    batched = getattr(generator, "generate_batch", None)
    while pending:
        ids = list(pending)[:batch_size]
        reqs = [pending[i][1] for i in ids]
        t = time.perf_counter()
        results = batched(reqs) if batched else [generator.generate(r) for r in reqs]
        share = (time.perf_counter() - t) / len(reqs)
        for i, res in zip(ids, results):
            res.seconds = share
            co = pending.pop(i)[0]
            _advance(i, co, res, pending, traces)
    name = getattr(generator, "name", type(generator).__name__)
    for tr in traces:
        tr.generator = name
    return traces  # type: ignore[return-value]


def _advance(i: int, co: Coroutine, res: GenResult | None, pending: dict, traces: list) -> None:
    try:
        pending[i] = (co, next(co) if res is None else co.send(res))
    except StopIteration as done:
        traces[i] = done.value


def load_generator(cfg: Config, model: str, steps: int | None = None, guidance: float | None = None) -> Generator:
    """`model`: oracle | noisy-oracle, or what the `loop.generator` backend loads (the world's: base | distilled |
    a checkpoint folder), sampling at `steps` and `guidance` (None = the checkpoint's recorded default). Every
    backend factory gets the whole config as `cfg` and checks its own `model` before anything loads."""
    import clvr.models  # noqa: F401  (registers the world backend)
    from clvr.generator import make_generator

    if model in ORACLES:
        return make_generator(model, grid=cfg.world.grid, cell=cfg.world.cell, appearance=cfg.world.appearance)
    return make_generator(cfg.loop.generator, model=model, steps=steps, guidance=guidance, cfg=cfg)


def register_controllers() -> list[str]:
    """Import the modules that register controller backends beyond the world one ("openai", "learned"); returns
    the known keys, sorted."""
    import clvr.loop.vlm_controller  # noqa: F401  (registers "openai")

    import clvr.learned.controller  # noqa: F401  (registers "learned")

    return sorted(CONTROLLERS)


def check_role_key(role: str, key: str, known: list[str]) -> None:
    """An unknown `role` key ("controller", "verifier") -> ClvrError listing the known ones and where the key is
    set (config loop.<role>, --<role>); call it before any weights load."""
    if key not in known:
        raise ClvrError(f"unknown {role} '{key}' (known: {', '.join(known)}; config loop.{role}, --{role})")


def check_controller(key: str) -> None:
    check_role_key("controller", key, register_controllers())


def build_controller(cfg: Config) -> Controller:
    """The controller `loop.controller` names. Every controller factory gets the loop's settings and the whole
    config as `cfg`, from which it reads its own (the world one its per-k success table, the "openai" one the
    endpoint section, the learned one its checkpoint `loop.controller_model`)."""
    check_controller(cfg.loop.controller)
    return make_controller(cfg.loop.controller, grid=cfg.world.grid, retries_per_step=cfg.loop.retries_per_step,
                           max_prompt_chars=cfg.loop.max_prompt_chars, cfg=cfg)


def register_verifiers() -> list[str]:
    """Import the modules that register verifier backends beyond the world one ("openai", "openvocab"); returns
    the known keys, sorted."""
    import clvr.loop.vlm_verifier  # noqa: F401  (registers "openai")
    import clvr.openvocab  # noqa: F401  (registers "openvocab")

    return sorted(VERIFIERS)


def check_verifier(key: str) -> None:
    check_role_key("verifier", key, register_verifiers())


def build_verifier(cfg: Config) -> Verifier:
    """The verifier `loop.verifier` names; every verifier factory gets the grid and the whole config as `cfg`."""
    check_verifier(cfg.loop.verifier)
    return make_verifier(cfg.loop.verifier, grid=cfg.world.grid, cfg=cfg)


def build_roles(cfg: Config) -> tuple[Controller, Verifier]:
    """The controller and verifier the config names (`loop.controller`, `loop.verifier`)."""
    return build_controller(cfg), build_verifier(cfg)
