"""The learned controller on many prompts: rejects after constrained decoding, and time per decision on one core.

Runs the loop (`clvr.loop.run.run_many`, generator calls batched) with the learned controller over the probe's
held-out prompts, `--n-per-tier` per tier, at one call budget, with torch on ONE thread (the decision time is a
one-core figure), and counts every controller output the loop rejected: by the schema (`Step.from_dict`), by the
state (`transition_error`), or cut off at the token limit.

    PYTHONPATH=src python benchmarks/learned_controller.py --controller runs/cpu/controller_sft/final \
        --model runs/release/sft/final --steps 4 --n-per-tier 100 --max-calls 4

Last line: one JSON object {"prompts", "decisions", "schema_rejects", "state_rejects", "truncated",
"ms_per_decision": {"median", "p95"}, "lexemes": {"median", "p95"}, "pass", "pass_per_tier", ...}.
"""

from __future__ import annotations

import argparse
import ast
import json
from dataclasses import replace

import numpy as np
import torch

from clvr.config import load_config
from clvr.learned.controller import TRUNCATED, LearnedController
from clvr.loop.roles import make_verifier
from clvr.loop.run import load_generator, run_many
from clvr.probe import judge_final, probe_prompts
from clvr.steps import SchemaError, Step


def reject_kind(raw: str) -> str:
    """Why the loop rejected an output (its recorded repr): cut off at the token limit, not a step (schema), or a
    step the state forbids (`transition_error`)."""
    try:
        d = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        return "schema"
    if isinstance(d, dict) and TRUNCATED in d:
        return "truncated"
    try:
        Step.from_dict(d)
    except SchemaError:
        return "schema"
    return "state"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--controller", required=True, help="a learned controller folder")
    ap.add_argument("--model", default="distilled", help="generator: base | distilled | folder | oracle | noisy-oracle")
    ap.add_argument("--steps", type=int, default=None, help="sampling steps (default: the model's)")
    ap.add_argument("--guidance", type=float, default=None)
    ap.add_argument("--n-per-tier", type=int, default=100)
    ap.add_argument("--max-calls", type=int, default=4, help="call budget (0 = unbounded)")
    ap.add_argument("--profile", default="cpu")
    ap.add_argument("--batch-size", type=int, default=64)
    args = ap.parse_args()

    torch.set_num_threads(1)
    cfg = load_config(args.profile)
    cfg = replace(cfg, loop=replace(cfg.loop, max_calls=args.max_calls))
    controller = LearnedController(args.controller, cfg.world.grid, cfg.loop.retries_per_step,
                                   cfg.loop.max_prompt_chars)
    generator = load_generator(cfg, args.model, args.steps, args.guidance)
    verifier = make_verifier(cfg.loop.verifier, grid=cfg.world.grid)
    prompts = probe_prompts(args.n_per_tier, cfg.eval.seed, cfg.world.grid)
    traces = run_many([(md["prompt"], cfg.eval.seed + i) for i, md in enumerate(prompts)], controller, generator,
                      verifier, cfg.loop, "loop", cfg.world.grid, cfg.world.cell, args.batch_size)

    rejects = {"schema": 0, "state": 0, "truncated": 0}
    for tr in traces:
        for s in tr.steps:
            if s.kind == "rejected":
                rejects[reject_kind(s.raw)] += 1
    passed = [judge_final(md, tr.final) for md, tr in zip(prompts, traces)]
    tiers = sorted({md["tier"] for md in prompts})
    per_tier = {str(t): round(float(np.mean([p for p, md in zip(passed, prompts) if md["tier"] == t])), 3)
                for t in tiers}
    ms = np.array(controller.stats.seconds) * 1000
    lex = np.array(controller.stats.tokens)
    print(json.dumps({
        "prompts": len(prompts), "decisions": controller.stats.decisions,
        "schema_rejects": rejects["schema"], "state_rejects": rejects["state"], "truncated": rejects["truncated"],
        "ms_per_decision": {"median": round(float(np.median(ms)), 2), "p95": round(float(np.percentile(ms, 95)), 2)},
        "lexemes": {"median": float(np.median(lex)), "p95": float(np.percentile(lex, 95))},
        "pass": round(float(np.mean(passed)), 3), "pass_per_tier": per_tier,
        "calls_mean": round(float(np.mean([tr.calls for tr in traces])), 2),
        "max_calls": args.max_calls, "generator": args.model, "controller": args.controller, "torch_threads": 1}))


if __name__ == "__main__":
    main()
