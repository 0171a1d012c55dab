import json
from pathlib import Path

import numpy as np
import pytest

from clvr.errors import ClvrError
from clvr.judge import (GENEVAL_METADATA, Failure, describe, failures, judge, judge_image, read_jsonl,
                        relative_position, score_folder, unsupported, validate_metadata)
from clvr.world.bench import render_suite
from clvr.world.detector import Detection, WorldDetector, detect, scene_detections
from clvr.world.grammar import TIERS, sample_prompt
from clvr.world.parser import parse
from clvr.world.render import render
from clvr.world.scene import Obj, Scene
from clvr.world.solver import solve
from clvr.world.vocab import COLORS, count_noun

def verdict(md, scene):
    return judge(md, detect(render(scene)))


def test_relative_position_follows_geneval():
    a, b = (0, 0, 10, 10), (0, 16, 10, 26)  # a directly above b
    assert relative_position(a, b) == {"above"} and relative_position(b, a) == {"below"}
    assert relative_position((16, 16, 26, 26), (0, 0, 10, 10)) == {"right of", "below"}  # 45 degrees: both
    assert relative_position((32, 0, 42, 10), (0, 16, 10, 26)) == {"right of"}  # 2 across, 1 up: only right
    assert relative_position((1, 1, 11, 11), (0, 0, 12, 12)) == set()  # offset smaller than 0.1 x box sizes


MD = parse("two red circles, a blue circle and a green square above the red circles and no yellow triangles")
TRUTH = Scene(tuple(sorted([Obj("circle", "red", 3, 0), Obj("circle", "red", 3, 2), Obj("circle", "blue", 0, 0),
                            Obj("square", "green", 1, 1)])))


def test_ground_truth_passes_with_empty_reason():
    assert verdict(MD, TRUTH) == (True, "")


@pytest.mark.parametrize("scene,needle", [
    (TRUTH.remove((3, 2)), "expected 2 red circles, found 1"),
    (TRUTH.recolor((3, 0), "blue"), "expected 2 red circles, found 1"),
    (TRUTH.move((1, 1), (3, 1)), "expected green square above red circle, found"),
    (TRUTH.remove((1, 1)), "expected 1 green square, found 0"),
    (TRUTH.add(Obj("circle", "red", 2, 3)), "expected fewer than 4 circles, found 4"),
    (TRUTH.add(Obj("triangle", "yellow", 0, 3)), "expected no yellow triangles, found 1"),
])
def test_broken_constraint_is_named(scene, needle):
    ok, reason = verdict(MD, scene)
    assert not ok and needle in reason


@pytest.mark.parametrize("scene,want", [
    (TRUTH.remove((3, 2)), [Failure("count", 0, "red circle", 2, 1), Failure("anchor", 2, "green square", "above", 0,
                                                                             "red circle")]),
    (TRUTH.move((1, 1), (3, 1)), [Failure("position", 2, "green square", "above", "right of", "red circle",
                                          ((3, 1), (3, 0)))]),
    (TRUTH.add(Obj("circle", "red", 2, 3)), [Failure("position", 2, "green square", "above", "left of", "red circle",
                                                     ((1, 1), (2, 3))), Failure("exclude", 0, "circle", 4, 4)]),
    (TRUTH.add(Obj("triangle", "yellow", 0, 3)), [Failure("exclude", 2, "yellow triangle", 1, 1)]),
])
def test_failures_are_structured_and_the_reason_is_their_text(scene, want):
    """One Failure per broken clause (kind, clause index, objects, expected, found); the judge's reason is made from
    them, so a caller counts or reads failures without parsing text."""
    dets = detect(render(scene))
    got = failures(MD, dets)
    assert got == want
    assert judge(MD, dets) == (False, "; ".join(f.text() for f in want))
    assert all(json.loads(json.dumps(f.to_dict()))["kind"] == f.kind for f in got)
    assert failures(MD, detect(render(TRUTH))) == []


def test_colour_selects_within_the_class():
    """World extension: 'two red circles and a blue circle' with the blue one first in raster order."""
    md = parse("two red circles and a blue circle")
    scene = Scene(tuple(sorted([Obj("circle", "blue", 0, 0), Obj("circle", "red", 1, 0), Obj("circle", "red", 2, 0)])))
    assert verdict(md, scene) == (True, "")
    geneval_style = [d for d in detect(render(scene))][:2]  # GenEval would check colours of the first two
    assert [d.color for d in geneval_style] != ["red", "red"]


def _ahead(a, b, rel):
    dr, dc = a[0] - b[0], a[1] - b[1]
    return {"above": dr < 0, "below": dr > 0, "left of": dc < 0, "right of": dc > 0}[rel]


def _clause_of(md, o):
    """The include clause an object of a ground-truth scene was drawn for."""
    return next(c for c in md["include"] if c["class"] == o.shape and c.get("color", o.color) == o.color)


@pytest.mark.parametrize("tier", list(TIERS))
def test_ground_truth_scores_and_corruptions_fail_with_a_reason(tier):
    rng = np.random.default_rng([21, tier])
    counts = {"remove": 0, "recolor": 0, "move": 0}
    for _ in range(6):
        md = sample_prompt(tier, rng)
        truth = solve(md, rng=rng)
        assert verdict(md, truth) == (True, "")
        o = truth.objects[int(rng.integers(len(truth.objects)))]
        c = _clause_of(md, o)
        ok, reason = verdict(md, truth.remove(o.cell))
        assert not ok and describe(c) in reason and "found" in reason
        counts["remove"] += 1
        if c.get("color"):  # recoloured to a colour its shape does not use in this prompt
            spare = [k for k in COLORS if not any(d["class"] == o.shape and d.get("color") == k for d in md["include"])]
            if spare:
                ok, reason = verdict(md, truth.recolor(o.cell, spare[0]))
                assert not ok and f"expected {count_noun(c['count'], describe(c))}, found {c['count'] - 1}" in reason
                counts["recolor"] += 1
        for i, c in enumerate(md["include"]):  # moved against a relation: the relation is named
            if "position" not in c:
                continue
            rel, j = c["position"]
            subj = [x for x in truth.objects if _clause_of(md, x) is c]
            targets = [x for x in truth.objects if _clause_of(md, x) is md["include"][j]]
            bad = [f for f in truth.free_cells() if any(not _ahead(f, t.cell, rel) for t in targets)]
            if bad:  # the moved object is not even strictly in the direction `rel` of some target
                ok, reason = verdict(md, truth.move(subj[0].cell, bad[0]))
                assert not ok and f"{describe(c)} {rel} {describe(md['include'][j])}" in reason
                counts["move"] += 1
    assert counts["remove"] == 6
    if tier >= 5:  # richer tiers always exercise recolouring and relations
        assert counts["recolor"] > 0 and counts["move"] > 0, counts


def test_pluggable_detector_judges_real_geneval_classes():
    md = {"tag": "position", "prompt": "a photo of a dog right of a teddy bear",
          "include": [{"class": "teddy bear", "count": 1}, {"class": "dog", "count": 1, "position": ["right of", 0]}]}

    class Boxes:
        name, classes, colors = "fixed", ("dog", "teddy bear"), ("brown",)

        def __init__(self, dets):
            self.dets = dets

        def __call__(self, image):
            return self.dets

    bear = Detection("teddy bear", "brown", 0, 0, (0, 0, 100, 100), 9000)
    dog = Detection("dog", "brown", 0, 1, (300, 10, 400, 110), 9000)
    assert judge_image(md, np.zeros((8, 8, 3), np.uint8), Boxes([bear, dog])) == (True, "")
    dog_below = Detection("dog", "brown", 0, 0, (0, 300, 100, 400), 9000)
    ok, reason = judge_image(md, np.zeros((8, 8, 3), np.uint8), Boxes([dog_below, bear]))
    assert not ok and "expected dog right of teddy bear, found below" in reason
    with pytest.raises(ClvrError, match="does not know class 'teddy bear'"):
        judge_image(md, render(Scene()), WorldDetector())


def test_real_geneval_metadata_loads_and_validates():
    assert GENEVAL_METADATA.is_relative_to(Path(__file__).resolve().parents[1])  # inside this repository
    mds = read_jsonl(GENEVAL_METADATA)
    assert len(mds) == 553
    tags = {m["tag"] for m in mds}
    assert tags == {"single_object", "two_object", "counting", "colors", "position", "color_attr"}
    for m in mds:
        assert validate_metadata(m) is m and m["prompt"].startswith("a photo of")
        if m["tag"] == "counting":
            assert m["exclude"] == [{"class": m["include"][0]["class"], "count": m["include"][0]["count"] + 1}]
        if m["tag"] == "position":
            assert m["include"][1]["position"][1] == 0
        if m["tag"] in ("colors", "color_attr"):
            assert all("color" in c for c in m["include"])
    assert sum(unsupported(m, WorldDetector()) is not None for m in mds) == 553  # real classes: not the world's


@pytest.mark.parametrize("md,needle", [
    ({"prompt": "x", "include": [{"class": "circle", "count": 1}]}, "'tag' must be a non-empty string"),
    ({"tag": "t", "prompt": "x", "include": []}, "'include' must be a non-empty list"),
    ({"tag": "t", "prompt": "x", "include": [{"class": "circle", "count": 0}]}, "include[0].count must be an integer >= 1"),
    ({"tag": "t", "prompt": "x", "include": [{"class": "circle", "count": 1, "position": ["above", 0]}]},
     "must point to an earlier include clause"),
    ({"tag": "t", "prompt": "x", "include": [{"class": "circle", "count": 1},
                                             {"class": "circle", "count": 1, "position": ["near", 0]}]},
     "include[1].position must be [relation, index]"),
    ({"tag": "t", "prompt": "x", "include": [{"class": "circle", "count": 1, "size": 3}]}, "unknown field(s) ['size']"),
    ({"tag": "t", "prompt": "x", "include": [{"class": "circle", "count": 1}], "exclude": [{"class": "circle"}]},
     "exclude[0].count"),
])
def test_validation_names_the_field(md, needle):
    with pytest.raises(ClvrError) as e:
        validate_metadata(md, "f.jsonl:4")
    assert needle in str(e.value) and "f.jsonl:4" in str(e.value)


def test_malformed_jsonl_line_is_named(tmp_path):
    f = tmp_path / "m.jsonl"
    f.write_text(json.dumps(parse("a red circle")) + "\n\n{not json\n")
    with pytest.raises(ClvrError, match=r"m\.jsonl:3: malformed JSON line"):
        read_jsonl(f)


def test_folder_round_trip_scores_one_and_reports_problems(tmp_path):
    rng = np.random.default_rng(0)
    mds = [sample_prompt(t, rng) for t in TIERS] + [dict(parse("a photo of a circle right of a square"), tag="position")]
    render_suite(mds, tmp_path / "gt", samples=2, seed=3)
    assert sorted(p.name for p in (tmp_path / "gt" / "00000" / "samples").iterdir()) == ["0000.png", "0001.png"]
    s = score_folder(tmp_path / "gt")
    assert s["overall"] == 1.0 and s["images"] == 22 and set(s["per_tier"]) == {str(t) for t in TIERS}
    rows = [json.loads(x) for x in (tmp_path / "gt" / "results.jsonl").read_text().splitlines()]
    assert len(rows) == 22 and set(rows[0]) >= {"filename", "tag", "prompt", "correct", "reason"}

    # one image spoilt, one prompt's samples gone, one prompt the world detector cannot judge
    from clvr.judge import save_png, write_geneval_folder

    truth = solve(mds[4], rng=np.random.default_rng([3, 4, 0]))
    save_png(tmp_path / "gt" / "00004" / "samples" / "0000.png", render(truth.remove(truth.objects[0].cell)))
    for p in (tmp_path / "gt" / "00006" / "samples").iterdir():
        p.unlink()
    write_geneval_folder(tmp_path / "extra", [{"tag": "single_object", "prompt": "a photo of a cow",
                                              "include": [{"class": "cow", "count": 1}]}], [[render(Scene())]])
    (tmp_path / "extra" / "00000").rename(tmp_path / "gt" / "00011")
    s = score_folder(tmp_path / "gt")
    assert (s["missing"], s["unsupported"], s["images"], s["correct"]) == (1, 1, 20, 19)
    rows = {r["filename"]: r for r in map(json.loads, (tmp_path / "gt" / "results.jsonl").read_text().splitlines())}
    assert rows["00004/samples/0000.png"]["correct"] is False and "found" in rows["00004/samples/0000.png"]["reason"]
    assert rows["00006/samples"]["status"] == "missing" and "no images" in rows["00006/samples"]["reason"]
    assert rows["00011/samples"]["status"] == "unsupported" and "class 'cow'" in rows["00011/samples"]["reason"]


def test_metadata_file_overrides_folders(tmp_path):
    mds = [parse("a red circle"), parse("two blue squares")]
    render_suite(mds, tmp_path / "d")
    other = tmp_path / "other.jsonl"
    other.write_text("".join(json.dumps(m) + "\n" for m in [parse("a green circle"), parse("two blue squares")]))
    s = score_folder(tmp_path / "d", metadata_file=other)
    assert s["correct"] == 1 and s["images"] == 2


def test_ground_truth_detections_equal_rendered_detections():
    scene = solve(sample_prompt(10, np.random.default_rng(1)), rng=np.random.default_rng(2))
    assert detect(render(scene)) == scene_detections(scene)
