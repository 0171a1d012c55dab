"""The open-vocabulary GenEval detector and verifier (clvr.openvocab) on tiny random-init OWLv2 + CLIP checkpoints
saved with save_pretrained and loaded through the `detector:` config section; GenEval's post-processing on known
scores and boxes."""

import json
import re
from pathlib import Path

import numpy as np
import pytest
from conftest import clvr

from clvr.config import load_config
from clvr.errors import CheckpointError, ClvrError, ConfigError
from clvr.io import save_png
from clvr.judge import GENEVAL_METADATA, detect_for, judge_image, read_jsonl, unsupported
from clvr.openvocab import (COLOR_TEMPLATES, GENEVAL_CLASSES, GENEVAL_COLORS, OpenVocabDetector, OpenVocabVerifier,
                            Rules, box_iou, build_random_detector, colour_classifier, load_detector, pick_colours,
                            random_parts, save_random_checkpoints, select_boxes, to_detection)
from clvr.world.detector import Detection
from clvr.world.vocab import COLORS, SHAPES

PROMPTS = [  # GenEval records: a colour clause, a counting prompt, a position prompt
    {"tag": "colors", "include": [{"class": "dog", "count": 1, "color": "brown"}], "prompt": "a photo of a brown dog"},
    {"tag": "counting", "include": [{"class": "cup", "count": 2}], "exclude": [{"class": "cup", "count": 3}],
     "prompt": "a photo of two cups"},
    {"tag": "position", "include": [{"class": "bench", "count": 1}, {"class": "cat", "count": 1,
                                                                       "position": ["left of", 0]}],
     "prompt": "a photo of a cat left of a bench"},
]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return save_random_checkpoints(tmp_path_factory.mktemp("openvocab"), "tiny", seed=0)


def cfg_for(ckpt, *extra):
    owl, clip = ckpt
    return load_config("cpu", [f"detector.model={owl}", f"detector.clip_model={clip}", "detector.device=cpu", *extra])


@pytest.fixture(scope="module")
def det(ckpt):
    return load_detector(cfg_for(ckpt, "detector.threshold=0.0").detector, grid=4)


def image(seed=0, h=64, w=96):
    return (np.random.default_rng(seed).random((h, w, 3)) * 255).astype(np.uint8)


# ---- GenEval's post-processing on known scores and boxes -----------------------------------------------

def test_box_iou_is_genevals_inclusive_pixel_rule():
    assert box_iou((0, 0, 9, 9), (0, 0, 9, 9)) == 1.0
    assert box_iou((0, 0, 9, 9), (5, 0, 14, 9)) == pytest.approx(50 / 150)  # 5 x 10 of 100 + 100 - 50 pixels
    assert box_iou((0, 0, 9, 9), (20, 20, 29, 29)) == 0.0


def test_select_boxes_thresholds_caps_and_orders_by_score():
    scores = np.array([[0.9, 0.1], [0.3, 0.2], [0.31, 0.0], [0.2, 0.8], [0.5, 0.6]])  # box 4: class 1 (0.6 > 0.5)
    boxes = np.array([[0, 0, 10, 10], [20, 0, 30, 10], [40, 0, 50, 10], [0, 20, 10, 30], [20, 20, 30, 30]], float)
    got = select_boxes(scores, boxes, threshold=0.3, max_objects=16, max_overlap=1.0)
    assert [(c, s) for c, s, _ in got] == [(0, 0.9), (1, 0.8), (1, 0.6), (0, 0.31)]  # 0.3 is not > 0.3
    assert got[0][2] == (0, 0, 10, 10)
    top = select_boxes(scores, boxes, threshold=0.0, max_objects=1, max_overlap=1.0)  # the best box per class
    assert [(c, s) for c, s, _ in top] == [(0, 0.9), (1, 0.8)]
    assert select_boxes(scores[:, :0], boxes, 0.3, 16, 1.0) == []
    with pytest.raises(ValueError):
        select_boxes(scores, boxes[:2], 0.3, 16, 1.0)


def test_nms_drops_overlaps_of_one_class_only_and_is_off_at_one():
    scores = np.array([[0.9, 0.0], [0.8, 0.0], [0.0, 0.7], [0.6, 0.0]])
    boxes = np.array([[0, 0, 9, 9], [1, 0, 10, 9], [0, 0, 9, 9], [30, 30, 39, 39]], float)  # box 1 ~ box 0
    assert len(select_boxes(scores, boxes, 0.3, 16, 1.0)) == 4
    kept = select_boxes(scores, boxes, 0.3, 16, 0.5)
    assert [(c, s) for c, s, _ in kept] == [(0, 0.9), (1, 0.7), (0, 0.6)]  # the class-1 twin of box 0 stays


def test_colour_classifier_averages_normalised_templates():
    # colour 0: one long template along x, one short along y -> normalised first, the mean points at 45 degrees
    text = np.array([[[10.0, 0.0], [0.0, 1.0]], [[1.0, -1.0], [1.0, -1.0]]])  # (K=2, T=2, D=2)
    w = colour_classifier(text)
    assert np.allclose(w, [[2 ** -0.5, 2 ** -0.5], [2 ** -0.5, -(2 ** -0.5)]])
    assert pick_colours(np.array([[0.1, 5.0], [3.0, -2.0]]), w) == [0, 1]


def test_to_detection_cell_of_the_box_centre_clipped_to_the_image():
    d = to_detection("dog", "red", (70.2, 10.0, 90.0, 30.5), (64, 128), grid=4)  # cells 16 px high, 32 px wide
    assert d == Detection("dog", "red", 1, 2, (70, 10, 90, 31), 20 * 21)
    edge = to_detection("cup", "blue", (-5.0, 60.0, 500.0, 70.0), (64, 128), grid=4)
    assert edge.bbox == (0, 60, 128, 64) and edge.cell == (3, 2)
    assert to_detection("cup", "", (10.0, 10.0, 10.0, 10.0), (64, 64), 4).area == 1  # degenerate -> 1 px


# ---- the detector: tiny random checkpoints through the config ----------------------------------------

def test_detector_returns_genevals_selection_as_detections(det):
    img = image()
    dets = det(img)
    scores, boxes = det.raw(img)
    assert scores.shape == (16, len(GENEVAL_CLASSES)) and boxes.shape == (16, 4)  # (64 / 16)^2 boxes, 80 queries
    picked = select_boxes(scores, boxes, 0.0, 16, 1.0)
    assert len(dets) == len(picked) == 16  # threshold 0: every box, under its best class
    assert [d.shape for d in dets] == [GENEVAL_CLASSES[c] for c, _, _ in picked]
    for d, (_, _, box) in zip(dets, picked):
        assert isinstance(d, Detection) and d.color in GENEVAL_COLORS
        assert d == to_detection(d.shape, d.color, box, (64, 96), 4)
    assert det(img) == dets  # deterministic
    assert det.name == "openvocab" and det.classes == GENEVAL_CLASSES and det.colors == GENEVAL_COLORS


def test_counting_prompts_use_the_counting_threshold(det):
    img = image(1)
    top = float(det.raw(img)[0].max())
    strict = OpenVocabDetector(det.detector, det.det_tokenizer, det.det_images, det.clip, det.clip_tokenizer,
                               det.clip_images, rules=Rules(threshold=0.0, counting_threshold=top))
    assert strict.for_prompt(PROMPTS[1])(img) == []  # no score is above the highest one
    assert len(strict.for_prompt(PROMPTS[0])(img)) == 16 == len(strict(img))
    # as GenEval: CLIP runs only on the classes a clause names with a colour ("a brown dog": dogs)
    dogs = strict.for_prompt(PROMPTS[0])(img)
    assert all((d.color in GENEVAL_COLORS) == (d.shape == "dog") and (d.color == "") == (d.shape != "dog")
               for d in dogs)
    assert [(d.shape, d.bbox) for d in dogs] == [(d.shape, d.bbox) for d in strict(img)]
    assert all(d.color for d in strict(img))  # without a prompt (the loop verifier): every detection
    assert detect_for(PROMPTS[1], img, strict) == [] and len(detect_for(PROMPTS[0], img, strict)) == 16  # the judge
    assert judge_image(PROMPTS[1], img, strict) == (False, "expected 2 cups, found 0")


def test_colour_is_clip_zero_shot_over_genevals_colours_and_templates(det):
    import torch
    from PIL import Image

    img = image(2)
    box = (8.0, 4.0, 40.0, 30.0)
    got = det.colours(img, [("dog", box)])
    crop = det.clip_images(images=[Image.fromarray(img).crop((8, 4, 40, 30))],
                           return_tensors="pt")["pixel_values"]
    texts = [t.format(c=c, cls="dog") for c in GENEVAL_COLORS for t in COLOR_TEMPLATES]
    with torch.no_grad():
        feat = det.clip.get_image_features(pixel_values=crop).pooler_output.numpy()
        ids = det.clip_tokenizer(texts, padding=True, return_tensors="pt")
        text = det.clip.get_text_features(**ids).pooler_output.numpy()
    want = colour_classifier(text.reshape(10, 3, -1))
    assert got == [GENEVAL_COLORS[pick_colours(feat, want)[0]]]
    assert det.colours(img, []) == []


def test_bad_images_are_refused(det):
    with pytest.raises(ClvrError, match="RGB image"):
        det(np.zeros((8, 8), np.uint8))
    with pytest.raises(ClvrError, match="RGB image"):
        det(np.zeros((8, 8, 4), np.uint8))


def test_the_real_metadata_is_all_supported(det):
    rows = read_jsonl(GENEVAL_METADATA)
    clauses = [c for r in rows for k in ("include", "exclude") for c in r.get(k, [])]
    assert len(rows) == 553 and {c["class"] for c in clauses} == set(GENEVAL_CLASSES)
    assert all(unsupported(md, det) is None for md in rows)


# ---- the CLI ---------------------------------------------------------------------------------------------

def geneval_folder(root: Path) -> Path:
    for i, md in enumerate(PROMPTS):
        d = root / f"{i:05d}"
        (d / "samples").mkdir(parents=True)
        (d / "metadata.jsonl").write_text(json.dumps(md) + "\n")
        for k in range(2):
            save_png(d / "samples" / f"{k:04d}.png", image(10 * i + k))
    return root


def test_eval_geneval_scores_a_folder_with_the_openvocab_detector(ckpt, tmp_path, monkeypatch, capsys):
    folder = geneval_folder(tmp_path / "gen")
    owl, clip = ckpt
    code, out, err = clvr(monkeypatch, capsys, "eval", "geneval", str(folder), "--detector", "openvocab",
                          "--set", f"detector.model={owl}", "--set", f"detector.clip_model={clip}",
                          "--set", "detector.device=cpu")
    assert code == 0, err
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["images"] == 6 and summary["unsupported"] == 0 and set(summary["per_tag"]) == {
        "colors", "counting", "position"}
    rows = [json.loads(line) for line in (folder / "results.jsonl").read_text().splitlines()]
    assert len(rows) == 6 and all(r["status"] == "scored" and isinstance(r["correct"], bool) for r in rows)
    # the world detector knows none of these classes: nothing scored, exit 2, one line
    code, _, err = clvr(monkeypatch, capsys, "eval", "geneval", str(folder), "--detector", "world",
                        "--out", str(tmp_path / "w.jsonl"))
    assert code == 2 and "does not know class 'dog'" in err and not (tmp_path / "w.jsonl").exists()


@pytest.mark.parametrize("args,needle", [
    (["--set", "detector.model=google/owlv2-base-patch16-ensemble"],
     "'google/owlv2-base-patch16-ensemble': weights must be present locally"),
    (["--set", "detector.model=CLIP"], "is a 'clip' checkpoint; expected owlv2"),
    (["--set", "detector.model="], "detector.model is empty"),
    (["--detector", "yolo"], "detector.kind must be one of"),
    (["--set", "detector.threshold=1.5"], "detector.threshold must be in 0..1"),
    (["--set", "detector.query=a photo"], "detector.query must be a text with one {cls} placeholder"),
    (["--set", "loop.max_iters=3"], "does not read the 'loop' section"),
])
def test_eval_geneval_bad_detector_input_is_one_line(ckpt, tmp_path, monkeypatch, capsys, args, needle):
    folder = geneval_folder(tmp_path / "gen")
    owl, clip = ckpt
    args = [a.replace("=CLIP", f"={clip}") for a in args]
    code, out, err = clvr(monkeypatch, capsys, "eval", "geneval", str(folder), "--detector", "openvocab",
                          "--set", f"detector.model={owl}", "--set", f"detector.clip_model={clip}", *args)
    assert code == 2 and needle in err and "Traceback" not in err + out
    assert not (folder / "results.jsonl").exists()


@pytest.mark.parametrize("override,needle", [
    ("detector.max_overlap=0", "detector.max_overlap must be in 0..1 (0 excluded"),
    ("detector.counting_threshold=1", "detector.counting_threshold must be in 0..1"),
    ("detector.max_objects=0", "detector.max_objects must be >= 1"),
    ("detector.classes=coco", "detector.classes must be one of ['geneval', 'world']"),
    ("detector.device=gpu", "detector.device must be auto | cpu | cuda | cuda:N"),
])
def test_detector_config_is_checked_when_it_loads(override, needle):
    with pytest.raises(ConfigError, match=re.escape(needle)):
        load_config("cpu", [override])


def test_missing_hub_weights_raise_a_checkpoint_error_naming_the_id(ckpt, tmp_path):
    with pytest.raises(CheckpointError, match="'openai/clip-vit-large-patch14': weights must be present locally"):
        load_detector(cfg_for(ckpt, "detector.clip_model=openai/clip-vit-large-patch14").detector, grid=4)
    with pytest.raises(CheckpointError, match="not a model folder"):
        load_detector(cfg_for(ckpt, f"detector.model={ckpt[0] / 'config.json'}").detector, grid=4)
    broken = tmp_path / "owl"
    broken.mkdir()
    (broken / "config.json").write_text((ckpt[0] / "config.json").read_text())  # an OWLv2 config, no weights
    with pytest.raises(CheckpointError, match=f"detector.model '{broken}' does not load"):
        load_detector(cfg_for(ckpt, f"detector.model={broken}").detector, grid=4)


def test_hub_ids_load_from_the_local_hub_cache(ckpt, tmp_path, monkeypatch):
    import shutil

    import huggingface_hub.constants

    for ident, folder in (("google/owlv2-base-patch16-ensemble", ckpt[0]), ("openai/clip-vit-large-patch14", ckpt[1])):
        repo = tmp_path / ("models--" + ident.replace("/", "--"))
        shutil.copytree(folder, repo / "snapshots" / ("0" * 40))
        (repo / "refs").mkdir()
        (repo / "refs" / "main").write_text("0" * 40)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    cfg = load_config("gpu-4b", ["detector.device=cpu"])  # the profile's real ids, found in the (fake) cache
    det = load_detector(cfg.detector, grid=4)
    assert det.classes == GENEVAL_CLASSES and det.rules == Rules()  # GenEval's rules by default
    assert all(d.shape in GENEVAL_CLASSES for d in det(image(4)))


# ---- the loop verifier -----------------------------------------------------------------------------------

def test_openvocab_verifier_runs_the_loop_on_world_classes(ckpt):
    from clvr.loop.run import build_roles, load_generator, run_loop

    cfg = cfg_for(ckpt, "loop.verifier=openvocab", "loop.max_iters=3", "detector.threshold=0.0")
    controller, verifier = build_roles(cfg)
    assert isinstance(verifier, OpenVocabVerifier) and verifier.detector.classes == SHAPES
    assert verifier.detector.colors == tuple(COLORS)
    seen = verifier.perceive(image(3, 64, 64))
    assert seen.detections and {d.shape for d in seen.detections} <= set(SHAPES)
    assert {o.cell for o in seen.scene.objects} <= {(d.row, d.col) for d in seen.detections}
    trace = run_loop("a red circle above a blue square", controller, load_generator(cfg, "oracle"), verifier,
                     cfg.loop, seed=0)
    calls = [s for s in trace.steps if s.output is not None]
    assert calls and all(s.passive is not None for s in calls)  # every call went through the open-vocab gate
    assert trace.calls == len(calls) and trace.ended_by in ("stop", "max_iters")


def test_random_detector_sizes():
    with pytest.raises(ClvrError, match="unknown detector size"):
        build_random_detector("huge")
    with pytest.raises(ClvrError, match="unknown class list 'coco'"):
        build_random_detector("tiny", classes="coco")
    owl, _, owl_images, clip, _, clip_images = random_parts("real", device="meta")  # not allocated
    v, t = owl.config.vision_config, owl.config.text_config
    assert (v.image_size, v.patch_size, v.hidden_size, v.num_hidden_layers) == (960, 16, 768, 12)
    assert (t.hidden_size, t.num_hidden_layers, t.max_position_embeddings, t.vocab_size) == (512, 12, 16, 49408)
    assert owl_images.size["height"] == 960 and clip_images.crop_size["height"] == 224
    cv = clip.config.vision_config
    assert (cv.image_size, cv.patch_size, cv.hidden_size, cv.num_hidden_layers) == (224, 14, 1024, 24)
    assert sum(p.numel() for p in clip.parameters()) == 427_616_513  # openai/clip-vit-large-patch14
