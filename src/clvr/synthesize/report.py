"""The data set's report: flat metrics (metrics.json) and the dataset card (dataset_card.md)."""

from __future__ import annotations

import numpy as np

from clvr.config import Config
from clvr.synthesize.macro import examples_per_k
from clvr.trajectories import FILE, SCHEMA, SCHEMA_VERSION, Trajectory


def dataset_metrics(trajs: list[Trajectory], tiers: list[int], max_k: int) -> dict[str, float]:
    acc = [t for t in trajs if t.accepted]
    ab = [t.ab["verdict"] for t in acc]
    m: dict[str, float] = {
        "trajectories": float(len(trajs)),
        "accepted": float(len(acc)),
        "acceptance_rate": _mean([t.accepted for t in trajs]),
        "mean_steps": _mean([t.calls for t in acc]),  # generator calls per accepted trajectory
        "mean_kept_steps": _mean([sum(s.kept for s in t.steps) for t in acc]),
        "mean_calls_all": _mean([t.calls for t in trajs]),
        "positive_steps": float(sum(s.positive for t in trajs for s in t.steps)),
        "failed_steps": float(sum(s.output is not None and not s.kept for t in trajs for s in t.steps)),
        "rejected_outputs": float(sum(t.rejected for t in trajs)),
        "controller_errors": float(sum(t.status == "controller_error" for t in trajs)),
        "judge_mismatches": float(sum(t.status == "judge_mismatch" for t in trajs)),
        "baseline_pass_rate": _mean([t.baseline["passed"] for t in trajs]),
        "ab_win_rate": _mean([v == "win" for v in ab]),
        "ab_tie_rate": _mean([v == "tie" for v in ab]),
        "ab_loss_rate": _mean([v == "loss" for v in ab]),
        "ab_win_or_tie": _mean([v != "loss" for v in ab]),
    }
    per_k = examples_per_k(trajs, max_k)
    m["examples"] = float(sum(per_k.values()))
    for k, n in per_k.items():
        m[f"examples_k_{k}"] = float(n)
    for tier in tiers:
        mine = [t for t in trajs if t.tier == tier]
        m[f"trajectories_tier_{tier}"] = float(len(mine))
        m[f"accepted_tier_{tier}"] = float(sum(t.accepted for t in mine))
        m[f"acceptance_tier_{tier}"] = _mean([t.accepted for t in mine])
    return {k: round(v, 4) for k, v in m.items()}


def _mean(xs: list) -> float:
    return float(np.mean(xs)) if len(xs) else 0.0


def _sampler(cfg: Config, trajs: list[Trajectory]) -> str:
    s = cfg.synthesize
    steps = f"{s.steps} steps" if s.steps else "its default steps"
    cfg_scale = "its default CFG" if s.guidance < 0 else f"CFG {s.guidance}" if s.guidance > 1 else "no CFG"
    nfe = [st.nfe for t in trajs for st in t.steps if st.nfe]
    return f"{steps}, {cfg_scale}, {max(nfe) if nfe else 0} NFE per call"


def dataset_card(trajs: list[Trajectory], m: dict, cfg: Config, model: str) -> str:
    s = cfg.synthesize
    rows = []
    for tier in s.tiers:
        mine = [t for t in trajs if t.tier == tier]
        acc = [t for t in mine if t.accepted]
        verdicts = [t.ab["verdict"] for t in acc]
        rows.append(f"| {tier} | {len(mine)} | {len(acc)} | {_mean([t.accepted for t in mine]):.3f} | "
                    f"{_mean([t.calls for t in acc]):.2f} | {_mean([v == 'win' for v in verdicts]):.3f} | "
                    f"{_mean([v != 'loss' for v in verdicts]):.3f} | {_mean([t.baseline['passed'] for t in mine]):.3f} |")
    ks = sorted(int(k.rsplit("_", 1)[1]) for k in m if k.startswith("examples_k_"))
    per_k = "\n".join(f"| {k} | {int(m[f'examples_k_{k}'])} |" for k in ks)
    controller = trajs[0].controller if trajs else cfg.loop.controller
    generator = trajs[0].generator if trajs else s.generator
    return f"""# Trajectory data set (clvr `synthesize`)

Verified closed-loop trajectories on the synthetic world: for each grammar prompt the controller plans, the
generator acts one grounded step at a time, passive verification gates every step (failed steps are kept,
flagged `kept: false`, never `positive`), active verification drives corrections. A trajectory is accepted
only if its final canvas, read back from the written PNG, passes the GenEval-format judge on the prompt's own
metadata. Accepted trajectories are A/B-judged against the single-step baseline for the same prompt and seed.
Their verified steps are also merged into macro-step examples (one multi-op step for one generator call).

- schema: `{SCHEMA}` version {SCHEMA_VERSION} (documented and loaded by `clvr.trajectories.load_trajectories`;
  training examples by `clvr.trajectories.load_examples`)
- generator: `{generator}` (model `{model}`, {_sampler(cfg, trajs)}); controller: `{controller}`; verifier: `{cfg.loop.verifier}`
- prompts: {s.n_per_tier} per tier, tiers {list(s.tiers)}, seed {s.seed}; loop budget max_iters
  {cfg.loop.max_iters}, max_nfe {cfg.loop.max_nfe}, retries_per_step {cfg.loop.retries_per_step}
- files: `{FILE}` (one line per trajectory, job order), `images/` (PNG; paths in the lines are relative
  to this folder), `metrics.json`

## Summary

| trajectories | accepted | acceptance rate | mean steps (calls, accepted) | A/B win | A/B win or tie | failed steps (flagged) |
|---|---|---|---|---|---|---|
| {int(m['trajectories'])} | {int(m['accepted'])} | {m['acceptance_rate']:.3f} | {m['mean_steps']:.2f} | {m['ab_win_rate']:.3f} | {m['ab_win_or_tie']:.3f} | {int(m['failed_steps'])} |

## Per tier

| tier | trajectories | accepted | acceptance | mean steps | A/B win | A/B win or tie | single-step pass |
|---|---|---|---|---|---|---|---|
{chr(10).join(rows)}

## Training examples per k

One example is one generator call to learn from: (reference canvas, trace, step, regions) -> target canvas. k = 1:
the positive steps (kept steps of accepted trajectories). k >= 2: macro-step examples, each merging k consecutive
positive steps of one trajectory into one multi-op step whose target is the later verified canvas (the generator's
own output, never a rendered ground truth); merged only when no two ops share a cell and the detected scene of the
target is exactly the k ops applied to the detected scene of the reference. Runs of up to {s.macro_max_k} steps
(`synthesize.macro_max_k`).

| k | examples |
|---|---|
{per_k}

## A/B comparison

The final canvas (loop) against the single-step image (one text-to-image call, same prompt and seed), both
judged on the prompt's metadata: more constraints satisfied (include + exclude clauses) wins; at equal
constraints, the image with fewer artefacts (mean |pixel - clean render of the detected scene|, 0..255)
wins if it is cleaner by more than {s.ab_margin}; otherwise a tie. Each line's `ab.reason` says which.
"""
