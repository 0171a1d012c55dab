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


# --- multi-op steps in the loop: call budget, grouping, one call per step, partly kept steps ---

GOOD = {1: 1.0, 2: 1.0, 3: 1.0, 4: 1.0, 6: 1.0, 8: 1.0}  # a generator that does k ops in one call


class DropParts(OracleGenerator):
    """The oracle, except that in a multi-op call it leaves out the ops whose index is in `drop` (first call
    only) and draws a stray object at `stray` (outside every op's cell). Records every request."""

    name = "drop-parts"

    def __init__(self, drop=(), stray: Obj | None = None):
        super().__init__()
        self.drop, self.stray, self.requests = set(drop), stray, []

    def generate(self, req: GenRequest) -> GenResult:
        self.requests.append(req)
        step = parse_instruction(req.instruction) if req.reference is not None else None
        if step is None or step.op != "edit" or len(self.requests) > 1:
            return super().generate(req)
        from clvr.world.detector import detect, to_scene

        scene = to_scene(detect(req.reference, self.grid), self.grid)
        for i, p in enumerate(step.ops):
            if i not in self.drop:
                scene = p.apply(scene)
        if self.stray is not None:
            scene = scene.add(self.stray)
        return GenResult(render(scene, self.cell), self.nfe, 0.0)


def test_max_calls_ends_the_loop_before_a_call_past_it(roles):
    controller, verifier = roles
    prompt = prompt_with(5)
    gen = Scripted()
    tr = run_loop(prompt, controller, gen, verifier, LoopCfg(max_iters=32, max_nfe=10_000, max_calls=3), seed=1)
    assert tr.calls == len(gen.requests) == 3 and tr.ended_by == "max_calls" and not tr.passed
    assert all(len(r.regions) == 1 for r in gen.requests)  # default table: one op per call
    tr = run_loop(prompt, controller, Scripted(), verifier, LoopCfg(max_iters=32, max_nfe=10_000, max_calls=5), seed=1)
    assert tr.passed and tr.calls == 5 and tr.ended_by == "max_calls"  # passed with the last call it had


@pytest.mark.parametrize("max_calls", [1, 2, 0])
def test_budget_aware_controller_groups_ops_into_one_call(max_calls):
    controller, verifier = make_controller("world", k_success=GOOD), make_verifier("world")
    prompt = prompt_with(7)
    gen = Scripted()
    tr = run_loop(prompt, controller, gen, verifier, LoopCfg(max_iters=32, max_nfe=10_000, max_calls=max_calls), seed=3)
    assert tr.passed and tr.calls == len(gen.requests) == 1  # 7 ops fit one call (k = 8 is known to work)
    (req,), (rec,) = gen.requests, [s for s in tr.steps if s.output is not None]
    step = Step.from_dict(rec.step)
    assert step.op == "edit" and len(step.parts()) == 7 and rec.kind == "plan"
    assert req.instruction == step.instruction() and req.regions == step.regions()  # one call: all ops, all cells
    assert req.instruction.count(". ") == 6


def test_shipped_success_table_keeps_one_op_per_call(roles, tmp_path):
    """bench-generator's table for today's generators (k >= 2 ~ 1 %) loaded from JSON: one op per call."""
    import json

    from clvr.loop.controller import load_k_success

    path = tmp_path / "bench.json"
    path.write_text(json.dumps({"multi_op_success": {"distilled_4": {"1": 1.0, "2": 0.01, "3": 0.0, "4": 0.0},
                                                     "base_28_cfg": {"1": 1.0, "2": 0.01}}}))
    table = load_k_success(f"{path}#distilled_4")
    assert table == {1: 1.0, 2: 0.01, 3: 0.0, 4: 0.0}
    controller, verifier = make_controller("world", k_success=table), make_verifier("world")
    gen = Scripted()
    tr = run_loop(prompt_with(5), controller, gen, verifier, LoopCfg(max_iters=32, max_nfe=10_000, max_calls=4), seed=1)
    # one op per call; only the last call, two ops left, takes both (its only chance to finish)
    assert tr.calls == 4 and [len(r.regions) for r in gen.requests] == [1, 1, 1, 2]
    tr = run_loop(prompt_with(5), controller, Scripted(), verifier, LoopCfg(max_iters=32, max_nfe=10_000), seed=1)
    assert tr.calls == 5 and tr.passed  # no call budget: one op per call


def test_partly_failed_multi_op_step_keeps_the_ops_that_passed():
    controller, verifier = make_controller("world", k_success=GOOD), make_verifier("world")
    prompt = prompt_with(3)
    target = controller.plan(prompt, "loop", 2).target
    free = [c for c in Scene((), 4).free_cells() if target.at(c) is None][0]
    stray = Obj("circle", "yellow", *free)
    gen = DropParts(drop={1}, stray=stray)
    tr = run_loop(prompt, controller, gen, verifier, LoopCfg(max_iters=32, max_nfe=10_000), seed=2)
    first, second = [s for s in tr.steps if s.output is not None][:2]
    parts = Step.from_dict(first.step).parts()
    assert len(parts) == 3 and first.passive["parts"] == [True, False, True] and not first.passive["ok"]
    assert first.accepted and first.passive["kept"] == [0, 2] and "kept 2/3" in first.caption()
    a = parts[0]
    assert first.caption().startswith(f"{first.index}. 3 ops [x, kept 2/3]: {a.op} {a.color} {a.shape} ({a.cell[0]},")
    from clvr.world.detector import detect, to_scene

    kept_scene = to_scene(detect(second.input, 4), 4)  # the composed canvas: ops 0 and 2, no stray, no op 1
    assert kept_scene == Scene((parts[0].apply(Scene(())).objects + parts[2].apply(Scene(())).objects))
    assert Step.from_dict(second.step) == parts[1]  # the failed op, alone, next
    assert second.kind == "plan"  # the call kept two ops: the third did not use up a try
    assert second.trace_text == f"{parts[0].instruction()}. {parts[2].instruction()}"
    assert tr.passed and tr.calls == 2


def test_multi_op_step_failing_every_op_is_undone():
    controller, verifier = make_controller("world", k_success=GOOD), make_verifier("world")
    gen = DropParts(drop={0, 1, 2})
    tr = run_loop(prompt_with(3), controller, gen, verifier, LoopCfg(max_iters=32, max_nfe=10_000), seed=2)
    first = tr.steps[0]
    assert not first.accepted and first.passive["parts"] == [False] * 3 and "kept" not in first.passive
    assert tr.steps[1].kind == "retry" and len(Step.from_dict(tr.steps[1].step).parts()) == 3
    assert tr.passed and tr.calls == 2


def test_multi_op_instruction_reads_back_into_its_step():
    step = Step.from_dict({"op": "edit", "ops": [{"op": "add", "shape": "circle", "color": "red", "cell": [0, 0]},
                                                 {"op": "move", "shape": "square", "color": "blue", "cell": [1, 1],
                                                  "to": [2, 3]}]})
    assert parse_instruction(step.instruction()) == step


def test_ops_per_call_from_calls_left_and_success_table():
    from clvr.loop.controller import ops_per_call

    shipped = {1: 1.0, 2: 0.01, 3: 0.0, 4: 0.0}
    sft = {1: 1.0, 2: 0.99, 4: 0.95, 8: 0.9}
    assert all(ops_per_call(n, c) == 1 for n in range(1, 12) for c in (None, 1, 2, 4))  # default: 1-op only
    assert all(ops_per_call(n, c, shipped) == 1 for n in range(3, 12) for c in (None, 1, 2, 3, 4))
    assert ops_per_call(2, 1, shipped) == 2  # the last call, two ops left: k = 2 is the only chance
    assert ops_per_call(3, 3, sft) == 1  # one op per call surely finishes; a failed k = 3 call might not
    assert ops_per_call(3, 4, sft) == 3  # a spare call: try all three, one op per call still fits after a failure
    assert ops_per_call(5, 2, sft) == 4 and ops_per_call(10, None, sft) == 8
    assert ops_per_call(8, 1, {1: 1.0, 8: 0.5}) == 8


def test_k_success_file_errors_are_one_line(tmp_path):
    import json

    from clvr.errors import ClvrError
    from clvr.loop.controller import load_k_success

    p = tmp_path / "t.json"
    p.write_text(json.dumps({"multi_op_success": {"a": {"1": 1.0}, "b": {"1": 1.0}}}))
    with pytest.raises(ClvrError, match="rows \\['a', 'b'\\]; pick one"):
        load_k_success(str(p))
    with pytest.raises(ClvrError, match="'c' is not one"):
        load_k_success(f"{p}#c")
    p.write_text(json.dumps({"1": 1.5}))
    with pytest.raises(ClvrError, match="no per-k success table"):
        load_k_success(str(p))
    with pytest.raises(ClvrError, match="cannot read"):
        load_k_success(str(tmp_path / "missing.json"))
    p.write_text(json.dumps({"1": 1.0, "2": 0.5}))
    assert load_k_success(str(p)) == {1: 1.0, 2: 0.5} and load_k_success("") == {1: 1.0}


def test_shipped_generator_runs_multi_op_steps_as_one_call_and_keeps_verified_ops():
    """The shipped distilled generator (real weights) asked for k ops per call: each step is one call with its
    joined instruction and all its cells; whatever it draws, only verified ops reach the canvas."""
    from clvr.config import load_config
    from clvr.loop.run import load_generator
    from clvr.world.detector import detect, to_scene

    cfg = load_config("ci")
    inner = load_generator(cfg, "distilled")
    requests = []

    class Recording:
        name = inner.name

        def generate(self, req):
            requests.append(req)
            return inner.generate(req)

    controller, verifier = make_controller("world", k_success=GOOD), make_verifier("world")
    prompt = "a red circle, a blue square and a green triangle"
    tr = run_loop(prompt, controller, Recording(), verifier, LoopCfg(max_iters=32, max_nfe=10_000, max_calls=4), seed=1)
    calls = [s for s in tr.steps if s.output is not None]
    assert tr.calls == len(calls) == len(requests) <= 4
    assert len(Step.from_dict(calls[0].step).parts()) == 3  # all three adds in the first call
    canvases = [s.input for s in calls[1:]] + [tr.final]
    for rec, req, after_img in zip(calls, requests, canvases):
        step = Step.from_dict(rec.step)
        assert req.instruction == step.instruction() and req.regions == step.regions()
        before, after = to_scene(detect(rec.input, 4), 4), to_scene(detect(after_img, 4), 4)
        flags = rec.passive.get("parts", [rec.passive["ok"]])
        kept = [p for p, ok in zip(step.parts(), flags) if ok] if rec.accepted else []
        want = before
        for p in kept:
            want = p.apply(want)
        if "kept" in rec.passive or not rec.accepted:  # partly kept or undone: exactly the verified ops changed
            assert after == want
        else:
            assert all(after.at(c) == want.at(c) for c in step.regions())


class LastOpOnly(OracleGenerator):
    """Like today's shipped generators asked for k ops: draws only the last op of a multi-op instruction."""

    name = "last-op-only"

    def generate(self, req: GenRequest) -> GenResult:
        if req.reference is not None and ". " in req.instruction:
            req = GenRequest(req.instruction.split(". ")[-1], req.trace, req.reference, req.regions[-1:], req.seed)
        return super().generate(req)


def test_a_table_that_overrates_the_generator_costs_calls_not_the_prompt():
    """k_success claims every k works, the generator does one op per call: each call keeps its one op and its
    other ops keep their tries, so the loop passes (counting their tries would set every op aside)."""
    controller, verifier = make_controller("world", k_success=GOOD), make_verifier("world")
    tr = run_loop(prompt_with(8), controller, LastOpOnly(), verifier, LoopCfg(max_iters=32, max_nfe=10_000), seed=4)
    calls = [s for s in tr.steps if s.output is not None]
    assert [len(Step.from_dict(s.step).parts()) for s in calls] == [8, 7, 6, 5, 4, 3, 2, 1]
    assert all(s.accepted for s in calls) and tr.passed and tr.calls == 8
    assert [s.kind for s in calls] == ["plan"] * 8  # no op ever counted a failed try
