"""Parser: a world prompt -> GenEval-format metadata (the constraints the judge checks).

Grammar (words from clvr.world.vocab; case-insensitive; a trailing '.' is allowed):

    prompt    := ["a photo of"] clause (("," | "and" | ", and") clause)*
    clause    := np [relation (ref | np)] | "no" [colour] shapes
    np        := count [colour] shape            count := a | an | one..sixteen | 1..16
    ref       := "the" [colour] shape            -- an earlier clause, by its (colour, shape)
    relation  := ["to" "the"] (left of | right of) | above | below

Meaning, in GenEval's metadata:
* every noun phrase is an include clause {class, count, color?}; "X rel the Y" gives X `position: [rel, i]`
  with i the earlier clause described by Y; "X rel Y" (a new object, GenEval's own position prompts) adds Y
  first, then X with `position: [rel, index of Y]`.
* counts are exact: for every class in the prompt an exclude clause {class, count: total + 1}, where the total
  is the sum of that class's include counts (GenEval's counting prompts do the same).
* "no [colour] shapes" is an exclude clause {class, count: 1, color?}.

Errors name the offending words and their character span: unknown word, a clause that is not grammatical,
a count that does not agree with its noun, a reference to nothing, a description repeated.
"""

from __future__ import annotations

import re
from functools import lru_cache

from clvr.errors import ClvrError
from clvr.world.vocab import COLORS, NUMBERS, PLURALS, PUNCTUATION, RELATIONS, SHAPES, words

SINGULAR = {p: s for s, p in PLURALS.items()}
COUNT_WORDS = {"a": 1, "an": 1, **{w: i for i, w in enumerate(NUMBERS)}}
_TOKEN = re.compile(r"[a-z0-9]+|[^\sa-z0-9]", re.IGNORECASE)  # spans index the prompt as typed


class ParseError(ClvrError):
    """A prompt outside the world's grammar; the message names the offending span."""


class Tok:
    __slots__ = ("text", "start", "end")

    def __init__(self, text: str, start: int, end: int):
        self.text, self.start, self.end = text, start, end


@lru_cache(maxsize=1)
def _known() -> frozenset[str]:
    return frozenset(words())


def _word_span(prompt: str, t: Tok) -> tuple[int, int]:
    """The span of the whole word around token `t` ("círcle", not its first letter "c"); a word ends at a space or
    at punctuation the world knows."""
    stop = lambda ch: ch.isspace() or ch in PUNCTUATION  # noqa: E731
    start, end = t.start, t.end
    if not t.text.isalnum():
        return start, end
    while start > 0 and not stop(prompt[start - 1]):
        start -= 1
    while end < len(prompt) and not stop(prompt[end]):
        end += 1
    return start, end


def tokenize(prompt: str) -> list[Tok]:
    """Lower-cased word and punctuation tokens with character spans; an unknown word is a ParseError."""
    toks = [Tok(m.group().lower(), m.start(), m.end()) for m in _TOKEN.finditer(prompt)]
    for t in toks:
        if t.text not in _known():
            start, end = _word_span(prompt, t)
            raise ParseError(f"unknown word '{prompt[start:end]}' at characters {start}-{end}")
    return toks


def span(prompt: str, toks: list[Tok]) -> str:
    return f"'{prompt[toks[0].start:toks[-1].end]}' (characters {toks[0].start}-{toks[-1].end})"


def exactness_excludes(include: list[dict]) -> list[dict]:
    """Counts in a world prompt are exact: per class, exclude `total + 1` (in order of first mention)."""
    totals: dict[str, int] = {}
    for c in include:
        totals[c["class"]] = totals.get(c["class"], 0) + int(c["count"])
    return [{"class": k, "count": n + 1} for k, n in totals.items()]


def parse(prompt: str) -> dict:
    """GenEval-format metadata {tag: "world", include, exclude, prompt} for a world prompt."""
    if not isinstance(prompt, str) or not prompt.strip():
        raise ParseError("empty prompt")
    toks = tokenize(prompt)
    if len(toks) >= 3 and [t.text for t in toks[:3]] == ["a", "photo", "of"]:
        toks = toks[3:]
    while toks and toks[-1].text == ".":
        toks = toks[:-1]
    include: list[dict] = []
    negations: list[dict] = []
    for clause in _split_clauses(prompt, toks):
        _parse_clause(prompt, clause, include, negations)
    if not include:
        raise ParseError(f"nothing to draw in '{prompt.strip()}': name at least one object, e.g. 'a red circle'")
    return {"tag": "world", "include": include, "exclude": exactness_excludes(include) + negations,
            "prompt": prompt.strip()}


def _split_clauses(prompt: str, toks: list[Tok]) -> list[list[Tok]]:
    clauses: list[list[Tok]] = [[]]
    for t in toks:
        if t.text in (",", "and"):
            if not clauses[-1]:
                raise ParseError(f"missing words before {span(prompt, [t])}")
            clauses.append([])
        elif t.text in (".", ";", ":"):
            raise ParseError(f"unexpected {span(prompt, [t])}: join clauses with ',' or 'and'")
        else:
            clauses[-1].append(t)
    if not clauses[-1]:
        where = f" after {span(prompt, [toks[-1]])}" if toks else ""
        raise ParseError(f"prompt ends without a clause{where}")
    return clauses


def _parse_clause(prompt: str, toks: list[Tok], include: list[dict], negations: list[dict]) -> None:
    if toks[0].text == "no":
        color, shape, rest = _description(prompt, toks, 1, plural=None)
        if rest < len(toks):
            raise ParseError(f"unexpected {span(prompt, toks[rest:])}: a negation is 'no [colour] shapes'")
        negations.append({"class": shape, "count": 1, **({"color": color} if color else {})})
        return
    subject, i = _noun_phrase(prompt, toks, 0)
    if i == len(toks):
        _add(prompt, toks, subject, include)
        return
    rel, i = _relation(prompt, toks, i)
    if i == len(toks):
        raise ParseError(f"{span(prompt, toks)} ends after '{rel}': say what it is {rel}")
    if toks[i].text == "the":
        color, shape, end = _description(prompt, toks, i + 1, plural=None)
        target = _resolve(prompt, toks[i:end], color, shape, include)
    else:
        obj, end = _noun_phrase(prompt, toks, i)
        target = _add(prompt, toks[i:end], obj, include)
    if end < len(toks):
        raise ParseError(f"unexpected {span(prompt, toks[end:])}: one relation per clause")
    _add(prompt, toks, {**subject, "position": [rel, target]}, include)


def _noun_phrase(prompt: str, toks: list[Tok], i: int) -> tuple[dict, int]:
    """count [colour] shape -> ({class, count, color?}, next index)."""
    t = toks[i]
    n = COUNT_WORDS.get(t.text, int(t.text) if t.text.isdigit() else None)
    if n is None:
        raise ParseError(f"expected a count (a, two, three, ...) or 'no' at {span(prompt, [t])}")
    if n < 1:
        raise ParseError(f"count {span(prompt, [t])} must be at least 1 (say 'no ...' to exclude)")
    color, shape, end = _description(prompt, toks, i + 1, plural=n > 1)
    return {"class": shape, "count": n, **({"color": color} if color else {})}, end


def _description(prompt: str, toks: list[Tok], i: int, plural: bool | None) -> tuple[str | None, str, int]:
    """[colour] shape starting at i -> (colour, shape, next index); `plural` checks number agreement."""
    color = None
    if i < len(toks) and toks[i].text in COLORS:
        color, i = toks[i].text, i + 1
    if i >= len(toks):
        raise ParseError(f"{span(prompt, toks)} lacks a shape ({', '.join(SHAPES)})")
    word = toks[i].text
    shape = word if word in SHAPES else SINGULAR.get(word)
    if shape is None:
        raise ParseError(f"expected a shape ({', '.join(SHAPES)}) at {span(prompt, [toks[i]])}")
    if plural is not None and (word != shape) != plural:
        want = PLURALS[shape] if plural else shape
        raise ParseError(f"{span(prompt, toks[:i + 1])}: '{word}' does not agree with its count (say '{want}')")
    return color, shape, i + 1


def _relation(prompt: str, toks: list[Tok], i: int) -> tuple[str, int]:
    words_ = [t.text for t in toks]
    if words_[i:i + 2] == ["to", "the"]:
        i += 2
    for rel in RELATIONS:
        parts = rel.split()
        if words_[i:i + len(parts)] == parts:
            return rel, i + len(parts)
    raise ParseError(f"expected a relation ({', '.join(RELATIONS)}) or ',' / 'and' at {span(prompt, toks[i:])}")


def _resolve(prompt: str, toks: list[Tok], color: str | None, shape: str, include: list[dict]) -> int:
    """Index of the earlier include clause that 'the [colour] shape' refers to."""
    same = [i for i, c in enumerate(include) if c["class"] == shape]
    if color is not None:
        hits = [i for i in same if include[i].get("color") == color]
    else:
        plain = [i for i in same if "color" not in include[i]]
        hits = plain if len(plain) == 1 else same
    if not hits:
        raise ParseError(f"{span(prompt, toks)} refers to nothing earlier in the prompt")
    if len(hits) > 1:
        raise ParseError(f"{span(prompt, toks)} is ambiguous: name the colour")
    return hits[0]


def _add(prompt: str, toks: list[Tok], clause: dict, include: list[dict]) -> int:
    for c in include:
        if c["class"] == clause["class"] and c.get("color") == clause.get("color"):
            raise ParseError(f"{span(prompt, toks)} repeats an earlier description; give the total count once")
    include.append(clause)
    return len(include) - 1
