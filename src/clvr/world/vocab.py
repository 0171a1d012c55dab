"""The world's vocabulary: the single owner of every word, shape, colour, relation and grid fact.

Everything else (renderer, grammar, parser, detector, tokenizer, controller) imports from here.
"""

from __future__ import annotations

SHAPES: tuple[str, ...] = ("circle", "square", "triangle")  # the GenEval "classes" of the world
PLURALS: dict[str, str] = {s: s + "s" for s in SHAPES}
# GenEval's COCO classes whose plural is not noun + "s" (messages name any class a metadata file may hold)
IRREGULAR_PLURALS: dict[str, str] = {"person": "people", "mouse": "mice", "sheep": "sheep", "skis": "skis",
                                     "scissors": "scissors", "knife": "knives", "skateboard": "skateboards"}


def plural(noun: str) -> str:
    """'circle' -> 'circles', 'red bus' -> 'red buses', 'teddy bear' -> 'teddy bears' (the last word inflects)."""
    head, _, last = noun.rpartition(" ")
    if last in PLURALS:
        word = PLURALS[last]
    elif last in IRREGULAR_PLURALS:
        word = IRREGULAR_PLURALS[last]
    elif last.endswith(("s", "x", "z", "ch", "sh")):
        word = last + "es"
    elif last.endswith("y") and last[-2:-1] not in ("a", "e", "i", "o", "u", ""):
        word = last[:-1] + "ies"
    else:
        word = last + "s"
    return f"{head} {word}" if head else word


def count_noun(n: int, noun: str) -> str:
    """'1 circle', '2 circles', 'no circles' (messages that count objects)."""
    return f"no {plural(noun)}" if n == 0 else f"{n} {noun if n == 1 else plural(noun)}"


# GenEval colour names -> RGB. Saturated and far apart so the palette snap and detector are exact.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 200, 30),
}
BACKGROUND: tuple[int, int, int] = (255, 255, 255)

RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")  # GenEval's
INVERSE: dict[str, str] = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}

GRID = 4  # default cells per side
CELL = 16  # default pixels per cell
SPRITE = 12  # sprite size inside a cell (2-px margin each side keeps neighbours apart)

NUMBERS: tuple[str, ...] = (
    "zero", "one", "two", "three", "four", "five", "six", "seven", "eight",
    "nine", "ten", "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen",
)
ARTICLES: tuple[str, ...] = ("a", "an")

# Step ops the loop may run; the controller's output schema is restricted to these. "edit" carries several
# single-cell edits (EDIT_OPS) for one generator call.
OPS: tuple[str, ...] = ("generate", "add", "remove", "recolor", "move", "edit", "stop")
EDIT_OPS: tuple[str, ...] = ("add", "remove", "recolor", "move")  # the single-op edits an "edit" step may carry

# Function words used by prompts and step instructions (grammar + controller). Keep in one place:
# the tokenizer and the parser's unknown-word check read this list.
FUNCTION_WORDS: tuple[str, ...] = (
    "a", "an", "the", "and", "no", "of", "photo", "at", "row", "column", "to", "on", "in",
    "left", "right", "above", "below", "add", "remove", "recolor", "move", "generate", "stop",
    "then", "with", "there", "is", "are", "all", "other", "other", "each", "every",
)
PUNCTUATION: tuple[str, ...] = (",", ".", ";", ":")


def words() -> list[str]:
    """Every word the world knows, in a fixed order (the tokenizer's vocabulary is built from this)."""
    seen: dict[str, None] = {}
    for w in (*SHAPES, *PLURALS.values(), *COLORS, *NUMBERS, *FUNCTION_WORDS, *PUNCTUATION,
              *[str(i) for i in range(GRID * GRID + 1)]):
        seen.setdefault(w, None)
    return list(seen)


def number_word(n: int) -> str:
    return NUMBERS[n]
