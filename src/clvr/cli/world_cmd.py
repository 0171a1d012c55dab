"""`clvr world ...`: parse and sample prompts, render ground-truth suites, benchmark the verifier."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from clvr.cli import ProfileOpt
from clvr.cli.groups import world_app

VariedOpt = typer.Option(None, "--varied/--fixed",
                         help="varied or fixed object appearance (default: config world.appearance.varied)")


def _appearance(cfg, varied: Optional[bool]):
    """The config's `world.appearance`, with `varied` switched by the command-line flag when given."""
    from dataclasses import replace

    app = cfg.world.appearance
    return app if varied is None else replace(app, varied=varied)


@world_app.command("parse")
def parse_cmd(prompt: str = typer.Argument(..., help='e.g. "two red circles and a blue square above the red circles"'),
              solve: bool = typer.Option(False, "--solve", help="also print a layout that satisfies it")) -> None:
    """Print a prompt's GenEval-format metadata (and C_task, tier); a bad prompt names the offending words."""
    from clvr.world.grammar import c_task, tier_of
    from clvr.world.parser import parse
    from clvr.world.solver import solve as solve_fn

    md = parse(prompt)
    c = c_task(md)
    md.update(c_task=c, tier=tier_of(c))
    if solve:
        md["layout"] = solve_fn(md).to_list()
    typer.echo(json.dumps(md))


@world_app.command("sample")
def sample_cmd(tier: int = typer.Option(..., "--tier", min=1, max=10, help="complexity tier 1..10"),
               n: int = typer.Option(5, "--n", min=1), seed: int = typer.Option(0, "--seed"),
               grid: int = typer.Option(4, "--grid", min=2)) -> None:
    """Print `n` seeded grammar prompts of one tier as GenEval-format JSONL."""
    import numpy as np

    from clvr.world.grammar import sample_prompt

    rng = np.random.default_rng([seed, tier])
    for _ in range(n):
        typer.echo(json.dumps(sample_prompt(tier, rng, grid)))


@world_app.command("render-suite")
def render_suite_cmd(metadata: Path = typer.Option(..., "--metadata", help="GenEval-format JSONL in world vocabulary"),
                     out: Path = typer.Option(..., "--out", help="output folder (GenEval layout)"),
                     samples: int = typer.Option(1, "--samples", min=1, help="images per prompt"),
                     seed: int = typer.Option(0, "--seed"), profile: str = ProfileOpt,
                     varied: Optional[bool] = VariedOpt) -> None:
    """Render ground truth for every prompt in GenEval's layout (DIR/00000/metadata.jsonl, samples/0000.png)."""
    from clvr.config import load_config
    from clvr.judge import read_jsonl
    from clvr.world.bench import render_suite

    cfg = load_config(profile)
    mds = read_jsonl(metadata)
    render_suite(mds, out, samples, seed, cfg.world.grid, cfg.world.cell, where=str(metadata),
                 appearance=_appearance(cfg, varied))
    typer.echo(json.dumps({"prompts": len(mds), "samples": samples, "out": str(out)}))


@world_app.command("bench")
def bench_cmd(n: int = typer.Option(1000, "--n", min=1, help="scenes, spread over the 10 tiers"),
              seed: int = typer.Option(0, "--seed"), profile: str = ProfileOpt,
              varied: Optional[bool] = VariedOpt) -> None:
    """Detector exactness, judge agreement (truth + recoloured/moved/removed copies), ms per image."""
    from clvr.config import load_config
    from clvr.world.bench import run_bench

    cfg = load_config(profile)
    result = run_bench(n, seed, cfg.world.grid, cfg.world.cell, _appearance(cfg, varied))
    for line in result.pop("disagreements"):
        typer.echo(f"disagreement: {line}")
    typer.echo(json.dumps(result))


@world_app.command("figure")
def figure_cmd(out: Path = typer.Option(Path("docs/tiers.png"), "--out"), seed: int = typer.Option(0, "--seed"),
               profile: str = ProfileOpt, varied: Optional[bool] = VariedOpt) -> None:
    """Save a PNG with one rendered ground-truth scene per tier (1..10) and its prompt."""
    from clvr.config import load_config
    from clvr.world.bench import tier_figure

    cfg = load_config(profile)
    tier_figure(out, seed, cfg.world.grid, cfg.world.cell, _appearance(cfg, varied))
    typer.echo(json.dumps({"figure": str(out)}))
