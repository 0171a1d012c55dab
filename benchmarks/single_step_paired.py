"""Single-step text-to-image pass rate of two generators on the same prompts and seeds, with the paired difference.

Issue 14 asks that trajectory SFT keep single-step text-to-image "within 0.02 of base". At 200 prompts per tier
the sampling error of a difference of two pass rates near 0.25 is about +-0.04, larger than the tolerance. Here
both models see the same prompt and the same noise seed, so the difference's error is that of the paired
outcomes only (McNemar: the prompts where exactly one of the two passes), and n can be large.

    PYTHONPATH=src python benchmarks/single_step_paired.py --a base --b runs/release/sft/final \
        [--n 1000] [--tiers 1-6] [--seed 4321] [--steps 28] [--guidance 2.0]

Prints one line per tier, then one JSON object: per tier the two pass rates, the difference b - a, its 95 %
interval (normal approximation of the paired difference) and the discordant counts.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np

from clvr.errors import ClvrError
from clvr.models.backend import WorldGenerator, load_pipeline
from clvr.train.bench import single_step_outcomes, tier_prompts


def tier_range(text: str) -> list[int]:
    """'3' or '1-6' -> the tiers, each in 1..10 (else an argparse usage error, exit 2)."""
    lo, _, hi = text.partition("-")
    try:
        tiers = list(range(int(lo), int(hi or lo) + 1))
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a tier or a range of tiers like 1-6") from None
    if not tiers or tiers[0] < 1 or tiers[-1] > 10:
        raise argparse.ArgumentTypeError(f"'{text}': tiers run from 1 to 10")
    return tiers


def paired(a: np.ndarray, b: np.ndarray) -> dict:
    d = b.astype(float) - a.astype(float)
    se = float(d.std(ddof=1) / np.sqrt(len(d)))
    m = float(d.mean())
    return {"a": round(float(a.mean()), 4), "b": round(float(b.mean()), 4), "diff": round(m, 4),
            "ci95": [round(m - 1.96 * se, 4), round(m + 1.96 * se, 4)],
            "only_a": int((a & ~b).sum()), "only_b": int((b & ~a).sum())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--a", default="base", help="model folder or shipped name (the reference)")
    ap.add_argument("--b", required=True, help="model folder or shipped name (compared with --a)")
    ap.add_argument("--n", type=int, default=1000, help="prompts per tier")
    ap.add_argument("--tiers", type=tier_range, default="1-6", help="a tier or a range, e.g. 1-6")
    ap.add_argument("--seed", type=int, default=4321)
    ap.add_argument("--steps", type=int, default=None, help="sampling steps (default: the model's own)")
    ap.add_argument("--guidance", type=float, default=None, help="CFG scale (default: the model's own)")
    args = ap.parse_args()

    if args.n < 2:
        ap.error("--n must be at least 2 (a paired interval needs two prompts)")
    try:
        gens = [WorldGenerator(load_pipeline(m), args.steps, args.guidance) for m in (args.a, args.b)]
    except ClvrError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    grid = gens[0].pipe.config.grid
    t0 = time.perf_counter()
    out = {}
    for tier in args.tiers:
        metas = tier_prompts(tier, args.n, grid, args.seed)
        out[str(tier)] = paired(*(single_step_outcomes(g, metas, args.seed) for g in gens))
        print(tier, out[str(tier)], flush=True)
    print(json.dumps({"a": args.a, "b": args.b, "n": args.n, "seed": args.seed,
                      "steps": {"a": gens[0].steps, "b": gens[1].steps},  # each model's sampler
                      "guidance": {"a": gens[0].guidance, "b": gens[1].guidance}, "per_tier": out,
                      "max_abs_diff": max(abs(v["diff"]) for v in out.values()),
                      "seconds": round(time.perf_counter() - t0, 1)}))


if __name__ == "__main__":
    main()
