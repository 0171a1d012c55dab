"""Bad input never loses data, prints a traceback or passes as success (issue 10).

The hand-made catalogue and the hypothesis strategies live in benchmarks/hostile_inputs.py (the benchmark runs
more generated cases); each case drives the CLI in-process and checks the contract there: exit 0 or 2, no
traceback, nothing written outside the named output, the named output complete (exit 0) or as it was (exit 2).
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings

from benchmarks.hostile_inputs import CATALOGUE, run_case, strategies
from clvr.config import load_config
from clvr.errors import ClvrError, ConfigError
from clvr.io import MARKER, claim_dir, empty_own_dir, replace_own_dir

STRATEGIES = strategies()
EXAMPLES = 25  # per strategy: 7 x 25 cases, ~20 s on one core


@pytest.mark.parametrize("case", CATALOGUE, ids=[f"{c.family}:{c.name}" for c in CATALOGUE])
def test_catalogued_hostile_input(case):
    o = run_case(case)
    assert o.ok, (o.problems, o.rc, o.err)


def _property(name: str):
    @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    @given(STRATEGIES[name])
    def check(case):
        o = run_case(case)
        assert o.ok, (o.problems, o.rc, o.err, case.args)
    return check


test_generated_prompts = _property("prompt")
test_generated_override_strings = _property("override")
test_generated_generate_overrides = _property("generate_override")
test_generated_metadata_files = _property("metadata")
test_generated_judge_folders = _property("judge")
test_generated_seeds = _property("seed")
test_generated_output_paths = _property("path")


def test_claim_dir_accepts_new_empty_and_own_folders_only(tmp_path):
    assert claim_dir(tmp_path / "new", "x") is False
    (tmp_path / "empty").mkdir()
    assert claim_dir(tmp_path / "empty", "x") is False
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    with pytest.raises(ClvrError, match="no clvr marker"):
        claim_dir(tmp_path / "mine", "x")
    assert claim_dir(tmp_path / "mine", "x", legacy=lambda p: (p / "notes.txt").is_file()) is True
    empty_own_dir(tmp_path / "own", "x")
    (tmp_path / "own" / "data").write_text("old")
    assert claim_dir(tmp_path / "own", "x") is True
    with pytest.raises(ClvrError, match="clvr x"):  # another command's folder
        claim_dir(tmp_path / "own", "y")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep"


def test_replace_own_dir_is_all_or_nothing(tmp_path):
    out = tmp_path / "out"
    replace_own_dir(out, "x", lambda d: (d / "a").write_text("1"))
    assert sorted(p.name for p in out.iterdir()) == [MARKER, "a"]

    def fail(d):
        (d / "b").write_text("half")
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        replace_own_dir(out, "x", fail)
    assert sorted(p.name for p in out.iterdir()) == [MARKER, "a"]  # the old folder, whole
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temporary folder left
    replace_own_dir(out, "x", lambda d: (d / "c").write_text("2"))
    assert sorted(p.name for p in out.iterdir()) == [MARKER, "c"]  # replaced whole, never mixed


def test_overrides_of_sections_a_command_does_not_read_are_refused():
    with pytest.raises(ConfigError, match="does not read the 'sample' section"):
        load_config("ci", ["sample.steps=3"], uses=("world", "loop"), command="generate")
    load_config("ci", ["loop.max_iters=3"], uses=("world", "loop"), command="generate")


def test_the_harness_flags_accepted_garbage_and_stray_writes():
    from benchmarks.hostile_inputs import GOOD, Case, gen

    o = run_case(Case("number", "valid call expected to fail", ["world", "sample", "--tier", "1"], "error"))
    assert o.problems == ["garbage_accepted"]
    o = run_case(Case("path", "output not declared", gen(GOOD), "ok", out=None))
    assert o.problems == ["stray_writes"]
