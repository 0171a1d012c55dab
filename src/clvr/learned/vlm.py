"""The learned controller at real scale: a vision-language model that reads the state text AND the canvas image.

`controller_sft.model_class: vlm` trains a `Qwen3VLForConditionalGeneration` with the same trainer, engine, loss
and checkpoints as the small causal LM (clvr.learned.train.ControllerTrainer; `VLMTrainer` only swaps the hooks
marked there). An example is the causal LM's (state_text, the teacher's step) plus the canvas the controller
looked at: the trajectory step's `input` image (clvr.trajectories.load_image; a stop or rejected output reads
the canvas of the last call), as uint8 HxWx3.

Inputs of one example: `[BOS] prompt <words> | <|vision_start|> <|image_pad|> x n <|vision_end|> the other state
fields | step tokens [EOS]` (`prompt_ids`: the user's prompt comes first, so that the part of the prompt constant
over a trajectory is a prefix the controller prefills once, clvr.learned.vlm_controller), labels -100 everywhere but
the step tokens and [EOS]; n = the merged patches of the image (the image processor's
`image_grid_thw`, over `spatial_merge_size`^2), as `Qwen3VLProcessor` expands its image placeholder. That
processor class is not used: it requires a video processor, which needs torchvision (not installed); the
expansion is the one line above, and `mm_token_type_ids` (1 on image tokens), which the model needs for its
multimodal RoPE, is written by `collate` as the processor would.

Two sources of model + processor (`controller_sft.init`):
* "" : a tiny model built from config (`build_vlm`: the text side sized by `controller_sft.layers/hidden/...`,
  a fixed tiny vision tower `TINY_VISION`), over the controller's own word-level tokenizer
  (clvr.learned.tokens) plus the vision special tokens (`VISION_TOKENS`); its outputs are the step lexemes, so
  exact match is measured as greedy constrained decoding, exactly as for the causal LM.
* a folder (one `save_vlm` wrote, or a pretrained checkpoint's) or a hub id (e.g. `Qwen/Qwen3-VL-8B-Instruct`,
  conf/gpu-*.yaml): loaded with `local_files_only`; weights are never fetched (no network), so an id whose
  files are not in the local hub cache is a CheckpointError naming it. A pretrained tokenizer has no step
  lexemes: the step is its compact JSON in that tokenizer's tokens, and exact match is teacher-forced greedy
  decoding over the whole vocabulary (no grammar); in the loop, the controller constrains that text to the step
  grammar (clvr.learned.textgrammar).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from clvr.errors import CheckpointError
from clvr.io import atomic_write_text
from clvr.learned import train as T
from clvr.learned.decisions import decision_states
from clvr.learned.grammar import Lexicon
from clvr.learned.tokens import build_tokenizer, encode_state, step_lexemes
from clvr.loop.roles import LoopState
from clvr.trajectories import Trajectory, dataset_file, load_image
from clvr.registry import local_model_folder

VISION_START, VISION_END, IMAGE_PAD, VIDEO_PAD = "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"
VISION_TOKENS = (VISION_START, VISION_END, IMAGE_PAD, VIDEO_PAD)
BLANK = "images/blank.png"  # the empty canvas every trajectory of a data set starts from (clvr.trajectories)
MARKER = "clvr_vlm_controller.json"
KIND = "clvr.learned-vlm-controller"
VERSION = 1
# the tiny vision tower (patch 16, 2x2 merge: a 64x64 canvas is 16 patches, 4 image tokens)
TINY_VISION = dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=16, spatial_merge_size=2,
                   temporal_patch_size=2, num_position_embeddings=64, deepstack_visual_indexes=[0])
MIN_PIXELS, MAX_PIXELS = 32 * 32, 512 * 512  # the tiny image processor's resize bounds (Qwen2-VL smart_resize)


@dataclass
class VLMProcessor:
    """A tokenizer that knows the vision tokens and a Qwen2-VL image processor (what Qwen3-VL checkpoints ship)."""

    tokenizer: object
    image_processor: object

    def __post_init__(self):
        ids = self.tokenizer.convert_tokens_to_ids
        self.vision_start, self.vision_end, self.image_pad, self.video_pad = (ids(t) for t in VISION_TOKENS)
        unk = self.tokenizer.unk_token_id
        if unk is not None and unk in (self.vision_start, self.vision_end, self.image_pad):
            raise ValueError(f"the tokenizer lacks the vision tokens {VISION_TOKENS[:3]}")
        self.merge = int(self.image_processor.merge_size)
        self.lexemes = _knows_lexemes(self.tokenizer)  # the controller's own tokenizer (step lexemes) or a foreign one

    @property
    def pad(self) -> int:
        p = self.tokenizer.pad_token_id
        return p if p is not None else self.tokenizer.eos_token_id

    def pixels(self, images: list[np.ndarray]) -> dict[str, torch.Tensor]:
        """pixel_values (sum of patches, C*T*P*P) and image_grid_thw (images, 3) of uint8 HxWx3 canvases."""
        out = self.image_processor(images=[np.ascontiguousarray(im) for im in images], return_tensors="pt")
        return {"pixel_values": out["pixel_values"], "image_grid_thw": out["image_grid_thw"]}

    def image_tokens(self, image: np.ndarray) -> int:
        """The image's placeholder count: merged patches, as Qwen3VLProcessor expands <|image_pad|>."""
        return int(self.pixels([image])["image_grid_thw"][0].prod()) // self.merge**2

    def save(self, folder: Path) -> None:
        self.tokenizer.save_pretrained(folder)
        self.image_processor.save_pretrained(folder)


def _knows_lexemes(tokenizer) -> bool:
    try:
        Lexicon(tokenizer, 2)
        return True
    except ValueError:
        return False


def build_processor(grid: int) -> VLMProcessor:
    """The tiny VLM's processor, built offline: the controller's tokenizer plus the vision tokens, and a
    Qwen2VLImageProcessorPil (the pillow backend; the torchvision one is not installed) with Qwen3-VL's patching."""
    from transformers import Qwen2VLImageProcessorPil

    tok = build_tokenizer(grid)
    tok.add_special_tokens({"additional_special_tokens": list(VISION_TOKENS)})
    ip = Qwen2VLImageProcessorPil(patch_size=TINY_VISION["patch_size"], merge_size=TINY_VISION["spatial_merge_size"],
                                  temporal_patch_size=TINY_VISION["temporal_patch_size"],
                                  size={"shortest_edge": MIN_PIXELS, "longest_edge": MAX_PIXELS})
    return VLMProcessor(tok, ip)


def build_vlm(proc: VLMProcessor, layers: int = 2, hidden: int = 128, heads: int = 4, kv_heads: int = 2,
              intermediate: int = 384, max_positions: int = 1024, seed: int = 0):
    """A tiny Qwen3VLForConditionalGeneration from config: the text side of the causal LM's size, TINY_VISION."""
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    head_dim = hidden // heads
    half = head_dim // 2  # rotary pairs, split over (time, height, width) as Qwen3-VL's [24, 20, 20] of 64
    mrope = [half - 2 * (half // 3), half // 3, half // 3]
    text = dict(vocab_size=len(proc.tokenizer), hidden_size=hidden, intermediate_size=intermediate,
                num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim,
                max_position_embeddings=max_positions, pad_token_id=proc.pad,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": mrope,
                                 "mrope_interleaved": True})
    vision = dict(TINY_VISION, out_hidden_size=hidden)
    cfg = Qwen3VLConfig(text_config=text, vision_config=vision, image_token_id=proc.image_pad,
                        video_token_id=proc.video_pad, vision_start_token_id=proc.vision_start,
                        vision_end_token_id=proc.vision_end, tie_word_embeddings=True)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return Qwen3VLForConditionalGeneration(cfg)


def load_vlm(init: str | Path, grid: int | None = None, key: str = "controller_sft.init") -> tuple[object, VLMProcessor]:
    """(model, processor) of a VLM folder or a hub id present locally; CheckpointError naming `init` when absent,
    corrupt, not a vision-language checkpoint with the vision tokens, or (a folder `save_vlm` wrote) for another
    grid than `grid`."""
    from transformers import AutoImageProcessor, AutoModelForImageTextToText, AutoTokenizer

    folder = local_model_folder(str(init), key)
    if grid is not None and (folder / MARKER).is_file():
        try:
            marker = json.loads((folder / MARKER).read_text())
        except (OSError, ValueError) as e:
            raise CheckpointError(f"corrupt VLM controller '{init}': {MARKER}: {e}") from None
        if marker.get("grid") != grid:
            raise CheckpointError(f"VLM controller '{init}' was trained for grid {marker.get('grid')}; "
                                  f"this world is grid {grid}")
    try:
        model = AutoModelForImageTextToText.from_pretrained(folder, local_files_only=True)
        proc = VLMProcessor(AutoTokenizer.from_pretrained(folder, local_files_only=True),
                            AutoImageProcessor.from_pretrained(folder, local_files_only=True))
    except Exception as e:  # missing files, wrong shapes, another model type, no vision tokens
        raise CheckpointError(f"VLM controller '{init}' does not load: {str(e).splitlines()[0][:300]}") from None
    if model.get_input_embeddings().num_embeddings < len(proc.tokenizer):
        raise CheckpointError(f"VLM controller '{init}': its embedding has {model.get_input_embeddings().num_embeddings}"
                              f" rows, its tokenizer {len(proc.tokenizer)} tokens")
    return model, proc


def save_vlm(model, proc: VLMProcessor, folder: Path, grid: int, extra: dict | None = None) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    proc.save(folder)
    marker = {"kind": KIND, "version": VERSION, "grid": grid, "lexemes": proc.lexemes, **(extra or {})}
    atomic_write_text(folder / MARKER, json.dumps(marker, indent=1))
    return folder


# ---- examples ------------------------------------------------------------------------------------------------


def prompt_ids(proc: VLMProcessor, text: str, n_image: int) -> tuple[list[int], list[int]]:
    """(prefix, rest) of one decision's prompt (module docstring): the prefix is [BOS] and the state text's first
    field (the user's prompt, constant over a trajectory: the controller caches its KV), the rest the image's
    `n_image` placeholders in their vision tokens, then the other fields."""
    tok = proc.tokenizer
    head, _, tail = text.partition(" | ")
    vision = [proc.vision_start, *[proc.image_pad] * n_image, proc.vision_end]
    if proc.lexemes:  # [BOS] + word ids; words are whole tokens, so the split changes no token; unknown -> error
        return encode_state(tok, head + " |"), [*vision, *encode_state(tok, tail)[1:]]
    bos = [tok.bos_token_id] if tok.bos_token_id is not None else []
    words = lambda t: tok(" " + t, add_special_tokens=False)["input_ids"]  # noqa: E731
    return [*bos, *words(head + " |")], [*vision, *words(tail)]


def target_ids(proc: VLMProcessor, step: dict) -> list[int]:
    """The step's tokens and [EOS]: its lexemes, or (a pretrained tokenizer) its compact JSON's tokens."""
    tok = proc.tokenizer
    if proc.lexemes:
        return [*tok.convert_tokens_to_ids(step_lexemes(step)), tok.eos_token_id]
    return [*tok(json.dumps(step, separators=(",", ":")), add_special_tokens=False)["input_ids"], tok.eos_token_id]


def encode_ids(proc: VLMProcessor, text: str, step: dict, n_image: int) -> tuple[list[int], list[int]]:
    """(input_ids, labels) of one example whose image is `n_image` placeholder tokens (module docstring)."""
    prefix, rest = prompt_ids(proc, text, n_image)
    prompt, target = prefix + rest, target_ids(proc, step)
    return prompt + target, [-100] * len(prompt) + target


@dataclass(frozen=True)
class VLMExample:
    ids: tuple[int, ...]
    labels: tuple[int, ...]
    canvas: np.ndarray


def encode_example(proc: VLMProcessor, text: str, image: np.ndarray, step: dict) -> dict[str, torch.Tensor]:
    """Model inputs of one (state text, canvas uint8 HxWx3, step): a batch of one (`collate`)."""
    ids, labels = encode_ids(proc, text, step, proc.image_tokens(image))
    return collate(proc, [VLMExample(tuple(ids), tuple(labels), image)])


def collate(proc: VLMProcessor, rows) -> dict[str, torch.Tensor]:
    """Rows with `.ids`, `.labels`, `.canvas` -> input_ids, attention_mask, labels (right-padded, as the causal
    LM's), mm_token_type_ids (1 on image tokens), pixel_values and image_grid_thw of the canvases in row order."""
    b = T.collate(rows, proc.pad)
    b["mm_token_type_ids"] = (b["input_ids"] == proc.image_pad).long() * b["attention_mask"]
    b.update(proc.pixels([r.canvas for r in rows]))
    return b


def canvas_states(traj: Trajectory, grid: int, root: Path) -> list[LoopState]:
    """`decision_states` with each state's canvas: the step's input image; a stop or rejected output (no input)
    sees the last call's kept output (or its input, when nothing was kept); before any call, the blank canvas."""
    states = decision_states(traj, grid)
    cache: dict[str, np.ndarray] = {}
    current, out = BLANK, []
    for st, s in zip(states, traj.steps):
        current = s.input or current
        if current not in cache:
            cache[current] = load_image(root, current)
        out.append(replace(st, canvas=cache[current]))
        if s.kept and s.output:
            current = s.output
    return out


# ---- the trainer ---------------------------------------------------------------------------------------------


class VLMTrainer(T.ControllerTrainer):
    """ControllerTrainer with a VLM: the hooks marked "[vlm hook]" in clvr.learned.train, nothing else."""

    def make_tokenizer(self):
        s = self.s
        if s.init:
            self._init_model, self.proc = load_vlm(s.init, self.grid)
        else:
            self._init_model, self.proc = None, build_processor(self.grid)
        return self.proc.tokenizer

    def make_lexicon(self) -> Lexicon | None:
        if not self.proc.lexemes:
            return None
        try:
            return Lexicon(self.tokenizer, self.grid)
        except ValueError as e:
            raise CheckpointError(f"controller_sft.init '{self.s.init}': {e}") from None

    def load_data(self, log):
        root = dataset_file(self.s.data).parent
        text_tok = build_tokenizer(self.grid)  # label_examples' own encoding; re-encoded with the image below
        train, evals, stats, tiers = T.load_data(self.cfg, self.teacher, text_tok, log,
                                                 states=lambda t, grid: canvas_states(t, grid, root))
        n_image: dict[tuple[int, ...], int] = {}

        def encode(d: T.Decision) -> T.Decision:
            shape = d.canvas.shape
            if shape not in n_image:
                n_image[shape] = self.proc.image_tokens(d.canvas)
            ids, labels = encode_ids(self.proc, d.text, json.loads(d.step), n_image[shape])
            return replace(d, ids=tuple(ids), labels=tuple(labels))

        return [encode(d) for d in train], [encode(d) for d in evals], stats, tiers

    def batch(self, rows: list[T.Decision]) -> dict[str, torch.Tensor]:
        return collate(self.proc, rows)

    def measure(self, model, examples: list[T.Decision]) -> dict[str, float]:
        if self.lex is not None:
            return T.exact_match(model, self.lex, examples, self.pad, collate_fn=self.batch)
        return free_match(model, examples, self.batch)

    def reload(self, folder: Path):
        return load_vlm(folder, self.grid)[0]

    def build(self):
        s = self.s
        if self._init_model is not None:
            model, self._init_model = self._init_model, None
            return model
        return build_vlm(self.proc, s.layers, s.hidden, s.heads, s.kv_heads, s.intermediate, T.MAX_POSITIONS, s.seed)

    def save_model(self, d: Path) -> None:
        save_vlm(self.plain(), self.proc, d, self.grid, {"mode": self.s.mode, "init": self.s.init})
        if self.peft is not None:
            self.peft.save_pretrained(Path(d) / T.ADAPTER)


@torch.inference_mode()
def free_match(model, examples: list[T.Decision], batch_fn) -> dict[str, float]:
    """Exact match without a grammar (a pretrained tokenizer): teacher-forced arg-max over the whole vocabulary
    equals the label at every label position; overall and per budget."""
    if not examples:
        return {}
    was = model.training
    model.eval()
    hits: dict[int, list[bool]] = {}
    for i in range(0, len(examples), T.EVAL_BATCH):
        rows = examples[i: i + T.EVAL_BATCH]
        b = batch_fn(rows)
        pred = model(**{k: v for k, v in b.items() if k != "labels"}).logits.argmax(-1)  # (B, L)
        lab = b["labels"][:, 1:]
        ok = ((pred[:, :-1] == lab) | (lab == -100)).all(dim=1)
        for d, h in zip(rows, ok.tolist()):
            hits.setdefault(d.budget, []).append(bool(h))
    model.train(was)
    flat = [h for v in hits.values() for h in v]
    return {"exact_match": float(np.mean(flat)), **{f"exact_match_b{k}": float(np.mean(v)) for k, v in sorted(hits.items())}}
