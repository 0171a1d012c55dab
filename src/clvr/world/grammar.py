"""Prompt grammar: seeded prompts with GenEval-format metadata at 10 complexity tiers, and the six GenEval
suites in world vocabulary. The parser (clvr.world.parser) reads every prompt written here back into the
same constraints.

A prompt is a list of clauses joined by ',' and 'and', optionally after "a photo of":
    "two red circles"                         entities with a count and an attribute binding
    "a blue square above the red circles"     a relation to an earlier clause, named by (colour, shape)
    "a circle right of a square"              a relation to a new object (GenEval's position prompts)
    "no yellow triangles"                     an exclusion
Every (colour, shape) description is used once; a shape is either named without colour once, or only with
colours. Counts are exact (exclude total + 1 per class), as in GenEval's counting prompts.
"""

from __future__ import annotations

import math

import numpy as np

from clvr.errors import ClvrError
from clvr.world.parser import exactness_excludes
from clvr.world.vocab import COLORS, GRID, PLURALS, RELATIONS, SHAPES, number_word

TIERS = range(1, 11)
GENEVAL_TAGS = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
TIER_WIDTH = 2.0  # tier t holds C_task in (2(t-1), 2t]; tier 10 everything above 18


def c_task(metadata: dict) -> float:
    """Task complexity C_task of a GenEval-format prompt: how many independent facts an image must get right.

        C_task = entities + bindings + counts + 2 * relations + exclusions

    * entities:   objects the prompt asks for (sum of include counts);
    * bindings:   attribute bindings, include clauses that tie a colour to a class;
    * counts:     include clauses with a count of 2 or more (exact numeracy beyond "a");
    * relations:  include clauses with a position; weighted 2 (they bind two groups and a direction);
    * exclusions: exclude clauses that forbid something new, i.e. not merely the bound that makes an
                  included class's count exact (a colour, or a class the prompt does not include).

    "a circle" = 1, "a red circle" = 2,
    "two red circles and a blue square above the red circles" = 3 + 2 + 1 + 2 = 8.
    """
    include = metadata.get("include", [])
    included = {c["class"] for c in include}
    entities = sum(int(c["count"]) for c in include)
    bindings = sum(1 for c in include if c.get("color"))
    counts = sum(1 for c in include if int(c["count"]) >= 2)
    relations = sum(1 for c in include if c.get("position"))
    exclusions = sum(1 for e in metadata.get("exclude", []) if e.get("color") or e["class"] not in included)
    return float(entities + bindings + counts + 2 * relations + exclusions)


def tier_of(c: float) -> int:
    """Tier 1..10 of a C_task value: tier t covers (2(t-1), 2t]; tier 1 includes everything <= 2."""
    return int(min(10, max(1, math.ceil(c / TIER_WIDTH))))


# Prompt structures held out of the learned controller's training (clvr.learned): its second test split.
HELD_OUT_COMPOSITIONS: tuple[str, ...] = ("rel+excl+3col",)


def composition(metadata: dict) -> str:
    """A prompt's structure, e.g. "rel+excl+3col": "rel" if any object is placed relative to another, "excl" if
    the prompt forbids something ("no squares": an exclude of count 1; the exact-count excludes are >= 2), then
    the number of distinct colours named."""
    parts = ["rel"] if any("position" in c for c in metadata.get("include", ())) else []
    if any(c.get("count") == 1 for c in metadata.get("exclude", ())):
        parts.append("excl")
    colours = {c["color"] for c in metadata.get("include", ()) if c.get("color")}
    return "+".join(parts + [f"{len(colours)}col"])


def held_out(metadata: dict) -> bool:
    """Whether a prompt's structure is one held out of controller training (`HELD_OUT_COMPOSITIONS`)."""
    return composition(metadata) in HELD_OUT_COMPOSITIONS


# ---- sampling ---------------------------------------------------------------------------------------

def sample_prompt(tier: int, rng: np.random.Generator, grid: int = GRID) -> dict:
    """A prompt of the given tier with its metadata {tag, include, exclude, prompt, tier, c_task};
    always satisfiable on the grid (the solver finds a layout before it is returned)."""
    from clvr.world.solver import Unsatisfiable, solve

    if tier not in TIERS:
        raise ValueError(f"tier must be in 1..10, got {tier}")
    for _ in range(10000):
        include, negations = _propose(tier, rng, grid)
        md = {"tag": "world", "include": include, "exclude": exactness_excludes(include) + negations}
        c = c_task(md)
        if tier_of(c) != tier or (tier == 10 and not _rich(include)):
            continue
        try:
            solve(md, grid, rng=None)
        except Unsatisfiable:
            continue
        md["prompt"] = realize(include, negations, rng)
        return {**md, "tier": tier, "c_task": c}
    raise ClvrError(f"could not sample a tier-{tier} prompt on a {grid}x{grid} grid (too few cells)")


def _rich(include: list[dict]) -> bool:
    """Tier 10's floor: at least 8 objects, 2 relations and 2 attribute bindings."""
    return (sum(c["count"] for c in include) >= 8 and sum("position" in c for c in include) >= 2
            and sum("color" in c for c in include) >= 2)


def _propose(tier: int, rng: np.random.Generator, grid: int) -> tuple[list[dict], list[dict]]:
    """A random clause structure whose size scales with the tier (accepted by tier only afterwards)."""
    cap = min(12, (grid * grid * 3) // 4)
    lo, hi = (1, 1) if tier == 1 else (max(1, tier - 3), max(1, min(cap, tier + 2)))
    if tier == 10:
        lo = min(8, cap)
    n = int(rng.integers(lo, hi + 1))
    k = int(rng.integers(1, min(n, 1 + tier // 2, 5) + 1))
    counts = _composition(n, k, rng)
    include = []
    used: dict[str, set] = {s: set() for s in SHAPES}  # colours used per shape; None = named without colour
    p_color = min(0.9, 0.35 + 0.07 * tier)
    for cnt in counts:
        desc = _fresh_description(used, rng, p_color)
        if desc is None:
            break
        shape, color = desc
        include.append({"class": shape, "count": int(cnt), **({"color": color} if color else {})})
    n_rel = int(rng.integers(0, len(include))) if tier >= 3 else 0
    for i in sorted(rng.permutation(np.arange(1, len(include)))[:n_rel].tolist()):
        include[i]["position"] = [RELATIONS[rng.integers(len(RELATIONS))], int(rng.integers(0, i))]
    negations = []
    free = [s for s in SHAPES if not used[s]]
    for s in rng.permutation(free)[: int(rng.integers(0, 3)) if tier >= 4 else 0].tolist():
        color = str(rng.choice(list(COLORS))) if rng.random() < 0.5 else None
        negations.append({"class": s, "count": 1, **({"color": color} if color else {})})
    return include, negations


def _composition(n: int, k: int, rng: np.random.Generator) -> list[int]:
    """n split into k positive parts, uniformly over compositions."""
    cuts = sorted(rng.choice(np.arange(1, n), size=k - 1, replace=False).tolist()) if k > 1 else []
    edges = [0, *cuts, n]
    return [b - a for a, b in zip(edges, edges[1:])]


def _fresh_description(used: dict[str, set], rng: np.random.Generator, p_color: float):
    """A (shape, colour-or-None) not used yet, keeping each shape either plain once or coloured only."""
    shapes = [s for s in SHAPES if None not in used[s] and len(used[s]) < len(COLORS)]
    if not shapes:
        return None
    shape = str(rng.choice(shapes))
    if not used[shape] and rng.random() >= p_color:
        used[shape].add(None)
        return shape, None
    color = str(rng.choice([c for c in COLORS if c not in used[shape]]))
    used[shape].add(color)
    return shape, color


# ---- text ---------------------------------------------------------------------------------------------

def noun_phrase(c: dict) -> str:
    n = int(c["count"])
    noun = c["class"] if n == 1 else PLURALS[c["class"]]
    color = f"{c['color']} " if c.get("color") else ""
    return f"{'a' if n == 1 else number_word(n)} {color}{noun}"


def reference(c: dict) -> str:
    noun = c["class"] if int(c["count"]) == 1 else PLURALS[c["class"]]
    return f"the {c['color'] + ' ' if c.get('color') else ''}{noun}"


def relation_text(rel: str, rng: np.random.Generator | None) -> str:
    if rel in ("left of", "right of") and rng is not None and rng.random() < 0.2:
        return f"to the {rel}"
    return rel


def realize(include: list[dict], negations: list[dict], rng: np.random.Generator | None = None) -> str:
    """Prompt text for include clauses (in order) and exclusions. With an rng, the surface form varies:
    "X rel Y" for a new object Y, "to the left of", "a photo of", where the exclusions go."""
    clauses: list[str] = []
    k = 0
    while k < len(include):
        c, nxt = include[k], include[k + 1] if k + 1 < len(include) else None
        if (nxt is not None and nxt.get("position", [None, -1])[1] == k and "position" not in c
                and rng is not None and rng.random() < 0.5):
            clauses.append(f"{noun_phrase(nxt)} {relation_text(nxt['position'][0], rng)} {noun_phrase(c)}")
            k += 2
            continue
        text = noun_phrase(c)
        if "position" in c:
            rel, j = c["position"]
            text += f" {relation_text(rel, rng)} {reference(include[j])}"
        clauses.append(text)
        k += 1
    for e in negations:
        neg = f"no {e['color'] + ' ' if e.get('color') else ''}{PLURALS[e['class']]}"
        at = len(clauses) if rng is None else int(rng.integers(1, len(clauses) + 1))
        clauses.insert(at, neg)
    text = clauses[0] if len(clauses) == 1 else ", ".join(clauses[:-1]) + " and " + clauses[-1]
    if rng is not None and rng.random() < 0.15:
        text = "a photo of " + text
    return text


# ---- GenEval suites in world vocabulary ---------------------------------------------------------------

def geneval_suite(tag: str, n: int, rng: np.random.Generator) -> list[dict]:
    """`n` prompts of one GenEval tag, in GenEval's metadata format and phrasing ("a photo of ...")."""
    makers = {"single_object": _single_object, "two_object": _two_object, "counting": _counting,
              "colors": _colors, "position": _position, "color_attr": _color_attr}
    if tag not in makers:
        raise ValueError(f"unknown GenEval tag '{tag}' (known: {', '.join(GENEVAL_TAGS)})")
    out = []
    for _ in range(n):
        include, exclude = makers[tag](rng)
        md = {"tag": tag, "include": include}
        if exclude:
            md["exclude"] = exclude
        md["prompt"] = "a photo of " + _geneval_text(include)
        out.append(md)
    return out


def _shapes(rng: np.random.Generator, k: int) -> list[str]:
    return [str(s) for s in rng.choice(SHAPES, size=k, replace=False)]


def _colors_of(rng: np.random.Generator, k: int) -> list[str]:
    return [str(c) for c in rng.choice(list(COLORS), size=k, replace=False)]


def _single_object(rng):
    return [{"class": _shapes(rng, 1)[0], "count": 1}], []


def _two_object(rng):
    a, b = _shapes(rng, 2)
    return [{"class": a, "count": 1}, {"class": b, "count": 1}], []


def _counting(rng):
    s, n = _shapes(rng, 1)[0], int(rng.integers(2, 5))
    return [{"class": s, "count": n}], [{"class": s, "count": n + 1}]


def _colors(rng):
    return [{"class": _shapes(rng, 1)[0], "count": 1, "color": _colors_of(rng, 1)[0]}], []


def _position(rng):
    a, b = _shapes(rng, 2)  # "a photo of a {b} {rel} a {a}": the target comes first, as in GenEval
    return [{"class": a, "count": 1}, {"class": b, "count": 1, "position": [str(rng.choice(RELATIONS)), 0]}], []


def _color_attr(rng):
    (a, b), (ca, cb) = _shapes(rng, 2), _colors_of(rng, 2)
    return [{"class": a, "count": 1, "color": ca}, {"class": b, "count": 1, "color": cb}], []


def _geneval_text(include: list[dict]) -> str:
    if len(include) == 2 and "position" in include[1]:
        return f"{noun_phrase(include[1])} {include[1]['position'][0]} {noun_phrase(include[0])}"
    return " and ".join(noun_phrase(c) for c in include)
