"""The learned controller's model: a small `Qwen3ForCausalLM` built from config over `clvr.learned.tokens`.

A controller folder is what `save_controller` writes and `load_controller` reads: the transformers model
(`config.json`, `model.safetensors`), the tokenizer files, and `clvr_controller.json` (what it is, for which
grid, and a digest of the vocabulary, so a folder built for another vocabulary is refused by name rather than
decoding nonsense).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerFast, Qwen3Config, Qwen3ForCausalLM

from clvr.errors import CheckpointError
from clvr.io import atomic_write_text
from clvr.learned.tokens import build_tokenizer, vocabulary

MARKER = "clvr_controller.json"
KIND = "clvr.learned-controller"
VERSION = 1


def build_model(vocab_size: int, layers: int = 2, hidden: int = 128, heads: int = 4, kv_heads: int = 2,
                intermediate: int = 384, max_positions: int = 1024, seed: int = 0) -> Qwen3ForCausalLM:
    cfg = Qwen3Config(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=intermediate,
                      num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                      head_dim=hidden // heads, max_position_embeddings=max_positions, tie_word_embeddings=True,
                      rope_theta=10000.0, use_cache=True)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return Qwen3ForCausalLM(cfg)


def vocab_digest(grid: int) -> str:
    return hashlib.sha256("\n".join(vocabulary(grid)).encode()).hexdigest()[:16]


def save_controller(model: Qwen3ForCausalLM, tokenizer: PreTrainedTokenizerFast, folder: Path, grid: int,
                    extra: dict | None = None) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    marker = {"kind": KIND, "version": VERSION, "grid": grid, "vocab": vocab_digest(grid), **(extra or {})}
    atomic_write_text(folder / MARKER, json.dumps(marker, indent=1))
    return folder


def load_controller(path: str | Path, grid: int) -> tuple[Qwen3ForCausalLM, PreTrainedTokenizerFast]:
    """(model in eval mode, tokenizer) of a controller folder; CheckpointError naming the path when it is not
    one, is for another grid or vocabulary, or its weights do not load."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as tlog

    tlog.disable_progress_bar()  # a 1 MB model: no "Loading weights" bar in the CLI's output
    folder = Path(path)
    try:
        marker = json.loads((folder / MARKER).read_text())
    except FileNotFoundError:
        raise CheckpointError(f"no learned controller at '{folder}' (missing {MARKER}; train one with "
                              f"`clvr world controller-sft`)") from None
    except (OSError, ValueError) as e:
        raise CheckpointError(f"corrupt learned controller '{folder}': {MARKER}: {e}") from None
    if not isinstance(marker, dict) or marker.get("kind") != KIND:
        raise CheckpointError(f"'{folder}' is not a learned controller ({MARKER} kind {marker!r:.80})")
    if marker.get("grid") != grid or marker.get("vocab") != vocab_digest(grid):
        raise CheckpointError(f"learned controller '{folder}' was built for grid {marker.get('grid')} and vocabulary "
                              f"{marker.get('vocab')}; this world is grid {grid}, vocabulary {vocab_digest(grid)}")
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True)
    except Exception as e:  # truncated safetensors, wrong shapes, missing files
        raise CheckpointError(f"corrupt learned controller '{folder}': {str(e).splitlines()[0][:300]}") from None
    if model.get_input_embeddings().num_embeddings != len(vocabulary(grid)):
        raise CheckpointError(f"learned controller '{folder}': its embedding has "
                              f"{model.get_input_embeddings().num_embeddings} rows, the vocabulary "
                              f"{len(vocabulary(grid))}")
    return model.eval(), build_tokenizer(grid)
