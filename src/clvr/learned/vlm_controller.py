"""The learned controller at real scale: a Qwen3-VL that looks at the canvas image and reads the state text, then
writes the next step under constrained decoding (registry key "learned" with `loop.controller_model` a VLM folder).
The weights run here, in-process; the VLM behind an OpenAI-compatible endpoint is clvr.loop.vlm_controller ("openai").

Planning stays symbolic, as for the other model controllers (`clvr.loop.controller.ModelController`); each loop
decision is the VLM's. Its prompt is the training layout (`clvr.learned.vlm.prompt_ids`): `[BOS] prompt <words> |`,
then the canvas (`LoopState.canvas`, uint8 HxWx3) as vision tokens, then the other state fields
(`clvr.learned.state.state_text`). Decoding is greedy with the KV cache, each token restricted to what keeps the
output a step that parses and fits the scene:
* the controller's own tokenizer (a folder `save_vlm` wrote from `controller_sft`): `StepParse` over the step
  lexemes, exactly as `clvr.learned.controller.LearnedController`;
* a pretrained tokenizer (byte-level BPE, no step lexemes): the same grammar over text
  (`clvr.learned.textgrammar`: a trie over the vocabulary's token strings walked along the lexeme strings).
Truncation is the causal LM controller's: a generation that hits `max_new_tokens` unfinished is a record that is
not a step (`{"op": null, "truncated": ...}`), which the loop rejects and counts; the trajectory then ends.

Prefix caching: the prefix (`[BOS]` and the prompt field) does not change over a trajectory, so its KV cache is
computed once per prompt and kept (`PrefixCache`, the `prefix_cache_size` most recent prompts); a decision
prefills only the image and the rest of the state onto it, decodes, then crops the cache back to the prefix.
Positions are Qwen3-VL's multimodal RoPE, computed once per decision over the whole prompt
(`model.model.get_rope_index`, as the model's own forward does) and passed explicitly, so the cached prefix and
a full prefill give the same logits (tests/test_learned_vlm_controller.py checks both, and the tokens).

`build_random_vlm_controller(size, grid)`: random weights of the real class at "tiny" (tests) or Qwen3-VL-8B-
Instruct's shape ("8b", for the GPU benchmark), over the lexeme tokenizer.
"""

from __future__ import annotations

import json
import time
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch

from clvr.errors import CheckpointError
from clvr.learned.controller import TRUNCATED, DecodeStats
from clvr.learned.grammar import Lexicon, StepParse, best_allowed
from clvr.learned.state import state_text
from clvr.learned.vlm import VLMProcessor, build_processor, build_vlm, load_vlm, prompt_ids
from clvr.loop.controller import ModelController
from clvr.loop.roles import LoopState

# Qwen3-VL-8B-Instruct's architecture (its config.json): the text side and the vision tower
QWEN3_VL_8B_TEXT = dict(vocab_size=151936, hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
                        num_attention_heads=32, num_key_value_heads=8, head_dim=128, max_position_embeddings=262144,
                        rms_norm_eps=1e-6, hidden_act="silu",
                        rope_parameters={"rope_type": "default", "rope_theta": 5000000.0, "mrope_section": [24, 20, 20],
                                         "mrope_interleaved": True})
QWEN3_VL_8B_VISION = dict(depth=27, hidden_size=1152, intermediate_size=4304, num_heads=16, patch_size=16,
                          spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=2304,
                          out_hidden_size=4096, deepstack_visual_indexes=[8, 16, 24], hidden_act="gelu_pytorch_tanh")
# its image processor's resize bounds (pixels) and normalisation
QWEN3_VL_PIXELS = dict(shortest_edge=64 * 32 * 32, longest_edge=16384 * 32 * 32)
LEXEME_MAX_NEW, TEXT_MAX_NEW = 160, 1024  # default token limits: lexemes (<= 2 per op), BPE text (~20 per op)


class PrefixCache:
    """KV caches of prompt prefixes, most recently used last; each is cropped back to its prefix after use."""

    def __init__(self, size: int):
        self.size = size
        self.entries: OrderedDict[tuple[int, ...], object] = OrderedDict()
        self.hits = self.misses = 0

    def get(self, key: tuple[int, ...]):
        cache = self.entries.get(key)
        if cache is not None:
            self.entries.move_to_end(key)
            self.hits += 1
        else:
            self.misses += 1
        return cache

    def put(self, key: tuple[int, ...], cache) -> None:
        self.entries[key] = cache
        while len(self.entries) > self.size:
            self.entries.popitem(last=False)


class VLMController(ModelController):
    """The VLM as a loop controller (module docstring). `model` a Qwen3VLForConditionalGeneration in eval mode,
    `proc` its tokenizer + image processor; `prefix_cache_size` 0 prefills the whole prompt every decision."""

    name = "learned"

    def __init__(self, model, proc: VLMProcessor, grid: int = 4, retries_per_step: int = 2,
                 max_prompt_chars: int = 500, max_new_tokens: int | None = None, prefix_cache_size: int = 64,
                 cell: int = 16, path: str = ""):
        super().__init__(grid, retries_per_step, max_prompt_chars)
        self.model, self.proc, self.grid, self.cell, self.path = model.eval(), proc, grid, cell, path
        if proc.lexemes:
            try:
                lex = Lexicon(proc.tokenizer, grid)
            except ValueError as e:
                raise CheckpointError(f"VLM controller '{path}': {e}") from None
            self.start = lambda scene: StepParse(lex, scene)
        else:
            from clvr.learned.textgrammar import TextGrammar

            try:
                grammar = TextGrammar(proc.tokenizer, grid)
            except ValueError as e:
                raise CheckpointError(f"VLM controller '{path}': {e}") from None
            self.start = grammar.start
        self.max_new_tokens = max_new_tokens or (LEXEME_MAX_NEW if proc.lexemes else TEXT_MAX_NEW)
        self.cache = PrefixCache(prefix_cache_size) if prefix_cache_size > 0 else None
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        self.stats = DecodeStats()

    # ---- one decision --------------------------------------------------------------------------------------

    def canvas(self, state: LoopState) -> np.ndarray:
        """What the controller looks at: the state's canvas (a state built without one shows the blank canvas)."""
        if state.canvas is not None:
            return state.canvas
        from clvr.world.render import blank

        return blank(self.grid, self.cell)

    def inputs(self, state: LoopState) -> tuple[list[int], list[int], dict[str, torch.Tensor]]:
        """(prefix ids, rest ids, the image's pixel_values and image_grid_thw) of one decision."""
        pix = self.proc.pixels([self.canvas(state)])
        n_image = int(pix["image_grid_thw"][0].prod()) // self.proc.merge**2
        prefix, rest = prompt_ids(self.proc, state_text(state), n_image)
        return prefix, rest, pix

    def positions(self, ids: list[int], grid_thw: torch.Tensor) -> tuple[torch.Tensor, int]:
        """(position_ids (4, 1, L): the text positions, then Qwen3-VL's 3-D (time, height, width) ones; the offset
        of a later text token's 3-D position from its index)."""
        t = torch.tensor([ids], device=self.device)
        mm = (t == self.proc.image_pad).int()
        pos3, delta = self.model.model.get_rope_index(t, mm, image_grid_thw=grid_thw.to(self.device))
        text = torch.arange(len(ids), device=self.device).view(1, 1, -1)
        return torch.cat([text, pos3], dim=0), int(delta.item())

    def forward(self, ids: list[int], pos: torch.Tensor, cache, **pix):
        out = self.model(input_ids=torch.tensor([ids], device=self.device), position_ids=pos, cache=cache,
                         use_cache=True, logits_to_keep=1, **pix)
        return out.cache, out.logits[0, -1]

    def prefill(self, prefix: list[int], rest: list[int], pix: dict[str, torch.Tensor]):
        """(KV cache of the whole prompt, last logits, 3-D position offset): the prefix from the cache when it is
        there, else computed (and kept)."""
        ids = prefix + rest
        pos, delta = self.positions(ids, pix["image_grid_thw"])
        pix = {"pixel_values": pix["pixel_values"].to(self.device, self.dtype),
               "image_grid_thw": pix["image_grid_thw"].to(self.device)}
        if self.cache is None:
            cache, logits = self.forward(ids, pos, None, **pix)
            return cache, logits, delta
        n = len(prefix)
        cache = self.cache.get(tuple(prefix))
        if cache is None:
            cache, _ = self.forward(prefix, pos[:, :, :n], None)
            self.cache.put(tuple(prefix), cache)
        cache.crop(n - cache.get_seq_length())  # (a no-op after `decode`, which crops when it is done)
        cache, logits = self.forward(rest, pos[:, :, n:], cache, **pix)
        return cache, logits, delta

    @torch.inference_mode()
    def decode(self, state: LoopState) -> tuple[list[int], object, bool]:
        """(output token ids, the parse, complete) for one state: greedy, constrained, with the KV cache."""
        prefix, rest, pix = self.inputs(state)
        parse = self.start(state.scene)
        cache, logits, delta = self.prefill(prefix, rest, pix)
        length, new = len(prefix) + len(rest), []
        try:
            while len(new) < self.max_new_tokens:
                tok = best_allowed(logits, parse.allowed())
                parse.feed(tok)
                new.append(tok)
                if parse.done:
                    return new, parse, True
                p = torch.tensor([length], device=self.device)
                pos = torch.stack([p, p + delta, p + delta, p + delta]).view(4, 1, 1)
                cache, logits = self.forward([tok], pos, cache)
                length += 1
            return new, parse, False
        finally:
            if self.cache is not None:  # back to the prefix: the next decision of this prompt reuses it
                cache.crop(len(prefix) - cache.get_seq_length())

    def propose(self, state: LoopState) -> tuple[dict, bool]:
        t = time.perf_counter()
        ids, parse, complete = self.decode(state)
        self.stats.decisions += 1
        self.stats.seconds.append(time.perf_counter() - t)
        self.stats.tokens.append(len(ids))
        text = parse.text if hasattr(parse, "text") else self.proc.tokenizer.decode(ids, skip_special_tokens=True)
        if not complete:
            self.stats.truncated += 1
            return {"op": None, TRUNCATED: f"cut off at {len(ids)} tokens: {text[:300]}"}, True
        return json.loads(text), False


def load_vlm_controller(model: str | Path, grid: int = 4, retries_per_step: int = 2, max_prompt_chars: int = 500,
                        max_new_tokens: int | None = None) -> VLMController:
    """The VLM controller of a folder (`save_vlm`'s, or a pretrained Qwen3-VL's) or a hub id present locally;
    CheckpointError naming it when it is missing, corrupt, for another grid, or its tokenizer cannot spell a step."""
    from transformers.utils import logging as tlog

    tlog.disable_progress_bar()
    vlm, proc = load_vlm(model, grid, key="loop.controller_model")
    return VLMController(vlm, proc, grid, retries_per_step, max_prompt_chars, max_new_tokens, path=str(model))


def build_random_vlm_controller(size: str = "tiny", grid: int = 4, seed: int = 0, device: str | None = None,
                                dtype: torch.dtype | None = None, **kw) -> VLMController:
    """A VLM controller with random weights over the lexeme tokenizer: "tiny" (`build_vlm`'s 1-layer test size) or
    "8b" (Qwen3-VL-8B-Instruct's text and vision shapes and image processor; build it on a GPU, e.g.
    device="cuda", dtype=torch.bfloat16). `kw` goes to VLMController (e.g. prefix_cache_size)."""
    if size == "tiny":
        proc = build_processor(grid)
        model = build_vlm(proc, layers=1, hidden=32, heads=2, kv_heads=1, intermediate=64, seed=seed)
        return VLMController(model.to(device or "cpu", dtype or torch.float32), proc, grid, **kw)
    if size != "8b":
        raise ValueError(f"unknown VLM controller size {size!r} (tiny | 8b)")
    from transformers import Qwen2VLImageProcessorPil, Qwen3VLConfig, Qwen3VLForConditionalGeneration

    tiny = build_processor(grid)
    ip = Qwen2VLImageProcessorPil(patch_size=16, merge_size=2, temporal_patch_size=2, size=dict(QWEN3_VL_PIXELS),
                                  image_mean=[0.5] * 3, image_std=[0.5] * 3)
    proc = VLMProcessor(tiny.tokenizer, ip)
    text = dict(QWEN3_VL_8B_TEXT, pad_token_id=proc.pad)  # 151,936 rows as the real one; ids past the tokenizer unused
    cfg = Qwen3VLConfig(text_config=text, vision_config=QWEN3_VL_8B_VISION, image_token_id=proc.image_pad,
                        video_token_id=proc.video_pad, vision_start_token_id=proc.vision_start,
                        vision_end_token_id=proc.vision_end, tie_word_embeddings=False)
    with torch.random.fork_rng(devices=[]), torch.device(device or "cpu"):
        torch.manual_seed(seed)
        model = Qwen3VLForConditionalGeneration._from_config(cfg, dtype=dtype or torch.bfloat16)
    return VLMController(model, proc, grid, **kw)
