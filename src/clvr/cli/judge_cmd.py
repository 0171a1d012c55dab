"""`clvr eval geneval DIR [--metadata FILE] [--detector world|openvocab]`: score a GenEval-layout folder with the
GenEval-format judge."""

from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.table import Table

from clvr.cli import ProfileOpt
from clvr.cli.groups import eval_app


def summary_table(summary: dict, title: str) -> Table:
    """Accuracy per GenEval tag and per tier, then the overall score (mean over tags)."""
    table = Table(title=title)
    table.add_column("group")
    table.add_column("accuracy", justify="right")
    for tag, acc in summary["per_tag"].items():
        table.add_row(f"tag {tag}", f"{acc:.3f}")
    for tier, acc in summary.get("per_tier", {}).items():
        table.add_row(f"tier {tier}", f"{acc:.3f}")
    overall = summary["overall"]
    table.add_row("[bold]overall (mean over tags)", "[bold]" + ("-" if overall is None else f"{overall:.3f}"))
    return table


def print_summary(summary: dict, title: str) -> None:
    console = Console()
    console.print(summary_table(summary, title))
    console.print(f"{summary['images']} images scored, {summary['correct']} correct; {summary['unsupported']} "
                  f"unsupported, {summary['missing']} missing, {summary['error']} unreadable")


JUDGE_USES = ("world", "detector")  # the config sections `clvr eval geneval` reads


@eval_app.command("geneval")
def geneval(folder: Path = typer.Argument(..., help="GenEval layout: DIR/00000/metadata.jsonl, DIR/00000/samples/*.png"),
            metadata: Optional[Path] = typer.Option(
                None, "--metadata", help="JSONL of prompts; line i = folder i (overrides the folders' metadata.jsonl)"),
            out: Optional[Path] = typer.Option(None, "--out", help="results file (default DIR/results.jsonl)"),
            detector: Optional[str] = typer.Option(
                None, "--detector", help="world (the world's exact detector) | openvocab (OWLv2 + CLIP colours, "
                                         "weights from config detector.model / detector.clip_model); default: "
                                         "config detector.kind"),
            grid: Optional[int] = typer.Option(None, "--grid", min=2, max=16,
                                               help="cells per side (default: config world.grid)"),
            profile: str = ProfileOpt,
            overrides: Optional[List[str]] = typer.Option(None, "--set", help="config override key=value (repeatable)")
            ) -> None:
    """Judge every image with GenEval's rules over the chosen detector; write results.jsonl; last line JSON.
    Exit code 2, and no results file, when no image could be scored (all missing, unreadable or unsupported)."""
    from clvr.config import load_config
    from clvr.judge import read_geneval_folder, score_folder
    from clvr.openvocab import make_detector

    if detector is not None:
        overrides = [*(overrides or []), f"detector.kind={detector}"]
    cfg = load_config(profile, overrides, uses=JUDGE_USES, command="eval geneval")
    grid = grid or cfg.world.grid
    read_geneval_folder(folder, metadata)  # bad folder or metadata: fails before any weights load
    summary = score_folder(folder, metadata, detector=make_detector(cfg, grid=grid), grid=grid, out=out,
                           require_scored=True)
    print_summary(summary, f"GenEval-format judge ({cfg.detector.kind} detector): {folder}")
    typer.echo(json.dumps(summary))
