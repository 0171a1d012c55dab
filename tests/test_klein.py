"""The `klein` generator backend on a tiny random-init Flux2KleinPipeline of the real diffusers/transformers classes,
saved with save_pretrained and loaded through the registry (loop.generator=klein), as a user's checkpoint would be."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import clvr.models  # noqa: F401  (registers the backends)
from clvr.config import load_config
from clvr.errors import CheckpointError, ClvrError, ConfigError
from clvr.generator import GenRequest, make_generator
from clvr.models.klein import KLEIN_4B, KLEIN_9B, SIZES, TINY, build_klein_pipeline
from clvr.registry import WEIGHTS_DIR

SETS = ["loop.generator=klein", "klein.max_sequence_length=64", "klein.base_steps=2", "klein.distilled_steps=2"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("klein") / "tiny"
    build_klein_pipeline(TINY, seed=0).save_pretrained(path)
    return path


def gen(folder, *sets: str, model=None):
    cfg = load_config("ci", [*SETS, f"loop.model={folder}", *sets])
    return make_generator("klein", model=str(model or folder), steps=None, guidance=None, cfg=cfg)


@pytest.fixture(scope="module")
def klein(folder):
    return gen(folder)


def canvas() -> np.ndarray:
    img = np.full((64, 64, 3), (200, 180, 40), np.uint8)
    img[20:40, 5:30] = (10, 20, 240)
    img[44:60, 40:60] = (250, 250, 250)
    return img


def test_text_to_image_and_edit_sizes_seeds_and_batches(klein):
    assert klein.resolution == 64 and klein.nfe == 2 * 2  # 0 = the world canvas (4 x 16); base: 2 steps + CFG
    a = klein.generate(GenRequest("a red circle", seed=1))
    assert a.image.shape == (64, 64, 3) and a.image.dtype == np.uint8 and a.nfe == 4
    assert np.array_equal(klein.generate(GenRequest("a red circle", seed=1)).image, a.image)
    b = klein.generate(GenRequest("a blue square", seed=2))
    assert not np.array_equal(a.image, b.image)
    edit = GenRequest("add a red circle", trace=["a blue square"], reference=a.image, regions=((1, 1),), seed=3)
    e = klein.generate(edit)
    assert e.image.shape == (64, 64, 3)
    # one batch: two text-to-image requests share a call, two edits of the same canvas share another
    edit2 = GenRequest("remove the circle", reference=a.image, regions=((0, 2),), seed=4)
    out = klein.generate_batch([GenRequest("a red circle", seed=1), edit, GenRequest("a blue square", seed=2), edit2])
    for got, want in zip(out, [a, e, b, klein.generate(edit2)]):
        assert np.abs(got.image.astype(int) - want.image.astype(int)).max() <= 1  # float batching noise only
    # a reference larger than the configured resolution is resized to it
    big = np.kron(canvas(), np.ones((2, 2, 1), np.uint8))
    assert klein.generate(GenRequest("add a circle", reference=big, seed=0)).image.shape == (64, 64, 3)


def test_region_blending_keeps_the_reference_outside_the_region(folder, klein):
    """Latents outside the region end exactly at the reference's (the blend runs to sigma = 0). Pixels: the decoder
    normalises over the whole image (GroupNorm), so a changed region shifts the pixels outside it too (measured: a
    mean of 9 levels blended vs 31 not); stated tolerance: beyond 8 px of the region their mean distance to the reference's VAE round trip is <= 0.6 x that of
    the same edit without blending, and klein.paste makes them the reference's exactly."""
    ref, regions = canvas(), ((1, 1), (2, 3))
    req = GenRequest("add a red circle", reference=ref, regions=regions, seed=5)
    with torch.inference_mode():
        want = klein.vae_latents(klein.encode(klein.reference(ref)))[0]
        roundtrip = klein.pipe.vae.decode(want[None], return_dict=False)[0]
    got = klein._call([req], "latent")[0].image
    free = klein.free_tokens(regions).reshape(16, 16)  # 4 px per token: a 16 px cell is 4 x 4 tokens
    assert int(free.sum()) == 2 * 16
    outside = ~np.kron(free.numpy(), np.ones((2, 2), bool))  # VAE latents are 2 px per side
    assert torch.allclose(got[0][outside], want[0][outside], atol=1e-5)
    assert not torch.allclose(got[0][~outside], want[0][~outside], atol=1e-2)

    rt = (klein.pipe.image_processor.postprocess(roundtrip, output_type="np")[0].clip(0, 1) * 255).round()
    pix = np.zeros((64, 64), bool)
    pix[16:32, 16:32] = pix[32:48, 48:64] = True
    from scipy.ndimage import binary_dilation

    far = ~binary_dilation(pix, iterations=8)
    blended = klein.generate(req).image
    unblended = gen(folder, "klein.blend=false").generate(req).image
    d_blend, d_free = np.abs(blended - rt)[far].mean(), np.abs(unblended - rt)[far].mean()
    print(f"mean |output - VAE round trip| beyond 8 px of the region: {d_blend:.1f} blended, {d_free:.1f} not")
    assert d_blend <= 0.6 * d_free
    pasted = gen(folder, "klein.paste=true").generate(req).image
    assert np.array_equal(pasted[~pix], ref[~pix]) and not np.array_equal(pasted[pix], ref[pix])


def test_distilled_steps_nfe_and_prompt_fit(folder, klein):
    from clvr.models.klein import KleinGenerator

    klein.pipe.register_to_config(is_distilled=True)  # what a distilled checkpoint's model_index.json says
    try:
        dist = KleinGenerator(klein.pipe, 64, 4, 64, distilled_steps=4)
        assert (dist.steps, dist.guidance, dist.nfe) == (4, 1.0, 4)
        assert dist.generate(GenRequest("a red circle", seed=0)).nfe == 4
    finally:
        klein.pipe.register_to_config(is_distilled=False)
    base = KleinGenerator(klein.pipe, 64, 4, 64)
    assert (base.steps, base.guidance, base.nfe) == (28, 4.0, 56)  # as the world's base: 28 steps + CFG
    trace = [f"add a red circle at row {i % 4}, column {i % 3}" for i in range(40)]
    text = klein.prompt(trace, "recolor the blue square to green")
    assert text.endswith("recolor the blue square to green") and klein.n_tokens(text) <= 64
    kept = text.split(". ")[:-1]
    assert 0 < len(kept) < 40 and kept == trace[-len(kept):]  # the oldest steps are cut first


def test_gpu_profiles_name_the_real_checkpoints_and_sizes():
    for profile, n, arch in (("gpu-4b", "4", KLEIN_4B), ("gpu-9b", "9", KLEIN_9B)):
        k = load_config(profile).klein
        ids = (f"black-forest-labs/FLUX.2-klein-{n}B", f"black-forest-labs/FLUX.2-klein-base-{n}B")
        assert (k.distilled, k.base) == ids
        assert SIZES[k.size] is arch and k.resolution == 1024 and k.dtype == "bfloat16"
    t4, t9 = KLEIN_4B["transformer"], KLEIN_9B["transformer"]
    keys = ("num_layers", "num_single_layers", "num_attention_heads", "joint_attention_dim")
    assert [t4[k] for k in keys] == [5, 20, 24, 7680] and [t9[k] for k in keys] == [8, 24, 32, 12288]
    assert (KLEIN_4B["text_encoder"]["hidden_size"], KLEIN_9B["text_encoder"]["hidden_size"]) == (2560, 4096)
    assert t4["joint_attention_dim"] == 3 * 2560 and t9["joint_attention_dim"] == 3 * 4096  # layers 9, 18, 27
    from diffusers import Flux2Transformer2DModel

    with torch.device("meta"):  # the architecture only, no memory
        counts = [sum(p.numel() for p in Flux2Transformer2DModel(**a["transformer"]).parameters())
                  for a in (KLEIN_4B, KLEIN_9B)]
    assert 3.87e9 < counts[0] < 3.88e9 and 9.07e9 < counts[1] < 9.08e9  # klein "4B" and "9B" flow transformers


def test_bad_inputs(folder, klein, tmp_path):
    with pytest.raises(CheckpointError, match=r"klein\.distilled.*black-forest-labs/FLUX\.2-klein-4B.*present locally"):
        gen(folder, model="distilled")
    with pytest.raises(CheckpointError, match="nobody/no-such-klein.*present locally"):
        gen(folder, model="nobody/no-such-klein")
    with pytest.raises(CheckpointError, match="WorldPipeline checkpoint, not a Flux2KleinPipeline"):
        gen(folder, model=WEIGHTS_DIR / "distilled")
    with pytest.raises(CheckpointError, match="missing model_index.json"):
        gen(folder, model=tmp_path)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "model_index.json").write_text(json.dumps(json.loads((folder / "model_index.json").read_text())))
    with pytest.raises(CheckpointError, match="cannot load klein checkpoint"):
        gen(folder, model=broken)
    with pytest.raises(ConfigError, match="klein.size"):
        load_config("ci", ["klein.size=7b"])
    with pytest.raises(ConfigError, match="klein.resolution"):
        load_config("ci", ["klein.resolution=8"])
    with pytest.raises(ClvrError, match="multiple of 4"):
        gen(folder, "klein.resolution=66")
    with pytest.raises(ClvrError, match="outside the klein.grid"):
        klein.generate(GenRequest("add", reference=canvas(), regions=((4, 0),)))
    with pytest.raises(ClvrError, match="uint8"):
        klein.generate(GenRequest("add", reference=canvas().astype(np.float32)))


def test_the_loop_runs_on_klein_and_counts_nfe(folder, monkeypatch, capsys, tmp_path):
    """`clvr generate` with loop.generator=klein: the same loop, world controller and verifier; the tiny model draws
    noise, so the loop fails, but it runs and spends NFE per call as the backend counts. At 96 px, not the world's
    64 px canvas: the loop takes the generator's images as they come (cells = image side / grid)."""
    from conftest import clvr

    out = tmp_path / "gen"
    sets = [*SETS, "loop.max_calls=3", "klein.resolution=96"]
    code, stdout, err = clvr(monkeypatch, capsys, "generate", "a red circle above a blue square", "--out", str(out),
                             "--profile", "ci", "--model", str(folder), *[x for s in sets for x in ("--set", s)])
    assert code == 0, err
    from PIL import Image

    assert Image.open(out / "final.png").size in ((64, 64), (96, 96))  # the blank canvas, or a kept output
    trace = json.loads((out / "trace.json").read_text())
    assert trace["generator"] == f"klein:{folder}" and trace["calls"] == 3
    assert trace["nfe"] == 3 * 4 and all(s["nfe"] == 4 for s in trace["steps"] if s.get("nfe"))


def test_the_real_scale_benchmark_runs_tiny_on_the_cpu(monkeypatch, capsys):
    """benchmarks/real_scale_iteration.py --tiny: the GPU script's code path on the tiny sizes; one JSON line."""
    import runpy
    import sys
    from pathlib import Path

    monkeypatch.setattr(sys, "argv", ["real_scale_iteration.py", "--tiny"])
    monkeypatch.setattr(sys, "path", list(sys.path))  # the script puts its src/ first
    runpy.run_path(str(Path(__file__).resolve().parents[1] / "benchmarks" / "real_scale_iteration.py"),
                   run_name="__main__")
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["bench"] == "real_scale_iteration" and (res["nfe_4"], res["nfe_28_cfg"]) == (4, 56)
    assert res["iteration_28_steps_cfg_s"] > res["iteration_4_steps_s"] > 0 and res["resolution"] == 64
