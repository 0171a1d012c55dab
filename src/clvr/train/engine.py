"""The training engine every trainer uses: DeepSpeed on one CPU process or on N ranks of GPUs.

* Device: DeepSpeed's accelerator (it honours DS_ACCELERATOR). CUDA -> NCCL and bf16; CPU -> gloo and fp32.
  DeepSpeed's CPU accelerator asks for oneCCL when it is installed, so the process group is always created
  here, with gloo on CPU, before `deepspeed.initialize` (which then reuses it).
* Launch: without a launcher it is one process (a private in-memory store, no ports); under `torchrun` or
  `deepspeed` it reads RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT (`config.launcher_env`).
* Optimizer: a torch AdamW handed to DeepSpeed as its client optimizer (`zero_allow_untested_optimizer`);
  ZeRO stage `engine.zero_stage` (0-3) shards its state (1), + gradients (2), + parameters (3).
* Checkpoints (`checkpoints/step-NNNNNN/`): `state.json` (step, world size, ZeRO stage, the resolved config),
  `model/` (diffusers layout, full weights gathered on rank 0) and `ds/` (DeepSpeed's own files: every rank
  writes and reads its share). All ranks write into one temporary folder that rank 0 renames after a barrier,
  so a kill -9 leaves the previous checkpoint or the new one, never half of one. DeepSpeed's files are
  pickles and are only ever read from the run's own out dir. ZeRO 0 keeps the full optimizer state in one
  file, so it resumes at any world size; ZeRO 1-3 shards must be read by as many ranks as wrote them.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch
import torch.distributed as dist

from clvr.config import EngineCfg, launcher_env
from clvr.errors import CheckpointError
from clvr.io import atomic_write_text

KEEP = 2  # newest checkpoints kept


@dataclass(frozen=True)
class Device:
    name: str  # "cpu" | "cuda"
    backend: str  # "gloo" | "nccl"
    dtype: torch.dtype  # parameter / activation dtype (the optimizer keeps fp32 masters under bf16)


def pick_device(precision: str = "auto") -> Device:
    """CUDA + NCCL + bf16 when DeepSpeed's accelerator is CUDA (DS_ACCELERATOR decides, else auto-detection),
    else CPU + gloo + fp32."""
    from deepspeed.accelerator import get_accelerator

    cuda = get_accelerator().device_name() == "cuda"
    dtype = torch.bfloat16 if precision == "bf16" or (precision == "auto" and cuda) else torch.float32
    return Device("cuda" if cuda else "cpu", "nccl" if cuda else "gloo", dtype)


def init_dist(device: Device) -> tuple[int, int]:
    """(rank, world size); creates the default process group once per process."""
    rank, world, local = launcher_env()
    if device.name == "cpu":
        # DeepSpeed's CPU backend JIT-compiles a shared-memory all-reduce op (a C++ compiler, ~40 s on first
        # use) that only its inference all-reduce calls; training uses gloo's collectives, so skip the build.
        # (importlib: the attribute `deepspeed.comm.torch` is shadowed by the torch package itself)
        importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
    if not dist.is_initialized():
        if device.name == "cuda":
            torch.cuda.set_device(local)
        if world == 1 and "MASTER_ADDR" not in os.environ:
            dist.init_process_group(device.backend, store=dist.HashStore(), rank=0, world_size=1)
        else:
            dist.init_process_group(device.backend, rank=rank, world_size=world)
    return dist.get_rank(), dist.get_world_size()


def ds_config(ecfg: EngineCfg, micro_batch: int, world: int, device: Device) -> dict:
    """The DeepSpeed config of a run: derived from the `engine` section and the global batch, nothing else."""
    return {
        "train_batch_size": micro_batch * world,
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": ecfg.grad_clip,
        "zero_optimization": {"stage": ecfg.zero_stage},
        "zero_allow_untested_optimizer": True,
        "bf16": {"enabled": device.dtype == torch.bfloat16},
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }


class Engine:
    """A DeepSpeed engine over `modules` (the trainable parts of a pipeline) with a torch AdamW."""

    def __init__(self, modules: dict[str, torch.nn.Module], ecfg: EngineCfg, global_batch: int, lr: float,
                 weight_decay: float = 0.0, betas: tuple[float, float] = (0.9, 0.99)):
        import deepspeed

        self.ecfg = ecfg
        self.device = pick_device(ecfg.precision)
        self.rank, self.world = init_dist(self.device)
        if global_batch % self.world:  # config.check_global_batch catches this when the config loads
            raise CheckpointError(f"global batch {global_batch} does not split over {self.world} ranks")
        self.global_batch, self.micro_batch = global_batch, global_batch // self.world
        self.module = torch.nn.ModuleDict(modules)
        params = [p for p in self.module.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=lr, betas=betas, weight_decay=weight_decay)
        cfg = ds_config(ecfg, self.micro_batch, self.world, self.device)
        own = "LOCAL_RANK" not in os.environ  # DeepSpeed asserts it is set, even for one process
        if own:
            os.environ["LOCAL_RANK"] = "0"
        try:
            self.ds, self.opt, _, _ = deepspeed.initialize(model=self.module, optimizer=opt, config=cfg,
                                                           dist_init_required=False)
        finally:
            if own:  # a later config load must not mistake it for a (partial) launcher environment
                del os.environ["LOCAL_RANK"]
        self.params = params

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def dtype(self) -> torch.dtype:
        return self.device.dtype

    def to_device(self, x: torch.Tensor) -> torch.Tensor:
        """A batch tensor on this rank's device, floats in the engine's dtype."""
        x = x.to(self.ds.device)
        return x.to(self.dtype) if x.is_floating_point() else x

    def set_lr(self, lr: float) -> None:
        for g in self.opt.param_groups:
            g["lr"] = lr

    def step(self, loss: torch.Tensor) -> float:
        """Backward (gradients averaged over ranks), clip, optimizer step; returns the global gradient norm."""
        self.ds.backward(loss)
        gn = None
        if self.ecfg.zero_stage == 0:  # DeepSpeed reports the norm only from its ZeRO optimizers
            grads = [p.grad for p in self.params if p.grad is not None]
            gn = float(torch.nn.utils.get_total_norm(grads)) if grads else 0.0
        self.ds.step()
        if gn is None:
            n = self.ds.get_global_grad_norm()
            gn = float(n) if n is not None else float("nan")
        return gn

    def all_sum(self, x: torch.Tensor) -> torch.Tensor:
        """Sum of a (detached) tensor over ranks; the tensor itself with one rank."""
        if self.world == 1:
            return x
        y = x.detach().to(self.ds.device, torch.float32).clone()
        dist.all_reduce(y)
        return y.to(x.device)

    def mean_stats(self, stats: dict[str, float]) -> dict[str, float]:
        """Per-rank scalars averaged over ranks (ranks hold equal shares of the global batch)."""
        if self.world == 1 or not stats:
            return stats
        v = self.all_sum(torch.tensor(list(stats.values()), dtype=torch.float64)) / self.world
        return dict(zip(stats, v.tolist()))

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    @contextlib.contextmanager
    def full_params(self) -> Iterator[None]:
        """Every parameter whole on every rank (ZeRO-3 gathers them; a collective: all ranks enter)."""
        if self.ecfg.zero_stage == 3:
            import deepspeed

            with deepspeed.zero.GatheredParameters(list(self.module.parameters()), modifier_rank=None):
                yield
        else:
            yield

    # ---- checkpoints -----------------------------------------------------------------------------------

    def save(self, root: Path, step: int, write_model: Callable[[Path], None], extra: dict) -> Path:
        """checkpoints/step-N with every rank's share; keeps the newest KEEP. Collective."""
        final = step_dir(root, step)
        tmp = final.parent / f".tmp-{final.name}"
        if self.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        self.barrier()
        self.ds.save_checkpoint(str(tmp), tag="ds", save_latest=False)
        with self.full_params():
            if self.is_main:
                write_model(tmp / "model")
        self.barrier()
        if self.is_main:
            state = {"step": step, "world_size": self.world, "zero_stage": self.ecfg.zero_stage, **extra}
            atomic_write_text(tmp / "state.json", json.dumps(state))
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            for old in sorted(final.parent.glob("step-[0-9]*"))[:-KEEP]:
                shutil.rmtree(old, ignore_errors=True)
        self.barrier()
        return final

    def load(self, ck: Path) -> dict:
        """Restore this rank's share of checkpoint `ck` (model + optimizer); returns its state.json."""
        try:
            state = json.loads((ck / "state.json").read_text())
        except (OSError, ValueError) as e:
            raise CheckpointError(f"corrupt training checkpoint '{ck}': {e}") from None
        was_world, was_stage = state.get("world_size", 1), state.get("zero_stage", 0)
        if was_stage != self.ecfg.zero_stage or (was_stage > 0 and was_world != self.world):
            raise CheckpointError(
                f"checkpoint '{ck}' holds ZeRO-{was_stage} shards of {was_world} rank(s); this run is ZeRO-"
                f"{self.ecfg.zero_stage} on {self.world}: resume with {was_world} rank(s) and "
                f"engine.zero_stage={was_stage}, or delete {ck.parent} to start fresh")
        try:
            path, _ = self.ds.load_checkpoint(str(ck), tag="ds", load_optimizer_states=True,
                                              load_lr_scheduler_states=False)
        except Exception as e:  # missing or truncated shard files
            raise CheckpointError(f"corrupt training checkpoint '{ck}': {e}") from None
        if path is None:
            raise CheckpointError(f"corrupt training checkpoint '{ck}': DeepSpeed found no state in {ck / 'ds'}")
        return state


def step_dir(root: Path, step: int) -> Path:
    return root / "checkpoints" / f"step-{step:06d}"


def latest(root: Path) -> Path | None:
    """The newest complete checkpoint (temporary folders of an interrupted save start with '.')."""
    d = root / "checkpoints"
    ckpts = sorted(d.glob("step-[0-9]*")) if d.is_dir() else []
    return ckpts[-1] if ckpts else None
