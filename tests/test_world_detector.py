import numpy as np
import pytest

from clvr.world.detector import Detection, WorldDetector, detect, scene_detections, to_scene
from clvr.world.render import render
from clvr.world.scene import Obj, Scene
from clvr.world.vocab import COLORS, SHAPES


def random_scene(rng, grid=4):
    cells = rng.permutation(grid * grid)[: rng.integers(0, grid * grid + 1)]
    return Scene(tuple(sorted(Obj(str(rng.choice(SHAPES)), str(rng.choice(list(COLORS))), int(c // grid),
                                  int(c % grid)) for c in cells)), grid)


@pytest.mark.parametrize("cell", [8, 16, 32])
def test_exact_on_renderer_output(cell):
    rng = np.random.default_rng(cell)
    for _ in range(150):
        scene = random_scene(rng)
        dets = detect(render(scene, cell))
        assert dets == scene_detections(scene, cell)
        assert to_scene(dets) == scene


def test_full_grid_of_every_shape_and_colour():
    objs = [Obj(SHAPES[i % 3], list(COLORS)[(i // 3) % 4], i // 4, i % 4) for i in range(16)]
    scene = Scene(tuple(sorted(objs)))
    dets = WorldDetector()(render(scene))
    expected = sorted(objs, key=lambda o: o.cell)  # raster order
    assert [(d.shape, d.color, d.row, d.col) for d in dets] == [(o.shape, o.color, o.row, o.col) for o in expected]
    assert all(isinstance(d, Detection) and d.area > 0 and len(d.bbox) == 4 for d in dets)


def test_robust_to_mild_noise_and_off_palette_pixels():
    rng = np.random.default_rng(0)
    for _ in range(60):
        scene = random_scene(rng)
        clean = render(scene)
        img = clean.astype(np.int16) + rng.normal(0, 12, clean.shape).astype(np.int16)  # sensor-like noise
        speck = rng.random(img.shape[:2]) < 0.01  # isolated pixels of any colour, anywhere
        img[speck] = rng.integers(0, 256, (int(speck.sum()), 3))
        haze = (rng.random(img.shape[:2]) < 0.05) & (clean == 255).all(-1)  # near-white background noise
        img[haze] = (235, 235, 235)
        got = to_scene(detect(np.clip(img, 0, 255).astype(np.uint8)))
        assert got == scene


def test_upscaled_image_uses_image_side_over_grid():
    scene = Scene(tuple(sorted((Obj("triangle", "green", 1, 2), Obj("circle", "red", 3, 0)))))
    big = np.kron(render(scene), np.ones((4, 4, 1), np.uint8))  # 256 px, cell 64
    assert to_scene(detect(big)) == scene


def test_touching_objects_of_one_colour_are_split_by_cell():
    img = np.full((64, 64, 3), 255, np.uint8)
    img[2:14, 2:30] = COLORS["blue"]  # one bar over cells (0,0) and (0,1)
    dets = detect(img)
    assert [(d.row, d.col, d.color) for d in dets] == [(0, 0, "blue"), (0, 1, "blue")]


def test_to_scene_keeps_the_larger_of_two_in_a_cell():
    a = Detection("circle", "red", 0, 0, (0, 0, 10, 10), 80)
    b = Detection("square", "blue", 0, 0, (2, 2, 6, 6), 16)
    assert to_scene([b, a]).objects == (Obj("circle", "red", 0, 0),)


def test_rejects_non_rgb():
    with pytest.raises(ValueError, match="RGB"):
        detect(np.zeros((64, 64), np.uint8))
