"""The `evaluate` pipeline stage: every generator the earlier stages trained (their `final/` folders), on the six
GenEval suites in world vocabulary, single step (one text-to-image call per prompt), judged by the
GenEval-format judge against each prompt's own metadata; then the semantic-complexity probe (single step vs
the closed loop over the 10 tiers: pass rate per tier, AUC, I_eff) on the last generator, the one the loop
runs (the 4-NFE distilled model when the distill stage ran).

Writes to `cfg.eval.out`: `metrics.json` (`<stage>_geneval_<tag>` and `<stage>_geneval_overall`, the mean over
tags, for each evaluated stage; `probe_<mode>_auc`, `probe_<mode>_tier<k>`, `probe_auc_ratio`, `probe_i_eff`),
`prompts.jsonl` (the suite: a data set DVC versions), `geneval.json` + `geneval.png` (DVC plots), `samples.png`
(the first prompt of each tag per model; green frame = passed), `probe.json` + `probe.png` and
`filmstrip.png` (one tier-10 prompt through the loop).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from clvr.config import Config
from clvr.errors import ClvrError
from clvr.io import atomic_write_text, save_figure, save_png
from clvr.registry import is_checkpoint

MODEL_STAGES = ("pretrain", "distill")  # config sections whose `<out>/final` is a generator


def generators_to_evaluate(cfg: Config) -> dict[str, Path]:
    """Stage name -> its final/ folder, for the stages that have produced one."""
    found = {s: Path(getattr(cfg, s).out) / "final" for s in MODEL_STAGES}
    found = {s: p for s, p in found.items() if is_checkpoint(p)}
    if not found:
        wanted = ", ".join(str(Path(getattr(cfg, s).out) / "final") for s in MODEL_STAGES)
        raise ClvrError(f"nothing to evaluate: no generator at {wanted} (run the pretrain stage first)")
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
    for stage, path in models.items():
        t = time.perf_counter()
        generator = load_generator(cfg, str(path))
        rows = run_mode(cfg, generator, prompts, "single", cfg.eval.seed)
        scores[stage] = {k: round(v, 4) for k, v in score(rows).items()}
        metrics.update({f"{stage}_geneval_{k}": v for k, v in scores[stage].items()})
        metrics[f"{stage}_s_per_prompt"] = (time.perf_counter() - t) / len(rows)
        finals[stage] = rows
        print(f"[evaluate] {stage}: GenEval (world, single step) overall {scores[stage]['overall']:.3f}", flush=True)
    atomic_write_text(out / "geneval.json", json.dumps([{"group": f"{stage}/{k}", "accuracy": v}
                                             for stage, sc in scores.items() for k, v in sc.items()], indent=1))
    plot_geneval(scores, out / "geneval.png")
    samples_sheet(finals, out / "samples.png")
    metrics.update(probe_metrics(cfg, generator, out))  # the last generator: the one the loop runs
    atomic_write_text(out / "metrics.json", json.dumps(metrics, indent=2))
    return {"metrics": metrics, "final": None}


def probe_metrics(cfg: Config, generator, out: Path) -> dict[str, float]:
    """The probe (probe.json, probe.png) and a tier-10 filmstrip of the loop; flat metrics for MLflow/DVC."""
    from clvr.loop.run import build_roles, run_loop
    from clvr.loop.trace import filmstrip
    from clvr.probe import probe_prompts, run_probe

    res = run_probe(cfg, generator, cfg.eval.probe_n_per_tier, out=out, log=lambda m: print(f"[evaluate] probe {m}"))
    metrics = {"probe_auc_ratio": res["auc_ratio"] or 0.0, "probe_i_eff": res["loop"]["i_eff"] or 0.0}
    for mode in ("single", "loop"):
        metrics[f"probe_{mode}_auc"] = res[mode]["auc"]
        metrics.update({f"probe_{mode}_tier{t}": v for t, v in res[mode]["per_tier"].items()})
    md = probe_prompts(1, cfg.eval.seed + 1, cfg.world.grid, tiers=[10])[0]
    controller, verifier = build_roles(cfg)
    trace = run_loop(md["prompt"], controller, generator, verifier, cfg.loop, seed=cfg.eval.seed,
                     grid=cfg.world.grid, cell=cfg.world.cell)
    save_png(out / "filmstrip.png", np.asarray(filmstrip(trace)))
    return metrics


def plot_geneval(scores: dict[str, dict[str, float]], path: Path) -> None:
    """Grouped horizontal bars: pass rate per GenEval tag (and overall), one bar per evaluated stage."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = list(next(iter(scores.values())))
    fig, ax = plt.subplots(figsize=(5.5, 3.6), dpi=120)
    h = 0.8 / len(scores)
    for i, (stage, sc) in enumerate(scores.items()):
        ax.barh(np.arange(len(groups)) + i * h, [sc[g] for g in groups], height=h, label=stage)
    ax.set_yticks(np.arange(len(groups)) + 0.4 - h / 2, groups)
    ax.set_xlim(0, 1)
    ax.set_xlabel("pass rate (single step)")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)


def samples_sheet(finals: dict[str, list[dict]], path: Path, scale: int = 2) -> None:
    """One row per stage: the first prompt of each tag, framed green (passed) or red (failed)."""
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
