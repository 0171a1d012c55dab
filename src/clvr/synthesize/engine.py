"""The per-process engine: one process's generator, controller and verifier run whole shards (record each
trajectory's images, judge them from the written files, commit); `run_shards` spreads shards over worker
processes that die with the run."""

from __future__ import annotations

import multiprocessing as mp
import os
import shutil
import signal
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from clvr.config import Config
from clvr.io import load_png
from clvr.registry import ORACLES
from clvr.synthesize.ab import ab_verdict, image_score
from clvr.synthesize.jobs import Log, job_prompt, job_seed, n_shards, shard_jobs, traj_id
from clvr.synthesize.macro import macro_examples
from clvr.synthesize.shards import BLANK, commit_shard, shard_file, write_png
from clvr.trajectories import SCHEMA, SCHEMA_VERSION, Trajectory, TrajectoryStep


class Engine:
    """One process's generator, controller and verifier; runs whole shards."""

    def __init__(self, cfg: Config, model: str):
        from clvr.generator import make_generator
        from clvr.loop.run import build_controller, build_verifier, load_generator

        self.cfg, self.s, self.out = cfg, cfg.synthesize, Path(cfg.synthesize.out)
        if model in ORACLES:  # no network: skip importing the model stack (seconds)
            self.generator = make_generator(model, grid=cfg.world.grid, cell=cfg.world.cell)
        else:
            self.generator = load_generator(replace(cfg, loop=replace(cfg.loop, generator=self.s.generator)), model,
                                            self.s.steps or None, None if self.s.guidance < 0 else self.s.guidance)
        self.controller = build_controller(cfg)
        self.verifier = build_verifier(cfg)

    def run_shard(self, shard: int) -> tuple[int, int, int]:
        """Generate, record and commit one shard; returns (shard, trajectories, accepted)."""
        from clvr.loop.run import run_many

        cfg, s = self.cfg, self.s
        jobs = list(shard_jobs(s, shard))
        mds = [job_prompt(s, cfg.world.grid, j) for j in jobs]
        work = [(md["prompt"], job_seed(s, j)) for md, j in zip(mds, jobs)]
        args = (self.controller, self.generator, self.verifier, cfg.loop)
        modes = ["loop"] * len(work) + ["single"] * len(work)  # the baselines fill the loops' batches
        traces = run_many(work + work, *args, modes, cfg.world.grid, cfg.world.cell, s.batch_size)
        loops, singles = traces[: len(work)], traces[len(work):]
        trajs = [self.record(shard, j, md, tr, base) for j, md, tr, base in zip(jobs, mds, loops, singles)]
        commit_shard(shard_file(self.out, shard), trajs)
        return shard, len(trajs), sum(t.accepted for t in trajs)

    def record(self, shard: int, j: int, md: dict, tr, base) -> Trajectory:
        """Write one trajectory's images, judge its final canvas and the baseline from the written PNGs, A/B
        them; the trajectory's line."""
        from clvr.loop.vlm_controller import controller_error

        tid = traj_id(j)
        steps, final, canvases = self.write_steps(tid, tr)
        base_rel = f"images/{tid}/baseline.png"
        write_png(self.out / base_rel, base.final)
        loop_score, base_score = self.score(md, final, tr.final), self.score(md, base_rel, base.final)
        accepted = loop_score["passed"]
        for st in steps:
            st.positive = st.kept and accepted
        macro = macro_examples(steps, canvases, self.cfg.world.grid, self.s.macro_max_k) if accepted else []
        status = ("accepted" if accepted else "controller_error" if controller_error(tr) else
                  "judge_mismatch" if tr.passed else "failed")
        return Trajectory(
            schema=SCHEMA, version=SCHEMA_VERSION, id=tid, shard=shard, job=j, tier=int(md["tier"]),
            c_task=float(md["c_task"]), prompt=md["prompt"], metadata=md, seed=tr.seed, generator=tr.generator,
            controller=getattr(self.controller, "name", type(self.controller).__name__), target=tr.target,
            steps=steps, final=final, accepted=accepted, status=status,
            judge={k: loop_score[k] for k in ("passed", "reason", "failures")}, ended_by=tr.ended_by,
            calls=tr.calls, nfe=tr.nfe, retries=tr.retries, corrections=tr.corrections, rejected=tr.rejected,
            baseline={"image": base_rel, **{k: base_score[k] for k in ("passed", "reason", "failures")}},
            ab=ab_verdict(loop_score, base_score, self.s.ab_margin) if accepted else None,
            grid=self.cfg.world.grid, macro=macro)

    def write_steps(self, tid: str, tr) -> tuple[list[TrajectoryStep], str, dict[str, np.ndarray]]:
        """Every step's output as images/<tid>/NN.png; a step's input is the canvas the last kept step left.
        Returns the steps, the final canvas's path and every step input and output by path."""
        folder = self.out / "images" / tid
        shutil.rmtree(folder, ignore_errors=True)  # left by a killed run of this shard
        folder.mkdir(parents=True)
        canvas, steps, canvases = BLANK, [], {}
        calls = [r for r in tr.steps if r.output is not None]
        left = {a.index: b.input for a, b in zip(calls, calls[1:])}  # the canvas each call left: the next one's input
        for r in tr.steps:
            inp = outp = None
            if r.output is not None:
                inp, outp = canvas, f"images/{tid}/{r.index:02d}.png"
                image = r.output
                if r.accepted and "kept" in (r.passive or {}):  # partly kept: the composed canvas (clvr.loop.run)
                    image = left.get(r.index, tr.final)
                write_png(self.out / outp, image)
                canvases.setdefault(inp, r.input)
                canvases[outp] = image
                if r.accepted:
                    canvas = outp
            note = r.note + (f" | raw: {r.raw}" if r.raw else "")
            steps.append(TrajectoryStep(r.index, r.kind, r.step, r.instruction, r.trace_text, r.seed, inp, outp,
                                        r.passive, r.active, bool(r.accepted), False, int(r.nfe), note))
        return steps, canvas, canvases

    def score(self, md: dict, rel: str, expected: np.ndarray) -> dict:
        """`image_score` of a written image, read back from disk (and checked to be the image the loop made)."""
        image = load_png(self.out / rel)
        if not np.array_equal(image, expected):
            raise RuntimeError(f"{self.out / rel} does not hold the image the loop made")
        return image_score(md, image, self.cfg.world.grid, self.cfg.world.cell, self.cfg.world.appearance)

    def close(self) -> None:
        close = getattr(self.controller, "close", None)
        if close:
            close()


_ENGINE: Engine | None = None


def _init_worker(cfg: Config, model: str, parent: int) -> None:
    global _ENGINE
    _die_with_parent(parent)
    _ENGINE = Engine(cfg, model)
    _set_threads(cfg.synthesize.threads)


def _work(shard: int) -> tuple[int, int, int]:
    assert _ENGINE is not None
    return _ENGINE.run_shard(shard)


def _die_with_parent(parent: int) -> None:
    """A worker must not outlive a killed run (it would still commit shards while a rerun redoes them): on
    Linux the kernel sends it SIGKILL when the parent dies (prctl PR_SET_PDEATHSIG)."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux: workers end when they find their task queue closed
        return
    if os.getppid() != parent:  # the parent died before the line above
        os._exit(1)


def _set_threads(n: int) -> int | None:
    """Set torch's intra-op threads if a backend imported torch (oracles do not); returns the old value."""
    torch = sys.modules.get("torch")
    if torch is None:
        return None
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    return old


def run_shards(cfg: Config, model: str, todo: list[int], workers: int, log: Log) -> None:
    total, done, t0 = n_shards(cfg.synthesize), n_shards(cfg.synthesize) - len(todo), time.perf_counter()

    def report(shard: int, n: int, acc: int) -> None:
        nonlocal done
        done += 1
        log(f"[synthesize] shard {shard} committed: {acc}/{n} accepted ({done}/{total} shards, "
            f"{time.perf_counter() - t0:.1f} s)")

    if workers <= 1 or len(todo) <= 1:
        engine = Engine(cfg, model)
        old = _set_threads(cfg.synthesize.threads)
        try:
            for sh in todo:
                report(*engine.run_shard(sh))
        finally:
            engine.close()
            if old is not None:
                _set_threads(old)
        return
    ctx = mp.get_context("spawn")  # fresh interpreters: no inherited torch threads or locks
    with ctx.Pool(min(workers, len(todo)), initializer=_init_worker, initargs=(cfg, model, os.getpid())) as pool:
        for res in pool.imap_unordered(_work, todo):
            report(*res)
