"""The data engine, the `synthesize` stage: verified reasoning trajectories from the closed loop.

For every job (a grammar prompt at one of the tiers) the loop runs Perceive (detector) -> Reason (the
controller's next op under the state constraints: allowed transitions, budgets) -> Act (the generator), with
passive verification gating each step (a failed step is undone, kept in the record, flagged, never a positive
example) and active verification driving corrections until STOP or a budget (clvr.loop). Then:

* acceptance: the final canvas is written as PNG, read back and judged against the prompt's own GenEval
  metadata; only a pass is accepted (checked on the written file, never taken from the loop's own verdict);
* A/B: the single-step baseline for the same prompt and seed (one text-to-image call) is judged the same
  way and compared with the final canvas (`ab_verdict`).

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

import hashlib
import json
import multiprocessing as mp
import os
import shutil
import signal
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

from clvr.config import Config, SynthesizeCfg, to_dict, validate
from clvr.errors import CheckpointError, ClvrError, ConfigError
from clvr.io import atomic_write_text, load_png
from clvr.trajectories import FILE, SCHEMA, SCHEMA_VERSION, Trajectory, TrajectoryStep

WORK = "shards"
BLANK = "images/blank.png"
ORACLES = ("oracle", "noisy-oracle")
SHIPPED = ("base", "distilled")

Log = Callable[[str], None]


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ---- jobs and shards ------------------------------------------------------------------------------------------

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


def shard_file(out: Path, shard: int) -> Path:
    return out / WORK / f"shard-{shard:05d}.jsonl"


# ---- config, model, fingerprint --------------------------------------------------------------------------------

def resolve_model(cfg: Config) -> str:
    """The generator model: `synthesize.model`, or "" = the pipeline's base `<pretrain.out>/final` if it exists,
    else the shipped base weights (the data engine acts with the base generator). An oracle generator key needs
    no model."""
    s = cfg.synthesize
    if s.generator in ORACLES:
        return s.generator
    if s.model:
        model = s.model
    else:
        trained = Path(cfg.pretrain.out) / "final"
        model = str(trained) if (trained / "model_index.json").is_file() else "base"
    if model not in (*SHIPPED, *ORACLES) and not (Path(model) / "model_index.json").is_file():
        raise CheckpointError(f"synthesize.model: no generator checkpoint at '{model}' (missing model_index.json)")
    return model


def model_digest(model: str) -> str:
    """sha256 over the files of a model folder (shipped or given); "" for an oracle."""
    if model in ORACLES:
        return ""
    root = Path(__file__).resolve().parent / "weights" / model if model in SHIPPED else Path(model)
    h = hashlib.sha256()
    for p in sorted(q for q in root.rglob("*") if q.is_file()):
        h.update(str(p.relative_to(root)).encode())
        h.update(p.read_bytes())
    return h.hexdigest()


def fingerprint(cfg: Config, model: str) -> str:
    """What the output depends on: the stage config (less out/workers), world, loop, the endpoint settings of
    a VLM controller, and the model's bytes."""
    s = {k: v for k, v in to_dict(cfg.synthesize).items() if k not in ("out", "workers")}
    d = {"schema": [SCHEMA, SCHEMA_VERSION], "synthesize": s, "world": to_dict(cfg.world), "loop": to_dict(cfg.loop),
         "model": model, "model_sha256": model_digest(model)}
    if cfg.loop.controller == "openai":
        d["controller"] = to_dict(cfg.controller)
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()


# ---- the per-process engine --------------------------------------------------------------------------------------

class Engine:
    """One process's generator, controller and verifier; runs whole shards."""

    def __init__(self, cfg: Config, model: str):
        from clvr.generator import make_generator
        from clvr.loop.roles import make_verifier
        from clvr.loop.run import build_controller, load_generator

        self.cfg, self.s, self.out = cfg, cfg.synthesize, Path(cfg.synthesize.out)
        if model in ORACLES:  # no network: skip importing the model stack (seconds)
            self.generator = make_generator(model, grid=cfg.world.grid, cell=cfg.world.cell)
        else:
            self.generator = load_generator(replace(cfg, loop=replace(cfg.loop, generator=self.s.generator)), model,
                                            self.s.steps or None, None if self.s.guidance < 0 else self.s.guidance)
        self.controller = build_controller(cfg)
        self.verifier = make_verifier(cfg.loop.verifier, grid=cfg.world.grid)

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
        steps, final = self.write_steps(tid, tr)
        base_rel = f"images/{tid}/baseline.png"
        write_png(self.out / base_rel, base.final)
        loop_score, base_score = self.score(md, final, tr.final), self.score(md, base_rel, base.final)
        accepted = loop_score["passed"]
        for st in steps:
            st.positive = st.kept and accepted
        status = ("accepted" if accepted else "controller_error" if controller_error(tr) else
                  "judge_mismatch" if tr.passed else "failed")
        return Trajectory(
            schema=SCHEMA, version=SCHEMA_VERSION, id=tid, shard=shard, job=j, tier=int(md["tier"]),
            c_task=float(md["c_task"]), prompt=md["prompt"], metadata=md, seed=tr.seed, generator=tr.generator,
            controller=getattr(self.controller, "name", type(self.controller).__name__), target=tr.target,
            steps=steps, final=final, accepted=accepted, status=status,
            judge={"passed": accepted, "reason": loop_score["reason"]}, ended_by=tr.ended_by, calls=tr.calls,
            nfe=tr.nfe, retries=tr.retries, corrections=tr.corrections, rejected=tr.rejected,
            baseline={"image": base_rel, "passed": base_score["passed"], "reason": base_score["reason"]},
            ab=ab_verdict(loop_score, base_score, self.s.ab_margin) if accepted else None)

    def write_steps(self, tid: str, tr) -> tuple[list[TrajectoryStep], str]:
        """Every step's output as images/<tid>/NN.png; a step's input is the canvas the last kept step left.
        Returns the steps and the final canvas's path."""
        folder = self.out / "images" / tid
        shutil.rmtree(folder, ignore_errors=True)  # left by a killed run of this shard
        folder.mkdir(parents=True)
        canvas, steps = BLANK, []
        for r in tr.steps:
            inp = outp = None
            if r.output is not None:
                inp, outp = canvas, f"images/{tid}/{r.index:02d}.png"
                write_png(self.out / outp, r.output)
                if r.accepted:
                    canvas = outp
            note = r.note + (f" | raw: {r.raw}" if r.raw else "")
            steps.append(TrajectoryStep(r.index, r.kind, r.step, r.instruction, r.trace_text, r.seed, inp, outp,
                                        r.passive, r.active, bool(r.accepted), False, int(r.nfe), note))
        return steps, canvas

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


# ---- A/B judge ---------------------------------------------------------------------------------------------------

def explained(dets: list, grid: int, cell: int, image: np.ndarray) -> np.ndarray:
    """(H, W, 3) int16: the picture the detections explain, for a varied world, whose looks (size, offset,
    turn) the detector does not report. Background everywhere, except inside each detection's box, where a
    pixel is whichever of the detection's colour and the background it is nearer to. So a clean object of any
    look costs nothing, and debris outside the boxes and off colours inside them do."""
    from clvr.world.vocab import BACKGROUND, COLORS

    img = image.astype(np.int16)
    clean = np.empty_like(img)
    clean[:] = np.asarray(BACKGROUND, np.int16)
    for d in dets:
        x0, y0, x1, y1 = d.bbox
        patch = img[y0:y1, x0:x1]
        fg, bg = np.asarray(COLORS[d.color], np.int16), np.asarray(BACKGROUND, np.int16)
        near_fg = np.abs(patch - fg).sum(-1) < np.abs(patch - bg).sum(-1)
        clean[y0:y1, x0:x1] = np.where(near_fg[..., None], fg, bg)
    return clean


def image_score(md: dict, image: np.ndarray, grid: int, cell: int, appearance=None) -> dict:
    """How one image does on its prompt: the judge's verdict and reason, constraints satisfied (the prompt's
    include + exclude clauses less the ones the judge names as broken: it names each broken constraint once)
    and the artefact level: mean |pixel - clean picture of the detected scene| (0..255), i.e. whatever the
    detector does not explain (smudges, debris, off colours). The clean picture is the render of the detected
    scene in the fixed world, and `explained` (objects of any look) when `appearance` is varied."""
    from clvr.judge import judge, unsupported
    from clvr.world.detector import WorldDetector, to_scene
    from clvr.world.render import render

    detector = WorldDetector(grid)
    why = unsupported(md, detector)
    if why:
        raise ClvrError(f"unsupported prompt '{md.get('prompt', '')}': {why}")
    dets = detector(image)
    ok, reason = judge(md, dets)
    total = len(md.get("include", [])) + len(md.get("exclude", []))
    broken = len(reason.split("; ")) if reason else 0
    if appearance is not None and appearance.varied:
        clean = explained(dets, grid, cell, image)
    else:
        clean = render(to_scene(dets, grid), cell).astype(np.int16)
    artefact = float(np.abs(image.astype(np.int16) - clean).mean())
    return {"passed": bool(ok), "reason": reason, "satisfied": total - broken, "constraints": total,
            "artefact": round(artefact, 3)}


def ab_verdict(loop: dict, base: dict, margin: float) -> dict:
    """The loop's final canvas (A) against the single-step baseline (B), same prompt and seed:
    1. more constraints satisfied wins;
    2. equal: the lower artefact level wins if it is lower by more than `margin`; else a tie."""
    n = loop["constraints"]
    if loop["satisfied"] != base["satisfied"]:
        verdict = "win" if loop["satisfied"] > base["satisfied"] else "loss"
        reason = f"constraints satisfied: loop {loop['satisfied']}/{n}, single step {base['satisfied']}/{n}"
        if base.get("reason"):
            reason += f" (single step: {base['reason']})"
    else:
        diff = base["artefact"] - loop["artefact"]
        verdict = "win" if diff > margin else "loss" if -diff > margin else "tie"
        reason = (f"both satisfy {loop['satisfied']}/{n}; artefacts loop {loop['artefact']:.2f}, single step "
                  f"{base['artefact']:.2f} (margin {margin})")
    keys = ("passed", "satisfied", "constraints", "artefact")
    return {"verdict": verdict, "reason": reason, "loop": {k: loop[k] for k in keys},
            "baseline": {k: base[k] for k in keys}}


# ---- files ----------------------------------------------------------------------------------------------------------

def write_png(path: Path, image: np.ndarray) -> None:
    """A PNG written in place: images are only ever referenced after their shard commits, and a redone shard
    wipes its folders first, so a half-written one is never read."""
    Image.fromarray(np.asarray(image, np.uint8), "RGB").save(path, format="PNG", compress_level=1)


def commit_shard(path: Path, trajs: list[Trajectory]) -> None:
    """Commit a shard: its lines are checked against the schema, then written atomically and fsynced. Its
    images are already on disk (not fsynced one by one, which costs more than the generator on some disks: a
    resumed run decodes every image of the shards it keeps, so an image lost in an OS crash redoes its shard)."""
    text = "".join(t.to_line() for t in trajs)
    for line in text.splitlines():
        Trajectory.from_dict(json.loads(line), f"{path.name} (before commit)")
    atomic_write_text(path, text, durable=True)


def _image_paths(t: Trajectory) -> list[str]:
    return [p for s in t.steps for p in (s.input, s.output) if p] + [t.final, t.baseline["image"]]


def read_shard(out: Path, s: SynthesizeCfg, shard: int, check_images: bool = False) -> list[Trajectory]:
    """A committed shard's trajectories, checked: the schema, exactly its jobs in order, and with
    `check_images` every image it names present and whole."""
    path = shard_file(out, shard)
    lines = path.read_text().splitlines()
    trajs = [Trajectory.from_dict(json.loads(line), f"{path}:{n}") for n, line in enumerate(lines, 1)]
    want = [traj_id(j) for j in shard_jobs(s, shard)]
    if [t.id for t in trajs] != want:
        raise ClvrError(f"{path}: holds {len(trajs)} trajectories that are not exactly jobs {want[0]}..{want[-1]}")
    if check_images:
        for p in sorted({p for t in trajs for p in _image_paths(t)}):
            try:
                with Image.open(out / p) as im:
                    im.verify()  # PNG signature and chunk CRCs
            except (OSError, SyntaxError) as e:
                raise ClvrError(f"{path}: image {p} is missing or damaged ({e})") from None
    return trajs


def prepare(out: Path, cfg: Config, fp: str, log: Log) -> list[int]:
    """Resume or start afresh; returns the shards still to do. Resume only an unfinished run of the same
    fingerprint, and only its shards whose lines and images check out."""
    work = out / WORK
    manifest = work / "manifest.json"
    try:
        old = json.loads(manifest.read_text()).get("fingerprint")
    except (OSError, ValueError):
        old = None
    if old == fp:
        done = []
        for sh in range(n_shards(cfg.synthesize)):
            if not shard_file(out, sh).is_file():
                continue
            try:
                read_shard(out, cfg.synthesize, sh, check_images=True)
                done.append(sh)
            except (ClvrError, ValueError, OSError) as e:
                log(f"[synthesize] redoing shard {sh}: {e}")
                shard_file(out, sh).unlink()
        if done:
            log(f"[synthesize] resuming: {len(done)}/{n_shards(cfg.synthesize)} shards already committed")
    else:
        if work.exists() or (out / FILE).exists():
            log(f"[synthesize] starting afresh in {out}" + (" (config or model changed)" if old else ""))
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(out / "images", ignore_errors=True)
        for name in (FILE, "metrics.json", "dataset_card.md"):
            (out / name).unlink(missing_ok=True)
        work.mkdir(parents=True)
        atomic_write_text(manifest, json.dumps({"fingerprint": fp, "n_shards": n_shards(cfg.synthesize)}), durable=True)
    (out / "images").mkdir(exist_ok=True)
    from clvr.world.render import blank

    write_png(out / BLANK, blank(cfg.world.grid, cfg.world.cell))
    for tmp in work.glob("*.tmp*"):  # torn temporary files of a killed commit
        tmp.unlink()
    return [sh for sh in range(n_shards(cfg.synthesize)) if not shard_file(out, sh).is_file()]


def merge(out: Path, s: SynthesizeCfg) -> list[Trajectory]:
    """All shards, in order, into trajectories.jsonl (atomically); every job exactly once."""
    trajs: list[Trajectory] = []
    for sh in range(n_shards(s)):
        trajs += read_shard(out, s, sh)
    ids = [t.id for t in trajs]
    if ids != [traj_id(j) for j in range(n_jobs(s))]:
        raise ClvrError(f"{out}: merged shards do not hold every job exactly once")
    atomic_write_text(out / FILE, "".join(t.to_line() for t in trajs), durable=True)
    return trajs


# ---- metrics and the card ------------------------------------------------------------------------------------------

def dataset_metrics(trajs: list[Trajectory], tiers: list[int]) -> dict[str, float]:
    acc = [t for t in trajs if t.accepted]
    ab = [t.ab["verdict"] for t in acc]
    m: dict[str, float] = {
        "trajectories": float(len(trajs)),
        "accepted": float(len(acc)),
        "acceptance_rate": _mean([t.accepted for t in trajs]),
        "mean_steps": _mean([t.calls for t in acc]),  # generator calls per accepted trajectory
        "mean_kept_steps": _mean([sum(s.kept for s in t.steps) for t in acc]),
        "mean_calls_all": _mean([t.calls for t in trajs]),
        "positive_steps": float(sum(s.positive for t in trajs for s in t.steps)),
        "failed_steps": float(sum(s.output is not None and not s.kept for t in trajs for s in t.steps)),
        "rejected_outputs": float(sum(t.rejected for t in trajs)),
        "controller_errors": float(sum(t.status == "controller_error" for t in trajs)),
        "judge_mismatches": float(sum(t.status == "judge_mismatch" for t in trajs)),
        "baseline_pass_rate": _mean([t.baseline["passed"] for t in trajs]),
        "ab_win_rate": _mean([v == "win" for v in ab]),
        "ab_tie_rate": _mean([v == "tie" for v in ab]),
        "ab_loss_rate": _mean([v == "loss" for v in ab]),
        "ab_win_or_tie": _mean([v != "loss" for v in ab]),
    }
    for tier in tiers:
        mine = [t for t in trajs if t.tier == tier]
        m[f"trajectories_tier_{tier}"] = float(len(mine))
        m[f"accepted_tier_{tier}"] = float(sum(t.accepted for t in mine))
        m[f"acceptance_tier_{tier}"] = _mean([t.accepted for t in mine])
    return {k: round(v, 4) for k, v in m.items()}


def _mean(xs: list) -> float:
    return float(np.mean(xs)) if len(xs) else 0.0


def _sampler(cfg: Config, trajs: list[Trajectory]) -> str:
    s = cfg.synthesize
    steps = f"{s.steps} steps" if s.steps else "its default steps"
    cfg_scale = "its default CFG" if s.guidance < 0 else f"CFG {s.guidance}" if s.guidance > 1 else "no CFG"
    nfe = [st.nfe for t in trajs for st in t.steps if st.nfe]
    return f"{steps}, {cfg_scale}, {max(nfe) if nfe else 0} NFE per call"


def dataset_card(trajs: list[Trajectory], m: dict, cfg: Config, model: str) -> str:
    s = cfg.synthesize
    rows = []
    for tier in s.tiers:
        mine = [t for t in trajs if t.tier == tier]
        acc = [t for t in mine if t.accepted]
        verdicts = [t.ab["verdict"] for t in acc]
        rows.append(f"| {tier} | {len(mine)} | {len(acc)} | {_mean([t.accepted for t in mine]):.3f} | "
                    f"{_mean([t.calls for t in acc]):.2f} | {_mean([v == 'win' for v in verdicts]):.3f} | "
                    f"{_mean([v != 'loss' for v in verdicts]):.3f} | {_mean([t.baseline['passed'] for t in mine]):.3f} |")
    controller = trajs[0].controller if trajs else cfg.loop.controller
    generator = trajs[0].generator if trajs else s.generator
    return f"""# Trajectory data set (clvr `synthesize`)

Verified closed-loop trajectories on the synthetic world: for each grammar prompt the controller plans, the
generator acts one grounded step at a time, passive verification gates every step (failed steps are kept,
flagged `kept: false`, never `positive`), active verification drives corrections. A trajectory is accepted
only if its final canvas, read back from the written PNG, passes the GenEval-format judge on the prompt's own
metadata. Accepted trajectories are A/B-judged against the single-step baseline for the same prompt and seed.

- schema: `{SCHEMA}` version {SCHEMA_VERSION} (documented and loaded by `clvr.trajectories.load_trajectories`)
- generator: `{generator}` (model `{model}`, {_sampler(cfg, trajs)}); controller: `{controller}`; verifier: `{cfg.loop.verifier}`
- prompts: {s.n_per_tier} per tier, tiers {list(s.tiers)}, seed {s.seed}; loop budget max_iters
  {cfg.loop.max_iters}, max_nfe {cfg.loop.max_nfe}, retries_per_step {cfg.loop.retries_per_step}
- files: `{FILE}` (one line per trajectory, job order), `images/` (PNG; paths in the lines are relative
  to this folder), `metrics.json`

## Summary

| trajectories | accepted | acceptance rate | mean steps (calls, accepted) | A/B win | A/B win or tie | failed steps (flagged) |
|---|---|---|---|---|---|---|
| {int(m['trajectories'])} | {int(m['accepted'])} | {m['acceptance_rate']:.3f} | {m['mean_steps']:.2f} | {m['ab_win_rate']:.3f} | {m['ab_win_or_tie']:.3f} | {int(m['failed_steps'])} |

## Per tier

| tier | trajectories | accepted | acceptance | mean steps | A/B win | A/B win or tie | single-step pass |
|---|---|---|---|---|---|---|---|
{chr(10).join(rows)}

## A/B comparison

The final canvas (loop) against the single-step image (one text-to-image call, same prompt and seed), both
judged on the prompt's metadata: more constraints satisfied (include + exclude clauses) wins; at equal
constraints, the image with fewer artefacts (mean |pixel - clean render of the detected scene|, 0..255)
wins if it is cleaner by more than {s.ab_margin}; otherwise a tie. Each line's `ab.reason` says which.
"""


# ---- the stage -------------------------------------------------------------------------------------------------------

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
    metrics = dataset_metrics(trajs, list(s.tiers))
    metrics["wall_s"] = round(time.perf_counter() - t0, 3)
    atomic_write_text(out / "dataset_card.md", dataset_card(trajs, metrics, cfg, model))
    atomic_write_text(out / "metrics.json", json.dumps(metrics, indent=1))
    shutil.rmtree(out / WORK, ignore_errors=True)
    made = sum(len(shard_jobs(s, sh)) for sh in todo)
    log(f"[synthesize] {int(metrics['accepted'])}/{len(trajs)} accepted ({metrics['acceptance_rate']:.3f}), "
        f"A/B win or tie {metrics['ab_win_or_tie']:.3f} -> {out / FILE}")
    return {"metrics": metrics, "final": str(out / FILE), "made": made}
