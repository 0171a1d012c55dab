"""The cell autoencoder: a tiny diffusers `AutoencoderKL` over one grid cell, whose latent is the generator's image
token in a latent world generator (`generator.vae`).

Why: with a cell's pixels as its token, the transformer's linear output layer can only draw cells in a
`hidden`-dimensional subspace of the 768 pixel values, and the varied world's looks (size, offset, turn) do not
fit there (benchmarks/cell_rank.py: a turned square comes out as a disc). A pixel x0 loss also barely penalises a
wrong shape: a disc and a square of the same colour differ in a few edge pixels. FLUX.2 solves the same problem
with its VAE: the transformer denoises latents and a convolutional decoder draws the pixels. Here each cell is
encoded on its own (16x16x3 -> latent_channels x 2 x 2 after three halvings), so a cell's pixels depend only on
its own token, and the edit gate's copy-by-construction holds cell by cell.

Latents are the encoder's means (no sampling), shifted and scaled to unit spread by the `shift_factor` and
`scaling_factor` of the model's config (set by `fit_scaling` after training, as FLUX's VAE stores them).
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import AutoencoderKL

from clvr.errors import CheckpointError


def build_cell_vae(cell: int, latent_channels: int, width: int, seed: int = 0) -> AutoencoderKL:
    """A fresh cell autoencoder: four blocks of `width`/2, `width`, `width`, `width` channels (three halvings)."""
    if cell % 8:
        raise ValueError(f"world.cell = {cell} must be a multiple of 8 for the cell autoencoder (three halvings)")
    torch.manual_seed(seed)
    chans = (width // 2, width, width, width)
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                         up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=chans, layers_per_block=1,
                         latent_channels=latent_channels, norm_num_groups=min(8, width // 2), sample_size=cell,
                         scaling_factor=1.0, shift_factor=0.0)


def latent_hw(vae: AutoencoderKL, cell: int) -> tuple[int, int]:
    """A cell's latent height and width: the autoencoder halves the size once per block after the first."""
    side = cell // 2 ** (len(vae.config.block_out_channels) - 1)
    return side, side


def latent_feat(vae: AutoencoderKL, cell: int) -> int:
    """Features of one cell's latent token: channels x height x width."""
    h, w = latent_hw(vae, cell)
    return vae.config.latent_channels * h * w


def cells_to_images(pixels: torch.Tensor, cell: int) -> torch.Tensor:
    """(M, cell*cell*3) pixel rows in [-1, 1] -> (M, 3, cell, cell), the autoencoder's layout."""
    return pixels.view(-1, cell, cell, 3).permute(0, 3, 1, 2)


@torch.no_grad()
def fit_scaling(vae: AutoencoderKL, pixels: torch.Tensor, cell: int) -> None:
    """Set the config's shift and scale so that the latent means of `pixels` (rows of cells) have mean 0 and
    standard deviation 1 over all their values."""
    z = vae.encode(cells_to_images(pixels, cell).to(vae.device, vae.dtype)).latent_dist.mode().float()
    vae.register_to_config(shift_factor=float(z.mean()), scaling_factor=float(1.0 / z.std().clamp_min(1e-6)))


def load_cell_vae(path: str, key: str) -> AutoencoderKL:
    """A trained cell autoencoder folder (config.json + safetensors), named by config key `key`; CheckpointError
    naming both otherwise."""
    if not (Path(path) / "config.json").is_file():
        raise CheckpointError(f"{key}: no cell autoencoder at '{path}' (missing config.json; run the vae stage, "
                              f"`clvr world vae`)")
    try:
        vae = AutoencoderKL.from_pretrained(path, use_safetensors=True)
    except Exception as e:  # corrupt / truncated / mismatched files
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{key}: cannot load cell autoencoder '{path}': {msg}") from None
    return vae.eval().requires_grad_(False)
