"""`clvr synthesize` (the data engine, outside the pipeline) and `clvr bench synthesize`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

import typer

from clvr.cli import ProfileOpt, app
from clvr.errors import ClvrError


def bench_group() -> typer.Typer:
    """The `clvr bench` group: the one already on `app` if another module added it, else a new one."""
    for g in app.registered_groups:
        if g.name == "bench" and g.typer_instance is not None:
            return g.typer_instance
    group = typer.Typer(help="Benchmarks: each prints one JSON object as its last line.", no_args_is_help=True)
    app.add_typer(group, name="bench")
    return group


bench_app = bench_group()

WorkersOpt = typer.Option(None, "--workers", "-w", min=1, help="processes (default: config synthesize.workers); "
                                                              "the output is identical for any number")
OverridesArg = typer.Argument(None, help="config overrides key=value, e.g. synthesize.n_per_tier=10")


SYNTH_USES = ("world", "loop", "controller", "detector", "weights", "synthesize")  # sections the data engine reads


def _cfg(profile: str, overrides: list[str] | None, command: str):
    from clvr.config import load_config

    return load_config(profile, overrides, uses=SYNTH_USES, command=command)


@app.command("synthesize")
def synthesize_cmd(overrides: Optional[List[str]] = OverridesArg, profile: str = ProfileOpt,
                   workers: Optional[int] = WorkersOpt) -> None:
    """Make the trajectory data set (synthesize.out): trajectories.jsonl + images, metrics.json, dataset_card.md.
    Killed runs resume where they stopped. Last line: one JSON object (the metrics)."""
    from clvr import synthesize

    res = synthesize.run(_cfg(profile, overrides, "synthesize"), workers)
    m = res["metrics"]
    typer.echo(f"{int(m['accepted'])}/{int(m['trajectories'])} trajectories accepted, A/B win or tie "
               f"{m['ab_win_or_tie']:.3f} -> {res['final']}")
    typer.echo(json.dumps({"final": res["final"], **m}))


@bench_app.command("synthesize")
def bench_synthesize(overrides: Optional[List[str]] = OverridesArg, profile: str = ProfileOpt,
                     workers: Optional[int] = WorkersOpt,
                     out: Optional[Path] = typer.Option(None, "--out", help="scratch folder, emptied first if an "
                                                       "earlier synthesize run made it, else it must be new or "
                                                       "empty (default: <synthesize.out>-bench)")) -> None:
    """Time a full data-engine run from scratch. Last line: JSON with trajectories_per_min, accepted_per_min,
    acceptance_per_tier, ab_win_or_tie, training examples per k and whether the target (>= 2000 accepted in <= 600 s) was met."""
    from dataclasses import replace

    from clvr import synthesize

    from clvr.io import empty_own_dir

    cfg = _cfg(profile, overrides, "bench synthesize")
    folder = out or Path(cfg.synthesize.out + "-bench")
    if folder.resolve() == Path(cfg.synthesize.out).resolve():
        raise ClvrError(f"--out {folder} is the stage's own output folder; the bench empties its folder")
    cfg = replace(cfg, synthesize=replace(cfg.synthesize, out=str(folder)))
    synthesize.preflight(cfg, workers)  # config, model and controller checked before anything is removed
    if empty_own_dir(folder, synthesize.OWNER, synthesize.earlier_output, "--out"):
        typer.echo(f"emptied the earlier synthesize output in {folder}", err=True)
    res = synthesize.run(cfg, workers)
    m, minutes = res["metrics"], res["metrics"]["wall_s"] / 60
    model = synthesize.resolve_model(cfg)
    result = {
        "trajectories_per_min": round(m["trajectories"] / minutes, 1),
        "accepted_per_min": round(m["accepted"] / minutes, 1),
        "acceptance_per_tier": {str(t): m[f"acceptance_tier_{t}"] for t in cfg.synthesize.tiers},
        "ab_win_or_tie": m["ab_win_or_tie"],
        "acceptance_rate": m["acceptance_rate"],
        "accepted": int(m["accepted"]),
        "trajectories": int(m["trajectories"]),
        "mean_steps": m["mean_steps"],
        "examples_per_k": {k.rsplit("_", 1)[1]: int(v) for k, v in m.items() if k.startswith("examples_k_")},
        "wall_s": m["wall_s"],
        "workers": workers or cfg.synthesize.workers,
        "threads_per_worker": cfg.synthesize.threads,
        "generator": cfg.synthesize.generator,
        "model": model,
        "steps": cfg.synthesize.steps,  # 0 = the model's recorded default (base: 28 + CFG)
        "guidance": cfg.synthesize.guidance,  # < 0 = the model's recorded default
        "target_met": bool(m["accepted"] >= 2000 and m["wall_s"] <= 600),
    }
    typer.echo(f"{result['accepted']}/{result['trajectories']} accepted in {m['wall_s']:.1f} s "
               f"({result['trajectories_per_min']} trajectories/min, model {model}) -> {res['final']}")
    typer.echo(json.dumps(result))
