"""Open-vocabulary GenEval detector and loop verifier, for real images (the world's detector reads only its
own renders).

GenEval (djghosh13/geneval, evaluation/evaluate_images.py) judges an image from an object detector's boxes
and a CLIP colour classifier. This module keeps its rules and swaps the closed-set Mask2Former for an
open-vocabulary detector from transformers (`Owlv2ForObjectDetection`, queried with one text per class):

* classes, counts and boxes: each of the detector's boxes gets the class whose query scores highest (sigmoid
  of the logit, as transformers' `post_process_object_detection`). Then, per class, GenEval's rules apply:
  boxes above `threshold` (0.3; `counting_threshold` 0.9 for prompts tagged "counting"), in descending
  score, the first `max_objects` (16), then greedy NMS dropping a box whose IoU with a kept one is
  >= `max_overlap` (1.0 = off, GenEval's default). IoU is GenEval's `compute_iou` (inclusive pixel
  coordinates, +1).
* colour: CLIP zero-shot over GenEval's 10 colours (the world's 4 with the world class list), with
  GenEval's three templates per class (for a prompt, as GenEval, only for the classes a clause names with a
  colour; the loop verifier colours every detection), on the box crop (GenEval masks the crop with the instance mask when
  its detector gives one; a box detector gives none, and GenEval then crops the box alone; here the crop is
  the integer box covering the detector's box). The classifier of a class is the mean of its normalised
  template embeddings, normalised (clip_benchmark's `zero_shot_classifier`); the colour is the argmax.
* position: the judge's relative-position rule (clvr.judge.relative_position, GenEval's) on the boxes.

The output is `clvr.world.detector.Detection` records (`shape` = the class name), so `clvr.judge` scores
them unchanged. Detections come in descending score, which is GenEval's per-class order ("the first
`count` of a class" are the most confident).

GenEval's thresholds were set for Mask2Former's scores; OWLv2's sigmoid scores sit on another scale (its
own examples use 0.1). The defaults are GenEval's, and every one of them is a config key (`detector:`).

Weights come from a local folder or a hub id already in the local hub cache (`local_files_only`); nothing is
ever downloaded. `build_random_detector` makes the same classes with random weights (tests: "tiny"; the GPU
benchmark: "real", the architecture of google/owlv2-base-patch16-ensemble and openai/clip-vit-large-patch14).
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from clvr.errors import CheckpointError, ClvrError, ConfigError
from clvr.loop.roles import Perception, register_verifier
from clvr.loop.verify import WorldVerifier
from clvr.world.detector import Detection
from clvr.world.vocab import COLORS, SHAPES
from clvr.registry import local_model_folder, resolve_device

# GenEval's object classes (its object_names.txt: the 80 COCO classes, COCO's order, GenEval's names).
GENEVAL_CLASSES: tuple[str, ...] = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow",
    "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee",
    "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard",
    "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple",
    "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch",
    "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "computer mouse", "tv remote",
    "computer keyboard", "cell phone", "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock",
    "vase", "scissors", "teddy bear", "hair drier", "toothbrush",
)
GENEVAL_COLORS: tuple[str, ...] = ("red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black",
                                   "white")
COLOR_TEMPLATES: tuple[str, ...] = ("a photo of a {c} {cls}", "a photo of a {c}-colored {cls}",
                                    "a photo of a {c} object")  # GenEval's, per class
# Class lists by name -> (classes, colours): GenEval's, or the world's (the loop's plans are world scenes)
VOCABS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {"geneval": (GENEVAL_CLASSES, GENEVAL_COLORS),
                                                              "world": (SHAPES, tuple(COLORS))}
DETECTOR_TYPES = ("owlv2",)  # config.json model_type of a detector checkpoint
COUNTING_TAG = "counting"

Box = tuple[float, float, float, float]


@dataclass(frozen=True)
class Rules:
    """GenEval's detection rules (its evaluate_images.py option defaults)."""

    threshold: float = 0.3
    counting_threshold: float = 0.9  # for prompts tagged "counting"
    max_objects: int = 16  # per class
    max_overlap: float = 1.0  # NMS IoU; 1.0 = no NMS


# ---- GenEval's post-processing (pure numpy; tested on known scores and boxes) ---------------------------

def box_iou(a: Box, b: Box) -> float:
    """GenEval's `compute_iou`: boxes (x0, y0, x1, y1) in inclusive pixel coordinates (+1 on each side)."""
    def area(x0: float, y0: float, x1: float, y1: float) -> float:
        return max(x1 - x0 + 1, 0) * max(y1 - y0 + 1, 0)

    inter = area(max(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), min(a[3], b[3]))
    union = area(*a) + area(*b) - inter
    return inter / union if union else 0.0


def select_boxes(scores: np.ndarray, boxes: np.ndarray, threshold: float, max_objects: int,
                 max_overlap: float) -> list[tuple[int, float, Box]]:
    """GenEval's box selection on an open-vocabulary detector's output.

    scores (N, C): per box, the sigmoid score of each class query; boxes (N, 4): x0, y0, x1, y1 in pixels.
    Each box takes its best class. Per class: scores > threshold, descending, the first `max_objects`, then
    greedy NMS (a box is dropped when its IoU with a kept box is >= max_overlap; max_overlap 1 = none).
    Returns [(class index, score, box)] in descending score (ties: lower class, then lower box index first).
    """
    scores, boxes = np.asarray(scores, np.float64), np.asarray(boxes, np.float64)
    if scores.ndim != 2 or boxes.shape != (scores.shape[0], 4):
        raise ValueError(f"expected scores (N, C) and boxes (N, 4), got {scores.shape} and {boxes.shape}")
    if scores.shape[1] == 0:
        return []
    label, best = scores.argmax(1), scores.max(1)
    out: list[tuple[int, float, Box]] = []
    for c in range(scores.shape[1]):
        idx = np.nonzero(label == c)[0]
        order = idx[np.argsort(-best[idx], kind="stable")]
        order = order[best[order] > threshold][:max_objects].tolist()
        while order:
            top = order.pop(0)
            out.append((c, float(best[top]), tuple(float(v) for v in boxes[top])))
            if max_overlap < 1:
                order = [i for i in order if box_iou(boxes[top], boxes[i]) < max_overlap]
    return sorted(out, key=lambda t: -t[1])  # stable: equal scores keep class order


def colour_classifier(text_embeds: np.ndarray) -> np.ndarray:
    """(K colours, T templates, D) text embeddings -> (K, D) zero-shot weights: each template embedding
    normalised, averaged over the templates, normalised again (clip_benchmark's zero_shot_classifier)."""
    e = text_embeds / np.linalg.norm(text_embeds, axis=-1, keepdims=True)
    w = e.mean(1)
    return w / np.linalg.norm(w, axis=-1, keepdims=True)


def pick_colours(image_embeds: np.ndarray, classifier: np.ndarray) -> list[int]:
    """Colour index per crop: argmax of the cosine between the (M, D) crop embeddings and the (K, D) weights."""
    e = image_embeds / np.linalg.norm(image_embeds, axis=-1, keepdims=True)
    return (e @ classifier.T).argmax(1).tolist()


def to_detection(cls: str, colour: str, box: Box, size: tuple[int, int], grid: int) -> Detection:
    """A judge record of one box: integer pixel box (x1, y1 exclusive, at least 1 px), its area, and the grid
    cell of its centre (the cell size is the image side / grid, per axis). size = (height, width)."""
    h, w = size
    x0, y0 = int(np.clip(np.floor(box[0]), 0, w - 1)), int(np.clip(np.floor(box[1]), 0, h - 1))
    x1, y1 = max(x0 + 1, int(np.clip(np.ceil(box[2]), 0, w))), max(y0 + 1, int(np.clip(np.ceil(box[3]), 0, h)))
    row = min(grid - 1, int((y0 + y1) / 2 // (h / grid)))
    col = min(grid - 1, int((x0 + x1) / 2 // (w / grid)))
    return Detection(cls, colour, row, col, (x0, y0, x1, y1), (x1 - x0) * (y1 - y0))


# ---- the detector -----------------------------------------------------------------------------------------

class OpenVocabDetector:
    """The judge's pluggable-detector interface (`name`, `classes`, `colors`, `__call__(image) -> detections`)
    over an OWLv2 detector and a CLIP colour classifier. `for_prompt(metadata)` gives the detector GenEval
    uses for that prompt (the counting threshold for the "counting" tag); the judge asks for it."""

    name = "openvocab"

    def __init__(self, detector, det_tokenizer, det_images, clip, clip_tokenizer, clip_images,
                 classes: tuple[str, ...] = GENEVAL_CLASSES, colors: tuple[str, ...] = GENEVAL_COLORS, grid: int = 4,
                 rules: Rules = Rules(), query: str = "a photo of a {cls}", device: str = "cpu"):
        self.detector, self.det_tokenizer, self.det_images = detector.eval(), det_tokenizer, det_images
        self.clip, self.clip_tokenizer, self.clip_images = clip.eval(), clip_tokenizer, clip_images
        self.classes, self.colors = tuple(classes), tuple(colors)
        self.grid, self.rules, self.query = grid, rules, query
        self._threshold = rules.threshold
        self._coloured: set[str] | None = None  # classes whose colour is classified (None = all)
        self._colour_weights: dict[str, np.ndarray] = {}  # per class, as GenEval caches its classifiers
        self.to(device)

    def to(self, device: str) -> "OpenVocabDetector":
        """Move both models to `device`; the class queries are tokenized once, here."""
        self.device = device
        self.detector.to(device)
        self.clip.to(device)
        texts = [self.query.format(cls=c) for c in self.classes]
        n = self.detector.config.text_config.max_position_embeddings
        self._queries = self.det_tokenizer(texts, padding="max_length", truncation=True, max_length=n,
                                           return_tensors="pt").to(device)
        return self

    def for_prompt(self, metadata: dict) -> "OpenVocabDetector":
        """This detector as GenEval runs it for the prompt: `counting_threshold` when tagged counting, and CLIP
        only on the classes a clause names with a colour (the others' detections get colour "": no clause reads
        it)."""
        view = copy.copy(self)  # shares the models and caches
        view._threshold = self.rules.counting_threshold if metadata.get("tag") == COUNTING_TAG else self.rules.threshold
        view._coloured = {c["class"] for k in ("include", "exclude") for c in metadata.get(k, []) if c.get("color")}
        return view

    def __call__(self, image: np.ndarray) -> list[Detection]:
        image = _check_image(image)
        scores, boxes = self.raw(image)
        r = self.rules
        picked = [(self.classes[c], box) for c, _, box in
                  select_boxes(scores, boxes, self._threshold, r.max_objects, r.max_overlap)]
        wanted = [i for i, (cls, _) in enumerate(picked) if self._coloured is None or cls in self._coloured]
        colours = [""] * len(picked)
        for i, col in zip(wanted, self.colours(image, [picked[i] for i in wanted])):
            colours[i] = col
        return [to_detection(cls, col, box, image.shape[:2], self.grid) for (cls, box), col in zip(picked, colours)]

    def raw(self, image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The detector's (N, C) class scores (sigmoid) and (N, 4) boxes in image pixels (x0, y0, x1, y1).
        OWLv2 pads the image to a square (bottom and right) before resizing, so its normalised boxes scale by
        the longer side."""
        import torch
        from PIL import Image

        pixels = self.det_images(images=Image.fromarray(image), return_tensors="pt")["pixel_values"]
        with torch.inference_mode():
            out = self.detector(input_ids=self._queries["input_ids"], attention_mask=self._queries["attention_mask"],
                                pixel_values=pixels.to(self.device, self.detector.dtype))
        scores = torch.sigmoid(out.logits[0].float()).cpu().numpy()  # (N, C)
        cx, cy, w, h = out.pred_boxes[0].float().cpu().numpy().T  # normalised to the padded square
        side = max(image.shape[:2])
        boxes = np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], 1) * side
        return scores, boxes

    def colours(self, image: np.ndarray, objects: list[tuple[str, Box]]) -> list[str]:
        """GenEval's colour of each (class, box): CLIP zero-shot on the box crop, over GenEval's colours."""
        if not objects:
            return []
        import torch
        from PIL import Image

        pil = Image.fromarray(image)
        crops = [pil.crop(to_detection(cls, "", box, image.shape[:2], 1).bbox) for cls, box in objects]
        pixels = self.clip_images(images=crops, return_tensors="pt")["pixel_values"]
        with torch.inference_mode():
            feats = self.clip.get_image_features(pixel_values=pixels.to(self.device, self.clip.dtype)).pooler_output
        feats = feats.float().cpu().numpy()
        out = []
        for (cls, _), f in zip(objects, feats):
            out.append(self.colors[pick_colours(f[None], self._colour_weights_of(cls))[0]])
        return out

    def _colour_weights_of(self, cls: str) -> np.ndarray:
        if cls not in self._colour_weights:
            import torch

            texts = [t.format(c=c, cls=cls) for c in self.colors for t in COLOR_TEMPLATES]
            n = self.clip.config.text_config.max_position_embeddings
            ids = self.clip_tokenizer(texts, padding=True, truncation=True, max_length=n,
                                      return_tensors="pt").to(self.device)
            with torch.inference_mode():
                e = self.clip.get_text_features(**ids).pooler_output.float().cpu().numpy()
            self._colour_weights[cls] = colour_classifier(e.reshape(len(self.colors), len(COLOR_TEMPLATES), -1))
        return self._colour_weights[cls]


def _check_image(image: Any) -> np.ndarray:
    if not isinstance(image, np.ndarray) or image.ndim != 3 or image.shape[2] != 3 or min(image.shape[:2]) < 1:
        shape = getattr(image, "shape", type(image).__name__)
        raise ClvrError(f"the open-vocabulary detector expects an RGB image (H, W, 3), got {shape}")
    return image if image.dtype == np.uint8 else np.clip(image, 0, 255).astype(np.uint8)


# ---- loading: config section `detector:` -------------------------------------------------------------------

def checkpoint_folder(ident: str, key: str, types: tuple[str, ...]) -> Path:
    """The local folder of `ident` (config key `key`), checked to hold a config.json of one of `types`."""
    if not str(ident).strip():
        raise ConfigError(f"{key} is empty: give a model folder or a hub id whose weights are in the local hub cache")
    folder = local_model_folder(str(ident), key)
    try:
        kind = str(json.loads((folder / "config.json").read_text()).get("model_type", ""))
    except (OSError, ValueError, AttributeError) as e:
        raise CheckpointError(f"{key} '{ident}': no readable config.json ({type(e).__name__})") from None
    if kind not in types:
        raise CheckpointError(f"{key} '{ident}' is a '{kind or 'unknown'}' checkpoint; expected {' or '.join(types)}")
    return folder


def _load_parts(folder: Path, ident: str, key: str, model_cls: str):
    """(model, tokenizer, image processor) of one checkpoint folder."""
    import transformers
    from transformers import AutoImageProcessor, AutoTokenizer
    from transformers.utils import logging as tlog

    tlog.disable_progress_bar()  # one bar per checkpoint on stderr otherwise, in the middle of a loop's output
    try:
        model = getattr(transformers, model_cls).from_pretrained(folder, local_files_only=True)
        tok = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        images = AutoImageProcessor.from_pretrained(folder, local_files_only=True)
    except Exception as e:  # missing files, wrong shapes
        raise CheckpointError(f"{key} '{ident}' does not load: {str(e).splitlines()[0][:300]}") from None
    return model, tok, images


def load_detector(cfg, grid: int, classes: str | None = None) -> OpenVocabDetector:
    """The open-vocabulary detector config section `detector` (a clvr.config.DetectorCfg) names; `classes`:
    a class list name (geneval: GenEval's classes and colours | world: the world's; None = `detector.classes`)."""
    owl_dir = checkpoint_folder(cfg.model, "detector.model", DETECTOR_TYPES)  # both checked before any loads
    clip_dir = checkpoint_folder(cfg.clip_model, "detector.clip_model", ("clip",))
    owl = _load_parts(owl_dir, cfg.model, "detector.model", "Owlv2ForObjectDetection")
    clip = _load_parts(clip_dir, cfg.clip_model, "detector.clip_model", "CLIPModel")
    rules = Rules(cfg.threshold, cfg.counting_threshold, cfg.max_objects, cfg.max_overlap)
    names, colors = VOCABS[classes or cfg.classes]
    return OpenVocabDetector(*owl, *clip, classes=names, colors=colors, grid=grid, rules=rules, query=cfg.query,
                             device=resolve_device(cfg.device))


def make_detector(cfg, kind: str | None = None, grid: int | None = None):
    """The detector `clvr eval geneval` uses: `kind` world | openvocab (None = config `detector.kind`)."""
    from clvr.judge import default_detector

    kind = kind or cfg.detector.kind
    grid = grid or cfg.world.grid
    if kind == "world":
        return default_detector(grid)
    if kind == "openvocab":
        return load_detector(cfg.detector, grid)
    raise ClvrError(f"unknown detector '{kind}' (known: world, openvocab)")


# ---- the loop verifier -------------------------------------------------------------------------------------

class OpenVocabVerifier(WorldVerifier):
    """The world verifier's passive and active logic (clvr.loop.verify), perceiving with the open-vocabulary
    detector. Its detector queries the world's classes and colours: the loop's controllers plan world scenes
    (circle, square, triangle in 4 colours) whatever draws them. Perception uses `detector.threshold` (the
    counting threshold is a judge rule of prompts tagged counting, which the loop's plans are not)."""

    name = "openvocab"

    def __init__(self, detector: OpenVocabDetector, grid: int = 4):
        super().__init__(grid)
        self.detector = detector

    def perceive(self, image: np.ndarray) -> Perception:
        from clvr.world.detector import to_scene

        dets = self.detector(image)
        return Perception(dets, to_scene(dets, self.grid))


@register_verifier("openvocab")
def openvocab_verifier(grid: int = 4, cfg=None, **_: object) -> OpenVocabVerifier:
    if cfg is None:
        raise ConfigError("the openvocab verifier needs the config (its `detector` section names the weights)")
    return OpenVocabVerifier(load_detector(cfg.detector, grid, classes="world"), grid)


# ---- random-init detectors (tests; the GPU benchmark) ------------------------------------------------------

# Sizes of the two checkpoints' architectures. "real": google/owlv2-base-patch16-ensemble (ViT-B/16 at 960 px,
# 16 text positions) and openai/clip-vit-large-patch14 (ViT-L/14 at 224 px), as their config.json files give.
SIZES: dict[str, dict[str, dict]] = {
    "tiny": {
        "owl_text": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                         max_position_embeddings=64),
        "owl_vision": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           image_size=64, patch_size=16),
        "owl_projection": dict(projection_dim=32),
        "clip_text": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                          max_position_embeddings=64),
        "clip_vision": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                            image_size=32, patch_size=16),
        "clip_projection": dict(projection_dim=32),
    },
    "real": {
        "owl_text": dict(vocab_size=49408, hidden_size=512, intermediate_size=2048, num_hidden_layers=12,
                         num_attention_heads=8, max_position_embeddings=16),
        "owl_vision": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                           image_size=960, patch_size=16),
        "owl_projection": dict(projection_dim=512),
        "clip_text": dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                          num_attention_heads=12, max_position_embeddings=77, projection_dim=768),
        "clip_vision": dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                            image_size=224, patch_size=14, projection_dim=768),
        "clip_projection": dict(projection_dim=768),
    },
}


def small_clip_tokenizer():
    """A CLIP BPE tokenizer built here (no downloads): the 256 byte symbols, each also as a word end, and
    CLIP's two special tokens; no merges, so text tokenizes per character. OWLv2 and CLIP both read it."""
    from transformers import CLIPTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    symbols = list(bytes_to_unicode().values())
    vocab = {s: i for i, s in enumerate([*symbols, *(s + "</w>" for s in symbols)])}
    vocab.update({"<|startoftext|>": len(vocab), "<|endoftext|>": len(vocab) + 1})
    return CLIPTokenizer(vocab=vocab, merges=[])


def random_parts(size: str = "tiny", seed: int = 0, device: str = "cpu"):
    """(owl model, tokenizer, image processor, clip model, tokenizer, image processor) with random weights,
    made on `device` (the real sizes initialise much faster on a GPU)."""
    import torch
    from transformers import (CLIPConfig, CLIPImageProcessorPil, CLIPModel, Owlv2Config, Owlv2ForObjectDetection,
                              Owlv2ImageProcessorPil)

    if size not in SIZES:
        raise ClvrError(f"unknown detector size '{size}' (known: {', '.join(SIZES)})")
    s, tok = SIZES[size], small_clip_tokenizer()
    ids = dict(vocab_size=s["owl_text"].get("vocab_size", len(tok)), bos_token_id=tok.bos_token_id,
               eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(seed)
    owl_cfg = Owlv2Config(text_config={**s["owl_text"], **ids}, vision_config=s["owl_vision"], **s["owl_projection"])
    ids["vocab_size"] = s["clip_text"].get("vocab_size", len(tok))
    clip_cfg = CLIPConfig(text_config={**s["clip_text"], **ids}, vision_config=s["clip_vision"], **s["clip_projection"])
    with torch.device(device):
        owl, clip = Owlv2ForObjectDetection(owl_cfg), CLIPModel(clip_cfg)
    side, clip_side = s["owl_vision"]["image_size"], s["clip_vision"]["image_size"]
    owl_images = Owlv2ImageProcessorPil(size={"height": side, "width": side})
    clip_images = CLIPImageProcessorPil(size={"shortest_edge": clip_side},
                                        crop_size={"height": clip_side, "width": clip_side})
    return owl.eval(), tok, owl_images, clip.eval(), tok, clip_images


def save_random_checkpoints(root: str | Path, size: str = "tiny", seed: int = 0) -> tuple[Path, Path]:
    """Random-init detector and CLIP checkpoints saved with save_pretrained: (root/owlv2, root/clip)."""
    owl, tok, owl_images, clip, clip_tok, clip_images = random_parts(size, seed)
    out = []
    for name, parts in (("owlv2", (owl, tok, owl_images)), ("clip", (clip, clip_tok, clip_images))):
        folder = Path(root) / name
        for part in parts:
            part.save_pretrained(folder)
        out.append(folder)
    return out[0], out[1]


def build_random_detector(size: str = "tiny", grid: int = 4, classes: str = "geneval", rules: Rules = Rules(),
                          seed: int = 0, device: str = "cpu") -> OpenVocabDetector:
    """An OpenVocabDetector with random weights ("tiny" for tests, "real" = the real checkpoints' architecture,
    for timing). `classes`: a class list name (geneval | world). The small tokenizer reads text per character,
    so a query is cut to the text encoder's length (16 positions at "real": the same cost, for timing)."""
    if classes not in VOCABS:
        raise ClvrError(f"unknown class list '{classes}' (known: {', '.join(VOCABS)})")
    names, colors = VOCABS[classes]
    return OpenVocabDetector(*random_parts(size, seed, device), classes=names, colors=colors, grid=grid, rules=rules,
                             device=device)
