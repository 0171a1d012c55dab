"""The `klein` generator backend: FLUX.2 [klein] through diffusers' `Flux2KleinPipeline`, one call = one step.

`make_generator("klein", model=..., steps=None, guidance=None, cfg=cfg)` (loop.generator=klein). `model` is
base | distilled (the ids of config `klein.base` / `klein.distilled`), a checkpoint folder, or a hub id whose
snapshot is in the local hub cache; nothing is ever downloaded (`clvr.registry.local_model_folder`).

* A step with no reference (the first, `generate`) is text-to-image; an edit passes the canvas as the pipeline's
  reference `image` (its latents join the transformer's sequence).
* The prompt is the reasoning trace + the step's instruction (`join_text`, as the world generator reads it), fitted
  into `klein.max_sequence_length` tokens of the pipeline's chat template: the oldest trace steps are cut first;
  the instruction always stays (an instruction alone longer than the limit loses its tail to the pipeline's
  right truncation).
* Regions (copy-by-construction, Blended Latent Diffusion): for an edit with regions, after every denoising step
  the latent tokens outside the region are replaced by the reference's latents noised to the scheduler's next
  sigma (x = (1 - sigma) ref + sigma noise), so at sigma = 0 they are the reference's latents exactly and the
  pixels outside the region are the reference's VAE round trip, up to the decoder: its convolutions reach across
  the region's border and its GroupNorm normalises over the whole image, so a changed region shifts the pixels
  outside it somewhat (tests/test_klein.py states the tolerance); `klein.paste` puts the reference's own pixels
  back outside the region after decoding. A cell (row, col) is the rect of a `klein.grid` x `klein.grid` split of
  the image; a latent token is free when its pixel patch overlaps a region rect.
* A distilled checkpoint (`is_distilled` in model_index.json) samples `klein.distilled_steps` (4) without CFG;
  a base one `klein.base_steps` (28) with CFG at `klein.guidance`. NFE = steps x (2 with CFG, else 1), as the
  world backend counts.
* Images are `klein.resolution` pixels square (0 = the world canvas); a reference of another size (larger or
  smaller) is resized to it (Lanczos) before encoding, so the output always has the configured size.
* `generate_batch` runs text-to-image requests in one pipeline call each `klein.max_batch`; edits share a call
  when they edit the same canvas (the pipeline gives every prompt of a call the same reference images).

`build_klein_pipeline(SIZES[name], seed)` assembles a random-init pipeline of the real classes (tests: "tiny";
the GPU benchmark: "4b" / "9b", the published architectures) with a small local tokenizer.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import numpy as np
import torch

from clvr.errors import CheckpointError, ClvrError
from clvr.generator import GenRequest, GenResult, register_generator
from clvr.registry import INDEX, SHIPPED, local_model_folder, resolve_device
from clvr.train.data import join_text

PIPELINE_CLASS = "Flux2KleinPipeline"

# Published architectures: the transformers as diffusers' scripts/convert_flux2_to_diffusers.py configures klein-4b
# and klein-9b (3.88 B and 9.08 B parameters), their text encoders Qwen3-4B and Qwen3-8B, whose layers 9, 18, 27
# are stacked into joint_attention_dim = 3 x hidden.
_FLUX2_COMMON = dict(patch_size=1, in_channels=128, attention_head_dim=128, timestep_guidance_channels=256,
                     mlp_ratio=3.0, axes_dims_rope=(32, 32, 32, 32), rope_theta=2000, eps=1e-6, guidance_embeds=False)
_QWEN3_COMMON = dict(num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                     vocab_size=151936, max_position_embeddings=40960, rope_theta=1000000, tie_word_embeddings=True)
KLEIN_4B = {
    "transformer": dict(_FLUX2_COMMON, num_layers=5, num_single_layers=20, num_attention_heads=24,
                        joint_attention_dim=7680),
    "text_encoder": dict(_QWEN3_COMMON, hidden_size=2560, intermediate_size=9728),
    "vae": {},  # AutoencoderKLFlux2's defaults are FLUX.2's VAE (32 latent channels, 8x down)
}
KLEIN_9B = {
    "transformer": dict(_FLUX2_COMMON, num_layers=8, num_single_layers=24, num_attention_heads=32,
                        joint_attention_dim=12288),
    "text_encoder": dict(_QWEN3_COMMON, hidden_size=4096, intermediate_size=12288, tie_word_embeddings=False),
    "vae": {},
}
# Tiny, for CPU tests: 4 px per latent token (VAE 2x down, 2x2 patches), a 4-layer text encoder (layers 1, 2, 3),
# no attention in the VAE's mid block (its decoder then reaches across a region's border only by convolutions and
# GroupNorm statistics; tests/test_klein.py measures what reaches).
TINY = {
    "transformer": dict(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16,
                        num_attention_heads=2, joint_attention_dim=48, timestep_guidance_channels=32,
                        axes_dims_rope=(4, 4, 4, 4), guidance_embeds=False),
    "text_encoder": dict(hidden_size=16, intermediate_size=32, num_hidden_layers=4, num_attention_heads=2,
                         num_key_value_heads=2, head_dim=8, max_position_embeddings=512),
    "vae": dict(down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                block_out_channels=(4, 8), layers_per_block=1, latent_channels=1, norm_num_groups=1,
                sample_size=64, use_quant_conv=False, use_post_quant_conv=False, mid_block_add_attention=False),
}
SIZES = {"tiny": TINY, "4b": KLEIN_4B, "9b": KLEIN_9B}

# Qwen3's chat template as the pipeline renders it (enable_thinking=False adds an empty think block).
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% if enable_thinking is defined and not "
                 "enable_thinking %}<think>\n\n</think>\n\n{% endif %}{% endif %}")
SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>")


def build_klein_tokenizer():
    """A small word-level tokenizer with Qwen3's chat tokens and template (the world's words + user/assistant), built
    offline: the pipeline only needs `apply_chat_template` and max_length padding from it."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from clvr.world.vocab import words

    vocab = {w: i for i, w in enumerate([*SPECIALS, "[UNK]", "user", "assistant", *words()])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="<|endoftext|>",
                                   eos_token="<|im_end|>", additional_special_tokens=list(SPECIALS[1:]))
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_klein_pipeline(sizes: dict, seed: int = 0, device: str | torch.device = "cpu",
                         dtype: torch.dtype = torch.float32, is_distilled: bool = False):
    """A random-init Flux2KleinPipeline of the real classes at `sizes` (SIZES[...]): Flux2Transformer2DModel,
    AutoencoderKLFlux2, Qwen3ForCausalLM and `build_klein_tokenizer()`; weights drawn from `seed`, built on
    `device` (a 4B/9B one straight on the GPU) and cast to `dtype`."""
    from diffusers import (AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler, Flux2KleinPipeline,
                           Flux2Transformer2DModel)
    from transformers import Qwen3Config, Qwen3ForCausalLM

    tokenizer = build_klein_tokenizer()
    te = dict(sizes["text_encoder"])
    te["vocab_size"] = te.get("vocab_size") or len(tokenizer)
    torch.manual_seed(seed)

    def make(build):
        """One part, built on `device` in float32 and cast before the next is built (a 9B one peaks lower)."""
        from diffusers.utils import logging as dlog

        with torch.device(device):
            part = build()
        if dtype == torch.float32:
            return part
        level = dlog.get_verbosity()
        dlog.set_verbosity_error()  # diffusers' note that no module needs float32 is noise here
        try:
            return part.to(dtype)
        finally:
            dlog.set_verbosity(level)

    transformer = make(lambda: Flux2Transformer2DModel(**sizes["transformer"]))
    vae = make(lambda: AutoencoderKLFlux2(**sizes["vae"]))
    text_encoder = make(lambda: Qwen3ForCausalLM(Qwen3Config(**te)))
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                base_image_seq_len=256, max_image_seq_len=4096)
    return Flux2KleinPipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                              transformer=transformer, is_distilled=is_distilled)


def text_layers(pipe) -> tuple[int, ...]:
    """The text encoder's hidden-state layers the transformer reads: joint_attention_dim / hidden_size of them,
    evenly spaced (FLUX.2 [klein]: 3 of Qwen3's 36 -> 9, 18, 27)."""
    joint, hidden = pipe.transformer.config.joint_attention_dim, pipe.text_encoder.config.hidden_size
    layers = pipe.text_encoder.config.num_hidden_layers
    n = joint // hidden
    if n < 1 or n * hidden != joint or n > layers:
        raise CheckpointError(f"klein checkpoint: transformer joint_attention_dim {joint} is not a stack of "
                              f"<= {layers} text-encoder layers of width {hidden}")
    return tuple(round(k * layers / (n + 1)) for k in range(1, n + 1))


def resolve(model: str, cfg) -> tuple[Path, str]:
    """(local folder, display name) of `model`: base | distilled (config klein.base / klein.distilled) | a folder |
    a hub id in the local hub cache; a CheckpointError naming the id otherwise."""
    key = "loop.model"
    if model in SHIPPED:  # base | distilled: the klein section's ids
        key, model = f"klein.{model}", getattr(cfg.klein, model)
    return local_model_folder(str(model), key), str(model)


def load_klein(folder: Path, name: str, dtype: torch.dtype, device: str):
    """Flux2KleinPipeline from a local folder (local_files_only); a folder of another pipeline class, or one that
    does not load, is a CheckpointError naming it."""
    from diffusers import Flux2KleinPipeline
    from diffusers.utils import logging as dlog
    from transformers.utils import logging as tlog

    index = folder / INDEX
    if not index.is_file():
        raise CheckpointError(f"no FLUX.2 [klein] checkpoint at '{name}' (missing {INDEX})")
    try:
        cls = json.loads(index.read_text()).get("_class_name")
    except (OSError, ValueError) as e:
        raise CheckpointError(f"'{name}': unreadable {INDEX}: {e}") from None
    if cls != PIPELINE_CLASS:
        raise CheckpointError(f"'{name}' is a {cls} checkpoint, not a {PIPELINE_CLASS} (FLUX.2 [klein]); "
                              f"loop.generator=klein needs a klein checkpoint")
    dlog.disable_progress_bar(), tlog.disable_progress_bar()
    try:
        pipe = Flux2KleinPipeline.from_pretrained(str(folder), dtype=dtype, local_files_only=True)
    except Exception as e:  # missing component, wrong shapes, corrupt safetensors
        msg = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"cannot load klein checkpoint '{name}': {msg}") from None
    finally:
        dlog.enable_progress_bar(), tlog.enable_progress_bar()
    if not getattr(pipe.tokenizer, "chat_template", None):
        raise CheckpointError(f"klein checkpoint '{name}': its tokenizer has no chat template")
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def _dtype(name: str, device: str) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    return getattr(torch, name)


class KleinGenerator:
    """Generator role on a Flux2KleinPipeline (see the module docstring for prompts, regions, NFE and batching)."""

    def __init__(self, pipe, resolution: int, grid: int, max_sequence_length: int = 512, steps: int | None = None,
                 guidance: float | None = None, base_steps: int = 28, distilled_steps: int = 4,
                 base_guidance: float = 4.0, blend: bool = True, paste: bool = False, max_batch: int = 8,
                 name: str = "klein"):
        self.pipe, self.grid, self.blend, self.paste, self.max_batch = pipe, grid, blend, paste, max_batch
        self.name = name
        self.distilled = bool(pipe.config.is_distilled)
        self.steps = int(steps or (distilled_steps if self.distilled else base_steps))
        self.guidance = 1.0 if self.distilled else float(base_guidance if guidance is None else guidance)
        self.patch = pipe.vae_scale_factor * 2  # pixels per latent token side
        if resolution % self.patch:
            raise ClvrError(f"klein.resolution {resolution} must be a multiple of {self.patch} (this checkpoint's "
                            f"pixels per latent token)")
        limit = pipe.text_encoder.config.max_position_embeddings
        if max_sequence_length > limit:
            raise ClvrError(f"klein.max_sequence_length {max_sequence_length} exceeds the text encoder's "
                            f"{limit} positions")
        self.resolution, self.max_len, self.layers = resolution, max_sequence_length, text_layers(pipe)

    @property
    def nfe(self) -> int:
        return self.steps * (2 if self.guidance > 1.0 else 1)

    # ---- prompt --------------------------------------------------------------------------------------------
    def n_tokens(self, text: str) -> int:
        tok = self.pipe.tokenizer
        chat = tok.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                       add_generation_prompt=True, enable_thinking=False)
        return len(tok(chat)["input_ids"])

    def prompt(self, trace: list[str], instruction: str) -> str:
        """trace + instruction within max_sequence_length tokens: the oldest trace steps are dropped first."""
        trace = list(trace)
        while trace and self.n_tokens(join_text(trace, instruction)) > self.max_len:
            trace.pop(0)
        return join_text(trace, instruction)

    # ---- images and regions --------------------------------------------------------------------------------
    def reference(self, image: np.ndarray):
        """The canvas as a PIL image of the configured size (another size is resized: Lanczos)."""
        from PIL import Image

        a = np.asarray(image)
        if a.ndim != 3 or a.shape[2] != 3 or a.dtype != np.uint8:
            raise ClvrError(f"klein reference must be an (H, W, 3) uint8 image, got {a.shape} {a.dtype}")
        img = Image.fromarray(a)
        r = self.resolution
        return img if img.size == (r, r) else img.resize((r, r), Image.LANCZOS)

    def free_tokens(self, regions) -> torch.Tensor:
        """(T,) bool over the latent tokens in raster order: True where the token's pixel patch overlaps a region
        cell's rect (those are generated; the others follow the reference)."""
        n, r, g, p = self.resolution // self.patch, self.resolution, self.grid, self.patch
        free = np.zeros((n, n), bool)
        lo = np.arange(n) * p
        for row, col in regions:
            if not (0 <= row < g and 0 <= col < g):
                raise ClvrError(f"region cell {(row, col)} is outside the klein.grid {g}x{g}")
            ys = (lo < (row + 1) * r / g) & (lo + p > row * r / g)
            xs = (lo < (col + 1) * r / g) & (lo + p > col * r / g)
            free |= ys[:, None] & xs[None, :]
        return torch.from_numpy(free.reshape(-1))

    def encode(self, img) -> torch.Tensor:
        """(1, T, C) packed, normalised latents of a PIL image: what the pipeline makes of a reference."""
        pipe, r = self.pipe, self.resolution
        x = pipe.image_processor.preprocess(img, height=r, width=r, resize_mode="crop")
        x = x.to(device=pipe.vae.device, dtype=pipe.vae.dtype)
        return pipe._pack_latents(pipe._encode_vae_image(x, None))

    def _blender(self, ref: torch.Tensor, free: torch.Tensor, seeds: list[int]):
        """callback_on_step_end: tokens outside `free` (B, T) take the reference latents `ref` (1, T, C) noised to the
        sigma the scheduler just stepped to (Blended Latent Diffusion)."""
        noise = torch.cat([torch.randn(ref.shape, generator=torch.Generator().manual_seed(s ^ 0x5EED))
                           for s in seeds])

        def blend(pipe, i, t, kw):
            lat = kw["latents"]
            sigma = pipe.scheduler.sigmas[pipe.scheduler.step_index].to(lat.device, torch.float32)
            kept = ((1 - sigma) * ref.float() + sigma * noise.to(lat.device)).to(lat.dtype)
            return {"latents": torch.where(free.to(lat.device)[..., None], lat, kept)}

        return blend

    # ---- calls ---------------------------------------------------------------------------------------------
    def generate(self, req: GenRequest) -> GenResult:
        return self.generate_batch([req])[0]

    def generate_batch(self, reqs: list[GenRequest]) -> list[GenResult]:
        """Text-to-image requests share calls; edits share a call when they edit the same canvas."""
        groups: dict[str, list[int]] = {}
        for i, r in enumerate(reqs):
            key = "t2i" if r.reference is None else hashlib.sha1(np.ascontiguousarray(r.reference).tobytes()
                                                                 + str(np.shape(r.reference)).encode()).hexdigest()
            groups.setdefault(key, []).append(i)
        out: list[GenResult | None] = [None] * len(reqs)
        for idx in groups.values():
            for k in range(0, len(idx), self.max_batch):
                part = idx[k:k + self.max_batch]
                for i, res in zip(part, self._call([reqs[i] for i in part])):
                    out[i] = res
        return out  # type: ignore[return-value]

    def _call(self, reqs: list[GenRequest], output_type: str = "np") -> list[GenResult]:
        """One pipeline call for requests of one kind (all text-to-image, or edits of one canvas). output_type
        "latent" returns the final VAE latents (B, C, h, w) as the images (tests check the blend on them)."""
        t0 = time.perf_counter()
        ref = reqs[0].reference
        kw: dict = {}
        free = None
        if ref is not None:
            img = self.reference(ref)
            kw["image"] = [img]
            free = torch.stack([self.free_tokens(r.regions) for r in reqs])
            free[[not r.regions for r in reqs]] = True  # an edit without regions may change everything
            if self.blend and not bool(free.all()):
                with torch.inference_mode():
                    lat = self.encode(img)
                kw["callback_on_step_end"] = self._blender(lat, free, [r.seed for r in reqs])
        with torch.inference_mode():
            images = self.pipe(prompt=[self.prompt(r.trace, r.instruction) for r in reqs], height=self.resolution,
                               width=self.resolution, num_inference_steps=self.steps, guidance_scale=self.guidance,
                               generator=[torch.Generator().manual_seed(int(r.seed)) for r in reqs],
                               max_sequence_length=self.max_len, text_encoder_out_layers=self.layers,
                               output_type=output_type, **kw).images
        if output_type == "np":
            images = (np.clip(images, 0, 1) * 255).round().astype(np.uint8)
            if self.paste and free is not None and not bool(free.all()):
                images = self._paste(images, np.asarray(kw["image"][0]), free)
        dt = (time.perf_counter() - t0) / len(reqs)
        return [GenResult(im, self.nfe, dt) for im in images]

    def _paste(self, images: np.ndarray, ref: np.ndarray, free: torch.Tensor) -> np.ndarray:
        """klein.paste: the reference's own pixels outside the free tokens' patches (the decoder, which normalises
        over the whole image, shifts them a little otherwise); the border of the region may then show a seam."""
        n, p = self.resolution // self.patch, self.patch
        inside = np.kron(free.numpy().reshape(len(images), n, n), np.ones((1, p, p))).astype(bool)
        return np.where(inside[..., None], images, ref[None])

    def vae_latents(self, packed: torch.Tensor) -> torch.Tensor:
        """Packed, normalised latents (B, T, C) -> the VAE latents (B, C', h, w) the pipeline decodes (what its
        output_type "latent" returns)."""
        pipe, n = self.pipe, self.resolution // self.patch
        ids = pipe._prepare_latent_ids(torch.zeros(len(packed), 1, n, n)).to(packed.device)
        lat = pipe._unpack_latents_with_ids(packed, ids, n, n)
        mean = pipe.vae.bn.running_mean.view(1, -1, 1, 1).to(lat)
        std = torch.sqrt(pipe.vae.bn.running_var.view(1, -1, 1, 1) + pipe.vae.config.batch_norm_eps).to(lat)
        return pipe._unpatchify_latents(lat * std + mean)


@register_generator("klein")
def klein_generator(model: str = "distilled", steps: int | None = None, guidance: float | None = None,
                    cfg=None, **_: object) -> KleinGenerator:
    """Registry factory (loop.generator=klein): `model` is base | distilled | a folder | a local hub id; the
    config's `klein` section sets resolution, grid, steps, guidance, dtype and device."""
    if cfg is None:
        raise ClvrError("the klein generator needs the config (make_generator(..., cfg=cfg))")
    k = cfg.klein
    folder, name = resolve(model, cfg)
    device = resolve_device(k.device)
    pipe = load_klein(folder, name, _dtype(k.dtype, device), device)
    resolution = k.resolution or cfg.world.grid * cfg.world.cell
    return KleinGenerator(pipe, resolution, k.grid, k.max_sequence_length, steps, guidance, k.base_steps,
                          k.distilled_steps, k.guidance, k.blend, k.paste, k.max_batch, name=f"klein:{name}")
