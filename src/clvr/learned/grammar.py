"""Constrained decoding: which output lexeme may come next, so that every finished output is a step that runs.

The grammar is the step schema over the output lexemes (`clvr.learned.tokens`): a step is `stop`, one edit op
(a head `{"op":…,"shape":…,"color":…,"cell":`, the cell, then `,"new_color":…` for a recolor or `,"to":[r,c]`
for a move; its last lexeme ends with `}`), or `{"op":"edit","ops":[` and ops whose last lexemes end with `},`
(another follows) or `}]}` (the last). On top of the syntax it applies what
`Step.from_dict` and the loop's `transition_error` check, read from the scene the controller sees:
* a remove / recolor / move names an object that is there (its shape, colour and cell), an add a free cell;
* no two ops of one step act on one cell; adds and move destinations take distinct free cells;
* a recolor changes the colour.
So a finished output always parses and always fits the state; a generation cut off by the token limit is the
only output that can fail (the controller reports it as a reject).

`StepParse` is the incremental parser (feed one lexeme, ask what may follow); `StepLogitsProcessor` is the same
thing as a transformers `LogitsProcessor` for `model.generate`.
"""

from __future__ import annotations

import copy

import torch
from transformers import LogitsProcessor, PreTrainedTokenizerFast

from clvr.learned import tokens as T
from clvr.world.scene import Cell, Scene
from clvr.world.vocab import COLORS, EDIT_OPS, SHAPES


class Lexicon:
    """Lexeme ids of one tokenizer, by role: heads (op, shape, colour); cells, new colours and destinations, each
    with how it ends (`clvr.learned.tokens.ENDS`, or OPEN for a recolor's or move's first cell)."""

    def __init__(self, tokenizer: PreTrainedTokenizerFast, grid: int):
        ids = tokenizer.convert_tokens_to_ids
        cells = [(r, c) for r in range(grid) for c in range(grid)]
        self.stop, self.edit_open, self.eos = ids(T.STOP), ids(T.EDIT_OPEN), tokenizer.eos_token_id
        self.heads = {ids(T.head(op, s, c)): (op, s, c) for op in EDIT_OPS for s in SHAPES for c in COLORS}
        self.cell = {(cell, e): ids(T.cell_lexeme(*cell, e)) for e in (T.OPEN, *T.ENDS) for cell in cells}
        self.new_color = {(c, e): ids(T.new_color_lexeme(c, e)) for e in T.ENDS for c in COLORS}
        self.to = {(cell, e): ids(T.to_lexeme(*cell, e)) for e in T.ENDS for cell in cells}
        # id -> (kind, value, end) for everything after a head
        self.tail = {i: ("cell", cell, e) for (cell, e), i in self.cell.items()}
        self.tail |= {i: ("new_color", c, e) for (c, e), i in self.new_color.items()}
        self.tail |= {i: ("to", cell, e) for (cell, e), i in self.to.items()}
        if tokenizer.unk_token_id in (self.stop, *self.heads, *self.tail):
            raise ValueError(f"the tokenizer lacks the output lexemes of a {grid}x{grid} grid")


class StepParse:
    """One output being decoded against one scene: `allowed()` lists the lexeme ids that may come next,
    `feed(id)` takes one; `done` once the step is complete (then only [EOS] is allowed)."""

    def __init__(self, lex: Lexicon, scene: Scene):
        self.lex = lex
        self.free = set(scene.free_cells())
        self.used: set[Cell] = set()  # cells this step's ops act on (sources and destinations)
        self.where: dict[tuple[str, str], list[Cell]] = {}
        for o in scene.objects:
            self.where.setdefault((o.shape, o.color), []).append(o.cell)
        self.cells = self.free | {o.cell for o in scene.objects}
        self.phase = "start"  # start | op | cell | new_color | to
        self.in_edit, self.op, self.done = False, None, False
        self._allowed: list[int] | None = None  # what may follow now (computed once per position)

    def copy(self) -> "StepParse":
        """An independent parse at the same position (the text-level decoder branches on it)."""
        other = copy.copy(self)
        other.used = set(self.used)
        return other

    def allowed(self) -> list[int]:
        if self._allowed is None:
            self._allowed = self._next_lexemes()
        return self._allowed

    def _next_lexemes(self) -> list[int]:
        lex = self.lex
        if self.done:
            return [lex.eos]
        if self.phase in ("start", "op"):
            heads = self._heads()
            return [lex.stop, *([lex.edit_open] if heads else []), *heads] if self.phase == "start" else heads
        kind = self.op[0]
        if self.phase == "cell":
            if kind in ("recolor", "move"):
                return [lex.cell[c, T.OPEN] for c in self._cells(self.op, self.used)]
            return [lex.cell[c, e] for c in self._cells(self.op, self.used) for e in self._ends({c})]
        if self.phase == "new_color":
            return [lex.new_color[c, e] for c in COLORS if c != self.op[2] for e in self._ends(set())]
        return [lex.to[c, e] for c in sorted(self.free - self.used) for e in self._ends({c})]  # "to"

    def _heads(self) -> list[int]:
        """Heads with at least one cell to act on: an add needs a free cell, a move an object and a free cell,
        a remove or recolor an object of its shape and colour on a cell no op of this step uses yet."""
        free = bool(self.free - self.used)
        there = {k for k, cells in self.where.items() if any(c not in self.used for c in cells)}
        return [i for i, (op, shape, color) in self.lex.heads.items()
                if (free if op == "add" else (shape, color) in there and (free or op != "move"))]

    def _cells(self, head: tuple[str, str, str], used: set[Cell]) -> list[Cell]:
        """Cells an op of this head may act on, given the cells already used."""
        op, shape, color = head
        free_left = sorted(self.free - used)
        if op == "add":
            return free_left
        if op == "move" and not free_left:
            return []
        return [c for c in self.where.get((shape, color), ()) if c not in used]

    def _ends(self, more: set[Cell]) -> list[str]:
        """How the current op may end once it also uses `more` cells: a bare step ends with "}"; an edit's op with
        "}]}", or with "}," if some op still fits after it."""
        if not self.in_edit:
            return [T.END]
        fits = bool(self.cells - self.used - more)  # a free cell takes an add, an object's cell a remove
        return [T.END_EDIT, *([T.NEXT] if fits else [])]

    def feed(self, tok: int) -> None:
        if tok not in self.allowed():
            raise ValueError(f"lexeme {tok} is not allowed in phase {self.phase!r}")
        self._allowed = None
        lex = self.lex
        if self.done:
            return
        if tok == lex.stop:
            self.done = True
        elif tok == lex.edit_open:
            self.phase, self.in_edit = "op", True
        elif tok in lex.heads:
            self.op, self.phase = lex.heads[tok], "cell"
        else:
            kind, value, end = lex.tail[tok]
            if kind in ("cell", "to"):
                self.used.add(value)
            if end == T.OPEN:
                self.phase = "new_color" if self.op[0] == "recolor" else "to"
            elif end == T.NEXT:
                self.phase = "op"
            else:
                self.done = True


def best_allowed(logits: torch.Tensor, allowed: list[int]) -> int:
    """Greedy constrained decoding's choice: the allowed token with the highest logit (`logits` (V,) of one
    position; a single allowed token needs no lookup)."""
    if len(allowed) == 1:
        return allowed[0]
    return allowed[int(torch.argmax(logits[torch.tensor(allowed, device=logits.device)]))]


class StepLogitsProcessor(LogitsProcessor):
    """`StepParse` as a transformers logits processor: every disallowed lexeme gets -inf. Rows of a batch may
    have their own scenes; `prompt_len` is where generation starts in `input_ids` (the same for every row,
    i.e. left-padded prompts)."""

    def __init__(self, lex: Lexicon, scenes: list[Scene], prompt_len: int):
        self.parses = [StepParse(lex, s) for s in scenes]
        self.fed = [0] * len(scenes)
        self.prompt_len = prompt_len

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        out = torch.full_like(scores, float("-inf"))
        for b, parse in enumerate(self.parses):
            new = input_ids[b, self.prompt_len + self.fed[b]:].tolist()
            for tok in new:
                parse.feed(tok)
            self.fed[b] += len(new)
            ok = parse.allowed()
            out[b, ok] = scores[b, ok]
        return out
