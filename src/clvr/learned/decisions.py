"""The learned controller's training questions: the states a controller was in, and the teacher's answers.

* `decision_states` rebuilds, from a data-engine trajectory alone, the exact `LoopState` the controller was
  handed before each of its outputs (`traj.steps`, the final stop included). Nothing else is stored, and
  nothing else is needed: the detected scene of a canvas follows from its active report (the target objects
  not `missing` plus the `wrong` ones, which is what `scene_diff` split it into), the failure counts follow
  the loop's rule (clvr.loop.run: a call that kept nothing counts a failed try for each of its ops; a call
  that kept something, partly kept multi-op edits included, counts none), and the rest is counting.
* `teacher_labels` asks the teacher (the budget-aware `WorldController`) for its step in each state at
  several call budgets: the same canvas is a different question with 1 call left than with 4 or unbounded.
* `RecordingController` / `collect_states`: the states a controller reaches itself in the real loop (DAgger:
  the student's own states, labelled by the teacher).
"""

from __future__ import annotations

import copy
from dataclasses import replace
from typing import Any, Iterable

from clvr.loop.controller import WorldController, corrections, step_key
from clvr.loop.roles import Controller, LoopState, Plan, Verifier
from clvr.steps import Step
from clvr.trajectories import Trajectory
from clvr.world.scene import Obj, Scene


def trajectory_plan(traj: Trajectory, grid: int | None = None) -> Plan:
    """The plan the (symbolic-planning) controller made for the trajectory's prompt: the parser's metadata,
    the target layout the trajectory records, one add per object in reading order."""
    from clvr.world.parser import parse

    grid = grid or traj.grid
    prompt = " ".join(traj.prompt.split())  # as clvr.loop.controller.check_prompt normalises it
    target = Scene.from_list(traj.target, grid)
    steps = [s.to_dict() for s in corrections(Scene((), grid), target)]
    return Plan(prompt, parse(prompt), target, steps, "loop")


def blank_active(plan: Plan) -> dict:
    """The active report of the blank canvas (no detections): every target object missing."""
    from clvr.judge import judge

    ok, reason = judge(plan.metadata, [])
    return {"ok": bool(ok), "reason": str(reason), "missing": plan.target.to_list(), "wrong": [], "crowded": []}


def scene_of(active: dict, target: Scene) -> Scene:
    """The detected scene an active report was made from: the target objects not missing, plus the wrong ones
    (`scene_diff` splits a scene into exactly these)."""
    missing = {Obj.from_dict(o) for o in active["missing"]}
    objs = [Obj(o.shape, o.color, o.row, o.col) for o in target.objects if o not in missing]
    objs += [Obj(o["shape"], o["color"], int(o["row"]), int(o["col"])) for o in active["wrong"]]
    return Scene(tuple(sorted(objs)), target.grid)


def decision_states(traj: Trajectory, grid: int | None = None, max_calls: int = 0) -> list[LoopState]:
    """The state the controller saw before each entry of `traj.steps` (in order; rejected outputs and the
    final stop included), exactly as clvr.loop.run.loop built it, less the canvas (None). `max_calls`: the
    loop's call budget of the run (the trajectory does not record it; 0 = none)."""
    grid = grid or traj.grid
    plan = trajectory_plan(traj, grid)
    active = blank_active(plan)
    history: list[dict] = []
    failures: dict[str, int] = {}
    last_step = last_passive = None
    calls = nfe = rejected = 0
    states = []
    for i, s in enumerate(traj.steps):
        states.append(LoopState(plan, scene_of(active, plan.target), None, list(history), last_step, last_passive,
                                active, dict(failures), calls, max_calls, i + 1, nfe, rejected))
        if s.kind == "rejected":
            rejected += 1
            continue
        if s.kind == "stop":
            continue
        step = Step.from_dict(s.step, grid)
        calls, nfe = calls + 1, nfe + s.nfe
        if s.kept:
            active = s.active
        else:  # a call that kept nothing: a failed try for each of its ops (clvr.loop.run)
            for p in step.parts():
                failures[step_key(p)] = failures.get(step_key(p), 0) + 1
        last_step, last_passive = step.to_dict(), s.passive
        history.append({"step": last_step, "accepted": bool(s.kept), "passive": s.passive})
    return states


def teacher_labels(states: Iterable[LoopState], teacher: WorldController,
                   budgets: tuple[int, ...]) -> list[tuple[LoopState, dict]]:
    """(state at budget b, the teacher's step there) for every state and every calls-left budget b in `budgets`
    (0 = unbounded): the state's `max_calls` becomes `calls + b` (0 when b = 0)."""
    out = []
    for st in states:
        for b in budgets:
            q = replace(st, max_calls=st.calls + b if b else 0)
            out.append((q, teacher.next(q)))
    return out


class RecordingController:
    """Any controller, plus a record of every state it was asked in (`states`: deep copies, canvas dropped)."""

    def __init__(self, inner: Controller):
        self.inner = inner
        self.name = getattr(inner, "name", type(inner).__name__)
        self.states: list[LoopState] = []

    def plan(self, prompt: str, mode: str = "loop", seed: int = 0) -> Plan:
        return self.inner.plan(prompt, mode, seed)

    def next(self, state: LoopState) -> Any:
        self.states.append(copy.deepcopy(replace(state, canvas=None)))
        return self.inner.next(state)

    def __getattr__(self, name: str) -> Any:  # e.g. close()
        return getattr(self.inner, name)


def collect_states(controller: Controller, prompts_with_seeds: Iterable[tuple[str, int]], generator, verifier: Verifier,
                   loop_cfg, grid: int = 4, cell: int = 16) -> list[LoopState]:
    """Every state `controller` is asked in when it runs the loop on these (prompt, seed) jobs (DAgger)."""
    from clvr.loop.run import run_many

    rec = RecordingController(controller)
    run_many(list(prompts_with_seeds), rec, generator, verifier, loop_cfg, "loop", grid, cell)
    return rec.states
