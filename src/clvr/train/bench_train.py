"""`clvr world bench-train`: training throughput of the plain AdamW loop vs the engine with 1 and 2 processes.

Each measurement runs in its own process (its peak RSS is its own): `plain` is the loop every trainer had
before the engine (a torch AdamW step on the pretrain loss, one RNG drawing the whole batch); `engine` is
`clvr.train.pretrain` on the DeepSpeed engine, once as one process and once as 2 ranks under torchrun at the
same global batch. All start from the same weights; after the same steps the 1- and 2-process parameters
are compared. The engine-vs-plain ratio comes from a `paired` process that times both in alternating chunks,
so a shared machine's changing load hits both alike. Timing starts after `warmup` steps. Last line: JSON.
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from clvr.config import Config, load_config

TOL = 1e-5  # max |parameter difference|, 2 ranks vs 1, that counts as "the same training"


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class PlainLoop:
    """The pre-engine training step: torch AdamW, grad-norm clip 1.0, the pretrain loss, one RNG per run."""

    def __init__(self, cfg: Config):
        from clvr.train.data import PromptSource
        from clvr.train.pretrain import build_pipeline

        p = cfg.pretrain
        self.cfg, self.p = cfg, p
        self.rng = np.random.default_rng(p.seed)
        self.gen = torch.Generator().manual_seed(p.seed)
        self.prompts = PromptSource(cfg.world.grid, p.tier_weights, p.prompt_pool, p.seed,
                                    appearance=cfg.world.appearance)
        self.pipe = build_pipeline(cfg, p.init)
        self.params = [x for m in (self.pipe.transformer, self.pipe.text_encoder) for x in m.parameters()]
        self.opt = torch.optim.AdamW(self.params, lr=p.lr, betas=(0.9, 0.99), weight_decay=p.weight_decay)
        self.pipe.transformer.train(), self.pipe.text_encoder.train()
        self.step = 0

    def train_step(self) -> float:
        from clvr.models.pipeline import Cond
        from clvr.train.data import sample_batch, tokens

        p, cell = self.p, self.cfg.world.cell
        for g in self.opt.param_groups:
            g["lr"] = p.lr * min(1.0, (self.step + 1) / max(1, p.warmup))
        b = sample_batch(self.rng, p.batch_size, self.cfg.world.grid, p.edit_frac, p.grounded_frac, p.text_dropout,
                         p.max_objects, self.prompts, op_probs=tuple(p.op_probs))
        x0, ref = tokens(b.x0, cell), tokens(b.ref, cell)
        changed, region = torch.from_numpy(b.changed), torch.from_numpy(b.region)
        t = torch.sigmoid(torch.randn(len(b.texts), generator=self.gen))
        t = torch.where(torch.rand(len(b.texts), generator=self.gen) < 0.15, torch.ones_like(t), t)
        x_t = (1 - t[:, None, None]) * x0 + t[:, None, None] * torch.randn(x0.shape, generator=self.gen)
        new, gate = self.pipe.predict(x_t, t, Cond(ref, region, self.pipe.encode_text(b.texts)))
        w = 1 + (p.changed_weight - 1) * changed
        loss = (w * ((new - x0) ** 2).mean(-1)).sum() / w.sum() + \
            p.gate_weight * F.binary_cross_entropy_with_logits(gate, changed)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.opt.step()
        self.step += 1
        return loss.item()


def measure_paired(cfg: Config, steps: int, warmup: int, chunk: int = 5) -> dict:
    """The plain loop and the 1-process engine in one process, timed in alternating chunks of `chunk` steps:
    on a shared machine whose load changes from second to second, both see the same load."""
    from clvr.train.pretrain import trainer

    torch.set_num_threads(cfg.pretrain.threads)
    runs = {"plain": PlainLoop(cfg), "engine_1": trainer(cfg, out=None)}
    for tr in runs.values():
        for _ in range(warmup):
            tr.train_step()
    spent = dict.fromkeys(runs, 0.0)
    for i in range(0, steps, chunk):
        for name, tr in runs.items():
            t0 = time.perf_counter()
            for _ in range(min(chunk, steps - i)):
                tr.train_step()
            spent[name] += time.perf_counter() - t0
    return {"rank": 0, **{name: steps * cfg.pretrain.batch_size / t for name, t in spent.items()}}


def measure(mode: str, cfg: Config, steps: int, warmup: int, params_out: str | None) -> dict:
    """Run `warmup` + `steps` steps of one mode in this process; samples/s over the timed steps."""
    if mode == "paired":
        return measure_paired(cfg, steps, warmup)
    torch.set_num_threads(cfg.pretrain.threads)
    if mode == "plain":
        tr, rank = PlainLoop(cfg), 0
    else:
        from clvr.train.pretrain import trainer

        tr = trainer(cfg, out=None)
        rank = tr.engine.rank
    for _ in range(warmup):
        tr.train_step()
    t0 = time.perf_counter()
    for _ in range(steps):
        tr.train_step()
    dt = time.perf_counter() - t0
    res = {"samples_per_s": steps * cfg.pretrain.batch_size / dt, "peak_rss_mb": _peak_rss_mb(), "rank": rank}
    if torch.cuda.is_available():
        res["peak_gpu_mem_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    if mode == "engine":
        res["world"] = tr.engine.world
        rss = tr.engine.all_sum(torch.tensor([res["peak_rss_mb"]], dtype=torch.float64))
        res["peak_rss_mb_all_ranks"] = float(rss[0])
        if params_out and rank == 0:
            from safetensors.torch import save_file

            sd = {f"{k}": v.detach().float().contiguous() for k, v in tr.engine.module.state_dict().items()}
            save_file(sd, params_out)
    return res


def _child(mode: str, ranks: int, profile: str, overrides: list[str], steps: int, warmup: int,
           params_out: str | None, tmp: Path) -> dict:
    out = tmp / f"{mode}-{ranks}-{time.monotonic_ns()}.json"
    args = ["--mode", mode, "--steps", str(steps), "--warmup", str(warmup), "--profile", profile,
            "--result", str(out), *(["--params-out", params_out] if params_out else []), *overrides]
    launch = [sys.executable, "-m", "clvr.train.bench_train"] if ranks == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}",
         "-m", "clvr.train.bench_train"]
    r = subprocess.run([*launch, *args], capture_output=True, text=True)
    if r.returncode != 0:
        from clvr.errors import ClvrError

        raise ClvrError(f"bench-train: the {mode} run on {ranks} process(es) failed: {r.stderr.strip()[-800:]}")
    return json.loads(out.read_text())


def run_bench(profile: str, overrides: list[str], steps: int, warmup: int, repeats: int = 2) -> dict:
    from safetensors.torch import load_file

    cfg = load_config(profile, overrides)
    with tempfile.TemporaryDirectory(prefix="clvr-bench-train-") as d:
        tmp = Path(d)
        p1, p2 = str(tmp / "one.safetensors"), str(tmp / "two.safetensors")
        plain, one, paired = [], [], []
        for _ in range(repeats):  # best of each
            paired.append(_child("paired", 1, profile, overrides, steps, warmup, None, tmp))
            plain.append(_child("plain", 1, profile, overrides, steps, warmup, None, tmp))
            one.append(_child("engine", 1, profile, overrides, steps, warmup, p1, tmp))
        two = _child("engine", 2, profile, overrides, steps, warmup, p2, tmp)
        a, b = load_file(p1), load_file(p2)
        diff = max(float((a[k] - b[k]).abs().max()) for k in a)
        scale = max(float(v.abs().max()) for v in a.values())
    sps = {"plain": max(r["samples_per_s"] for r in plain), "engine_1": max(r["samples_per_s"] for r in one),
           "engine_2": two["samples_per_s"]}
    pair = {k: max(r[k] for r in paired) for k in ("plain", "engine_1")}
    ratio = pair["engine_1"] / pair["plain"]
    return {
        "profile": profile, "global_batch": cfg.pretrain.batch_size, "steps_timed": steps, "warmup": warmup,
        "params": sum(v.numel() for v in a.values()),
        "samples_per_s": {k: round(v, 1) for k, v in sps.items()},  # each in its own process
        "samples_per_s_paired": {k: round(v, 1) for k, v in pair.items()},  # one process, alternating chunks
        "engine_1_vs_plain": round(ratio, 3),  # from the paired run: the same load on both
        "engine_1_vs_plain_separate": round(sps["engine_1"] / sps["plain"], 3),
        "engine_2_vs_engine_1": round(sps["engine_2"] / sps["engine_1"], 3),
        "peak_rss_mb": {"plain": round(max(r["peak_rss_mb"] for r in plain), 1),
                        "engine_1": round(max(r["peak_rss_mb"] for r in one), 1),
                        "engine_2_all_ranks": round(two["peak_rss_mb_all_ranks"], 1)},
        "param_max_abs_diff_1_vs_2": diff, "param_max_abs": scale, "tol": TOL,
        "target_met": bool(ratio >= 0.9 and diff <= TOL and math.isfinite(diff)),
    }


def main(argv: list[str] | None = None) -> None:
    """One measurement (a child of run_bench, or a rank under torchrun); rank 0 writes --result."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--mode", choices=("plain", "engine", "paired"), required=True)
    ap.add_argument("--steps", type=int, required=True)
    ap.add_argument("--warmup", type=int, required=True)
    ap.add_argument("--profile", required=True)
    ap.add_argument("--result", required=True)
    ap.add_argument("--params-out")
    ap.add_argument("overrides", nargs="*")
    a = ap.parse_args(argv)
    res = measure(a.mode, load_config(a.profile, a.overrides), a.steps, a.warmup, a.params_out)
    if res["rank"] == 0:
        Path(a.result).write_text(json.dumps(res))


if __name__ == "__main__":
    main()
