"""The cell autoencoder and the latent world generator (generator.vae): the vae stage trains, saves a scaled
diffusers AutoencoderKL and resumes exactly; a pipeline with it tokenises cells as latents, round-trips through
save/load, keeps every cell outside an edit's gate pixel for pixel, and pretrains in latent space."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from clvr.config import load_config
from clvr.errors import CheckpointError
from clvr.models import load_pipeline
from clvr.models.backend import GenRequest, WorldGenerator
from clvr.models.pipeline import WorldPipeline
from clvr.models.vae import build_cell_vae, latent_feat, load_cell_vae
from clvr.train import pretrain
from clvr.train import vae as vae_train
from clvr.world.render import render
from clvr.world.scene import Obj, Scene


def ci(tmp_path, *extra):
    return load_config("ci", [f"vae.out={tmp_path}/vae", f"pretrain.out={tmp_path}/pre",
                              "world.appearance.varied=true", *extra])


def vae_weights(path) -> dict[str, torch.Tensor]:
    return load_cell_vae(str(path), "test").state_dict()


def test_vae_stage_saves_a_scaled_autoencoder_and_resumes_exactly(tmp_path, die_at_step):
    res = vae_train.run(ci(tmp_path / "a"))
    out = tmp_path / "a" / "vae"
    v = load_cell_vae(res["final"], "test")
    assert v.config.latent_channels == 4 and v.config.scaling_factor != 1.0  # fit_scaling ran before the save
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert {"recon_ok", "recon_exact"} <= set(next(x for x in lines if x["split"] == "eval"))
    cfg = ci(tmp_path / "b")
    die_at_step(vae_train.run, cfg, 2)
    resumed = vae_train.run(cfg)["final"]
    a, b = vae_weights(res["final"]), vae_weights(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_random_cells_follow_the_appearance():
    app = load_config("ci", ["world.appearance.varied=true"]).world.appearance
    c = vae_train.random_contents(np.random.default_rng(0), 2000, app)
    assert 0.03 < (c == 0).mean() < 0.15  # empty cells: 1 in 13
    assert (c > 12).mean() > 0.85  # varied looks (content > 12 carries a look code)
    fixed = vae_train.random_contents(np.random.default_rng(0), 200, load_config("ci").world.appearance)
    assert fixed.max() <= 12  # the fixed world: canonical sprites only


def latent_pipe() -> WorldPipeline:
    return WorldPipeline.from_sizes(32, 2, 1, 1, 16, 1, 16, vae=build_cell_vae(16, 4, 8).eval())


def test_latent_pipeline_tokens_save_load_and_copy_outside_the_gate(tmp_path):
    pipe = latent_pipe()
    assert pipe.feat == latent_feat(pipe.vae, 16) == 16 and pipe.transformer.config.in_channels == 17
    scene = Scene((Obj("circle", "red", 0, 0), Obj("square", "blue", 2, 3)), 4)
    img = render(scene)
    tok = pipe.to_tokens(np.stack([img, img]))
    assert tok.shape == (2, 16, 16) and torch.equal(tok[0], tok[1])
    assert torch.equal(tok[0, 1], tok[0, 2])  # two empty cells: one latent
    pipe.save_pretrained(tmp_path / "m")
    loaded = load_pipeline(tmp_path / "m")
    assert loaded.vae is not None and torch.allclose(loaded.to_tokens(img[None]), tok[:1])
    gen = WorldGenerator(loaded, 4, 1.0)
    out = gen.generate(GenRequest("add a green triangle at row 2 column 2", reference=img, regions=((1, 1),),
                                  seed=3)).image
    keep = np.ones((64, 64), bool)
    keep[16:32, 16:32] = False
    assert np.array_equal(out[keep], img[keep])  # an untrained decoder, yet every other cell is the reference's


def test_pretrain_in_latent_space_and_a_missing_autoencoder_names_the_key(tmp_path):
    vae_final = vae_train.run(ci(tmp_path))["final"]
    res = pretrain.run(ci(tmp_path, f"generator.vae={vae_final}"))
    pipe = load_pipeline(res["final"])
    assert pipe.transformer.config.in_channels == pipe.feat + 1 == 17
    a, b = pipe.vae.state_dict(), vae_weights(vae_final)
    assert all(torch.equal(a[k], b[k]) for k in a)  # frozen: the generator draws with the stage's autoencoder
    with pytest.raises(CheckpointError, match="generator.vae: no cell autoencoder at '/nope'"):
        pretrain.run(ci(tmp_path / "x", "generator.vae=/nope"))
