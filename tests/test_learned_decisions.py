"""The learned controller's training states: rebuilt from data-engine trajectories, they equal the states the real
loop handed its controller, field by field; the teacher's labels follow the calls left."""

from __future__ import annotations

import json
from dataclasses import fields, replace

import numpy as np
import pytest

from clvr import synthesize
from clvr.config import load_config
from clvr.learned.decisions import RecordingController, collect_states, decision_states, teacher_labels
from clvr.loop.controller import WorldController
from clvr.loop.run import run_loop
from clvr.synthesize.jobs import job_prompt, job_seed
from clvr.trajectories import load_trajectories

TABLE = {"1": 1.0, "2": 0.9, "3": 0.8, "4": 0.6}  # claims multi-op steps work: the teacher groups, calls partly keep


def engine_for(tmp_path, *overrides: str) -> synthesize.Engine:
    (tmp_path / "k.json").write_text(json.dumps(TABLE))
    cfg = load_config("ci", [f"synthesize.out={tmp_path / 'data'}", "synthesize.generator=noisy-oracle",
                             "synthesize.n_per_tier=4", *overrides])
    cfg = replace(cfg, loop=replace(cfg.loop, k_success=cfg.loop.k_success.replace("TABLE", str(tmp_path / "k.json"))))
    return synthesize.Engine(cfg, "noisy-oracle")


def assert_same_state(got, want, where: str) -> None:
    for f in fields(want):
        if f.name == "canvas":
            assert got.canvas is None, where
            continue
        assert getattr(got, f.name) == getattr(want, f.name), f"{where}: {f.name}"


@pytest.mark.parametrize("overrides", [(), ("loop.k_success=TABLE",), ("loop.k_success=TABLE", "loop.max_calls=5")],
                         ids=["one-op", "multi-op", "multi-op-5-calls"])
def test_rebuilt_states_equal_the_states_the_loop_handed_its_controller(tmp_path, overrides):
    eng = engine_for(tmp_path, *overrides)
    cfg, s = eng.cfg, eng.cfg.synthesize
    grid, cell = cfg.world.grid, cfg.world.cell
    counts = {"states": 0, "failures": 0, "partly": 0, "stop": 0, "max_calls": 0}
    for j in range(len(s.tiers) * s.n_per_tier):
        md, seed = job_prompt(s, grid, j), job_seed(s, j)
        rec = RecordingController(eng.controller)
        trace = run_loop(md["prompt"], rec, eng.generator, eng.verifier, cfg.loop, seed, "loop", grid, cell)
        base = run_loop(md["prompt"], eng.controller, eng.generator, eng.verifier, cfg.loop, seed, "single", grid, cell)
        traj = eng.record(0, j, md, trace, base)  # the data engine's own conversion (images written, judged)
        traj = type(traj).from_dict(json.loads(traj.to_line()))  # as training reads it: a JSON line
        states = decision_states(traj, max_calls=cfg.loop.max_calls)
        assert len(states) == len(rec.states) == len(traj.steps)
        for i, (got, want) in enumerate(zip(states, rec.states)):
            assert_same_state(got, want, f"job {j} decision {i}")
            assert eng.controller.next(got) == traj.steps[i].step or traj.steps[i].kind == "rejected"
        counts["states"] += len(states)
        counts["failures"] += any(st.failures for st in states)
        counts["partly"] += any("kept" in (st.passive or {}) for st in traj.steps)
        counts["stop"] += traj.ended_by == "stop"
        counts["max_calls"] += traj.ended_by == "max_calls"
    # the runs exercised what the rebuild must get right: failed tries, and (multi-op) partly kept calls
    assert counts["failures"] > 0 and counts["stop"] > 0
    if overrides:
        assert counts["partly"] > 0


def test_states_of_a_data_set_made_by_the_stage_replay_its_steps(tmp_path):
    """On a data set written by `synthesize.run` (shards, merge, JSONL): the teacher, asked in each rebuilt
    state, gives back the step the trajectory recorded there."""
    eng = engine_for(tmp_path, "loop.k_success=TABLE", "synthesize.shard_size=8")
    synthesize.run(eng.cfg, workers=1, log=lambda m: None)
    trajs = list(load_trajectories(eng.cfg.synthesize.out))
    assert len(trajs) == 40
    for t in trajs:
        for st, rec in zip(decision_states(t), t.steps):
            assert eng.controller.next(st) == rec.step


def test_teacher_labels_follow_the_calls_left(tmp_path):
    (tmp_path / "k3.json").write_text(json.dumps({"1": 1.0, "2": 0.9, "3": 0.5}))
    eng = engine_for(tmp_path, f"loop.k_success={tmp_path / 'k3.json'}")
    teacher, s = eng.controller, eng.cfg.synthesize
    prompt = next(p for p in (job_prompt(s, 4, j)["prompt"] for j in range(40))
                  if len(teacher.plan(p).steps) == 3)
    rec = RecordingController(teacher)
    run_loop(prompt, rec, eng.generator, eng.verifier, eng.cfg.loop, 0, "loop", 4, 16)
    first = rec.states[0]
    labels = teacher_labels([first], teacher, (1, 2, 0))
    assert [q.max_calls for q, _ in labels] == [1, 2, 0]
    assert first.max_calls == 0  # the input state is not changed
    one, two, unbounded = (step for _, step in labels)
    assert len(one["ops"]) == 3  # one call left: all three in it, the only chance to finish
    assert len(two["ops"]) == len(unbounded["ops"]) == 2  # else: most ops per call on average (2 * 0.9)
    assert teacher_labels(rec.states[-1:], teacher, (1, 0))[0][1] == {"op": "stop"} or not rec.states[-1].active["ok"]


def test_collect_states_records_every_decision_of_every_job(tmp_path):
    eng = engine_for(tmp_path)
    s = eng.cfg.synthesize
    jobs = [(job_prompt(s, 4, j)["prompt"], job_seed(s, j)) for j in range(6)]
    states = collect_states(eng.controller, jobs, eng.generator, eng.verifier, eng.cfg.loop, 4, 16)
    from clvr.loop.run import run_many

    traces = run_many(jobs, eng.controller, eng.generator, eng.verifier, eng.cfg.loop, "loop", 4, 16)
    assert len(states) == sum(len(t.steps) for t in traces)
    assert all(st.canvas is None for st in states)
    assert sorted({st.plan.prompt for st in states}) == sorted({p for p, _ in jobs})
    assert np.mean([st.iteration for st in states]) >= 1
