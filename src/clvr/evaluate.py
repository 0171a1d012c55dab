"""The `evaluate` pipeline stage (retrain flow, last): the released base and distilled generators (`weights.base`,
`weights.distilled`: the shipped ones or registry-pinned folders) and the SFT model (`<sft.out>/final`, once the
sft stage made it), on the six GenEval suites in world vocabulary, single step (one text-to-image call per prompt),
judged by the GenEval-format judge against each prompt's own metadata; then the semantic-complexity probe (single
step vs the closed loop over the 10 tiers, and the open-loop rewrite baseline with `eval.rewrite`: pass rate per
tier, AUC, I_eff) on the released distilled model, the 4-NFE generator the loop runs by default (`loop.model`).

Writes to `cfg.eval.out`: `metrics.json` (`<model>_geneval_<tag>` and `<model>_geneval_overall`, the mean over
tags, for each evaluated model: base, distilled, sft; `probe_<mode>_auc`, `probe_<mode>_tier<k>` for the modes
single, loop and (with `eval.rewrite`) rewrite, `probe_auc_ratio`, `probe_i_eff`; with a learned controller
(`loop.controller_model`, the controller_sft stage's output) its pass rate beside its teacher's, `learned_metrics`),
`prompts.jsonl` (the suite: a
data set DVC versions), `geneval.json` + `geneval.png` (DVC plots), `samples.png` (the first prompt of each tag
per model; green frame = passed), `probe.json` + `probe.png` and `filmstrip.png` (one tier-10 prompt through the
loop).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from clvr.config import Config
from clvr.io import atomic_write_text, save_figure, save_png
from clvr.registry import is_checkpoint, released

PROBED = "distilled"  # the model the probe and the filmstrip run: the released 4-NFE generator


def generators_to_evaluate(cfg: Config) -> dict[str, str]:
    """Model name in the metrics -> model ("base" | "distilled" | a folder): the released pair (checked by
    clvr.registry, a CheckpointError naming `weights.<name>` if one is missing), then the SFT model if made."""
    found = released(cfg.weights.base, cfg.weights.distilled)
    sft = Path(cfg.sft.out) / "final"
    if is_checkpoint(sft):
        found["sft"] = str(sft)
    return found


def geneval_prompts(cfg: Config) -> list[dict]:
    """`eval.geneval_n` prompts per GenEval tag, seeded as `clvr eval geneval-world` seeds them."""
    from clvr.probe import GENEVAL_TAGS
    from clvr.world.grammar import geneval_suite

    prompts = []
    for k, tag in enumerate(GENEVAL_TAGS):
        rng = np.random.default_rng([cfg.eval.seed, 7, k])
        prompts += [dict(md, tag=tag) for md in geneval_suite(tag, cfg.eval.geneval_n, rng)]
    return prompts


def score(rows: list[dict]) -> dict[str, float]:
    """Pass rate per tag and `overall`, the mean over tags (GenEval's overall score)."""
    tags = sorted({r["tag"] for r in rows})
    per_tag = {t: float(np.mean([r["passed"] for r in rows if r["tag"] == t])) for t in tags}
    return {**per_tag, "overall": float(np.mean(list(per_tag.values())))}


def run(cfg: Config) -> dict:
    from clvr.config import validate
    from clvr.loop.run import load_generator
    from clvr.probe import run_mode

    validate(cfg)
    out = Path(cfg.eval.out)
    out.mkdir(parents=True, exist_ok=True)
    models = generators_to_evaluate(cfg)
    prompts = geneval_prompts(cfg)
    atomic_write_text(out / "prompts.jsonl", "".join(json.dumps(md) + "\n" for md in prompts))
    scores: dict[str, dict[str, float]] = {}
    metrics: dict[str, float] = {}
    finals: dict[str, list] = {}
    probed = None
    for name, path in models.items():
        t = time.perf_counter()
        generator = load_generator(cfg, str(path))
        probed = generator if name == PROBED else probed
        rows = run_mode(cfg, generator, prompts, "single", cfg.eval.seed)
        scores[name] = {k: round(v, 4) for k, v in score(rows).items()}
        metrics.update({f"{name}_geneval_{k}": v for k, v in scores[name].items()})
        metrics[f"{name}_s_per_prompt"] = (time.perf_counter() - t) / len(rows)
        finals[name] = rows
        print(f"[evaluate] {name}: GenEval (world, single step) overall {scores[name]['overall']:.3f}", flush=True)
    atomic_write_text(out / "geneval.json", json.dumps([{"group": f"{name}/{k}", "accuracy": v}
                                             for name, sc in scores.items() for k, v in sc.items()], indent=1))
    plot_geneval(scores, out / "geneval.png")
    samples_sheet(finals, out / "samples.png")
    metrics.update(probe_metrics(cfg, probed, out))  # the released 4-NFE generator: the one the loop runs
    atomic_write_text(out / "metrics.json", json.dumps(metrics, indent=2))
    return {"metrics": metrics, "final": None}


def probe_metrics(cfg: Config, generator, out: Path) -> dict[str, float]:
    """The probe (probe.json, probe.png) and a tier-10 filmstrip of the loop; flat metrics for MLflow/DVC."""
    from clvr.loop.run import build_roles, run_loop
    from clvr.loop.trace import filmstrip
    from clvr.probe import MODES, probe_prompts, run_probe

    res = run_probe(cfg, generator, cfg.eval.probe_n_per_tier, out=out, log=lambda m: print(f"[evaluate] probe {m}"))
    metrics = {"probe_auc_ratio": res["auc_ratio"] or 0.0, "probe_i_eff": res["loop"]["i_eff"] or 0.0}
    for mode in (m for m in MODES if m in res):
        metrics[f"probe_{mode}_auc"] = res[mode]["auc"]
        metrics.update({f"probe_{mode}_tier{t}": v for t, v in res[mode]["per_tier"].items()})
    md = probe_prompts(1, cfg.eval.seed + 1, cfg.world.grid, tiers=[10])[0]
    controller, verifier = build_roles(cfg)
    trace = run_loop(md["prompt"], controller, generator, verifier, cfg.loop, seed=cfg.eval.seed,
                     grid=cfg.world.grid, cell=cfg.world.cell)
    save_png(out / "filmstrip.png", np.asarray(filmstrip(trace)))
    return {**metrics, **learned_metrics(cfg, generator)}


LEARNED_BUDGETS = (4, 0)  # the learned controller is compared with its teacher at <= 4 calls and unbounded


def learned_metrics(cfg: Config, generator) -> dict[str, float]:
    """The learned controller (`loop.controller_model`, the controller_sft stage's output) against its teacher,
    the symbolic controller with the same per-k table (`controller_sft.k_success`), on the probe's prompts with the
    probed generator, at each budget of `LEARNED_BUDGETS`: `probe_<teacher|learned>_<b4|unbounded>_pass` and
    `..._tier<k>`, and the learned controller's `probe_learned_rejected` (outputs the loop refused) and
    `probe_learned_decision_seconds_median` (its time per decision). Nothing when there is no controller folder."""
    from dataclasses import replace

    from clvr.learned.model import MARKER
    from clvr.loop.run import build_roles
    from clvr.probe import budget_label, probe_prompts, run_mode, with_budget

    if not (Path(cfg.loop.controller_model) / MARKER).is_file():
        return {}
    prompts = probe_prompts(cfg.eval.probe_n_per_tier, cfg.eval.seed, cfg.world.grid)
    metrics: dict[str, float] = {}
    for who in ("teacher", "learned"):
        c = replace(cfg, loop=replace(cfg.loop, controller="world" if who == "teacher" else "learned",
                                      k_success=cfg.controller_sft.k_success))
        roles = build_roles(c)
        for b in LEARNED_BUDGETS:
            rows = run_mode(with_budget(c, b), generator, prompts, "loop", cfg.eval.seed, roles)
            key = f"probe_{who}_b{b}" if b else f"probe_{who}_unbounded"
            metrics[f"{key}_pass"] = float(np.mean([r["passed"] for r in rows]))
            for t in sorted({r["tier"] for r in rows}):
                metrics[f"{key}_tier{t}"] = float(np.mean([r["passed"] for r in rows if r["tier"] == t]))
            if who == "learned":
                metrics["probe_learned_rejected"] = metrics.get("probe_learned_rejected", 0) + sum(r["rejected"] for r in rows)
            print(f"[evaluate] {who} controller, {budget_label(b)} calls: pass {metrics[f'{key}_pass']:.3f}", flush=True)
        if who == "learned":
            metrics["probe_learned_decision_seconds_median"] = float(np.median(roles[0].stats.seconds))
    return metrics


def plot_geneval(scores: dict[str, dict[str, float]], path: Path) -> None:
    """Grouped horizontal bars: pass rate per GenEval tag (and overall), one bar per evaluated model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = list(next(iter(scores.values())))
    fig, ax = plt.subplots(figsize=(5.5, 3.6), dpi=120)
    h = 0.8 / len(scores)
    for i, (name, sc) in enumerate(scores.items()):
        ax.barh(np.arange(len(groups)) + i * h, [sc[g] for g in groups], height=h, label=name)
    ax.set_yticks(np.arange(len(groups)) + 0.4 - h / 2, groups)
    ax.set_xlim(0, 1)
    ax.set_xlabel("pass rate (single step)")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)


def samples_sheet(finals: dict[str, list[dict]], path: Path, scale: int = 2) -> None:
    """One row per model: the first prompt of each tag, framed green (passed) or red (failed)."""
    from PIL import Image, ImageDraw

    rows = {s: [next(r for r in rs if r["tag"] == t) for t in dict.fromkeys(r["tag"] for r in rs)]
            for s, rs in finals.items()}
    h = next(iter(rows.values()))[0]["final"].shape[0] * scale
    pad, ncol = 6, max(len(r) for r in rows.values())
    sheet = Image.new("RGB", (pad + ncol * (h + pad), pad + len(rows) * (h + pad)), "white")
    draw = ImageDraw.Draw(sheet)
    for i, shots in enumerate(rows.values()):
        for j, r in enumerate(shots):
            x, y = pad + j * (h + pad), pad + i * (h + pad)
            sheet.paste(Image.fromarray(r["final"]).resize((h, h), Image.NEAREST), (x, y))
            frame = (40, 160, 60) if r["passed"] else (210, 40, 40)
            draw.rectangle([x - 2, y - 2, x + h + 1, y + h + 1], outline=frame, width=2)
    save_png(path, np.asarray(sheet))
