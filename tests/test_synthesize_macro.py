"""Macro-step examples of the data engine: merged from verified generator outputs (never rendered ground truth),
exact, counted per k in the card; `load_examples` reads schema versions 2 and 1 (v1: single-op examples only)."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from clvr import synthesize
from clvr.config import load_config
from clvr.errors import ClvrError
from clvr.io import load_png
from clvr.steps import Step
from clvr.synthesize.macro import macro_examples
from clvr.trajectories import FILE, TrajectoryStep, load_examples, load_trajectories
from clvr.world.detector import detect, to_scene
from clvr.world.render import blank, render
from clvr.world.scene import Obj, Scene


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("macro")
    cfg = load_config("ci", [f"synthesize.out={out}", "synthesize.generator=noisy-oracle", "synthesize.n_per_tier=2",
                             "synthesize.macro_max_k=4"])
    return out, synthesize.run(cfg, workers=1, log=lambda m: None)["metrics"]


def test_macro_examples_are_verified_generator_outputs_merged_exactly(data):
    out, metrics = data
    trajs = {t.id: t for t in load_trajectories(out)}
    n_macro = 0
    for t in trajs.values():
        outputs = {s.output for s in t.steps if s.output}
        assert t.macro == [] or t.accepted
        for m in t.macro:
            n_macro += 1
            step = Step.from_dict(m["step"], t.grid)
            assert 2 <= len(step.parts()) <= 4 and m["target"] in outputs  # the generator's own output
            before = to_scene(detect(load_png(out / m["reference"]), t.grid), t.grid)
            after = to_scene(detect(load_png(out / m["target"]), t.grid), t.grid)
            assert after == step.apply(before)
    examples = load_examples(out)
    per_k = Counter(e.k for e in examples)
    assert n_macro == sum(n for k, n in per_k.items() if k > 1) and max(per_k) == 4 and per_k[2] > 0
    assert {k: metrics[f"examples_k_{k}"] for k in range(1, 5)} == {k: per_k[k] for k in range(1, 5)}
    card = (out / "dataset_card.md").read_text()
    assert all(f"| {k} | {per_k[k]} |" in card for k in range(1, 5))


def test_an_example_carries_its_trace_reference_and_instruction(data):
    out, _ = data
    t = max((t for t in load_trajectories(out) if t.macro), key=lambda t: len(t.kept()))
    kept = t.kept()
    for e in load_examples(out / FILE):
        if e.target.parent.name != t.id:
            continue
        first = next(i for i, s in enumerate(kept) if out / s.input == e.reference)
        run = kept[first: first + e.k]
        assert e.target == out / run[-1].output
        assert e.trace == tuple(s.instruction for s in kept[:first])
        assert e.step.instruction() == ". ".join(s.instruction for s in run)
        assert e.step.regions() == tuple(c for s in run for c in Step.from_dict(s.step).regions())


def test_a_version_1_data_set_gives_its_single_op_examples(data, tmp_path):
    out, _ = data
    v1 = []
    for line in (out / FILE).read_text().splitlines():
        d = json.loads(line)
        for key in ("grid", "macro"):
            d.pop(key)
        for key in ("judge", "baseline"):
            d[key].pop("failures")
        v1.append(json.dumps({**d, "version": 1}, separators=(",", ":")) + "\n")
    (tmp_path / FILE).write_text("".join(v1))
    old = load_examples(tmp_path)
    new = [e for e in load_examples(out) if e.k == 1]
    assert len(old) == len(new) > 0
    assert [(e.reference.name, e.target.name, e.trace, e.step) for e in old] == \
        [(e.reference.name, e.target.name, e.trace, e.step) for e in new]
    assert [t.to_line() for t in load_trajectories(tmp_path)] == v1  # a v1 line round-trips as v1


def test_a_macro_entry_that_does_not_follow_from_its_steps_is_refused(data, tmp_path):
    out, _ = data
    d = next(json.loads(line) for line in (out / FILE).read_text().splitlines() if json.loads(line)["macro"])
    m = d["macro"][0]
    cases = {"target": {**m, "target": d["final"] if d["final"] != m["target"] else "images/blank.png"},
             "steps": {**m, "steps": m["steps"][::-1]},
             "step": {**m, "step": {"op": "edit", "ops": m["step"]["ops"][:1]}}}
    for name, bad in cases.items():
        (tmp_path / FILE).write_text(json.dumps({**d, "macro": [bad]}) + "\n")
        with pytest.raises(ClvrError, match="macro\\[0\\]"):
            load_examples(tmp_path)


def _step(index: int, step: dict, inp: str, outp: str) -> TrajectoryStep:
    return TrajectoryStep(index, "plan", step, "", "", 0, inp, outp, {"ok": True}, None, True, True, 1, "")


def test_runs_sharing_a_cell_or_not_exact_are_not_merged():
    """add A; recolour A (same cell: never in one edit with the add); add B but the canvas also gained debris
    (passive verification lets it pass; an example must not teach it); add C."""
    a, b, c = Obj("circle", "red", 0, 0), Obj("square", "blue", 1, 1), Obj("triangle", "green", 2, 2)
    s1 = Scene((a,))
    s2 = s1.recolor((0, 0), "blue")
    s3 = s2.add(b)
    s4 = s3.add(c)
    dirty = render(s3).copy()
    dirty[16:21, 16:21] = (255, 0, 0)  # a small red blob beside the square, in its cell (1, 1)
    canvases = {"b.png": blank(4), "1.png": render(s1), "2.png": render(s2), "3.png": dirty, "4.png": render(s4)}
    cell = lambda o: [o.row, o.col]  # noqa: E731
    steps = [_step(0, {"op": "add", "shape": "circle", "color": "red", "cell": cell(a)}, "b.png", "1.png"),
             _step(1, {"op": "recolor", "shape": "circle", "color": "red", "cell": cell(a), "new_color": "blue"},
                   "1.png", "2.png"),
             _step(2, {"op": "add", "shape": "square", "color": "blue", "cell": cell(b)}, "2.png", "3.png"),
             _step(3, {"op": "add", "shape": "triangle", "color": "green", "cell": cell(c)}, "3.png", "4.png")]
    assert len(detect(dirty)) == 3 and to_scene(detect(dirty)) == s3  # the debris is seen beside the scene
    # steps 0 + 1 share a cell; a run that ends at the dirty canvas (step 2) is not exact
    assert [m["steps"] for m in macro_examples(steps, canvases, 4, 8)] == [[1, 2, 3], [2, 3]]
    assert [m["steps"] for m in macro_examples(steps, canvases, 4, 2)] == [[2, 3]]
    assert macro_examples(steps, canvases, 4, 1) == []
