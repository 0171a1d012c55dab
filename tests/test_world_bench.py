import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from clvr.world.bench import cell_relation, corrupt, expected_verdict, run_bench
from clvr.world.parser import parse
from clvr.world.scene import Obj, Scene

CLVR = [sys.executable, "-m", "clvr"]


def test_bench_is_exact_on_every_tier():
    r = run_bench(n=40, seed=1)
    assert r["scenes"] == 40 and r["images"] == 160 and r["judge_checks"] == 160
    assert r["detector_accuracy"] == 1.0 and r["judge_agreement"] == 1.0, r["disagreements"]
    assert 0.3 < r["corrupted_failing"] < 1.0  # corruptions both break and (sometimes) keep the prompt
    assert r["ms_per_image"] > 0


def test_known_answers_are_symbolic():
    md = parse("a blue square above a red circle")
    square, circle = Obj("square", "blue", 0, 1), Obj("circle", "red", 2, 1)
    assert expected_verdict(md, Scene(tuple(sorted([square, circle])))) is True
    assert expected_verdict(md, Scene(tuple(sorted([Obj("square", "blue", 2, 0), circle])))) is False
    assert expected_verdict(md, Scene(tuple(sorted([Obj("square", "blue", 1, 3), circle])))) is None  # off the cone
    assert expected_verdict(md, Scene((circle,))) is False
    assert cell_relation(Obj("circle", "red", 0, 0), Obj("circle", "red", 3, 3), "above") is True


def test_corruptions_change_exactly_one_object():
    scene = Scene(tuple(sorted([Obj("square", "blue", 0, 1), Obj("circle", "red", 2, 1)])))
    rng = np.random.default_rng(0)
    assert len(corrupt(scene, "remove", rng).objects) == 1
    moved = corrupt(scene, "move", rng)
    assert len(moved.objects) == 2 and len(set(moved.objects) & set(scene.objects)) == 1
    recoloured = corrupt(scene, "recolor", rng)
    assert [o.cell for o in recoloured.objects] == [o.cell for o in scene.objects] and recoloured != scene


def run(args, cwd=None):
    env = dict(os.environ, CLVR_CONF_DIR=str(Path(__file__).resolve().parents[1] / "conf"))
    return subprocess.run(CLVR + args, capture_output=True, text=True, cwd=cwd, env=env, timeout=120)


def test_cli_bench_prints_json_last():
    p = run(["world", "bench", "--n", "20", "--profile", "ci"])
    assert p.returncode == 0, p.stderr
    last = json.loads(p.stdout.strip().splitlines()[-1])
    assert last["scenes"] == 20 and last["detector_accuracy"] == 1.0 and last["judge_agreement"] == 1.0


def test_cli_render_suite_then_judge(tmp_path):
    meta = tmp_path / "m.jsonl"
    meta.write_text("".join(json.dumps(parse(p)) + "\n" for p in
                            ["a red circle", "three triangles and a blue square below the triangles"]))
    p = run(["world", "render-suite", "--metadata", str(meta), "--out", str(tmp_path / "gt"), "--samples", "2",
             "--profile", "ci"])
    assert p.returncode == 0, p.stderr
    p = run(["eval", "geneval", str(tmp_path / "gt")])
    assert p.returncode == 0, p.stderr
    last = json.loads(p.stdout.strip().splitlines()[-1])
    assert last["overall"] == 1.0 and last["images"] == 4
    assert (tmp_path / "gt" / "results.jsonl").is_file()


def test_cli_bad_input_is_one_line_exit_2(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(parse("a red circle")) + "\n{oops\n")
    (tmp_path / "d").mkdir()
    cases = [(["eval", "geneval", str(tmp_path / "d"), "--metadata", str(bad)], "bad.jsonl:2: malformed JSON"),
             (["world", "render-suite", "--metadata", str(bad), "--out", str(tmp_path / "o")], "bad.jsonl:2"),
             (["world", "parse", "a red circle above"], "ends after 'above'"),
             (["eval", "geneval", str(tmp_path / "nowhere")], "not a folder")]
    for args, needle in cases:
        p = run(args)
        assert p.returncode == 2 and needle in p.stderr and len(p.stderr.strip().splitlines()) == 1, p.stderr


def test_main_job_scores_ground_truth(tmp_path):
    p = run(["run", "--profile", "ci"], cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    last = json.loads(p.stdout.strip().splitlines()[-1])
    assert last["overall"] == 1.0 and set(last["per_tier"]) == {str(t) for t in range(1, 11)}
    assert len(last["per_tag"]) == 7 and (tmp_path / "runs" / "ci" / "main" / "suite" / "00000" / "samples").is_dir()
