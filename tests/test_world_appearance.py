"""World v2 appearance: looks (size, offset, orientation, anti-aliasing), the detector on them, random layouts."""

from dataclasses import replace

import numpy as np
import pytest
import torch

from clvr.config import load_config
from clvr.errors import ConfigError
from clvr.judge import judge
from clvr.world.bench import run_bench
from clvr.world.detector import detect, scene_detections, to_scene
from clvr.world.grammar import sample_prompt
from clvr.world.render import MARGIN, SYMMETRY, cell_patch, plain, redraw, render, vary
from clvr.world.scene import LOOK_UNIT, Look, Obj, Scene
from clvr.world.solver import solve
from clvr.world.vocab import BACKGROUND, COLORS, SHAPES

FIXED = load_config("ci").world.appearance
VARIED = replace(FIXED, varied=True)
AA = replace(VARIED, antialias=True)


def random_scene(rng, grid=4):
    cells = rng.permutation(grid * grid)[: rng.integers(1, grid * grid + 1)]
    return Scene(tuple(sorted(Obj(str(rng.choice(SHAPES)), str(rng.choice(list(COLORS))), int(c // grid),
                                  int(c % grid)) for c in cells)), grid)


def all_looks(shape, aa=False):
    for r in range(10, 15):
        room = LOOK_UNIT // 2 - MARGIN - r
        for dy in range(-room, room + 1):
            for dx in range(-room, room + 1):
                for a in range(0, SYMMETRY.get(shape, 15), 15):
                    yield Look(r, dy, dx, a, aa)


def test_cpu_and_release_use_the_varied_world_ci_the_fixed_and_an_override_switches():
    for profile, varied, vae in (("ci", False, ""), ("cpu", True, "runs/cpu/vae/final"),
                                 ("release", True, "runs/release/vae/final")):
        cfg = load_config(profile)
        assert (cfg.world.appearance.varied, cfg.generator.vae) == (varied, vae)
    assert load_config("ci", ["world.appearance.varied=true"]).world.appearance.varied is True
    assert load_config("cpu", ["world.appearance.varied=false"]).world.appearance.varied is False
    assert load_config("release", ["vae.out=/tmp/v"]).generator.vae == "/tmp/v/final"  # follows its vae stage
    with pytest.raises(ConfigError, match="world.appearance.size"):
        load_config("ci", ["world.appearance.size=[0.1,0.4]"])
    with pytest.raises(ConfigError, match="world.cell"):
        load_config("ci", ["world.appearance.varied=true", "world.cell=8"])


def test_fixed_appearance_changes_nothing():
    rng = np.random.default_rng(0)
    scene = random_scene(rng)
    assert vary(scene, rng, FIXED) is scene and vary(scene, rng, None) is scene
    md = sample_prompt(5, np.random.default_rng(1))
    a = solve(md, rng=np.random.default_rng(2))
    b = solve(md, rng=np.random.default_rng(2), appearance=FIXED)
    assert a == b and all(o.look is None for o in b.objects)
    assert np.array_equal(render(a), render(b))


def test_looks_are_seeded_and_vary():
    scene = random_scene(np.random.default_rng(3))
    a = vary(scene, np.random.default_rng(7), VARIED)
    b = vary(scene, np.random.default_rng(7), VARIED)
    assert [o.look for o in a.objects] == [o.look for o in b.objects]
    assert np.array_equal(render(a), render(b))
    assert a == scene  # looks take no part in equality: same objects, same cells
    looks = {vary(scene, np.random.default_rng(s), VARIED).objects[0].look for s in range(40)}
    assert len(looks) > 10
    assert {lk.r for lk in looks} != {looks.pop().r}  # sizes vary too


def test_objects_stay_inside_their_cells_with_a_margin():
    rng = np.random.default_rng(4)
    for _ in range(100):
        scene = vary(random_scene(rng), rng, AA)
        img = render(scene)
        for o in scene.objects:
            patch = img[o.row * 16:(o.row + 1) * 16, o.col * 16:(o.col + 1) * 16]
            border = np.concatenate([patch[0], patch[-1], patch[:, 0], patch[:, -1]])
            assert (border == BACKGROUND).all()
        empty = [c for c in scene.free_cells()]
        for r, c in empty:
            assert (img[r * 16:(r + 1) * 16, c * 16:(c + 1) * 16] == BACKGROUND).all()


def test_look_codes_round_trip():
    for shape in SHAPES:
        for lk in all_looks(shape, aa=shape == "square"):
            assert Look.from_code(lk.code()) == lk and lk.code() >= 1
    o = Obj("square", "red", 1, 2, Look(12, -1, 2, 30, True))
    assert Obj.from_dict(o.to_dict()).look == o.look and "look" not in Obj("square", "red", 1, 2).to_dict()


@pytest.mark.parametrize("aa", [False, True])
def test_detector_is_exact_on_every_look_at_cell_16(aa):
    for shape in SHAPES:
        for i, lk in enumerate(all_looks(shape, aa)):
            scene = Scene((Obj(shape, list(COLORS)[i % len(COLORS)], 2, 1, lk),))
            assert detect(render(scene)) == scene_detections(scene), lk


@pytest.mark.parametrize("cell", [16, 32])
def test_detector_is_exact_on_hundreds_of_varied_scenes(cell):
    rng = np.random.default_rng(cell)
    for i in range(200):
        scene = vary(random_scene(rng), rng, AA if i % 2 else VARIED)
        dets = detect(render(scene, cell))
        assert dets == scene_detections(scene, cell)
        assert to_scene(dets) == scene
        assert [(d.shape, d.color, d.cell) for d in dets] == [(o.shape, o.color, o.cell)
                                                               for o in sorted(scene.objects, key=lambda o: o.cell)]


def test_varied_layouts_keep_every_verdict():
    rng = np.random.default_rng(5)
    for i in range(150):
        md = sample_prompt(1 + i % 10, rng)
        seed = int(rng.integers(1 << 30))
        fixed = solve(md, rng=np.random.default_rng(seed))
        varied = solve(md, rng=np.random.default_rng(seed), appearance=AA)
        assert varied == fixed  # the same cells: looks never move an object
        assert judge(md, detect(render(varied)))[0], md["prompt"]
        assert judge(md, detect(render(plain(varied))))[0]


def test_solver_draws_many_layouts_seeded():
    md = {"prompt": "a red circle above a blue square", "include": [
        {"class": "square", "count": 1, "color": "blue"},
        {"class": "circle", "count": 1, "color": "red", "position": ["above", 0]}]}
    layouts = [solve(md, rng=np.random.default_rng(s), appearance=VARIED) for s in range(20)]
    assert len(set(layouts)) > 5
    assert solve(md, rng=np.random.default_rng(3), appearance=VARIED).to_list() == layouts[3].to_list()
    assert all(judge(md, detect(render(s)))[0] for s in layouts)


def test_training_prompts_draw_layouts_and_looks_only_when_varied():
    from clvr.train.data import PromptSource

    fixed = PromptSource(4, [1.0], pool=3, seed=0)
    varied = PromptSource(4, [1.0], pool=3, seed=0, appearance=VARIED)
    rng_f, rng_v = np.random.default_rng(0), np.random.default_rng(0)
    f = [fixed(rng_f) for _ in range(30)]
    v = [varied(rng_v) for _ in range(30)]
    assert len({s for _, s in f}) <= 3 and all(o.look is None for _, s in f for o in s.objects)
    assert len({s for _, s in v}) > 3 and all(o.look is not None for _, s in v for o in s.objects)


def test_tokens_of_looked_contents_are_the_renderers_pixels():
    from clvr.train.data import N_CONTENTS, contents_of, tokens

    rng = np.random.default_rng(6)
    scenes = [vary(random_scene(rng), rng, AA) for _ in range(8)]
    contents = np.stack([contents_of(s) for s in scenes])
    assert contents.max() >= N_CONTENTS
    tok = tokens(contents, 16)
    img = torch.from_numpy(np.stack([render(s) for s in scenes])).float() / 127.5 - 1.0
    expect = img.view(8, 4, 16, 4, 16, 3).permute(0, 1, 3, 2, 4, 5).reshape(8, 16, 16 * 16 * 3)
    assert torch.equal(tok, expect)


def test_sample_batch_is_unchanged_when_fixed_and_keeps_untouched_looks_when_varied():
    from clvr.train.data import N_CONTENTS, PromptSource, sample_batch

    args = dict(size=16, grid=4, edit_frac=0.7, grounded_frac=0.8, text_dropout=0.0, max_objects=8)
    a = sample_batch(np.random.default_rng(0), prompts=PromptSource(4, [1.0], 4), **args)
    b = sample_batch(np.random.default_rng(0), prompts=PromptSource(4, [1.0], 4, appearance=FIXED), **args)
    assert np.array_equal(a.x0, b.x0) and np.array_equal(a.ref, b.ref) and a.texts == b.texts
    v = sample_batch(np.random.default_rng(0), prompts=PromptSource(4, [1.0], 4, appearance=VARIED), **args)
    assert v.x0.max() >= N_CONTENTS
    kept = v.edit[:, None] & (v.changed == 0) & (v.ref > 0)
    assert kept.any() and np.array_equal(v.x0[kept], v.ref[kept])


def test_varied_oracle_edit_redraws_only_the_edited_cell():
    from clvr.generator import GenRequest
    from clvr.loop.oracle import OracleGenerator

    gen = OracleGenerator(appearance=VARIED)
    img = gen.generate(GenRequest("a red circle above a blue square", seed=1)).image
    out = gen.generate(GenRequest("add a green triangle at row 3 column 3", reference=img, regions=[(3, 3)], seed=2)).image
    assert np.array_equal(out[:48], img[:48]) and np.array_equal(out[48:, :48], img[48:, :48])
    assert [(d.shape, d.color) for d in detect(out) if d.cell == (3, 3)] == [("triangle", "green")]
    before = Scene((Obj("circle", "red", 0, 0, Look(12, 1, 1, 0, False)),))
    after = before.recolor((0, 0), "blue")
    assert np.array_equal(redraw(render(before), before, after), render(after))
    assert not np.array_equal(cell_patch("circle", "blue", Look(12, 1, 1, 0, False)), cell_patch("circle", "blue", None))


def test_bench_on_varied_scenes():
    res = run_bench(60, seed=3, appearance=AA)
    assert res["appearance"] == "varied"
    assert res["detector_accuracy"] == 1.0 and res["judge_agreement"] == 1.0
    assert res["corrupted_failing"] > 0.3
