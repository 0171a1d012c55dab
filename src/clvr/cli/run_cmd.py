"""`clvr run [--profile P]`: the project's main job.

For now (until the pipeline exists): render the world suite -- grammar prompts over the 10 tiers plus the
six GenEval suites -- as ground truth into <main.out>/suite in GenEval's layout, score it with the
GenEval-format judge, print the summary table and, last, one JSON line.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import typer

from clvr.cli import ProfileOpt, app


@app.command("run")
def run(profile: str = ProfileOpt) -> None:
    """Run the main job on a profile's config (the embedded default: cpu)."""
    from clvr.cli.judge_cmd import print_summary
    from clvr.config import load_config
    from clvr.judge import score_folder, write_jsonl
    from clvr.world.bench import render_suite, suite_metadata

    cfg = load_config(profile)
    m, t = cfg.main, time.perf_counter()
    out = Path(m.out)
    mds = suite_metadata(m.n_per_tier, m.geneval_n, m.seed, cfg.world.grid)
    write_jsonl(out / "metadata.jsonl", mds)
    render_suite(mds, out / "suite", m.samples, m.seed, cfg.world.grid, cfg.world.cell,
                 appearance=cfg.world.appearance)
    summary = score_folder(out / "suite", grid=cfg.world.grid)
    print_summary(summary, f"main job ({profile}): world ground truth, GenEval-format judge")
    result = {"profile": profile, "out": str(out), "prompts": len(mds), **summary,
              "seconds": round(time.perf_counter() - t, 2)}
    typer.echo(json.dumps(result))
