"""`WorldTransformer`: diffusers' `Flux2Transformer2DModel` with an optional MLP output head.

Why: the world's tokens are whole cells (16x16x3 = 768 pixel values) and the stock `proj_out` is one Linear from
`hidden` features. Every cell the model can draw then lies in a `hidden`-dimensional affine subspace of pixel
space. In the varied world (clvr.world.render.draw_look: size, offset, turn per object) the cell looks do not fit
in 96 dimensions (benchmarks/cell_rank.py), and a turned square or triangle comes out as a disc. With
`head_width` > 0, `proj_out` is Linear(hidden, head_width) -> GELU -> Linear(head_width, out): a small per-token
nonlinear decoder, the role FLUX's VAE decoder plays at real scale, trained end to end. `head_width` = 0 is the
stock model, layer for layer.

Everything else (blocks, RoPE, modulation, `from_pretrained`/`save_pretrained`) is the parent's.
"""

from __future__ import annotations

from torch import nn
from diffusers import Flux2Transformer2DModel, ModelMixin  # noqa: F401  (a pipeline loads a custom component
# through the base classes its module names: ModelMixin -> from_pretrained)
from diffusers.configuration_utils import register_to_config


class WorldTransformer(Flux2Transformer2DModel):
    @register_to_config
    def __init__(self, patch_size: int = 1, in_channels: int = 128, out_channels: int | None = None,
                 num_layers: int = 8, num_single_layers: int = 48, attention_head_dim: int = 128,
                 num_attention_heads: int = 48, joint_attention_dim: int = 15360, timestep_guidance_channels: int = 256,
                 mlp_ratio: float = 3.0, axes_dims_rope: tuple[int, ...] = (32, 32, 32, 32), rope_theta: int = 2000,
                 eps: float = 1e-6, guidance_embeds: bool = True, head_width: int = 0):
        super().__init__(patch_size=patch_size, in_channels=in_channels, out_channels=out_channels,
                         num_layers=num_layers, num_single_layers=num_single_layers,
                         attention_head_dim=attention_head_dim, num_attention_heads=num_attention_heads,
                         joint_attention_dim=joint_attention_dim,
                         timestep_guidance_channels=timestep_guidance_channels, mlp_ratio=mlp_ratio,
                         axes_dims_rope=axes_dims_rope, rope_theta=rope_theta, eps=eps,
                         guidance_embeds=guidance_embeds)
        if head_width:
            linear = self.proj_out
            self.proj_out = nn.Sequential(nn.Linear(linear.in_features, head_width), nn.GELU(approximate="tanh"),
                                          nn.Linear(head_width, linear.out_features))
