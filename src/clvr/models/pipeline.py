"""The world's generator as a diffusers pipeline: tiny `Flux2Transformer2DModel` + tiny `Qwen3Model` text encoder
+ world tokenizer + `FlowMatchEulerDiscreteScheduler`, in diffusers folder layout (model_index.json, one
sub-folder per component, safetensors weights; loading never unpickles).

Conditioning path as FLUX.2 [klein]: text tokens are `encoder_hidden_states`; the reference canvas enters as
extra image tokens appended after the noisy tokens, with position ids offset on the T axis (t=10, as
`Flux2KleinPipeline._prepare_image_ids`). Tokens are grid cells: one 16x16x3 patch = 768 features per token,
plus one grounding channel that marks the cells a step names (GLIGEN-like: the controller knows the layout). A
latent generator (`vae`, clvr.models.vae) takes each cell's autoencoder latent as its token instead, as FLUX.2
denoises its VAE's latents; the sampled latents are decoded cell by cell.

Cell slots (config `cell_slots`, saved with the model; off in the shipped weights): the text starts with
grid*grid fixed slots, one per cell in row-major order, each `SLOT_LEN` tokens (op word, colour, shape; [PAD]
where the step does nothing there; a move fills two: remove at the source, add at the destination), then the
`max_text_len` tokens of free text. Slot j of cell (r, c) gets the RoPE position (0, r, c, j), the H/W of that
cell's image tokens, so Flux2's rotary attention binds each op's words to its cell without new parameters; the
free text sits at (TEXT_T, 0, 0, l). The slot layout is the same for every sample: one `txt_ids` per batch.
The text encoder reads each slot as its own 3-token text and the free text as a slotless model does.

Outputs per noisy token: a clean-image (x0) prediction as a residual on the reference, and one gate logit.
Sampling composes x0 = reference + gate * (new - reference): copy-by-construction outside the gate. The gate is
the grounded regions when the request has them, else the net's own gate taken at the first step and held as a
hard mask (edits), or re-read each step and thresholded at the end (text-to-image, whose reference is blank).
Every output is snapped to the world palette, so the next step reads a clean canvas.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from diffusers import AutoencoderKL, DiffusionPipeline, FlowMatchEulerDiscreteScheduler, Flux2Transformer2DModel
from transformers import PreTrainedTokenizerFast, Qwen3Config, Qwen3Model

from clvr.models.tokenizer import PAD, build_tokenizer
from clvr.models.transformer import WorldTransformer
from clvr.models.vae import cells_to_images, latent_feat, latent_hw
from clvr.steps import Step
from clvr.world.vocab import BACKGROUND, COLORS

REF_T = 10  # T-axis offset of reference-image tokens (as Flux2KleinPipeline)
TEXT_T = 20  # T-axis offset of the free text in a cell-slot model (clear of the noisy (0) and reference (10) tokens)
SLOT_LEN = 3  # tokens per cell slot: op word, colour, shape
PALETTE = np.array([BACKGROUND, *COLORS.values()], np.uint8)  # (5, 3)


@dataclass
class Cond:
    """One batch of conditioning: reference tokens, grounding flags, text embeddings (cond and uncond)."""

    ref: torch.Tensor  # (B, N, F) in [-1, 1]
    region: torch.Tensor  # (B, N) 1 = a cell the step names
    text: torch.Tensor  # (B, L, D)
    text_uncond: torch.Tensor | None = None  # (B, L, D) empty text, for CFG

    def cfg_pair(self) -> "Cond":
        """Cond and uncond stacked (2B): classifier-free guidance in one forward instead of two."""
        return Cond(self.ref.repeat(2, 1, 1), self.region.repeat(2, 1), torch.cat([self.text, self.text_uncond]))


class WorldPipeline(DiffusionPipeline):
    model_cpu_offload_seq = "text_encoder->transformer"
    _optional_components = ["vae"]

    def __init__(self, transformer: Flux2Transformer2DModel, text_encoder: Qwen3Model,
                 tokenizer: PreTrainedTokenizerFast, scheduler: FlowMatchEulerDiscreteScheduler,
                 vae: AutoencoderKL | None = None, grid: int = 4, cell: int = 16, max_text_len: int = 64,
                 default_steps: int = 28, default_guidance: float = 2.0, cell_slots: bool = False):
        super().__init__()
        self.register_modules(transformer=transformer, text_encoder=text_encoder, tokenizer=tokenizer,
                              scheduler=scheduler, vae=vae)
        self.register_to_config(grid=grid, cell=cell, max_text_len=max_text_len, default_steps=default_steps,
                                default_guidance=default_guidance, cell_slots=cell_slots)

    # ---- construction -------------------------------------------------------------------------------
    @classmethod
    def from_sizes(cls, hidden: int, heads: int, double_layers: int, single_layers: int, text_hidden: int,
                   text_layers: int, max_text_len: int, grid: int = 4, cell: int = 16, seed: int = 0,
                   default_steps: int = 28, default_guidance: float = 2.0, cell_slots: bool = False,
                   head_width: int = 0, vae: AutoencoderKL | None = None) -> "WorldPipeline":
        """A freshly initialised tiny pipeline (deterministic under `seed`); `head_width` > 0: an MLP output head
        (clvr.models.transformer); `vae`: a trained cell autoencoder (clvr.models.vae), whose latents become the
        image tokens instead of the cells' pixels."""
        torch.manual_seed(seed)
        tok = build_tokenizer(max_text_len)
        feat = cell * cell * 3 if vae is None else latent_feat(vae, cell)
        head_dim = hidden // heads
        if head_dim % 8 and head_dim % 4 == 0 and (head_dim // 4) % 2:
            raise ValueError(f"hidden/heads = {head_dim} must split into 4 even RoPE axes")
        transformer = WorldTransformer(
            patch_size=1, in_channels=feat + 1, out_channels=feat + 1, num_layers=double_layers,
            num_single_layers=single_layers, attention_head_dim=head_dim, num_attention_heads=heads,
            joint_attention_dim=text_hidden, timestep_guidance_channels=64, mlp_ratio=3.0,
            axes_dims_rope=(head_dim // 4,) * 4, rope_theta=2000, guidance_embeds=False, head_width=head_width)
        text_len = max_text_len + (grid * grid * SLOT_LEN if cell_slots else 0)
        text_encoder = Qwen3Model(Qwen3Config(
            vocab_size=len(tok), hidden_size=text_hidden, intermediate_size=2 * text_hidden,
            num_hidden_layers=text_layers, num_attention_heads=2, num_key_value_heads=1,
            head_dim=text_hidden // 2, max_position_embeddings=text_len, pad_token_id=tok.pad_token_id,
            tie_word_embeddings=False))
        return cls(transformer, text_encoder, tok, FlowMatchEulerDiscreteScheduler(shift=1.0), vae=vae, grid=grid,
                   cell=cell, max_text_len=max_text_len, default_steps=default_steps,
                   default_guidance=default_guidance, cell_slots=cell_slots)

    def use_cell_slots(self, max_text_len: int = 0) -> "WorldPipeline":
        """Turn a slotless model into a cell-slot one in place (same weights: the slots are new text tokens and
        position ids, not parameters); `max_text_len` > 0 also sets the free-text length. Returns self."""
        n = max_text_len or self.config.max_text_len
        self.register_to_config(cell_slots=True, max_text_len=n)
        self.tokenizer.model_max_length = n
        self.text_encoder.config.max_position_embeddings = self.text_len
        return self

    # ---- tokens <-> images ----------------------------------------------------------------------------
    @property
    def n_tokens(self) -> int:
        return self.config.grid ** 2

    @property
    def feat(self) -> int:
        """Features per image token: a cell's pixels, or its latent when the pipeline has a cell autoencoder."""
        return self.config.cell ** 2 * 3 if self.vae is None else latent_feat(self.vae, self.config.cell)

    def to_tokens(self, images: np.ndarray) -> torch.Tensor:
        """(B, H, W, 3) uint8 -> (B, grid*grid, feat) image tokens, cells in row-major order."""
        g, c = self.config.grid, self.config.cell
        x = torch.from_numpy(np.ascontiguousarray(images)).float() / 127.5 - 1.0
        b = x.shape[0]
        return self.encode_cells(x.view(b, g, c, g, c, 3).permute(0, 1, 3, 2, 4, 5).reshape(b, g * g, c * c * 3))

    def from_tokens(self, tokens: torch.Tensor) -> np.ndarray:
        """Inverse of `to_tokens`, snapped to the world palette -> (B, H, W, 3) uint8."""
        g, c = self.config.grid, self.config.cell
        b = tokens.shape[0]
        x = self.decode_cells(tokens).view(b, g, g, c, c, 3).permute(0, 1, 3, 2, 4, 5).reshape(b, g * c, g * c, 3)
        return snap(((x.clamp(-1, 1) + 1) * 127.5).numpy())

    @torch.no_grad()
    def encode_cells(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, N, cell*cell*3) pixels in [-1, 1] -> (B, N, feat) tokens: the pixels themselves, or the cell
        autoencoder's normalised latent means (each distinct cell encoded once)."""
        if self.vae is None:
            return pixels
        c, v = self.config.cell, self.vae
        uniq, inv = torch.unique(pixels.reshape(-1, pixels.shape[-1]), dim=0, return_inverse=True)
        z = v.encode(cells_to_images(uniq, c).to(v.device, v.dtype)).latent_dist.mode()
        z = ((z.float() - v.config.shift_factor) * v.config.scaling_factor).flatten(1).cpu()
        return z[inv].view(*pixels.shape[:-1], -1)

    @torch.no_grad()
    def decode_cells(self, tokens: torch.Tensor) -> torch.Tensor:
        """Inverse of `encode_cells`: (B, N, feat) -> (B, N, cell*cell*3) pixels in [-1, 1] (not snapped)."""
        if self.vae is None:
            return tokens
        c, v = self.config.cell, self.vae
        z = tokens.reshape(-1, v.config.latent_channels, *latent_hw(v, c)).float()
        x = v.decode((z / v.config.scaling_factor + v.config.shift_factor).to(v.device, v.dtype)).sample
        return x.float().permute(0, 2, 3, 1).reshape(*tokens.shape[:-1], c * c * 3).cpu()

    # ---- network ------------------------------------------------------------------------------------
    @property
    def n_slots(self) -> int:
        """Text tokens taken by the cell slots (0 for a slotless model)."""
        return self.n_tokens * SLOT_LEN if self.config.cell_slots else 0

    @property
    def text_len(self) -> int:
        """Text tokens per sample: the cell slots, then the free text."""
        return self.n_slots + self.config.max_text_len

    def slot_ids(self, parts: list[tuple[Step, ...]]) -> torch.Tensor:
        """Each sample's single-op steps -> (B, n_slots) token ids of its cell slots."""
        words = [slot_words(p, self.config.grid) for p in parts]
        return torch.tensor([self.tokenizer.convert_tokens_to_ids(w) for w in words], dtype=torch.long)

    def encode_text(self, texts: list[str], parts: list[tuple[Step, ...]] | None = None) -> torch.Tensor:
        """Texts -> (B, text_len, D). The free text is left-padded and truncated from the left (the newest words
        stay); a cell-slot model puts the slots of each sample's `parts` (its single-op steps; none = empty
        slots) before it. Each slot is encoded on its own (a 3-token text): its embedding says what happens
        in its cell whatever the other cells hold, and the free text is encoded exactly as in a slotless
        model. A slotless model ignores `parts`."""
        enc = self.tokenizer(texts, padding="max_length", truncation=True, max_length=self.config.max_text_len,
                             return_tensors="pt")["input_ids"]
        dev = self.text_encoder.device
        free = self.text_encoder(input_ids=enc.to(dev)).last_hidden_state
        if not self.n_slots:
            return free
        slots = self.slot_ids(parts if parts is not None else [()] * len(texts)).view(-1, SLOT_LEN)
        slots = self.text_encoder(input_ids=slots.to(dev)).last_hidden_state.reshape(len(texts), self.n_slots, -1)
        return torch.cat([slots, free], 1)

    def ids(self, text_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """RoPE position ids (T, H, W, L): noisy tokens at t=0, reference tokens at t=REF_T, text along L.
        A cell-slot model: slot j of cell (r, c) at (0, r, c, j), the free text at (TEXT_T, 0, 0, l)."""
        g = self.config.grid
        cells = torch.cartesian_prod(torch.arange(g), torch.arange(g))
        zero = torch.zeros(g * g, 1, dtype=torch.long)
        noisy = torch.cat([zero, cells, zero], 1)
        ref = torch.cat([zero + REF_T, cells, zero], 1)
        n_slots = self.n_slots
        free = text_len - n_slots
        txt = torch.cat([torch.zeros(free, 3, dtype=torch.long), torch.arange(free)[:, None]], 1)
        if n_slots:
            txt[:, 0] = TEXT_T
            slot = torch.cat([torch.zeros(n_slots, 1, dtype=torch.long), cells.repeat_interleave(SLOT_LEN, 0),
                              torch.arange(SLOT_LEN).repeat(g * g)[:, None]], 1)
            txt = torch.cat([slot, txt])
        return torch.cat([noisy, ref]), txt

    def predict(self, x_t: torch.Tensor, sigma: torch.Tensor, cond: Cond, text: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """One network evaluation -> (x0 prediction (B, N, F), gate logits (B, N)), on x_t's device and dtype
        (the inputs move to the transformer's device and dtype, e.g. a bf16 model on a GPU)."""
        text = cond.text if text is None else text
        dev, dt = self.transformer.device, self.transformer.dtype
        flag = cond.region[..., None].to(x_t)
        hidden = torch.cat([torch.cat([x_t, flag], -1), torch.cat([cond.ref.to(x_t), flag], -1)], 1)
        img_ids, txt_ids = self.ids(text.shape[1])
        out = self.transformer(hidden_states=hidden.to(dev, dt), encoder_hidden_states=text.to(dev, dt),
                               timestep=sigma.to(dev, dt), img_ids=img_ids.to(dev), txt_ids=txt_ids.to(dev),
                               return_dict=False)[0][:, : x_t.shape[1]].to(x_t)
        return cond.ref.to(x_t) + out[..., : self.feat], out[..., self.feat]

    def guided_predict(self, x_t: torch.Tensor, sigma: torch.Tensor, cond: Cond, guidance: float | torch.Tensor,
                       pair: Cond | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """`predict` with classifier-free guidance when guidance > 1: x0_u + w (x0_c - x0_u), the cond branch's
        gate. `guidance`: one scale, or (B,) one per sample. `pair`: cond.cfg_pair(), passed by a caller that
        builds it once for many steps."""
        per_row = isinstance(guidance, torch.Tensor)
        if bool((guidance <= 1.0).all()) if per_row else guidance <= 1.0:
            return self.predict(x_t, sigma, cond)
        both, gates = self.predict(x_t.repeat(2, 1, 1), sigma.repeat(2), pair or cond.cfg_pair())
        (new, new_u), gate = both.chunk(2), gates[: len(x_t)]
        w = guidance.to(new.dtype)[:, None, None] if per_row else guidance
        return new_u + w * (new - new_u), gate

    # ---- sampling -----------------------------------------------------------------------------------
    @torch.no_grad()
    def sample(self, texts: list[str], references: np.ndarray, regions: np.ndarray, edit: np.ndarray,
               seeds: list[int], steps: int, guidance: float, parts: list[tuple[Step, ...]] | None = None
               ) -> np.ndarray:
        """Batched sampling. references (B, H, W, 3) uint8 (blank canvas for text-to-image); regions (B, N) 0/1;
        edit (B,) bool; parts: each sample's single-op steps (a cell-slot model's slots; None = none). Returns
        snapped images (B, H, W, 3) uint8. Each sample's noise comes from its own seed, so a request gives the
        same image alone or inside any batch."""
        cfg = guidance > 1.0
        ref = self.to_tokens(references)
        region = torch.from_numpy(regions).float()
        cond = Cond(ref, region, self.encode_text(texts, parts),
                    self.encode_text([""] * len(texts)) if cfg else None)
        noise = torch.stack([torch.randn(ref.shape[1:], generator=torch.Generator().manual_seed(int(s)))
                             for s in seeds])
        pair = cond.cfg_pair() if cfg else None
        grounded = torch.from_numpy(edit & (regions.sum(1) > 0))[:, None]
        edit_t = torch.from_numpy(edit)[:, None]
        sched = FlowMatchEulerDiscreteScheduler.from_config(self.scheduler.config)
        sched.set_timesteps(steps)
        x, hard, x0 = noise, None, ref
        for i, t in enumerate(sched.timesteps):
            sigma = (t / 1000).expand(len(texts))
            new, gate = self.guided_predict(x, sigma, cond, guidance, pair)
            p = torch.sigmoid(gate)
            if hard is None:  # first step: the edit's mask, held for the rest of sampling
                hard = torch.where(grounded, region, (p > 0.5).float())
            m = torch.where(edit_t, hard, p)  # text-to-image re-reads its (soft) gate every step
            if i == len(sched.timesteps) - 1:
                m = torch.where(edit_t, hard, (p > 0.5).float())
            x0 = ref + m[..., None] * (new - ref)
            v = (x - x0) / sigma[:, None, None].clamp_min(1e-4)
            x = sched.step(v, t, x, return_dict=False)[0]
        out = self.from_tokens(x0)
        if self.vae is not None:  # copy by construction in pixels too: cells outside the gate are the reference's
            keep = np.kron((m == 0).numpy().reshape(-1, self.config.grid, self.config.grid),
                           np.ones((self.config.cell, self.config.cell)))[..., None].astype(bool)
            out = np.where(keep, np.asarray(references, np.uint8), out)
        return out


def slot_words(parts: tuple[Step, ...], grid: int) -> list[str]:
    """The grid*grid*SLOT_LEN slot words of one step's single-op parts, cells in row-major order: (op, colour,
    shape) at each cell a part acts on ([PAD] elsewhere). A recolor names its new colour; a move is a remove at
    its source and an add at its destination; other ops (generate, stop) fill no slot."""
    words = [PAD] * (grid * grid * SLOT_LEN)

    def put(cell, *w: str) -> None:
        i = (cell[0] * grid + cell[1]) * SLOT_LEN
        words[i:i + SLOT_LEN] = w

    for p in parts:
        if p.op in ("add", "remove"):
            put(p.cell, p.op, p.color, p.shape)
        elif p.op == "recolor":
            put(p.cell, "recolor", p.new_color, p.shape)
        elif p.op == "move":
            put(p.cell, "remove", p.color, p.shape)
            put(p.to, "add", p.color, p.shape)
    return words


def snap(pixels: np.ndarray) -> np.ndarray:
    """Nearest world colour per pixel: (..., 3) float/uint8 -> uint8."""
    d = ((pixels[..., None, :].astype(np.float32) - PALETTE.astype(np.float32)) ** 2).sum(-1)
    return PALETTE[d.argmin(-1)]
