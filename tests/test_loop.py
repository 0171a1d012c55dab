"""The closed loop with an exact oracle and a scripted generator that fails on chosen calls."""

from __future__ import annotations

import numpy as np
import pytest

from clvr.config import LoopCfg
from clvr.generator import GenRequest, GenResult
from clvr.loop import make_controller, make_verifier, run_loop, run_many
from clvr.loop.controller import corrections
from clvr.loop.oracle import OracleGenerator, parse_instruction
from clvr.loop.run import transition_error
from clvr.loop.trace import Trace, filmstrip
from clvr.steps import SchemaError, Step
from clvr.world.render import render
from clvr.world.scene import Obj, Scene
from clvr.world.vocab import COLORS, SHAPES

BUDGET = LoopCfg(max_iters=32, max_nfe=10_000, retries_per_step=2)


class Scripted(OracleGenerator):
    """The oracle, except on chosen calls (0-based): "noop" draws nothing new, "wrong" draws the intended
    object in another colour, "break" does the step but wipes the canvas's first object, and an `Obj`
    does the step and also draws that stray object. Records every request it gets."""

    name = "scripted"

    def __init__(self, script: dict | None = None, always: str | None = None, nfe: int = 4):
        super().__init__(nfe=nfe)
        self.script, self.always, self.requests = script or {}, always, []

    def generate(self, req: GenRequest) -> GenResult:
        k = len(self.requests)
        self.requests.append(req)
        good = super().generate(req)
        how = self.script.get(k, self.always)
        if how is None or req.reference is None:
            return good
        from clvr.world.detector import detect, to_scene

        before = to_scene(detect(req.reference, self.grid), self.grid)
        after = to_scene(detect(good.image, self.grid), self.grid)
        step = parse_instruction(req.instruction)
        if how == "noop":
            scene = before
        elif how == "wrong":
            cell = step.to or step.cell
            scene = after.recolor(cell, "yellow" if after.at(cell).color != "yellow" else "red")
        elif how == "break":
            scene = after.remove(before.objects[0].cell)
        else:
            scene = after.remove(how.cell).add(how) if after.at(how.cell) else after.add(how)
        return GenResult(render(scene, self.cell), self.nfe, 0.0)


@pytest.fixture()
def roles():
    return make_controller("world", retries_per_step=2), make_verifier("world")


def prompt_with(n_objects: int, seed: int = 0) -> str:
    """A grammar prompt whose target layout has `n_objects` objects (and no relations to make it fragile)."""
    from clvr.world.grammar import sample_prompt

    ctrl = make_controller("world")
    for tier in range(1, 11):
        rng = np.random.default_rng([seed, tier])
        for _ in range(200):
            md = sample_prompt(tier, rng, 4)
            if len(ctrl.plan(md["prompt"]).target.objects) == n_objects:
                return md["prompt"]
    raise AssertionError(f"no prompt with {n_objects} objects")


def test_oracle_loop_is_one_grounded_call_per_object(roles):
    controller, verifier = roles
    prompt = prompt_with(4)
    gen = Scripted()
    tr = run_loop(prompt, controller, gen, verifier, BUDGET, seed=1)
    target = controller.plan(prompt, seed=1).target
    assert tr.passed and tr.ended_by == "stop"
    assert tr.calls == len(target.objects) == 4 and tr.retries == tr.corrections == tr.rejected == 0
    assert tr.nfe == 4 * tr.calls
    assert all(r.reference is not None and len(r.regions) == 1 for r in gen.requests)
    assert {r.regions[0] for r in gen.requests} == {o.cell for o in target.objects}
    assert gen.requests[-1].trace == [r.instruction for r in gen.requests[:-1]]  # conditioned on the trace
    assert np.array_equal(tr.final, render(target))


def test_single_mode_is_one_ungrounded_text_to_image_call(roles):
    controller, verifier = roles
    gen = Scripted()
    tr = run_loop(prompt_with(3), controller, gen, verifier, BUDGET, seed=2, mode="single")
    assert tr.calls == 1 and len(gen.requests) == 1
    assert gen.requests[0].reference is None and gen.requests[0].regions == ()
    assert tr.passed  # the oracle is a ceiling for single-step too


def test_failed_step_is_undone_and_retried_with_a_new_seed(roles):
    controller, verifier = roles
    gen = Scripted({1: "noop", 2: "wrong"})
    tr = run_loop(prompt_with(3), controller, gen, verifier, BUDGET, seed=3)
    calls = [s for s in tr.steps if s.output is not None]
    assert [s.accepted for s in calls[:4]] == [True, False, False, True]
    assert calls[1].instruction == calls[2].instruction == calls[3].instruction
    assert [s.kind for s in calls[1:4]] == ["plan", "retry", "retry"]
    assert len({s.seed for s in calls[1:4]}) == 3
    assert np.array_equal(calls[2].input, calls[1].input) and np.array_equal(calls[3].input, calls[0].output)
    assert "wanted" in calls[2].passive["detail"]
    assert tr.passed and tr.calls == 5 and tr.retries == 2


def test_retries_are_bounded_then_the_loop_moves_on_and_comes_back(roles):
    controller, verifier = roles  # retries_per_step=2 -> 3 tries, then the next step, then one more round
    gen = Scripted({0: "noop", 1: "noop", 2: "noop"})
    tr = run_loop(prompt_with(2), controller, gen, verifier, BUDGET, seed=4)
    instr = [r.instruction for r in gen.requests]
    assert instr[0] == instr[1] == instr[2] != instr[3] and instr[4] == instr[0]
    assert tr.passed and tr.calls == 5


def test_step_that_breaks_a_right_object_is_reverted(roles):
    controller, verifier = roles
    gen = Scripted({1: "break"})
    tr = run_loop(prompt_with(3), controller, gen, verifier, BUDGET, seed=5)
    bad = [s for s in tr.steps if s.output is not None][1]
    assert not bad.accepted and bad.passive["intended"] and bad.passive["broken"]
    assert tr.passed


@pytest.mark.parametrize("case", ["remove", "recolor", "move"])
def test_stray_object_is_kept_then_corrected(roles, case):
    controller, verifier = roles
    prompt = prompt_with(3)
    target = controller.plan(prompt, seed=6).target
    first, last = target.objects[0], target.objects[-1]
    free = [c for c in target.free_cells() if c != first.cell]
    if case == "remove":  # a stray object the target wants nowhere
        kinds = {(o.shape, o.color) for o in target.objects}
        shape, color = next((s, c) for s in SHAPES for c in COLORS if (s, c) not in kinds)
        stray = Obj(shape, color, *free[0])
    elif case == "recolor":  # the right shape, wrong colour, at a cell the target fills later
        stray = Obj(last.shape, "red" if last.color != "red" else "blue", *last.cell)
    else:  # the object the target wants at `last.cell`, drawn at a free cell instead
        stray = Obj(last.shape, last.color, *free[0])
    gen = Scripted({0: stray})
    tr = run_loop(prompt, controller, gen, verifier, BUDGET, seed=6)
    fixes = [s for s in tr.steps if s.kind == "correction"]
    assert tr.steps[0].accepted and tr.steps[0].passive["new"] == [stray.to_dict()]
    assert [s.step["op"] for s in fixes] == [case]
    assert tr.passed and np.array_equal(tr.final, render(target))
    assert tr.calls == (3 if case in ("recolor", "move") else 4)  # a correction that places an object saves its add


def test_budgets_always_end_the_loop(roles):
    controller, verifier = roles
    prompt = prompt_with(3)
    tr = run_loop(prompt, controller, Scripted(always="noop"), verifier, LoopCfg(max_iters=5, max_nfe=10_000), seed=7)
    assert tr.ended_by == "max_iters" and tr.calls == 5 and not tr.passed
    tr = run_loop(prompt, controller, Scripted(always="noop", nfe=4), verifier, LoopCfg(max_iters=99, max_nfe=10), seed=7)
    assert tr.ended_by == "max_nfe" and tr.nfe == 8 and tr.calls == 2
    # a generator that never succeeds: the controller gives up after two rounds of tries per step (stop)
    tr = run_loop(prompt, controller, Scripted(always="noop"), verifier, LoopCfg(max_iters=99, max_nfe=10_000), seed=7)
    assert tr.ended_by == "stop" and tr.calls == 3 * 2 * 3 and not tr.passed


class Hostile:
    """Emits schema-breaking and state-breaking outputs first, then defers to the world controller."""

    name = "hostile"

    def __init__(self, inner, bad):
        self.inner, self.bad = inner, list(bad)

    def plan(self, prompt, mode="loop", seed=0):
        return self.inner.plan(prompt, mode, seed)

    def next(self, state):
        return self.bad.pop(0) if self.bad else self.inner.next(state)


def test_schema_and_state_breaking_outputs_are_rejected_and_never_executed(roles):
    controller, verifier = roles
    prompt = prompt_with(2)
    target = controller.plan(prompt, seed=8).target
    o = target.objects[0]
    free = target.free_cells()[0]
    bad = [
        {"op": "paint", "cell": [0, 0]},  # not an op
        "rm -rf /",  # not an object
        {"op": "add", "shape": "circle", "color": ["red"], "cell": [0, 0]},  # unhashable colour
        {"op": "add", "shape": "hexagon", "color": "red", "cell": [0, 0]},  # unknown shape
        {"op": "add", "shape": "circle", "color": "red", "cell": [4, 0]},  # off the grid
        {"op": "add", "shape": "circle", "color": "red", "cell": [0, 0], "seed": 3},  # extra field
        {"op": "remove", "shape": o.shape, "color": o.color, "cell": list(o.cell)},  # nothing there yet
        {"op": "move", "shape": o.shape, "color": o.color, "cell": list(o.cell), "to": list(free)},  # nothing to move
    ]
    gen = Scripted()
    tr = run_loop(prompt, Hostile(controller, bad), gen, verifier, BUDGET, seed=8)
    assert tr.rejected == len(bad) and [s.kind for s in tr.steps[:len(bad)]] == ["rejected"] * len(bad)
    assert all(s.output is None and s.note for s in tr.steps[:len(bad)])
    assert len(gen.requests) == tr.calls == 2 and tr.passed  # only the real plan ran
    # after a first call, a generate (replace the canvas) or an add on a taken cell is refused too
    late = [{"op": "generate", "prompt": prompt}, {"op": "add", "shape": o.shape, "color": o.color, "cell": list(o.cell)}]
    tr = run_loop(prompt, Hostile(controller, []), Scripted(), verifier, BUDGET, seed=8)
    first = Step.from_dict(tr.steps[0].step)
    scene = Scene((), 4).add(Obj(first.shape, first.color, *first.cell))
    assert transition_error(Step.from_dict(late[0]), scene, calls=1)
    assert transition_error(Step.from_dict({**late[1], "cell": list(first.cell)}), scene, calls=1)


def test_rejections_count_toward_the_iteration_budget(roles):
    controller, verifier = roles
    tr = run_loop(prompt_with(2), Hostile(controller, [{"op": "fly"}] * 50), Scripted(), verifier,
                  LoopCfg(max_iters=6, max_nfe=10_000), seed=9)
    assert tr.ended_by == "max_iters" and tr.rejected == 6 and tr.calls == 0 and not tr.passed


def test_trace_round_trips_through_json_and_pngs(roles, tmp_path):
    controller, verifier = roles
    tr = run_loop(prompt_with(3), Hostile(controller, [{"op": "zap"}]), Scripted({1: "wrong"}), verifier, BUDGET, seed=10)
    tr.save(tmp_path / "t")
    back = Trace.load(tmp_path / "t")
    assert back.to_json() == tr.to_json()
    assert np.array_equal(back.final, tr.final)
    for a, b in zip(back.steps, tr.steps):
        for k in ("input", "output"):
            assert (getattr(a, k) is None and getattr(b, k) is None) or np.array_equal(getattr(a, k), getattr(b, k))
    assert back.summary() == tr.summary() and back.retries == 1 and back.rejected == 1
    sheet = filmstrip(back)
    assert sheet.width >= 4 * 64 * 3 and sheet.height > 64 * 3


def test_run_many_batches_loops_and_matches_run_loop(roles):
    controller, verifier = roles
    jobs = [(prompt_with(n, seed=n), 20 + n) for n in (1, 3, 5)]
    gen = Scripted()
    many = run_many(jobs, controller, gen, verifier, BUDGET, batch_size=2)
    for (prompt, seed), tr in zip(jobs, many):
        one = run_loop(prompt, controller, Scripted(), verifier, BUDGET, seed=seed)
        assert tr.passed and tr.calls == one.calls and np.array_equal(tr.final, one.final)


class Batching(Scripted):
    """Records the size of every batch it is given."""

    def __init__(self):
        super().__init__()
        self.batches = []

    def generate_batch(self, reqs):
        self.batches.append(len(reqs))
        return [self.generate(r) for r in reqs]


def test_run_many_mixes_modes_and_keeps_batches_full(roles):
    """Loops and single-step baselines in one run: each trace is what its own mode gives alone, and a batch is
    short only once fewer loops than `batch_size` are left (continuous batching)."""
    controller, verifier = roles
    jobs = [(prompt_with(n, seed=n), 40 + n) for n in (1, 4, 2, 5, 3)]
    modes = ["loop"] * len(jobs) + ["single"] * len(jobs)
    gen = Batching()
    many = run_many(jobs + jobs, controller, gen, verifier, BUDGET, mode=modes, batch_size=4)
    for (prompt, seed), mode, tr in zip(jobs + jobs, modes, many):
        one = run_loop(prompt, controller, Scripted(), verifier, BUDGET, seed=seed, mode=mode)
        assert tr.mode == mode and tr.calls == one.calls and np.array_equal(tr.final, one.final)
    total = sum(tr.calls for tr in many)
    assert sum(gen.batches) == total and max(gen.batches) == 4
    longest = max(tr.calls for tr in many)
    assert len(gen.batches) <= -(-total // 4) + longest  # full batches but for the longest loop's tail
    with pytest.raises(ValueError, match="2 modes for 10 jobs"):
        run_many(jobs + jobs, controller, gen, verifier, BUDGET, mode=["loop", "single"])


def test_corrections_order_and_legality():
    target = Scene((Obj("circle", "red", 0, 0), Obj("square", "blue", 1, 1), Obj("triangle", "green", 2, 2)))
    scene = Scene((Obj("circle", "blue", 0, 0), Obj("square", "blue", 3, 3), Obj("triangle", "red", 2, 1)))
    steps = corrections(scene, target)
    assert [s.op for s in steps] == ["recolor", "move", "remove", "add"]
    for s in steps:
        assert transition_error(s, scene, calls=1) is None
        scene = s.apply(scene)
    assert scene == target and corrections(scene, target) == []


@pytest.mark.parametrize("d", [
    {"op": "add", "shape": "circle", "color": "red", "cell": [1, 2]},
    {"op": "remove", "shape": "square", "color": "blue", "cell": [0, 3]},
    {"op": "recolor", "shape": "triangle", "color": "green", "cell": [3, 3], "new_color": "yellow"},
    {"op": "move", "shape": "circle", "color": "yellow", "cell": [2, 0], "to": [0, 1]},
])
def test_instruction_text_reads_back_into_its_step(d):
    step = Step.from_dict(d)
    assert parse_instruction(step.instruction()) == step
    with pytest.raises(SchemaError):
        parse_instruction(step.instruction() + " please")


def test_debris_beside_a_right_object_is_cleared_by_remove_then_add(roles):
    """Two detections in one cell (an object plus a stray fragment): the scene shows only the larger one, so
    the judge fails while scene == target; the controller removes the object and adds it again."""
    controller, verifier = roles
    prompt = "a red square"  # the fragment is a small blue square: one square too many for the judge
    target = controller.plan(prompt, seed=11).target
    o = target.objects[0]

    class Debris(Scripted):
        def generate(self, req):
            res = super().generate(req)
            if len(self.requests) == 1:  # the first add also leaves a 3x8 strip in the cell's top margin
                img = res.image.copy()
                y, x = o.row * 16, o.col * 16
                img[y:y + 3, x:x + 8] = (40, 80, 220)
                res = GenResult(img, res.nfe, res.seconds)
            return res

    tr = run_loop(prompt, controller, Debris(), verifier, BUDGET, seed=11)
    ops = [s.step["op"] for s in tr.steps if s.output is not None]
    assert tr.steps[0].active["crowded"] == [list(o.cell)] and not tr.steps[0].active["ok"]
    assert ops == ["add", "remove", "add"] and tr.passed


def test_transition_error_checks_multi_op_steps_part_by_part():
    """A multi-op step runs only if every part fits the scene, and its adds fit the free cells."""
    scene = Scene(tuple(Obj("circle", "red", r, c) for r in range(4) for c in range(4) if (r, c) not in ((0, 0), (0, 1))))
    add = lambda r, c: {"op": "add", "shape": "square", "color": "blue", "cell": [r, c]}  # noqa: E731
    ok = Step.from_dict({"op": "edit", "ops": [add(0, 0), add(0, 1)]})
    assert transition_error(ok, scene, calls=1) is None
    three = Step.from_dict({"op": "edit", "ops": [add(0, 0), add(0, 1), add(1, 1)]})
    assert "needs 3 free cells" in transition_error(three, scene, calls=1)
    moved = Step.from_dict({"op": "edit", "ops": [add(0, 0), {"op": "move", "shape": "circle", "color": "red",
                                                               "cell": [2, 2], "to": [0, 1]}]})
    assert transition_error(moved, scene, calls=1) is None
    wrong = Step.from_dict({"op": "edit", "ops": [add(0, 0), {"op": "remove", "shape": "square", "color": "red",
                                                               "cell": [3, 3]}]})
    assert transition_error(wrong, scene, calls=1).startswith("edit ops[1]: remove names a red square")
    taken = Step.from_dict({"op": "edit", "ops": [add(0, 0), add(2, 2)]})
    assert transition_error(taken, scene, calls=1).startswith("edit ops[1]: add needs a free cell")
