"""The "learned" controller backend: a small causal LM proposes every next step under constrained decoding.

The registry key also takes a VLM folder or hub id (`is_vlm`): then the controller is
`clvr.learned.vlm_controller.VLMController`, which reads the canvas image too and decodes the same way.

Planning stays symbolic, as for the openai VLM controller (both are `clvr.loop.controller.ModelController`s): the
world parser validates the prompt (unknown words -> the same ClvrError as the symbolic path) and the solver gives
the target layout the verifier checks against. Each decision is the LM's: it reads `state_text(state)` (the
prompt, the calls left, the detected canvas, the verifier's reports, the failed tries) and writes the step's
lexemes greedily, each one restricted by `StepParse` to what the schema and the state allow. The single-step
baseline's one `generate` step needs no LM and comes from the symbolic controller.

A generation that hits `max_new_tokens` before its step is complete is returned as a record that is not a
step (`{"op": null, "truncated": ...}`): the loop rejects and counts it, never runs it; the controller then
stops that trajectory (greedy decoding of the same state would be cut off again).

Decoding is a plain greedy loop over the model with its KV cache (prefill the state, then one forward per
lexeme); `model.generate` with `StepLogitsProcessor` gives the same tokens (tests/test_learned_controller.py)
but costs ~2x per token in its bookkeeping, and a decision must take milliseconds.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from clvr.learned.grammar import Lexicon, StepParse, best_allowed
from clvr.learned.model import MARKER, load_controller
from clvr.learned.state import state_text
from clvr.learned.tokens import decode_step, encode_state
from clvr.loop.controller import ModelController
from clvr.loop.roles import LoopState, register_controller

TRUNCATED = "truncated"


@dataclass
class DecodeStats:
    decisions: int = 0
    truncated: int = 0
    seconds: list[float] = field(default_factory=list)  # per decision (prefill + decode)
    tokens: list[int] = field(default_factory=list)  # output lexemes per decision


@torch.inference_mode()
def greedy_step(model, tokenizer, lex: Lexicon, state: LoopState, max_new_tokens: int) -> tuple[list[int], bool]:
    """(output lexeme ids, complete) for one state: greedy, each lexeme restricted to what `StepParse` allows."""
    parse = StepParse(lex, state.scene)
    ids = torch.tensor([encode_state(tokenizer, state_text(state))])
    out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
    cache, logits = out.cache, out.logits[0, -1]
    new: list[int] = []
    while len(new) < max_new_tokens:
        tok = best_allowed(logits, parse.allowed())
        parse.feed(tok)
        new.append(tok)
        if parse.done:
            return new, True
        out = model(input_ids=torch.tensor([[tok]]), cache=cache, use_cache=True)
        cache, logits = out.cache, out.logits[0, -1]
    return new, False


class LearnedController(ModelController):
    name = "learned"

    def __init__(self, model: str | Path, grid: int = 4, retries_per_step: int = 2, max_prompt_chars: int = 500,
                 max_new_tokens: int = 160):
        super().__init__(grid, retries_per_step, max_prompt_chars)
        self.path = str(model)
        self.model, self.tokenizer = load_controller(model, grid)
        self.lex = Lexicon(self.tokenizer, grid)
        self.max_new_tokens = max_new_tokens
        self.stats = DecodeStats()

    def propose(self, state: LoopState) -> tuple[dict, bool]:
        t = time.perf_counter()
        ids, complete = greedy_step(self.model, self.tokenizer, self.lex, state, self.max_new_tokens)
        self.stats.decisions += 1
        self.stats.seconds.append(time.perf_counter() - t)
        self.stats.tokens.append(len(ids))
        if not complete:
            self.stats.truncated += 1
            return {"op": None, TRUNCATED: f"cut off at {len(ids)} tokens: "
                                           + self.tokenizer.decode(ids, skip_special_tokens=True)[:300]}, True
        return decode_step(self.tokenizer, ids), False


def is_vlm(model: str) -> bool:
    """Whether `model` names a VLM controller (clvr.learned.vlm_controller) rather than a causal LM folder: a
    folder without the causal LM's marker that holds a model (`save_vlm`'s, or a pretrained Qwen3-VL's), or a
    hub id (owner/name, not a path)."""
    from clvr.learned.vlm import MARKER as VLM_MARKER

    from clvr.registry import is_hub_id

    p = Path(model)
    if p.is_dir():
        return not (p / MARKER).is_file() and any((p / f).is_file() for f in ("config.json", VLM_MARKER))
    return is_hub_id(model)


@register_controller("learned")
def learned_controller(model: str = "", grid: int = 4, retries_per_step: int = 2, max_prompt_chars: int = 500,
                       max_new_tokens: int | None = None, cfg=None):
    """Registry factory; `model` (default: config `loop.controller_model`) is the controller folder: the causal
    LM's (`LearnedController`) or a VLM's, or a VLM's hub id present locally (`clvr.learned.vlm_controller`)."""
    from clvr.errors import CheckpointError

    model = model or (cfg.loop.controller_model if cfg is not None else "")
    if not model:
        raise CheckpointError("the learned controller needs a controller folder (loop.controller_model)")
    if is_vlm(model):
        from clvr.learned.vlm_controller import load_vlm_controller

        return load_vlm_controller(model, grid, retries_per_step, max_prompt_chars, max_new_tokens)
    return LearnedController(model, grid, retries_per_step, max_prompt_chars, max_new_tokens or 160)
