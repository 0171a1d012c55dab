"""The world generator pipeline: tokens, save/load, determinism, reference conditioning, checkpoint errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from clvr.config import load_config
from clvr.errors import CheckpointError
from clvr.generator import GenRequest, make_generator
from clvr.models import WorldGenerator, WorldPipeline, load_pipeline
from clvr.models.pipeline import PALETTE
from clvr.models.tokenizer import build_tokenizer
from clvr.train.data import contents_of, tokens
from clvr.train.pretrain import build_pipeline
from clvr.world.render import render
from clvr.world.scene import Obj, Scene


@pytest.fixture(scope="module")
def pipe() -> WorldPipeline:
    p = build_pipeline(load_config("ci"))
    p.transformer.eval(), p.text_encoder.eval()
    return p


@pytest.fixture(scope="module")
def saved(pipe, tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "gen"
    pipe.save_pretrained(path)
    return path


def scene() -> Scene:
    return Scene((Obj("circle", "red", 0, 1), Obj("square", "blue", 2, 3), Obj("triangle", "yellow", 3, 0)))


def request(seed: int = 3, reference: np.ndarray | None = None) -> GenRequest:
    ref = render(scene()) if reference is None else reference
    return GenRequest("add a green circle at row 1 column 1", ["add a red circle at row 0 column 1"], ref,
                      ((1, 1),), seed)


def test_tokenizer_keeps_the_newest_words():
    tok = build_tokenizer(8)
    ids = tok(["remove the blue square at row 0 column 3. add a red circle at row 1 column 2"],
              padding="max_length", truncation=True, max_length=8)["input_ids"][0]
    assert tok.convert_ids_to_tokens(ids) == ["a", "red", "circle", "at", "row", "1", "column", "2"]
    assert tok.unk_token_id not in ids


def test_cell_table_tokens_equal_rendered_pixels(pipe):
    s = scene()
    assert torch.equal(tokens(contents_of(s)[None]), pipe.to_tokens(render(s)[None]))
    assert np.array_equal(pipe.from_tokens(pipe.to_tokens(render(s)[None]))[0], render(s))


def test_sampling_is_deterministic_and_batch_invariant(pipe):
    gen = WorldGenerator(pipe, steps=3, guidance=2.0)
    a, b = gen.generate(request(seed=5)), gen.generate(request(seed=5))
    assert np.array_equal(a.image, b.image)
    batch = gen.generate_batch([request(seed=9), request(seed=5)])
    assert np.array_equal(batch[1].image, a.image)
    assert a.nfe == 6 and a.image.dtype == np.uint8 and a.image.shape == (64, 64, 3)
    colours = {tuple(c) for c in a.image.reshape(-1, 3)}
    assert colours <= {tuple(c) for c in PALETTE}  # snapped to the world palette


def test_grounded_edit_copies_cells_outside_its_region(pipe):
    ref = render(scene())
    out = WorldGenerator(pipe, steps=2, guidance=1.0).generate(request(reference=ref)).image
    keep = np.ones((64, 64), bool)
    keep[16:32, 16:32] = False  # the region cell (1, 1)
    assert np.array_equal(out[keep], ref[keep])


def test_reference_conditioning_changes_the_output(pipe):
    gen = WorldGenerator(pipe, steps=2, guidance=1.0)
    x = pipe.to_tokens(render(scene())[None])
    region = torch.zeros(1, 16)
    sigma = torch.tensor([0.5])
    from clvr.models.pipeline import Cond

    text = pipe.encode_text(["add a green circle at row 1 column 1"])
    with torch.no_grad():
        a, _ = pipe.predict(x, sigma, Cond(pipe.to_tokens(render(scene())[None]), region, text))
        b, _ = pipe.predict(x, sigma, Cond(pipe.to_tokens(render(Scene())[None]), region, text))
    assert not torch.allclose(a, b)
    other = render(Scene((Obj("square", "green", 1, 2),)))
    assert not np.array_equal(gen.generate(request(reference=other)).image,
                              gen.generate(request(reference=render(scene()))).image)


def test_save_load_round_trip_gives_identical_outputs(pipe, saved):
    files = {p.name for p in saved.rglob("*")}
    assert {"model_index.json", "diffusion_pytorch_model.safetensors", "model.safetensors", "tokenizer.json"} <= files
    assert not any(n.endswith((".bin", ".pt", ".pkl")) for n in files)
    again = load_pipeline(saved)
    r = request(seed=11)
    assert np.array_equal(WorldGenerator(pipe, 3, 2.0).generate(r).image,
                          WorldGenerator(again, 3, 2.0).generate(r).image)
    t2i = GenRequest("a photo of a red circle", seed=2)
    assert np.array_equal(WorldGenerator(pipe, 3, 2.0).generate(t2i).image,
                          WorldGenerator(again, 3, 2.0).generate(t2i).image)


def test_saving_a_loaded_checkpoint_writes_the_same_bytes(saved, tmp_path):
    """No loader state (source path, tokenizer call defaults) leaks into a re-saved model, so a fine-tune's or
    a resumed run's folder hashes the same wherever its source lay (DVC, MLflow)."""
    again = tmp_path / "again"
    load_pipeline(saved).save_pretrained(again)
    files = sorted(p.relative_to(saved) for p in saved.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(again) for p in again.rglob("*") if p.is_file())
    for f in files:
        assert (saved / f).read_bytes() == (again / f).read_bytes(), f


def test_ship_installs_a_checkpoint_and_keeps_the_model_card(saved, tmp_path):
    from clvr.models.backend import ship

    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "MODEL_CARD.md").write_text("# card")
    (tmp_path / "base" / "stale.json").write_text("{}")
    dest = ship(saved, "base", root=tmp_path)
    assert (dest / "MODEL_CARD.md").read_text() == "# card" and not (dest / "stale.json").exists()
    assert (dest / "transformer" / "diffusion_pytorch_model.safetensors").read_bytes() == \
        (saved / "transformer" / "diffusion_pytorch_model.safetensors").read_bytes()
    with pytest.raises(CheckpointError, match="not 'champion'"):
        ship(saved, "champion", root=tmp_path)
    with pytest.raises(CheckpointError, match="nowhere"):
        ship(tmp_path / "nowhere", "base", root=tmp_path)


def test_registry_loads_a_checkpoint_folder(saved):
    gen = make_generator("world", model=str(saved), steps=4, guidance=1.0)
    res = gen.generate(GenRequest("a photo of a blue square", seed=1))
    assert res.nfe == 4 and res.image.shape == (64, 64, 3)
    assert make_generator("world", model=str(saved)).nfe == 28 * 2  # the recorded default: 28 steps + CFG


def test_missing_checkpoint_names_the_path(tmp_path):
    with pytest.raises(CheckpointError, match=str(tmp_path / "nope")):
        load_pipeline(tmp_path / "nope")


def test_corrupt_checkpoint_names_the_path(saved, tmp_path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(saved, bad)
    (bad / "transformer" / "diffusion_pytorch_model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match=str(bad)):
        load_pipeline(bad)
    other = tmp_path / "other"
    other.mkdir()
    (other / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    with pytest.raises(CheckpointError, match=str(other)):
        load_pipeline(other)


def test_mlp_head_model_round_trips_and_head_width_0_is_the_stock_flux2(tmp_path):
    """`generator.head_width` > 0 swaps Flux2's Linear `proj_out` for an MLP (clvr.models.transformer); the folder
    loads back through diffusers as the same model. 0 keeps the stock model, weight for weight."""
    from diffusers import Flux2Transformer2DModel

    head = build_pipeline(load_config("ci", ["generator.head_width=32"]))
    assert [type(m).__name__ for m in head.transformer.proj_out] == ["Linear", "GELU", "Linear"]
    head.save_pretrained(tmp_path / "head")
    again = load_pipeline(tmp_path / "head")
    assert again.transformer.config.head_width == 32
    r = request(seed=5)
    assert np.array_equal(WorldGenerator(head, 3, 2.0).generate(r).image, WorldGenerator(again, 3, 2.0).generate(r).image)
    stock = build_pipeline(load_config("ci")).transformer
    cfg = {k: v for k, v in stock.config.items() if not k.startswith("_") and k != "head_width"}
    assert stock.state_dict().keys() == Flux2Transformer2DModel(**cfg).state_dict().keys()
