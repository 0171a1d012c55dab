"""The data engine's work list: job j's tier, prompt and seed, its shard, and the fingerprint of everything the
output depends on (a change starts the data set afresh)."""

from __future__ import annotations

import hashlib
import json
from typing import Callable

import numpy as np

from clvr.config import Config, SynthesizeCfg, to_dict
from clvr.registry import ORACLES, check_checkpoint, model_digest
from clvr.trajectories import SCHEMA, SCHEMA_VERSION

Log = Callable[[str], None]


def n_jobs(s: SynthesizeCfg) -> int:
    return s.n_per_tier * len(s.tiers)


def n_shards(s: SynthesizeCfg) -> int:
    return -(-n_jobs(s) // s.shard_size)


def shard_jobs(s: SynthesizeCfg, shard: int) -> range:
    return range(shard * s.shard_size, min(n_jobs(s), (shard + 1) * s.shard_size))


def job_prompt(s: SynthesizeCfg, grid: int, j: int) -> dict:
    """Job j's prompt with its metadata (tier, c_task): a function of (seed, j) only."""
    from clvr.world.grammar import sample_prompt

    tier = s.tiers[j % len(s.tiers)]
    return sample_prompt(tier, np.random.default_rng([s.seed, tier, j // len(s.tiers)]), grid)


def job_seed(s: SynthesizeCfg, j: int) -> int:
    return s.seed * 1_000_003 + j


def traj_id(j: int) -> str:
    return f"t{j:06d}"


# ---- config, model, fingerprint --------------------------------------------------------------------------------

def resolve_model(cfg: Config) -> str:
    """The generator model: `synthesize.model`, or "" = `weights.base`, the released base the retrain flow starts
    from (the data engine acts with the base generator). An oracle generator key needs no model."""
    s = cfg.synthesize
    if s.generator in ORACLES:
        return s.generator
    return check_checkpoint(s.model or cfg.weights.base, "synthesize.model")


def fingerprint(cfg: Config, model: str) -> str:
    """What the output depends on: the stage config (less out/workers), world, loop, the endpoint settings of
    a VLM controller, and the model's bytes."""
    s = {k: v for k, v in to_dict(cfg.synthesize).items() if k not in ("out", "workers")}
    d = {"schema": [SCHEMA, SCHEMA_VERSION], "synthesize": s, "world": to_dict(cfg.world), "loop": to_dict(cfg.loop),
         "model": model, "model_sha256": model_digest(model)}
    if cfg.loop.controller == "openai":
        d["controller"] = to_dict(cfg.controller)
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()

