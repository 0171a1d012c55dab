"""Constrained decoding over text: the step grammar (`clvr.learned.grammar.StepParse`) for a tokenizer that has no
step lexemes, e.g. a pretrained Qwen3-VL's byte-level BPE.

A token is allowed iff its string keeps the output a prefix of a step that `StepParse` accepts, i.e. of a
concatenation of the lexeme strings it allows (`clvr.learned.tokens`: a step's compact JSON is exactly that).
A BPE token may end inside a lexeme or run across lexeme boundaries (e.g. `]},{"`), so the decoder state is
a set of hypotheses (a `StepParse` and the characters of the current lexeme read so far, with the allowed
lexemes that start with them). In practice the set has one element: no lexeme allowed at one point is a proper
prefix of another (a recolor's open cell `[0,1]` is allowed exactly where the closed ones are not).

Speed: the vocabulary (~150k tokens at real scale) is put once into a character trie (`TokenTrie`), keeping only
tokens whose characters all occur in some lexeme (the others can never be allowed). At each position
`TextStepParse.allowed` walks the trie and the grammar together, following only characters some hypothesis
allows, so the work is the number of vocabulary tokens that are prefixes of a valid continuation (hundreds),
not the vocabulary size.

Token strings: for a byte-level decoder (GPT-2 / Qwen) the exact bytes of each token (a token that is not
whole UTF-8 is never allowed; the step JSON is ASCII); for other decoders, tokens whose decoded text equals
their raw string (no space marks, no byte fallback). Either way the output text is the concatenation of the
chosen tokens' strings, which is what `text` returns and the controller parses.
"""

from __future__ import annotations

from dataclasses import dataclass

from clvr.learned.grammar import Lexicon, StepParse
from clvr.learned.tokens import build_tokenizer
from clvr.world.scene import Scene


class Node:
    __slots__ = ("kids", "ids")

    def __init__(self):
        self.kids: dict[str, Node] = {}
        self.ids: list[int] = []  # tokens whose string ends here


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte-level alphabet: byte -> the printable character a byte-level BPE token spells it with."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("\u00a1"), ord("\u00ac") + 1), *range(ord("\u00ae"), 256)]
    extra = [b for b in range(256) if b not in keep]
    return {**{b: chr(b) for b in keep}, **{b: chr(256 + n) for n, b in enumerate(extra)}}


def token_strings(tokenizer) -> list[str | None]:
    """Each token id's exact text (None: special, or not representable as text on its own)."""
    from tokenizers import decoders

    n = len(tokenizer)
    raw = tokenizer.convert_ids_to_tokens(list(range(n)))
    special = set(tokenizer.all_special_ids) | {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
    out: list[str | None] = [None] * n
    if isinstance(tokenizer.backend_tokenizer.decoder, decoders.ByteLevel):
        byte_of = {u: b for b, u in bytes_to_unicode().items()}
        for i, t in enumerate(raw):
            if i in special or t is None or any(ch not in byte_of for ch in t):
                continue
            try:
                out[i] = bytes(byte_of[ch] for ch in t).decode("utf-8")
            except UnicodeDecodeError:
                continue
        return out
    decoded = tokenizer.backend_tokenizer.decode_batch([[i] for i in range(n)], skip_special_tokens=False)
    for i, (t, s) in enumerate(zip(raw, decoded)):
        if i not in special and t is not None and t == s:
            out[i] = s
    return out


class TokenTrie:
    """The vocabulary's token strings made of `alphabet`'s characters, as a character trie (built once)."""

    def __init__(self, strings: list[str | None], alphabet: set[str]):
        self.root = Node()
        self.strings = strings
        for i, s in enumerate(strings):
            if not s or not set(s) <= alphabet:
                continue
            node = self.root
            for ch in s:
                node = node.kids.get(ch) or node.kids.setdefault(ch, Node())
            node.ids.append(i)


@dataclass
class Hyp:
    """One reading of the output so far: the parse up to the last complete lexeme, and the allowed lexemes
    (string, lexeme id) that start with the `k` characters of the current one read since."""

    parse: StepParse
    k: int
    cands: list[tuple[str, int]]


class TextGrammar:
    """What one tokenizer needs for text-level constrained decoding of one grid's steps, built once: the lexeme
    grammar (over `clvr.learned.tokens`' lexemes, as symbols) and the trie of the tokenizer's vocabulary."""

    def __init__(self, tokenizer, grid: int):
        lt = build_tokenizer(grid)
        self.lex = Lexicon(lt, grid)
        ids = [self.lex.stop, self.lex.edit_open, *self.lex.heads, *self.lex.tail]
        self.lexeme = dict(zip(ids, lt.convert_ids_to_tokens(ids)))  # lexeme id -> its text (no space marks)
        alphabet = {ch for s in self.lexeme.values() for ch in s}
        self.trie = TokenTrie(token_strings(tokenizer), alphabet)
        singles = {s for s in self.trie.strings if s and len(s) == 1}
        if not alphabet <= singles:
            raise ValueError(f"the tokenizer cannot spell a step: no token for {sorted(alphabet - singles)}")
        self.eos = tokenizer.eos_token_id
        if self.eos is None:
            raise ValueError("the tokenizer has no end-of-sequence token")

    def start(self, scene: Scene) -> "TextStepParse":
        return TextStepParse(self, scene)


class TextStepParse:
    """One output being decoded against one scene, token by token: `allowed()` (token ids that may come next),
    `feed(id)`, `done` once the text is a complete step, `text` the output so far (`StepParse`'s interface)."""

    def __init__(self, g: TextGrammar, scene: Scene):
        self.g = g
        self.hyps = [self._boundary(StepParse(g.lex, scene))]
        self.parts: list[str] = []
        self._allowed: list[int] | None = None

    @property
    def text(self) -> str:
        return "".join(self.parts)

    @property
    def done(self) -> bool:
        return any(h.k == 0 and h.parse.done for h in self.hyps)

    def _boundary(self, parse: StepParse) -> Hyp:
        """The hypothesis at the start of a lexeme: every lexeme the parse allows (none once it is done)."""
        cands = [] if parse.done else [(self.g.lexeme[i], i) for i in parse.allowed()]
        return Hyp(parse, 0, cands)

    def _advance(self, h: Hyp, ch: str) -> list[Hyp]:
        """The hypotheses after reading one more character `ch`."""
        k = h.k
        longer = [(s, i) for s, i in h.cands if s[k] == ch]
        out = [Hyp(h.parse, k + 1, [(s, i) for s, i in longer if len(s) > k + 1])] if any(
            len(s) > k + 1 for s, _ in longer) else []
        for s, i in longer:
            if len(s) == k + 1:  # the lexeme is complete: feed it, the next one starts
                p = h.parse.copy()
                p.feed(i)
                out.append(self._boundary(p))
        return out

    def _advance_all(self, hyps: list[Hyp], ch: str) -> list[Hyp]:
        return [n for h in hyps for n in self._advance(h, ch)]

    def allowed(self) -> list[int]:
        if self._allowed is None:
            self._allowed = [self.g.eos] if self.done else self._walk()
        return self._allowed

    def _walk(self) -> list[int]:
        """Every token whose string keeps some hypothesis alive: the trie walked along the grammar."""
        out: list[int] = []
        stack = [(self.g.trie.root, self.hyps)]
        while stack:
            node, hyps = stack.pop()
            nexts = {s[h.k] for h in hyps for s, _ in h.cands}
            for ch in nexts:
                child = node.kids.get(ch)
                if child is None:
                    continue
                after = self._advance_all(hyps, ch)
                out.extend(child.ids)
                if child.kids:
                    stack.append((child, after))
        return sorted(out)

    def feed(self, tok: int) -> None:
        if tok not in self.allowed():
            raise ValueError(f"token {tok} is not allowed after {self.text!r}")
        self._allowed = None
        if tok == self.g.eos:
            return
        s = self.g.trie.strings[tok]
        for ch in s:
            self.hyps = self._advance_all(self.hyps, ch)
        self.parts.append(s)
