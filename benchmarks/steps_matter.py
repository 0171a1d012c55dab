"""Do sampling steps matter? One generator's edit success and single-step pass by sampler steps (no CFG), each as a
share of its own reference sampling (its default steps + CFG).

Issue 13's "steps matter" target: the base at 4 steps without CFG at <= 0.8x of its 28-step + CFG figure, on
single-step pass at tiers 1-3 and on mean edit success. This prints the whole curve, not one point, so it also
shows where each figure comes from: an edit as the loop sends it is grounded at its cells, and remove, recolor
and move then copy what the reference canvas already shows (their targets have one right picture), while an add
still samples the object's look inside its cell and a text-to-image prompt its whole layout.

    PYTHONPATH=src python benchmarks/steps_matter.py [--model base] [--profile release] [--steps 1,2,4,8,28] \
        [--n 100] [--tiers 1-3] [--seed 1234]

Prints one JSON line per sampler, then one JSON object: per sampler each figure's ratio to the reference, the
mean-edit ratio and the tier ratios. Edits are those of `clvr world bench-generator` (seed `--seed`, the profile's
`world.appearance`), prompts those of its single-step rows.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from clvr.config import load_config
from clvr.errors import ClvrError
from clvr.models.backend import WorldGenerator, load_pipeline
from clvr.train.bench import edit_success, single_step_pass
from single_step_paired import tier_range  # this folder (the script's own, first on sys.path)


def step_list(text: str) -> list[int]:
    try:
        steps = [int(s) for s in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a comma-separated list of step counts") from None
    if not steps or min(steps) < 1 or max(steps) > 1000:
        raise argparse.ArgumentTypeError(f"'{text}': step counts run from 1 to 1000")
    return steps


def figures(gen: WorldGenerator, n: int, tiers: list[int], seed: int, appearance) -> dict:
    g, c = gen.pipe.config.grid, gen.pipe.config.cell
    edits = edit_success(gen, n, g, c, seed, appearance)
    return {"steps": gen.steps, "guidance": gen.guidance, "edit": edits,
            "edit_mean": round(sum(edits.values()) / len(edits), 4),
            "single": single_step_pass(gen, n, g, tiers, seed)}


def ratio(a: float, b: float) -> float | None:
    return round(a / b, 3) if b else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="base", help="model folder or shipped name")
    ap.add_argument("--profile", default="release", help="config profile (its world.appearance draws the edits)")
    ap.add_argument("--steps", type=step_list, default="1,2,4,8,28", help="sampler steps without CFG, e.g. 1,4,28")
    ap.add_argument("--n", type=int, default=100, help="edits per op and prompts per tier")
    ap.add_argument("--tiers", type=tier_range, default="1-3", help="a tier or a range, e.g. 1-3")
    ap.add_argument("--seed", type=int, default=1234)
    args = ap.parse_args()
    if args.n < 1:
        ap.error("--n must be at least 1")
    try:  # a bad profile or model: one line naming it, exit 2
        cfg = load_config(args.profile)
        pipe = load_pipeline(args.model)
    except ClvrError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    t0, app = time.perf_counter(), cfg.world.appearance
    ref = figures(WorldGenerator(pipe), args.n, args.tiers, args.seed, app)  # the model's default steps + CFG
    print(json.dumps({"reference": ref}), flush=True)
    rows = {}
    for s in args.steps:
        f = figures(WorldGenerator(pipe, s, 1.0), args.n, args.tiers, args.seed, app)
        print(json.dumps(f), flush=True)
        rows[str(s)] = {"edit": {op: ratio(v, ref["edit"][op]) for op, v in f["edit"].items()},
                        "edit_mean": ratio(f["edit_mean"], ref["edit_mean"]),
                        "single": {t: ratio(v, ref["single"][t]) for t, v in f["single"].items()}}
    print(json.dumps({"model": args.model, "profile": args.profile, "n": args.n, "seed": args.seed,
                      "reference": {"steps": ref["steps"], "guidance": ref["guidance"]}, "ratio_no_cfg": rows,
                      "seconds": round(time.perf_counter() - t0, 1)}))


if __name__ == "__main__":
    main()
