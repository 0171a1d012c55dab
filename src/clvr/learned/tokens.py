"""The learned controller's vocabulary: state words in, JSON lexemes out, in one `PreTrainedTokenizerFast`.

Two kinds of token, chosen so that decoding is plain string concatenation (what transformers' `decode`, and
every library that streams or constrains text, assumes of a tokenizer):

* Input words (the state text, `clvr.learned.state`): the world's words (`clvr.world.vocab.words`), digits, and the
  state's own field words. They are Metaspace tokens ("▁red"): the tokenizer splits the text on spaces and
  marks each word's leading space, and its decoder turns the marks back into spaces.
* Output lexemes: whole JSON fragments of a step, with no space mark, e.g.
  `{"op":"add","shape":"circle","color":"red","cell":` `[0,1]},`. A step's text is exactly the concatenation
  of its lexemes (`decode` gives the compact JSON that `json.loads` reads).

Why fragments rather than one token per JSON character or word: an add or remove is 2 lexemes (a head naming
op, shape and colour; the cell with how the op ends), a recolor or move 3, so a 12-object layout decodes in 25
forward passes instead of ~300, which is what keeps a decision within milliseconds on one CPU core; and the fragments are exactly the step schema's choices
(`clvr.steps.OP_ARGS`, `clvr.world.vocab`), so the constrained decoder (`clvr.learned.grammar`) is a small
state machine over them. The controller only emits the loop's edit ops and stop: `generate` (free text) is the
single-step baseline's step, which the learned controller hands to the symbolic one.
"""

from __future__ import annotations

import json
import re

from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from clvr.world.vocab import COLORS, EDIT_OPS, GRID, SHAPES, words

PAD, UNK, BOS, EOS = "[PAD]", "[UNK]", "[BOS]", "[EOS]"
MARK = "\u2581"  # Metaspace's word mark
# the state text's own field words (clvr.learned.state)
FIELD_WORDS = ("prompt", "calls", "left", "unbounded", "judge", "canvas", "empty", "missing", "wrong", "crowded",
               "last", "ok", "failed", "kept", "of", "none", "tries", "|")

STOP = '{"op":"stop"}'
EDIT_OPEN = '{"op":"edit","ops":['
# how an op's last lexeme ends: "" (more of this op follows), "}" (a bare step ends), "}," (an op of an edit,
# another follows), "}]}" (the edit's last op)
OPEN, END, NEXT, END_EDIT = "", "}", "},", "}]}"
ENDS = (END, NEXT, END_EDIT)


def head(op: str, shape: str, color: str) -> str:
    return f'{{"op":"{op}","shape":"{shape}","color":"{color}","cell":'


def cell_lexeme(r: int, c: int, end: str = OPEN) -> str:
    return f"[{r},{c}]{end}"


def new_color_lexeme(color: str, end: str) -> str:
    return f',"new_color":"{color}"{end}'


def to_lexeme(r: int, c: int, end: str) -> str:
    return f',"to":[{r},{c}]{end}'


def output_lexemes(grid: int = GRID) -> list[str]:
    """Every output lexeme, in a fixed order."""
    cells = [(r, c) for r in range(grid) for c in range(grid)]
    return [STOP, EDIT_OPEN,
            *(head(op, s, c) for op in EDIT_OPS for s in SHAPES for c in COLORS),
            *(cell_lexeme(r, c, e) for e in (OPEN, *ENDS) for r, c in cells),
            *(new_color_lexeme(c, e) for e in ENDS for c in COLORS),
            *(to_lexeme(r, c, e) for e in ENDS for r, c in cells)]


def input_words() -> list[str]:
    seen = dict.fromkeys([*words(), *FIELD_WORDS])
    return list(seen)


def vocabulary(grid: int = GRID) -> list[str]:
    return [PAD, UNK, BOS, EOS, *(MARK + w for w in input_words()), *output_lexemes(grid)]


def build_tokenizer(grid: int = GRID, max_len: int = 1024) -> PreTrainedTokenizerFast:
    vocab = {t: i for i, t in enumerate(vocabulary(grid))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement=MARK, prepend_scheme="always", split=True)
    tok.decoder = decoders.Metaspace(replacement=MARK, prepend_scheme="always", split=True)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=PAD, unk_token=UNK, bos_token=BOS,
                                   eos_token=EOS, model_max_length=max_len, padding_side="right")


def split_words(text: str) -> str:
    """Text as the space-separated words the tokenizer reads: punctuation becomes its own word."""
    return " ".join(re.findall(r"\w+|[^\w\s]", text))


def step_lexemes(step: dict) -> list[str]:
    """A (valid, edit-op or stop) step as output lexemes; `"".join` of them is the step's compact JSON."""
    if step["op"] == "stop":
        return [STOP]
    if step["op"] == "edit":
        n = len(step["ops"])
        return [EDIT_OPEN, *(lx for i, op in enumerate(step["ops"]) for lx in _op_lexemes(op, END_EDIT if i == n - 1 else NEXT))]
    return _op_lexemes(step, END)


def _op_lexemes(op: dict, end: str) -> list[str]:
    """head, then the cell; a recolor adds its new colour, a move its destination; the last lexeme carries `end`."""
    if op["op"] not in EDIT_OPS:
        raise ValueError(f"the learned controller emits no {op['op']!r} step")
    first = head(op["op"], op["shape"], op["color"])
    if op["op"] == "recolor":
        return [first, cell_lexeme(*op["cell"]), new_color_lexeme(op["new_color"], end)]
    if op["op"] == "move":
        return [first, cell_lexeme(*op["cell"]), to_lexeme(*op["to"], end)]
    return [first, cell_lexeme(*op["cell"], end)]


def encode_state(tokenizer: PreTrainedTokenizerFast, text: str) -> list[int]:
    """[BOS] + the state text's word ids (an unknown word is an error: the state text is built from the vocab)."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if tokenizer.unk_token_id in ids:
        unknown = [w for w in text.split() if tokenizer.convert_tokens_to_ids(MARK + w) == tokenizer.unk_token_id]
        raise ValueError(f"state text has words outside the controller's vocabulary: {unknown[:5]}")
    return [tokenizer.bos_token_id, *ids]


def encode_example(tokenizer: PreTrainedTokenizerFast, state_text: str, step: dict) -> tuple[list[int], list[int]]:
    """(input_ids, labels) of one decision: the state, then the step's lexemes and [EOS]; labels are -100 on the
    state (the loss is on the step only)."""
    prompt = encode_state(tokenizer, state_text)
    target = [*tokenizer.convert_tokens_to_ids(step_lexemes(step)), tokenizer.eos_token_id]
    return prompt + target, [-100] * len(prompt) + target


def decode_step(tokenizer: PreTrainedTokenizerFast, ids: list[int]) -> dict:
    """Output ids (without [EOS]) -> the step dict (json.loads of the concatenated lexemes)."""
    return json.loads(tokenizer.decode(ids, skip_special_tokens=True))
