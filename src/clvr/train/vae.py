"""Train the cell autoencoder (`clvr world vae`, the foundation flow's `vae` stage) on the world's looks.

Each sample is one row of grid*grid cells, every cell drawn on its own: empty with probability 1 / (kinds + 1),
else a random shape and colour in a random look of `world.appearance` (`clvr.world.render.draw_look`). Loss: pixel
MSE of the reconstruction from the latent mean + `kl_weight` x the KL of the posterior (keeps the latents small
and smooth, so the generator's noise scale fits them). The run is the one training loop (clvr.train.loop) on the
engine: resumable, checkpointed, each checkpoint a diffusers `AutoencoderKL` folder with its latent scaling.

Evaluation: random looks encoded, decoded, snapped to the palette, and read by the detector; `recon_ok` is the
fraction read as the drawn shape and colour, `recon_exact` the fraction equal to the drawing pixel for pixel.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL

from clvr.config import Config
from clvr.models.pipeline import WorldPipeline, snap
from clvr.models.vae import build_cell_vae, cells_to_images, fit_scaling
from clvr.train.data import N_KINDS, Batch, tokens
from clvr.train.engine import Engine
from clvr.train.loop import Rows, Trainer
from clvr.world.detector import detect
from clvr.world.render import draw_look
from clvr.world.vocab import COLORS, SHAPES

SCALE_CELLS = 4096  # random cells the latent scaling is measured on


def random_contents(rng: np.random.Generator, n: int, appearance) -> np.ndarray:
    """(n,) cell contents (clvr.train.data's code): empty, or a random kind in a random look of `appearance`."""
    out = np.zeros(n, np.int64)
    for i in range(n):
        kind = int(rng.integers(N_KINDS + 1))
        if kind == N_KINDS:
            continue
        look = draw_look(SHAPES[kind // len(COLORS)], rng, appearance)
        out[i] = 1 + kind + N_KINDS * (0 if look is None else look.code())
    return out


def cell_batch(rng: np.random.Generator, grid: int, appearance) -> Batch:
    """One training sample: a row of grid*grid random cells (no text, no edit)."""
    n = grid * grid
    zeros = np.zeros((1, n), np.float32)
    return Batch(random_contents(rng, n, appearance)[None], np.zeros((1, n), np.int64), zeros, zeros, [""],
                 np.zeros(1, bool))


def fixed_cells(n: int, cell: int, seed: int, appearance) -> tuple[np.ndarray, torch.Tensor]:
    """`n` random non-empty cells, the same for every call: (contents (n,), pixels (n, cell*cell*3))."""
    rng = np.random.default_rng([seed, 7])
    contents = np.zeros(0, np.int64)
    while len(contents) < n:
        c = random_contents(rng, n, appearance)
        contents = np.concatenate([contents, c[c > 0]])[:n]
    return contents, tokens(contents[None], cell)[0]


class VaeLoss:
    def __init__(self, cfg: Config):
        self.cfg = cfg

    def __call__(self, engine: Engine, pipe: WorldPipeline, rows: Rows) -> tuple[torch.Tensor, dict[str, float]]:
        cell, v = self.cfg.world.cell, pipe.vae
        x = engine.to_device(cells_to_images(tokens(rows.batch.x0, cell).reshape(-1, cell * cell * 3), cell))
        post = v.encode(x).latent_dist
        rec = v.decode(post.mode()).sample
        mse = ((rec.float() - x.float()) ** 2).mean()
        kl = post.kl().float().mean() / post.mean[0].numel()
        return mse + self.cfg.vae.kl_weight * kl, {"loss_rec": mse.item(), "loss_kl": kl.item()}


def reconstruct(pipe: WorldPipeline, pixels: torch.Tensor, cell: int) -> np.ndarray:
    """(M, cell*cell*3) pixels -> (M, cell, cell, 3) uint8 through the generator's own path: cell tokens
    (`encode_cells`), back to pixels (`decode_cells`), snapped to the palette."""
    rec = pipe.decode_cells(pipe.encode_cells(pixels[None]))[0].view(-1, cell, cell, 3)
    return snap(((rec.clamp(-1, 1) + 1) * 127.5).numpy())


def recon_scores(pipe: WorldPipeline, contents: np.ndarray, pixels: torch.Tensor, cell: int) -> dict[str, float]:
    """recon_ok: the detector reads each reconstructed cell as its shape and colour; recon_exact: pixel equal."""
    was = pipe.vae.training
    pipe.vae.eval()
    rec = reconstruct(pipe, pixels, cell)
    pipe.vae.train(was)
    truth = ((pixels.view(-1, cell, cell, 3) + 1) * 127.5).round().to(torch.uint8).numpy()
    ok = 0
    for im, c in zip(rec, contents):
        kind = (int(c) - 1) % N_KINDS
        dets = detect(im, 1)
        ok += len(dets) == 1 and (dets[0].shape, dets[0].color) == (SHAPES[kind // len(COLORS)],
                                                                       tuple(COLORS)[kind % len(COLORS)])
    exact = (rec == truth).all(axis=(1, 2, 3))
    return {"recon_ok": ok / len(rec), "recon_exact": float(exact.mean())}


def build_pipeline(cfg: Config, vae: AutoencoderKL) -> WorldPipeline:
    """A pipeline that carries `vae` (its transformer and text encoder are placeholders the vae stage never trains
    or saves: only the autoencoder is its output)."""
    return WorldPipeline.from_sizes(8, 1, 1, 0, 8, 1, 4, cfg.world.grid, cfg.world.cell, vae=vae)


def trainer(cfg: Config, out: Path | None) -> Trainer:
    s, cell, app = cfg.vae, cfg.world.cell, cfg.world.appearance
    scale_cells = fixed_cells(SCALE_CELLS, cell, s.seed, app)
    eval_cells = fixed_cells(s.eval_trials, cell, s.seed + 1, app)

    def build(resume: Path | None) -> WorldPipeline:
        """Always a fresh autoencoder of the section's sizes: a resumed run's weights come from the checkpoint's
        DeepSpeed state (engine.load), which a folder loaded through from_pretrained would only duplicate."""
        return build_pipeline(cfg, build_cell_vae(cell, s.latent_channels, s.width, s.seed))

    def save(pipe: WorldPipeline, d: Path) -> None:
        fit_scaling(pipe.vae, scale_cells[1], cell)
        pipe.vae.save_pretrained(str(d), safe_serialization=True)

    def evaluate(pipe: WorldPipeline) -> dict[str, float]:
        return recon_scores(pipe, *eval_cells, cell)

    return Trainer("vae", cfg, s, build, VaeLoss(cfg), evaluate, out,
                   draw=lambda rng: cell_batch(rng, cfg.world.grid, app), modules=lambda p: {"vae": p.vae},
                   save_model=save)


def run(cfg: Config) -> dict:
    torch.set_num_threads(cfg.vae.threads)
    return trainer(cfg, Path(cfg.vae.out)).fit()
