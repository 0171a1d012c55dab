import numpy as np
import pytest

from clvr.world.grammar import GENEVAL_TAGS, TIERS, c_task, geneval_suite, sample_prompt, tier_of
from clvr.world.parser import parse
from clvr.world.vocab import COLORS, SHAPES


def test_c_task_and_tiers():
    assert c_task(parse("a circle")) == 1 and c_task(parse("a red circle")) == 2
    assert tier_of(c_task(parse("a red circle"))) == 1
    assert c_task(parse("two red circles and a blue square above the red circles")) == 8
    assert c_task(parse("two circles and no yellow squares")) == 4  # 2 objects + 1 count + 1 exclusion
    assert [tier_of(c) for c in (0, 2, 2.5, 4, 18, 18.5, 40)] == [1, 1, 2, 2, 9, 10, 10]


@pytest.mark.parametrize("tier", list(TIERS))
def test_samples_hit_their_tier(tier):
    rng = np.random.default_rng([7, tier])
    for _ in range(20):
        md = sample_prompt(tier, rng)
        assert md["tier"] == tier == tier_of(md["c_task"]) and md["c_task"] == c_task(md)
        assert set(md) >= {"tag", "include", "exclude", "prompt"}
        objects = sum(c["count"] for c in md["include"])
        assert objects <= 16
        if tier == 10:
            assert objects >= 8
            assert sum("position" in c for c in md["include"]) >= 2
            assert sum("color" in c for c in md["include"]) >= 2


def test_tier_one_is_a_single_object():
    md = sample_prompt(1, np.random.default_rng(0))
    assert len(md["include"]) == 1 and md["include"][0]["count"] == 1


def test_sampling_is_deterministic_given_the_seed():
    a = [sample_prompt(t, np.random.default_rng([3, t])) for t in TIERS]
    b = [sample_prompt(t, np.random.default_rng([3, t])) for t in TIERS]
    assert a == b
    assert len({m["prompt"] for m in a}) == 10


def test_round_trip_thousands_of_prompts():
    """grammar -> text -> parser gives the same constraints (include in order; exclude as a set)."""
    n = 0
    for tier in TIERS:
        rng = np.random.default_rng([11, tier])
        for _ in range(150):
            md = sample_prompt(tier, rng)
            got = parse(md["prompt"])
            assert got["include"] == md["include"], md["prompt"]
            assert sorted(map(repr, got["exclude"])) == sorted(map(repr, md["exclude"])), md["prompt"]
            n += 1
    assert n == 1500


@pytest.mark.parametrize("tag", GENEVAL_TAGS)
def test_geneval_suites_follow_genevals_format(tag):
    mds = geneval_suite(tag, 30, np.random.default_rng(0))
    assert len(mds) == 30 and all(m["tag"] == tag and m["prompt"].startswith("a photo of ") for m in mds)
    for m in mds:
        inc = m["include"]
        assert all(c["class"] in SHAPES and c.get("color", "red") in COLORS for c in inc)
        parsed = parse(m["prompt"])
        assert parsed["include"] == inc  # the parser reads GenEval's phrasing back
        assert ("exclude" in m) == (tag == "counting")
    if tag == "counting":
        assert all(m["exclude"] == [{"class": m["include"][0]["class"], "count": m["include"][0]["count"] + 1}]
                   and 2 <= m["include"][0]["count"] <= 4 for m in mds)
    if tag == "position":
        assert all(m["include"][1]["position"][1] == 0 and m["include"][0]["class"] != m["include"][1]["class"]
                   for m in mds)
    if tag == "color_attr":
        assert all(m["include"][0]["color"] != m["include"][1]["color"] for m in mds)


def test_unknown_tag():
    with pytest.raises(ValueError, match="unknown GenEval tag"):
        geneval_suite("texture", 1, np.random.default_rng(0))
