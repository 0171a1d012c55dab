"""The data engine, the `synthesize` stage: verified reasoning trajectories from the closed loop.

For every job (a grammar prompt at one of the tiers) the loop runs Perceive (detector) -> Reason (the
controller's next op under the state constraints: allowed transitions, budgets) -> Act (the generator), with
passive verification gating each step (a failed step is undone, kept in the record, flagged, never a positive
example) and active verification driving corrections until STOP or a budget (clvr.loop). Then:

* acceptance: the final canvas is written as PNG, read back and judged against the prompt's own GenEval
  metadata; only a pass is accepted (checked on the written file, never taken from the loop's own verdict);
* A/B: the single-step baseline for the same prompt and seed (one text-to-image call) is judged the same
  way and compared with the final canvas (`ab_verdict`);
* macro-step examples: runs of consecutive verified steps of an accepted trajectory merged into one multi-op
  step whose target is the later verified canvas (`clvr.synthesize.macro`).

Modules: `jobs` (the work list and the fingerprint), `engine` (one process's loop over whole shards, the worker
pool), `shards` (commit, resume, merge), `ab` (the A/B judge), `macro` (macro-step examples), `report` (metrics
and the dataset card); this module is the stage (`run`).

Work, determinism, exactly once. Job j is tier `tiers[j % len(tiers)]` (tiers interleave), its prompt comes from
`default_rng([seed, tier, j // len(tiers)])` and its loop seed is `seed * 1000003 + j`. Jobs are cut into shards
of `shard_size`; a shard is the unit of batching (one `run_many` in lockstep, so each shard's generator batches
are the same whoever runs it), of atomic commit and of resume. A shard writes its images first, then its lines
to `shards/shard-NNNNN.jsonl` in one atomic, fsynced commit. A kill at any moment loses at most the shards in
flight (their half-written images are wiped when they are redone); a rerun with the same config does the
missing shards only; any change of what the output depends on (`fingerprint`) starts afresh. `--workers N`
processes take shards from a queue and die with the run (a killed run's worker never commits behind its back).
The merge reads the shards in order, checks that every job is there exactly once and writes `trajectories.jsonl`
atomically, so the output is identical for any N and any kills. A finished run removes its shards, so running
it again (what DVC does when a dependency changed) starts afresh.

Output under `synthesize.out`: `trajectories.jsonl` + `images/` (schema: clvr.trajectories), `metrics.json`
(flat floats), `dataset_card.md`. `shards/` is scratch, removed once the merge is written.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path

from clvr.config import Config, validate
from clvr.errors import ConfigError
from clvr.io import atomic_write_text
from clvr.synthesize.ab import ab_verdict, explained, image_score  # noqa: F401  (the stage's public names)
from clvr.synthesize.engine import Engine, run_shards  # noqa: F401
from clvr.synthesize.jobs import (Log, fingerprint, job_prompt, job_seed, n_jobs, n_shards,  # noqa: F401
                                  resolve_model, shard_jobs, traj_id)
from clvr.synthesize.report import dataset_card, dataset_metrics
from clvr.synthesize.shards import WORK, commit_shard, merge, prepare, read_shard, shard_file  # noqa: F401
from clvr.trajectories import FILE


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


OWNER = "synthesize"  # the marker (clvr.io.MARKER) of a folder this stage made
STAGE_LOG = "stage.log"  # the pipeline's log of this stage, written into its folder before the stage starts
OWN_NAMES = {FILE, WORK, "images", "metrics.json", "dataset_card.md", STAGE_LOG}


def earlier_output(out: Path) -> bool:
    """A synthesize folder without a marker that is still the stage's own: made before markers existed, or holding
    the pipeline's log of this stage. Only the stage's own files, its data, work or stage log among them."""
    names = {p.name for p in out.iterdir()}
    return names <= OWN_NAMES and bool(names & {FILE, WORK, STAGE_LOG})


def preflight(cfg: Config, workers: int | None = None) -> tuple[str, int]:
    """Everything checkable before work starts or a file is touched: the config, the worker count, the model,
    the controller, and that `synthesize.out` is a folder this stage may write. Returns (model, workers)."""
    from clvr.io import claim_dir
    from clvr.loop.run import build_controller

    validate(cfg)  # a config built in code (dataclasses.replace) gets the checks a loaded one got
    workers = workers or cfg.synthesize.workers
    if workers < 1:
        raise ConfigError(f"--workers must be >= 1, got {workers}")
    model = resolve_model(cfg)
    probe = build_controller(cfg)  # an unknown key or a bad endpoint config fails here, before any worker starts
    getattr(probe, "close", lambda: None)()
    claim_dir(Path(cfg.synthesize.out), OWNER, earlier_output, "synthesize.out")
    return model, workers


def run(cfg: Config, workers: int | None = None, log: Log = _stderr) -> dict:
    """The stage: {"metrics": flat floats, "final": path of trajectories.jsonl, "made": trajectories generated
    by this call (not resumed)}. `synthesize.out` must be new, empty or made by this stage (clvr.io.claim_dir)."""
    from clvr.io import mark_dir

    model, workers = preflight(cfg, workers)
    s = cfg.synthesize
    out = Path(s.out)
    out.mkdir(parents=True, exist_ok=True)
    mark_dir(out, OWNER)
    t0 = time.perf_counter()
    todo = prepare(out, cfg, fingerprint(cfg, model), log)
    log(f"[synthesize] {n_jobs(s)} prompts in {n_shards(s)} shards of {s.shard_size}; {len(todo)} to do on "
        f"{min(workers, max(1, len(todo)))} worker(s); generator {s.generator}, model {model}")
    run_shards(cfg, model, todo, workers, log)
    trajs = merge(out, s)
    metrics = dataset_metrics(trajs, list(s.tiers), s.macro_max_k)
    metrics["wall_s"] = round(time.perf_counter() - t0, 3)
    atomic_write_text(out / "dataset_card.md", dataset_card(trajs, metrics, cfg, model))
    atomic_write_text(out / "metrics.json", json.dumps(metrics, indent=1))
    shutil.rmtree(out / WORK, ignore_errors=True)
    made = sum(len(shard_jobs(s, sh)) for sh in todo)
    log(f"[synthesize] {int(metrics['accepted'])}/{len(trajs)} accepted ({metrics['acceptance_rate']:.3f}), "
        f"A/B win or tie {metrics['ab_win_or_tie']:.3f} -> {out / FILE}")
    return {"metrics": metrics, "final": str(out / FILE), "made": made}
