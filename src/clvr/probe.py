"""Evaluation of the loop against single-step generation with the same backbone.

* `run_probe`: the complexity probe. Held-out seeded prompts at each of the 10 tiers, generated in each
  mode and judged against their own metadata: per-tier pass rate, AUC Pass, median C_task of passed
  prompts, I_eff, NFEs, generator calls and seconds per prompt.
* `run_geneval_world`: the six GenEval suites in world vocabulary, each mode, judged.

Modes: "single" (one text-to-image call), "loop" (the closed loop at the config's budget) and, with
`eval.rewrite`, "rewrite": the open-loop rewrite baseline (the controller rewrites the prompt once into one
grounded step of every object, the generator runs once, nothing is verified or corrected; clvr.loop.run).
Each is its own row of the result.
* `run_speed`: the efficiency table: 1-4 loop iterations x (base at 28 steps + CFG, distilled at 4 NFE).

Call budgets. The probe and geneval-world also run the loop at each of `max_calls` budgets (generator calls
per prompt, 0 = unbounded; `loop.max_calls`), with the budget-aware controller, and report each budget's
pass rate and AUC under "budgets" (keys "1", "2", ..., "unbounded"). The mode rows stay as they were; a
budget equal to the config's reuses the "loop" run. The rewrite row is the open-loop counterpart of budget "1".

AUC Pass. For tier t let c_t be the mean C_task of its prompts and p_t its pass rate. Then
    AUC = 100 * sum_t (c_{t+1} - c_t) * (p_t + p_{t+1}) / 2  /  (c_T - c_1),
the trapezoid area under pass rate vs C_task over the probed range, normalised so that passing every prompt
gives 100 and passing none gives 0 (comparable across probes with different C_task ranges).

I_eff (spectral capacity). For every weight matrix W of the generator's backbone (parameters with 2+ dims,
reshaped to (out, -1)), the effective rank erank(W) = exp(H(p)) with p_i = s_i / sum_j s_j over W's singular
values s (Roy & Vetterli, 2007): the number of directions the layer actually uses. I_eff = sum over matrices.
It is a property of the weights alone, so single-step and loop (same backbone) have the same I_eff by
construction: any gain of the loop is not extra capacity. Backends without weights (oracles) report None.
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from clvr.config import Config, validate
from clvr.errors import ClvrError
from clvr.generator import Generator
from clvr.loop.run import build_roles, run_loop, run_many
from clvr.io import atomic_write_text
from clvr.judge import is_geneval_layout, judge_image, write_geneval_folder

TIERS = tuple(range(1, 11))
HELD_OUT_TRIES = 100  # grammar draws per wanted prompt before a tier is left out of the held-out split
MODES = ("single", "rewrite", "loop")  # the evaluated modes, in the order they run and print


def eval_modes(cfg: Config) -> tuple[str, ...]:
    """The modes the probe and geneval-world run: all of MODES, "rewrite" only with `eval.rewrite`."""
    return tuple(m for m in MODES if m != "rewrite" or cfg.eval.rewrite)
GENEVAL_TAGS = ("single_object", "two_object", "counting", "colors", "position", "color_attr")


# ---- metrics -------------------------------------------------------------------------------------------

def auc_pass(c_task: list[float], pass_rate: list[float]) -> float:
    """Normalised trapezoid area under pass rate vs C_task (0..100); see the module docstring."""
    x, y = np.asarray(c_task, float), np.asarray(pass_rate, float)
    order = np.argsort(x, kind="stable")
    x, y = x[order], y[order]
    if len(x) < 2 or x[-1] == x[0]:
        return float(100 * y.mean()) if len(y) else 0.0
    return float(100 * np.sum(np.diff(x) * (y[1:] + y[:-1]) / 2) / (x[-1] - x[0]))


def effective_rank(w: np.ndarray) -> float:
    s = np.linalg.svd(w.reshape(w.shape[0], -1).astype(np.float64), compute_uv=False)
    s = s[s > 0]
    if not len(s):
        return 0.0
    p = s / s.sum()
    return float(np.exp(-(p * np.log(p)).sum()))


def backbone_modules(generator: Generator) -> list:
    """The torch modules that make up the generator's denoiser (what I_eff measures)."""
    import torch

    found = []
    for holder in (generator, getattr(generator, "pipe", None), getattr(generator, "pipeline", None)):
        for name in ("transformer", "denoiser", "model", "net"):
            m = getattr(holder, name, None) if holder is not None else None
            if isinstance(m, torch.nn.Module) and all(m is not f for f in found):
                found.append(m)
        if found:
            break
    return found


def i_eff(generator: Generator) -> float | None:
    """Sum of effective ranks of the backbone's weight matrices (None when it has no weights)."""
    mods = backbone_modules(generator)
    if not mods:
        return None
    total = 0.0
    for m in mods:
        for _, p in m.named_parameters():
            if p.ndim >= 2 and min(p.shape[0], int(np.prod(p.shape[1:]))) > 1:
                total += effective_rank(p.detach().float().cpu().numpy())
    return round(total, 3)


# ---- prompts ---------------------------------------------------------------------------------------------

def probe_prompts(n_per_tier: int, seed: int, grid: int, tiers=TIERS, split: str = "all") -> list[dict]:
    """Held-out seeded prompts: `n_per_tier` per tier from the grammar, from the eval seed (not training's).
    split "held_out": only prompts of the structures held out of controller training (`held_out`), drawn from
    the same grammar by rejection from a seed stream of their own; a tier where none turns up in
    `HELD_OUT_TRIES` draws per wanted prompt (a low tier has too few objects for the structure) is left out."""
    from clvr.world.grammar import held_out, sample_prompt

    out = []
    for tier in tiers:
        if split == "all":
            rng = np.random.default_rng([seed, tier])
            out += [sample_prompt(tier, rng, grid) for _ in range(n_per_tier)]
            continue
        rng, got = np.random.default_rng([seed, tier, 1]), []
        for _ in range(HELD_OUT_TRIES * n_per_tier):
            md = sample_prompt(tier, rng, grid)
            if held_out(md):
                got.append(md)
                if len(got) == n_per_tier:
                    break
        out += got if len(got) == n_per_tier else []
    return out


def judge_final(metadata: dict, image: np.ndarray) -> bool:
    """The verdict on a final canvas against the prompt's own metadata (not the parser's reading of it)."""
    return bool(judge_image(metadata, image)[0])


def run_mode(cfg: Config, generator: Generator, prompts: list[dict], mode: str, seed: int,
             roles: tuple | None = None) -> list[dict]:
    """Generate every prompt in one mode (batched across prompts); one row per prompt. `roles`: the
    (controller, verifier) to use (default: built from the config)."""
    controller, verifier = roles or build_roles(cfg)
    traces = run_many([(md["prompt"], seed + i) for i, md in enumerate(prompts)], controller, generator,
                      verifier, cfg.loop, mode, cfg.world.grid, cfg.world.cell, cfg.eval.batch_size)
    rows = []
    for md, tr in zip(prompts, traces):
        rows.append({"prompt": md["prompt"], "tier": md.get("tier"), "tag": md.get("tag"),
                     "c_task": md.get("c_task"), "passed": judge_final(md, tr.final), "nfe": tr.nfe,
                     "calls": tr.calls, "seconds": tr.seconds, "retries": tr.retries,
                     "corrections": tr.corrections, "rejected": tr.rejected, "ended_by": tr.ended_by,
                     "final": tr.final})
    return rows


def budget_label(max_calls: int) -> str:
    return str(max_calls) if max_calls else "unbounded"


def parse_budgets(values: list[str] | str) -> list[int]:
    """`--max-calls` values ("1,2,3,4,unbounded", repeatable; 0, "unbounded", "inf" = no budget) -> [1, 2, 3, 4, 0]
    (order kept, duplicates dropped); a ClvrError names a bad value."""
    out: list[int] = []
    for item in [values] if isinstance(values, str) else values:
        for v in str(item).split(","):
            v = v.strip().lower()
            if v in ("unbounded", "inf", "none", "0"):
                b = 0
            elif v.isdigit() and 1 <= int(v) <= 1000:
                b = int(v)
            else:
                raise ClvrError(f"--max-calls: {v!r} is not a call budget (1..1000, or unbounded)")
            if b not in out:
                out.append(b)
    return out


def with_budget(cfg: Config, max_calls: int) -> Config:
    return replace(cfg, loop=replace(cfg.loop, max_calls=max_calls))


def summarize(rows: list[dict], capacity: float | None) -> dict:
    tiers = sorted({r["tier"] for r in rows})
    by = {t: [r for r in rows if r["tier"] == t] for t in tiers}
    rate = {t: sum(r["passed"] for r in by[t]) / len(by[t]) for t in tiers}
    c_mean = {t: float(np.mean([r["c_task"] for r in by[t]])) for t in tiers}
    passed_c = [r["c_task"] for r in rows if r["passed"]]
    return {
        "auc": round(auc_pass([c_mean[t] for t in tiers], [rate[t] for t in tiers]), 2),
        "pass": round(float(np.mean([r["passed"] for r in rows])), 3),
        "i_eff": capacity,
        "per_tier": {str(t): round(rate[t], 3) for t in tiers},
        "c_task_per_tier": {str(t): round(c_mean[t], 2) for t in tiers},
        "median_c_task_passed": float(statistics.median(passed_c)) if passed_c else None,
        "nfe_mean": round(float(np.mean([r["nfe"] for r in rows])), 2),
        "calls_mean": round(float(np.mean([r["calls"] for r in rows])), 3),
        "s_per_prompt": round(float(np.mean([r["seconds"] for r in rows])), 4),
        "s_per_prompt_per_tier": {str(t): round(float(np.mean([r["seconds"] for r in by[t]])), 4) for t in tiers},
        "retries_mean": round(float(np.mean([r["retries"] for r in rows])), 3),
        "corrections_mean": round(float(np.mean([r["corrections"] for r in rows])), 3),
        "rejected": int(sum(r["rejected"] for r in rows)),
        "n": len(rows),
    }


# ---- the probe -------------------------------------------------------------------------------------------

def run_probe(cfg: Config, generator: Generator, n_per_tier: int | None = None, tiers=TIERS,
              out: str | Path | None = None, log=print, max_calls: list[int] | None = None) -> dict:
    """Single-step vs loop (and the rewrite baseline, with `eval.rewrite`) on the same held-out prompts and the
    same generator, and the loop at each call budget in `max_calls` (0 = unbounded; see the module docstring).
    Writes probe.json, probe_rows.jsonl (budget runs' rows carry "max_calls") and probe.png under `out`
    (default cfg.eval.out); returns the summary."""
    validate(cfg)
    n = n_per_tier or cfg.eval.n_per_tier
    prompts = probe_prompts(n, cfg.eval.seed, cfg.world.grid, tiers, cfg.eval.split)
    if not prompts:
        raise ClvrError(f"eval.split {cfg.eval.split!r}: no prompts of that split in tiers {list(tiers)}")
    capacity = i_eff(generator)  # one backbone, one figure: every mode reports it
    roles = build_roles(cfg)  # the budget is the loop's argument, not the controller's: one controller serves all
    result, rows_all = {}, []
    for mode in eval_modes(cfg):
        t = time.perf_counter()
        rows = run_mode(cfg, generator, prompts, mode, cfg.eval.seed, roles)
        result[mode] = summarize(rows, capacity)
        log(f"{mode:>7}: auc {result[mode]['auc']:.1f}  pass/tier {list(result[mode]['per_tier'].values())}  "
            f"{result[mode]['calls_mean']:.2f} calls  {result[mode]['s_per_prompt']:.3f} s/prompt  "
            f"({time.perf_counter() - t:.1f} s)")
        rows_all += [{**{k: v for k, v in r.items() if k != "final"}, "mode": mode} for r in rows]
    if max_calls:
        result["budgets"] = {}
        for b in max_calls:
            label = budget_label(b)
            if b == cfg.loop.max_calls:
                result["budgets"][label] = result["loop"]
                continue
            t = time.perf_counter()
            rows = run_mode(with_budget(cfg, b), generator, prompts, "loop", cfg.eval.seed, roles)
            result["budgets"][label] = summarize(rows, capacity)
            r = result["budgets"][label]
            log(f"loop, max {label} calls: auc {r['auc']:.1f}  pass {r['pass']:.3f}  pass/tier "
                f"{list(r['per_tier'].values())}  {r['calls_mean']:.2f} calls  ({time.perf_counter() - t:.1f} s)")
            rows_all += [{**{k: v for k, v in r_.items() if k != "final"}, "mode": "loop", "max_calls": b} for r_ in rows]
    result["auc_ratio"] = round(result["loop"]["auc"] / result["single"]["auc"], 3) if result["single"]["auc"] else None
    result["generator"] = getattr(generator, "name", type(generator).__name__)
    result["n_per_tier"], result["split"] = n, cfg.eval.split
    out = Path(out or cfg.eval.out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "probe.json", json.dumps(result, indent=1))
    atomic_write_text(out / "probe_rows.jsonl", "".join(json.dumps(r) + "\n" for r in rows_all))
    plot_probe(result, out / "probe.png")
    result["plot"] = str(out / "probe.png")
    return result


def plot_probe(result: dict, path: Path) -> list[str]:
    """Pass rate vs C_task: single step, the rewrite baseline (when run), and the loop at each call budget (or
    the config's loop); returns the curves' labels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.6), dpi=120)
    curves = [("single", result["single"], "o--")]
    if "rewrite" in result:
        curves.append(("rewrite (1 call, open loop)", result["rewrite"], "^-."))
    if result.get("budgets"):  # one curve per call budget (the config's own loop is one of them or drawn too)
        labels = list(result["budgets"])
        curves += [("loop, " + (b if b == "unbounded" else f"≤ {b} call{'s' * (b != '1')}"), result["budgets"][b], "s-")
                   for b in labels]
        if result["loop"] not in result["budgets"].values():
            curves.append(("loop (config budget)", result["loop"], "s:"))
    else:
        curves.append(("loop", result["loop"], "s-"))
    for label, r, style in curves:
        tiers = list(r["per_tier"])
        # the rewrite curve often equals the loop's at 1 call: drawn on top with open markers, both stay visible
        on_top = dict(zorder=3, markerfacecolor="none", markersize=8) if label.startswith("rewrite") else {}
        ax.plot([r["c_task_per_tier"][t] for t in tiers], [r["per_tier"][t] for t in tiers], style,
                label=f"{label} (AUC {r['auc']:.1f})", **on_top)
    ax.set_xlabel("C_task (mean per tier)")
    ax.set_ylabel("pass rate")
    ax.set_ylim(-0.03, 1.03)
    cap = result["loop"]["i_eff"]
    modes = "single-step, rewrite" if "rewrite" in result else "single-step"
    ax.set_title(f"{result['generator']}: {modes} vs loop (I_eff {cap if cap is not None else 'n/a'})", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7 if len(curves) > 3 else None)
    fig.tight_layout()
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(path)
    return [label for label, _, _ in curves]


# ---- GenEval suites in the world ----------------------------------------------------------------------

def run_geneval_world(cfg: Config, generator: Generator, n_per_tag: int | None = None,
                      out: str | Path | None = None, log=print, max_calls: list[int] | None = None) -> dict:
    """The six GenEval suites through generation + the judge, in each mode (single, loop and, with
    `eval.rewrite`, the rewrite baseline). Also writes each mode's images in GenEval's folder layout
    (out/geneval-world/<mode>/NNNNN/{metadata.jsonl,samples/0000.png}) so `clvr eval geneval` can score them
    independently. With `max_calls`, the loop also runs at each call budget: "budgets" holds each one's overall
    and per-tag pass, pass over all prompts, and AUC over the prompts' C_task tiers (as the probe computes it);
    their images are not written. The rewrite row has the budget rows' fields (it is a 1-call run)."""
    from clvr.world.grammar import geneval_suite

    n = n_per_tag or cfg.eval.geneval_n
    prompts = []
    for k, tag in enumerate(GENEVAL_TAGS):
        prompts += [dict(md, tag=md.get("tag", tag)) for md in geneval_suite(tag, n, np.random.default_rng([cfg.eval.seed, 7, k]))]
    root = Path(out or cfg.eval.out) / "geneval-world"
    roles = build_roles(cfg)
    result: dict = {}
    by_mode: dict[str, list[dict]] = {}
    for mode in eval_modes(cfg):
        rows = by_mode[mode] = run_mode(cfg, generator, prompts, mode, cfg.eval.seed, roles)
        result[mode] = tag_summary(rows, prompts, with_auc=mode == "rewrite")
        log(f"{mode:>7}: overall {result[mode]['overall']:.3f}  {result[mode]['per_tag']}")
        write_geneval_folder(root / mode, prompts, [[r["final"]] for r in rows], "eval geneval-world",
                             is_geneval_layout)
    if max_calls:
        result["budgets"] = {}
        for b in max_calls:
            rows = by_mode["loop"] if b == cfg.loop.max_calls else run_mode(with_budget(cfg, b), generator, prompts,
                                                                            "loop", cfg.eval.seed, roles)
            label = budget_label(b)
            r = result["budgets"][label] = tag_summary(rows, prompts, with_auc=True)
            log(f"loop, max {label} calls: overall {r['overall']:.3f}  auc {r['auc']:.1f}  {r['calls_mean']:.2f} calls")
    result["generator"] = getattr(generator, "name", type(generator).__name__)
    result["n_per_tag"] = n
    atomic_write_text(root / "summary.json", json.dumps(result, indent=1))
    return result


def tag_summary(rows: list[dict], prompts: list[dict], with_auc: bool = False) -> dict:
    """GenEval's scores of one run: pass per tag and `overall` (their mean), calls and seconds per prompt; with
    `with_auc`, also pass over all prompts and AUC over the prompts' C_task tiers (as the probe computes it)."""
    from clvr.world.grammar import c_task, tier_of

    per_tag = {tag: round(float(np.mean([r["passed"] for r in rows if r["tag"] == tag])), 3)
               for tag in GENEVAL_TAGS if any(r["tag"] == tag for r in rows)}
    overall = round(float(np.mean(list(per_tag.values()))), 3)
    if not with_auc:
        return {"overall": overall, "per_tag": per_tag,
                "calls_mean": round(float(np.mean([r["calls"] for r in rows])), 3),
                "s_per_prompt": round(float(np.mean([r["seconds"] for r in rows])), 4)}
    for r, md in zip(rows, prompts):
        r["c_task"] = c_task(md)
        r["tier"] = tier_of(r["c_task"])
    s = summarize(rows, None)
    return {"overall": overall, "pass": s["pass"], "auc": s["auc"], "per_tag": per_tag, "calls_mean": s["calls_mean"],
            "s_per_prompt": s["s_per_prompt"]}


# ---- efficiency table ----------------------------------------------------------------------------------

def batched_seconds(cfg: Config, generators: dict[str, Generator], prompts: list[dict], budget, controller,
                    verifier) -> dict:
    """Seconds per prompt when all `prompts` run their loops in lockstep (one batch per round), per generator."""
    row, names = {}, list(generators)
    jobs = [(md["prompt"], cfg.eval.seed + i) for i, md in enumerate(prompts)]
    for name, gen in generators.items():
        t = time.perf_counter()
        run_many(jobs, controller, gen, verifier, budget, "loop", cfg.world.grid, cfg.world.cell, len(jobs))
        row[f"{name}_s_batched"] = round((time.perf_counter() - t) / len(jobs), 4)
    if len(names) >= 2:
        row["speedup_batched"] = round(row[f"{names[0]}_s_batched"] / max(row[f"{names[1]}_s_batched"], 1e-9), 2)
    return row


def with_base_4(cfg: Config, generators: dict[str, Generator]) -> dict[str, Generator]:
    """`generators` plus `base_4` (the base's network at `sample.distilled_steps` without CFG, the naive
    few-step baseline distillation must beat) when one of them is the world backend's base; else unchanged."""
    from clvr.models.backend import WorldGenerator

    base = generators.get("base")
    if not isinstance(base, WorldGenerator) or "base_4" in generators:
        return generators
    return {**generators, "base_4": WorldGenerator(base.pipe, cfg.sample.distilled_steps, 1.0, name="world-base_4")}


def run_speed(cfg: Config, generators: dict[str, Generator], n: int | None = None, max_iters: int = 4,
              tier: int = 8, log=print) -> dict:
    """Seconds per prompt for a loop of exactly k = 1..max_iters generator calls (budget max_iters = k, one
    prompt at a time as `clvr generate` runs it), per generator; speedup = first / second. Prompts come from
    `tier` (every tier-8 prompt has >= 5 objects, so no loop stops before k calls). The generators take
    turns prompt by prompt and each cell is the median, so load from other processes hits both alike.

    Latency at batch 1 is bound by per-call overhead for a 1M-parameter model on a CPU, not by compute, so it
    scales with sampling steps rather than NFE (the base's CFG pair is one forward of batch 2). At real scale
    one 1024 px image saturates the GPU and time follows NFE. The `*_batched` columns show that regime: the
    same loops for `eval.speed_batch` prompts in lockstep, seconds per prompt = batch time / batch.

    When the reference is the world base, a `base_4` column (the base at the distilled step count, no CFG)
    runs beside the two; speedups stay first / second. `<name>_pass` is the share of prompts whose loop
    passed within k calls: the quality side of the table."""
    import torch

    validate(cfg)
    pair = list(generators)[:2]
    generators = with_base_4(cfg, generators)
    n = n or cfg.eval.speed_n
    prompts = probe_prompts(n, cfg.eval.seed + 1, cfg.world.grid, (tier,))
    batched = probe_prompts(cfg.eval.speed_batch, cfg.eval.seed + 2, cfg.world.grid, (tier,))
    names = list(generators)
    controller, verifier = build_roles(cfg)
    for gen in generators.values():  # warm-up (first-call allocations, lazy imports)
        run_loop(prompts[0]["prompt"], controller, gen, verifier, replace(cfg.loop, max_iters=1), 0, "loop",
                 cfg.world.grid, cfg.world.cell)
    rows = []
    for k in range(1, max_iters + 1):
        budget = replace(cfg.loop, max_iters=k, max_nfe=10**9)
        secs: dict[str, list[float]] = {name: [] for name in names}
        nfes: dict[str, list[int]] = {name: [] for name in names}
        passed: dict[str, list[bool]] = {name: [] for name in names}
        for i, md in enumerate(prompts):
            for name, gen in generators.items():
                t = time.perf_counter()
                tr = run_loop(md["prompt"], controller, gen, verifier, budget, cfg.eval.seed + i, "loop",
                              cfg.world.grid, cfg.world.cell)
                secs[name].append(time.perf_counter() - t)
                nfes[name].append(tr.nfe)
                passed[name].append(bool(tr.passed))
        row: dict = {"iterations": k}
        for name in names:
            row[f"{name}_s"] = round(float(np.median(secs[name])), 4)
            row[f"{name}_nfe"] = round(float(np.mean(nfes[name])), 1)
            row[f"{name}_pass"] = round(float(np.mean(passed[name])), 3)
        if len(pair) >= 2:
            row["speedup"] = round(row[f"{pair[0]}_s"] / max(row[f"{pair[1]}_s"], 1e-9), 2)
        if cfg.eval.speed_batch:
            row.update(batched_seconds(cfg, generators, batched, budget, controller, verifier))
        log("  ".join(f"{k_}={v}" for k_, v in row.items()))
        rows.append(row)
    speedups = [r["speedup"] for r in rows if "speedup" in r]
    batched_speedups = [r["speedup_batched"] for r in rows if "speedup_batched" in r]
    return {"rows": rows, "speedup_mean": round(float(np.mean(speedups)), 2) if speedups else None,
            "speedup_batched_mean": round(float(np.mean(batched_speedups)), 2) if batched_speedups else None,
            "batch": cfg.eval.speed_batch,
            "models": names, "n": n, "tier": tier, "device": "cpu", "torch_threads": torch.get_num_threads()}
