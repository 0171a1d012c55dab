"""Distill the base into a `nfe`-step student without CFG (`clvr world distill`), by one of two methods
(`distill.method`).

`guidance` (the schema default; the ci profile's): guidance distillation at the student's own
timesteps (Meng et al. 2023, "On distillation of guided diffusion models", stage 1, restricted to the `nfe`
sigmas the student will sample at). The student learns to output, in one evaluation without CFG, the teacher's
guided x0 prediction x0_u + w (x0_c - x0_u) and the teacher's gate, at x_t drawn from the forward process at
those sigmas. On the fixed world, where every prompt has one picture and the base's 4-step samples are already
its 28-step ones, that is all 4 NFE lack. On a multimodal target (the varied world: many right pictures per
prompt) it is not: the x0 prediction at a coarse sigma is the *mean* of the pictures still possible there, so
a student that copies it takes the same blurred coarse steps as the base at `nfe` steps.

`progressive`: progressive distillation (Salimans & Ho 2022, "Progressive distillation for fast sampling of
diffusion models", ICLR; with the guided teacher of Meng et al. 2023 in the first round). The student learns
to take in one deterministic (Euler / DDIM) step what the teacher takes in two, so it follows the teacher's
sampling *trajectories*, which end on one sharp picture each, instead of the teacher's one-step means. Rounds
halve the steps: with `rounds` = R the first teacher is the base at nfe * 2^R steps with CFG `guidance`, each
later round's teacher is the previous round's student (frozen, no CFG), and the last round's student samples
at `nfe`. Round r runs global steps [r * steps / R, (r + 1) * steps / R), or `distill.round_steps[r]` steps, and
is its own run of the lr schedule (warm-up, cosine), as each round of the paper is its own training. The shipped
student gives its last round the most steps: that halving, to 4 steps, is where text-to-image is lost.
Why this method: the model predicts x0, which is the parameterisation Salimans & Ho recommend for it (the
two-step target is an x0, see `x0_target`), it needs only the frozen teacher (no EMA target network, unlike
consistency distillation, Song et al. 2023, whose EMA state a resume would also have to restore) and two
teacher evaluations per sample (4 with CFG, batched as 2), the cheapest of the multimodal-safe methods on CPU.
The last round's student grid is the student's own sampler grid at `nfe` steps: the teacher's
`FlowMatchEulerDiscreteScheduler` config with `shift_terminal` = `distill.final_sigma`, saved as the student's
scheduler. At 0 that is the base's grid, whose last of 4 steps sits at sigma 0.001 and only reads off the
picture; at 1/nfe it is the FLUX grid (1, .75, .5, .25), every step doing work. Each earlier round's grid is the
next one with every interval split at its midpoint (`refine`), as in the paper's halving of a uniform grid: the
teacher's two steps from s_i to s_{i+1} go through the midpoint, which are exactly the two steps the previous
round's student was trained to take. The teacher's x0 is composed with its gate exactly as `WorldPipeline.sample`
does (the grounded regions for grounded edits, its first gate > 0.5 for other edits, its soft gate for
text-to-image). The student's x0 is composed as its own sampler will compose it: an edit inside the teacher's
edit mask, text-to-image through the student's own soft gate, so the x0 loss trains that gate as well. Its gate
is also pulled (BCE) towards the teacher's: at x_t for an edit, at the midpoint for text-to-image (one teacher
step more committed to where objects go; matching the gate at x_t left objects with a gate under 0.5, erased
at the last step).
`distill.substeps` = k generalises the halving: one student step is k teacher steps, and each earlier round's
grid splits every interval into k. With one round the target is the base's own guided trajectory at nfe * k
steps, learned in one phase as in TRACT (Berthelot et al. 2023, "TRACT: denoising diffusion models with
transitive closure time-distillation"), not through students in a row, each passing its error on to the next;
it costs k teacher evaluations per sample. `distill.init` starts the student from other weights than the
teacher's (e.g. an earlier student), `distill.edit_guidance` gives the first teacher another CFG scale on edits
(a scale that helps text-to-image can hurt recolors; see the distilled model card). The shipped student is
`distill`'s progressive student taken on by two such runs, the foundation stages `trajectory` and `rebalance`
(`run_trajectory`, `run_rebalance`: this trainer on their own sections, conf/base.yaml).
At a round's first step rank 0 saves the student as `<out>/rounds/round-<r>/` (the next teacher), so a
resume inside a later round reloads exactly the teacher it had.

The student has the base's architecture and starts from it, so Delta_distill = student - base is a meaningful
weight delta for the later merge. Every setting comes from the `distill` section, or the stage's own (its data
mix and loss weights included); it runs on the training engine through the same loop as pretrain, the method
being the pluggable loss. Each rank holds a frozen copy of the teacher.
"""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import FlowMatchEulerDiscreteScheduler

from clvr.config import Config
from clvr.errors import CheckpointError
from clvr.io import atomic_dir
from clvr.models.pipeline import Cond, WorldPipeline
from clvr.train import ckpt
from clvr.train.data import Batch, tokens
from clvr.train.engine import Engine
from clvr.train.loop import Rows, Trainer
from clvr.train.pretrain import EVAL_TIERS, noise, sampler_sigmas, weighted_x0_loss


def teacher_path(cfg: Config) -> str:
    """cfg.distill.teacher, else <finetune.out>/final if present, else <pretrain.out>/final if present, else the
    shipped base."""
    from clvr.registry import default_teacher

    return cfg.distill.teacher or default_teacher(cfg.finetune.out, cfg.pretrain.out)


def cell_tokens(pipe: WorldPipeline, b: Batch, cell: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch's target and reference canvases as the pipeline's image tokens (pixels, or cell latents)."""
    return pipe.encode_cells(tokens(b.x0, cell)), pipe.encode_cells(tokens(b.ref, cell))


def student_scheduler(cfg: Config, teacher: WorldPipeline) -> dict:
    """The student's scheduler config: the teacher's, its grid ending at `distill.final_sigma` (0: as is)."""
    return {**teacher.scheduler.config, "shift_terminal": cfg.distill.final_sigma or None}


class DistillLoss:
    def __init__(self, cfg: Config, teacher: WorldPipeline, sigmas: torch.Tensor):
        self.cfg, self.teacher, self.sigmas = cfg, teacher, sigmas

    def __call__(self, engine: Engine, pipe: WorldPipeline, rows: Rows) -> tuple[torch.Tensor, dict[str, float]]:
        b, d, dev = rows.batch, self.cfg.distill, engine.to_device
        w = d.guidance
        x0, ref = cell_tokens(pipe, b, self.cfg.world.cell)
        region = torch.from_numpy(b.region)
        t, eps = noise(rows, tuple(x0.shape[1:]), lambda r: float(self.sigmas[r.integers(len(self.sigmas))]))
        x_t = (1 - t[:, None, None]) * x0 + t[:, None, None] * eps
        with torch.no_grad():
            tp = self.teacher
            cond = Cond(ref, region, tp.encode_text(b.texts, b.parts))
            new_c, gate_c = tp.predict(x_t, t, cond)
            new_u, _ = tp.predict(x_t, t, cond, tp.encode_text([""] * len(b.texts)))
            target = new_u + w * (new_c - new_u)
            gate_t = torch.sigmoid(gate_c)
        new, gate = pipe.predict(dev(x_t), dev(t), Cond(dev(ref), dev(region), pipe.encode_text(b.texts, b.parts)))
        target, gate_t = target.to(new.device), gate_t.to(new.device)
        wt = 1 + (d.changed_weight - 1) * torch.from_numpy(b.changed).to(new.device)
        loss_x = weighted_x0_loss(engine, new, target, wt)
        loss_g = F.binary_cross_entropy_with_logits(gate.float(), gate_t)
        return loss_x + d.gate_weight * loss_g, {"loss_x0": loss_x.item(), "loss_gate": loss_g.item()}


def euler(x: torch.Tensor, x0: torch.Tensor, t: torch.Tensor, t_next: torch.Tensor) -> torch.Tensor:
    """One deterministic sampler step from sigma t to t_next given the x0 prediction (as `WorldPipeline.sample`:
    velocity (x - x0) / t). x, x0 (B, N, F); t, t_next (B,)."""
    return x + (t_next - t)[:, None, None] * (x - x0) / t[:, None, None]


def x0_target(x_t: torch.Tensor, t: torch.Tensor, t_next: torch.Tensor, x_next: torch.Tensor) -> torch.Tensor:
    """The x0 whose one Euler step from t lands on x_next at t_next: euler(x_t, x0_target(...), t, t_next)
    == x_next (Salimans & Ho 2022, eq. 8 in x-prediction form)."""
    return x_t - t[:, None, None] * (x_next - x_t) / (t_next - t)[:, None, None]


@torch.no_grad()
def teacher_x0(tp: WorldPipeline, x: torch.Tensor, t: torch.Tensor, cond: Cond, guidance: float | torch.Tensor,
               edit: torch.Tensor, hard: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The teacher's composed x0 at (x, t) as its sampler forms it -> (x0, gate logits, hard mask). `hard`:
    the edits' mask from the first step (None: this is the first step; grounded edits use their regions)."""
    new, gate = tp.guided_predict(x, t, cond, guidance)  # as the sampler
    p = torch.sigmoid(gate)
    if hard is None:
        grounded = edit[:, None] & (cond.region.sum(1, keepdim=True) > 0)
        hard = torch.where(grounded, cond.region, (p > 0.5).float())
    m = torch.where(edit[:, None], hard, p)
    return cond.ref + m[..., None] * (new - cond.ref), gate, hard


def subdivide(a: torch.Tensor, b: torch.Tensor, k: int) -> list[torch.Tensor]:
    """[a, ..., b]: the k + 1 ends of k equal intervals from a to b, point i = (a (k - i) + b i) / k; at k = 2
    the midpoint is (a + b) / 2, bit for bit the halving's, and the ends are a and b themselves."""
    return [a, *((a * (k - i) + b * i) / k for i in range(1, k)), b]


@torch.no_grad()
def teacher_steps(tp: WorldPipeline, x_t: torch.Tensor, t: torch.Tensor, t_next: torch.Tensor, cond: Cond,
                  guidance: float | torch.Tensor, edit: torch.Tensor, k: int = 2) -> dict[str, torch.Tensor]:
    """The teacher from sigma t to t_next in k equal Euler steps (2: via the midpoint) -> {x_next, x0 (the
    one-step target), gate and gate_mid (the teacher's gate logits at x_t and at the midpoint, or the step
    nearest after it), hard (the edits' mask)}."""
    sig = subdivide(t, t_next, k)
    x, hard, gates = x_t, None, []
    for s, s_next in zip(sig[:-1], sig[1:]):
        x0, g, hard = teacher_x0(tp, x, s, cond, guidance, edit, hard)
        gates.append(g)
        x = euler(x, x0, s, s_next)
    return {"x_next": x, "x0": x0_target(x_t, t, t_next, x), "gate": gates[0], "gate_mid": gates[-(-k // 2)],
            "hard": hard}


def round_starts(steps: int, rounds: int, round_steps: list[int]) -> list[int]:
    """The first global step of each round: cumulative `round_steps`, or `steps` split evenly (round r starts at
    ceil(r * steps / rounds))."""
    if round_steps:
        return [sum(round_steps[:r]) for r in range(rounds)]
    return [-(-r * steps // rounds) for r in range(rounds)]


def refine(grid: torch.Tensor, k: int = 2) -> torch.Tensor:
    """(n + 1,) sigmas -> (kn + 1,): every interval split into k equal ones (k = 2: at its midpoint; the
    previous round's student grid)."""
    parts = subdivide(grid[:-1], grid[1:], k)[:-1]
    return torch.cat([torch.stack(parts, 1).flatten(), grid[-1:]])


class ProgressiveLoss:
    """Progressive distillation (see the module docstring): round r of `rounds`, from the global step."""

    def __init__(self, cfg: Config, teacher: WorldPipeline, out: Path | None):
        d = cfg.distill
        self.cfg, self.base, self.out = cfg, teacher, out
        self.teacher, self.round = teacher, 0
        self.grids = [sampler_sigmas(student_scheduler(cfg, teacher), d.nfe)]  # the last round's: the sampler's
        while len(self.grids) < d.rounds:
            self.grids.insert(0, refine(self.grids[0], d.substeps))
        self.starts = round_starts(d.steps, d.rounds, d.round_steps)

    def round_of(self, step: int) -> int:
        return max(r for r, s in enumerate(self.starts) if s <= step)

    def first_step(self, r: int) -> int:
        return self.starts[r]

    def schedule(self, step: int) -> tuple[int, int]:
        """The lr schedule's clock (clvr.train.loop.Loss): (step within its round, the round's steps)."""
        r = self.round_of(step)
        end = self.starts[r + 1] if r + 1 < len(self.starts) else self.cfg.distill.steps
        return step - self.starts[r], end - self.starts[r]

    def teacher_for(self, engine: Engine, pipe: WorldPipeline, step: int) -> WorldPipeline:
        """Round 0: the base. Round r > 0: the student as it was at round r's first step (saved then)."""
        r = self.round_of(step)
        if r == self.round:
            return self.teacher
        from clvr.models.backend import load_pipeline

        if self.out is None:
            raise CheckpointError("progressive distillation past its first round needs an out folder")
        path = self.out / "rounds" / f"round-{r}"
        if step == self.first_step(r):  # now is the boundary: the student becomes the teacher
            with engine.full_params():
                if engine.is_main:
                    atomic_dir(path, lambda d: pipe.save_pretrained(d))
            engine.barrier()
        elif not (path / "model_index.json").is_file():
            raise CheckpointError(f"resuming distill round {r} at step {step} needs its teacher {path}; "
                                  f"delete {self.out} to start fresh")
        t = load_pipeline(str(path))
        t.transformer.requires_grad_(False), t.text_encoder.requires_grad_(False)
        t.transformer.eval(), t.text_encoder.eval()
        if engine.device.name != "cpu":
            t.to(engine.ds.device)
        self.teacher, self.round = t, r
        return t

    def __call__(self, engine: Engine, pipe: WorldPipeline, rows: Rows) -> tuple[torch.Tensor, dict[str, float]]:
        b, d, dev = rows.batch, self.cfg.distill, engine.to_device
        tp = self.teacher_for(engine, pipe, rows.step)
        # CFG in the first round only (later teachers are students, guidance folded in): `edit_guidance` on edits
        w = torch.where(torch.from_numpy(b.edit), d.edit_guidance or d.guidance, d.guidance) if self.round == 0 \
            else torch.ones(len(b.texts))
        grid = self.grids[self.round]
        x0, ref = cell_tokens(pipe, b, self.cfg.world.cell)
        region, edit = torch.from_numpy(b.region), torch.from_numpy(b.edit)
        n = len(grid) - 1
        t, eps = noise(rows, tuple(x0.shape[1:]), lambda r: float(grid[r.integers(n)]))
        idx = (grid[:n][None, :] - t[:, None]).abs().argmin(1)
        t_next = grid[idx + 1]
        x_t = (1 - t[:, None, None]) * x0 + t[:, None, None] * eps
        cond = Cond(ref, region, tp.encode_text(b.texts, b.parts),
                    tp.encode_text([""] * len(b.texts)) if (w > 1).any() else None)
        tgt = teacher_steps(tp, x_t, t, t_next, cond, w, edit, d.substeps)
        new, gate = pipe.predict(dev(x_t), dev(t), Cond(dev(ref), dev(region), pipe.encode_text(b.texts, b.parts)))
        is_edit, ref_d = dev(edit)[:, None], dev(ref).to(new.dtype)
        # the student's x0 as its sampler composes it: an edit inside its first-step mask (the teacher's here),
        # text-to-image through its own soft gate, so the x0 loss trains that gate too
        mask = torch.where(is_edit, tgt["hard"].to(new.device), torch.sigmoid(gate.float())).to(new.dtype)
        x0_s = ref_d + mask[..., None] * (new - ref_d)
        wt = 1 + (d.changed_weight - 1) * torch.from_numpy(b.changed).to(new.device)
        loss_x = weighted_x0_loss(engine, x0_s, tgt["x0"].to(new.device), wt)
        # the gate's anchor: the teacher's at x_t for an edit (the mask it holds), for text-to-image its gate at
        # the midpoint, one teacher step further committed to where the picture is going
        gate_t = torch.sigmoid(torch.where(edit[:, None], tgt["gate"], tgt["gate_mid"])).to(new.device)
        loss_g = F.binary_cross_entropy_with_logits(gate.float(), gate_t)
        return loss_x + d.gate_weight * loss_g, {"loss_x0": loss_x.item(), "loss_gate": loss_g.item(),
                                                 "round": float(self.round)}


def trainer(cfg: Config, out: Path | None, section: str = "distill") -> Trainer:
    """The student's run on config section `section` (distill, trajectory or rebalance: a DistillCfg each), read as
    `cfg.distill` throughout this module; errors and the run folder name the section."""
    from clvr.models.backend import load_pipeline
    from clvr.registry import check_checkpoint

    d = getattr(cfg, section)
    cfg = replace(cfg, distill=d)
    if d.init:
        check_checkpoint(d.init, f"{section}.init")  # named before anything loads
    teacher = load_pipeline(teacher_path(cfg))
    teacher.transformer.requires_grad_(False), teacher.text_encoder.requires_grad_(False)
    sched = student_scheduler(cfg, teacher)

    def build(resume: Path | None) -> WorldPipeline:
        student = load_pipeline(resume / "model" if resume else d.init or teacher_path(cfg))
        student.register_to_config(default_steps=d.nfe, default_guidance=1.0)
        student.scheduler = FlowMatchEulerDiscreteScheduler.from_config(sched)
        return student

    def evaluate(pipe: WorldPipeline) -> dict[str, float]:
        from clvr.train.bench import quick_eval

        return quick_eval(pipe, d.eval_trials, d.nfe, 1.0, EVAL_TIERS, appearance=cfg.world.appearance)

    if d.method == "progressive":
        loss = ProgressiveLoss(cfg, teacher, out)
    else:  # at the student's sampling sigmas, e.g. 1, .75, .5, .25
        loss = DistillLoss(cfg, teacher, sampler_sigmas(sched, d.nfe)[:-1])
    tr = Trainer(section, cfg, d, build, loss, evaluate, out, text_dropout=0.0)
    if tr.engine.device.name != "cpu":  # the frozen teacher (fp32) sits beside the student on this rank's GPU
        teacher.to(tr.engine.ds.device)
    tr.teacher = teacher
    return tr


def run(cfg: Config, section: str = "distill") -> dict:
    """Student metrics at `nfe` (no CFG); the teacher's at `teacher_steps` + CFG once, for the gap. `section`:
    the config section with the settings (see `trainer`)."""
    from clvr.train.bench import quick_eval

    d = getattr(cfg, section)
    torch.set_num_threads(d.threads)
    out = Path(d.out)
    tr = trainer(cfg, out, section)
    res = tr.fit()
    if tr.engine.is_main:
        t0 = time.perf_counter()
        # the teacher as this run used it: progressive's first teacher takes CFG `edit_guidance` on edits
        edit_w = d.edit_guidance if d.method == "progressive" else 0.0
        teach = quick_eval(tr.teacher, d.eval_trials, d.teacher_steps, d.guidance, EVAL_TIERS,
                           appearance=cfg.world.appearance, edit_guidance=edit_w)
        m = res["metrics"]
        m.update({f"teacher_{k}": v for k, v in teach.items()})
        gaps = [abs(m[f"eval_{k}"] - v) for k, v in teach.items() if k.startswith("edit_") and f"eval_{k}" in m]
        if gaps:
            m["edit_gap_max"] = max(gaps)
        m["teacher_eval_s"] = time.perf_counter() - t0
        ckpt.write_json(out / "metrics.json", m)
    tr.engine.barrier()
    return {"metrics": ckpt.read_json(out / "metrics.json"), "final": res["final"]}


def run_trajectory(cfg: Config) -> dict:
    """The foundation stage `trajectory`: the distilled model's second part, on the `trajectory` section."""
    return run(cfg, "trajectory")


def run_rebalance(cfg: Config) -> dict:
    """The foundation stage `rebalance`: on from `trajectory`'s student, on the `rebalance` section."""
    return run(cfg, "rebalance")
