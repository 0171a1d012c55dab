"""`clvr world ...`: parse and sample prompts, render ground-truth suites, benchmark the verifier and training."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from clvr.cli import ProfileOpt
from clvr.cli.groups import world_app
from clvr.config import MAX_SEED

SeedOpt = typer.Option(0, "--seed", min=0, max=MAX_SEED)

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
               n: int = typer.Option(5, "--n", min=1, max=100_000), seed: int = SeedOpt,
               grid: int = typer.Option(4, "--grid", min=2, max=16)) -> None:
    """Print `n` seeded grammar prompts of one tier as GenEval-format JSONL."""
    import numpy as np

    from clvr.world.grammar import sample_prompt

    rng = np.random.default_rng([seed, tier])
    for _ in range(n):
        typer.echo(json.dumps(sample_prompt(tier, rng, grid)))


@world_app.command("render-suite")
def render_suite_cmd(metadata: Path = typer.Option(..., "--metadata", help="GenEval-format JSONL in world vocabulary"),
                     out: Path = typer.Option(..., "--out", help="output folder (GenEval layout); replaced whole "
                                              "if an earlier render-suite made it, else it must be new or empty"),
                     samples: int = typer.Option(1, "--samples", min=1, max=1000, help="images per prompt"),
                     seed: int = SeedOpt, profile: str = ProfileOpt, varied: Optional[bool] = VariedOpt) -> None:
    """Render ground truth for every prompt in GenEval's layout (DIR/00000/metadata.jsonl, samples/0000.png)."""
    from clvr.config import load_config
    from clvr.io import claim_dir
    from clvr.judge import read_jsonl
    from clvr.world.bench import render_suite

    cfg = load_config(profile)
    claim_dir(out, "world render-suite", what="--out")  # before reading or rendering anything
    mds = read_jsonl(metadata)
    if render_suite(mds, out, samples, seed, cfg.world.grid, cfg.world.cell, where=str(metadata),
                    appearance=_appearance(cfg, varied)):
        typer.echo(f"replaced the earlier suite in {out}", err=True)
    typer.echo(json.dumps({"prompts": len(mds), "samples": samples, "out": str(out)}))


@world_app.command("bench")
def bench_cmd(n: int = typer.Option(1000, "--n", min=1, max=1_000_000, help="scenes, spread over the 10 tiers"),
              seed: int = SeedOpt, profile: str = ProfileOpt, varied: Optional[bool] = VariedOpt) -> None:
    """Detector exactness, judge agreement (truth + recoloured/moved/removed copies), ms per image."""
    from clvr.config import load_config
    from clvr.world.bench import run_bench

    cfg = load_config(profile)
    result = run_bench(n, seed, cfg.world.grid, cfg.world.cell, _appearance(cfg, varied))
    for line in result.pop("disagreements"):
        typer.echo(f"disagreement: {line}")
    typer.echo(json.dumps(result))


@world_app.command("figure")
def figure_cmd(out: Path = typer.Option(Path("docs/tiers.png"), "--out"), seed: int = SeedOpt,
               profile: str = ProfileOpt, varied: Optional[bool] = VariedOpt) -> None:
    """Save a PNG with one rendered ground-truth scene per tier (1..10) and its prompt."""
    from clvr.config import load_config
    from clvr.io import check_out_file
    from clvr.world.bench import tier_figure

    cfg = load_config(profile)
    check_out_file(out, "--out")
    tier_figure(out, seed, cfg.world.grid, cfg.world.cell, _appearance(cfg, varied))
    typer.echo(json.dumps({"figure": str(out)}))


@world_app.command("bench-train")
def bench_train_cmd(overrides: list[str] = typer.Argument(None, help="key=value config overrides"),
                    steps: int = typer.Option(30, "--steps", min=1, help="timed steps per measurement"),
                    warmup: int = typer.Option(3, "--warmup", min=0, help="untimed steps first"),
                    repeats: int = typer.Option(2, "--repeats", min=1, help="plain and 1-process runs (best)"),
                    profile: str = ProfileOpt) -> None:
    """Training samples/s: the plain AdamW loop vs the engine with 1 and 2 processes (same global batch,
    pretrain section), peak RSS, and the 1- vs 2-process parameter difference. Last line: JSON."""
    from clvr.config import load_config
    from clvr.train.bench_train import run_bench

    load_config(profile, overrides)  # a bad key or value fails here, before any run
    typer.echo(json.dumps(run_bench(profile, overrides or [], steps, warmup, repeats)))
