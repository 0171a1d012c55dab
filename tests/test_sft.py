"""Cell slots, multi-op training samples and the sft stage (LoRA via peft and full), on tiny real models."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from clvr.config import load_config
from clvr.errors import ClvrError, ConfigError
from clvr.generator import GenRequest
from clvr.models import WorldGenerator, load_pipeline
from clvr.models.pipeline import REF_T, SLOT_LEN, TEXT_T, WorldPipeline, slot_words
from clvr.steps import Step
from clvr.train import sft
from clvr.train.bench import multi_requests
from clvr.train.data import MultiMix, PromptSource, batch_tokens, random_multi_edit, sample_batch
from clvr.trajectories import Example
from clvr.world.render import render
from clvr.world.scene import Obj, Scene

MOVE_RECOLOR = {"op": "edit", "ops": [
    {"op": "move", "shape": "circle", "color": "red", "cell": [0, 1], "to": [3, 3]},
    {"op": "recolor", "shape": "square", "color": "red", "cell": [1, 0], "new_color": "blue"}]}


def tiny(cell_slots: bool = False, seed: int = 0) -> WorldPipeline:
    """A pipeline at the ci profile's generator sizes."""
    g = load_config("ci").generator
    return WorldPipeline.from_sizes(g.hidden, g.heads, g.double_layers, g.single_layers, g.text_hidden,
                                    g.text_layers, g.max_text_len, seed=seed, default_steps=4, cell_slots=cell_slots)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """A saved slotless tiny model: what sft fine-tunes in these tests."""
    d = tmp_path_factory.mktemp("tiny") / "model"
    tiny().save_pretrained(d)
    return d


def ci(tmp_path, init, *extra):
    return load_config("ci", [f"sft.init={init}", f"sft.out={tmp_path}/sft", "sft.data=", *extra])


def weights(pipe: WorldPipeline) -> dict[str, torch.Tensor]:
    return {**{f"t.{k}": v for k, v in pipe.transformer.state_dict().items()},
            **{f"e.{k}": v for k, v in pipe.text_encoder.state_dict().items()}}


# ---- cell slots ------------------------------------------------------------------------------------------------

def test_slot_position_ids_bind_each_slot_to_its_cell():
    pipe = tiny(cell_slots=True)
    n, free = 16 * SLOT_LEN, pipe.config.max_text_len
    assert pipe.n_slots == n and pipe.text_len == n + free
    img, txt = pipe.ids(pipe.text_len)
    assert txt.shape == (n + free, 4) and img.shape == (32, 4)
    for r in range(4):
        for c in range(4):
            for j in range(SLOT_LEN):  # slot j of cell (r, c): the H/W of that cell's noisy image token
                assert txt[(r * 4 + c) * SLOT_LEN + j].tolist() == [0, r, c, j]
            assert img[r * 4 + c].tolist() == [0, r, c, 0] and img[16 + r * 4 + c].tolist() == [REF_T, r, c, 0]
    assert txt[n:].tolist() == [[TEXT_T, 0, 0, i] for i in range(free)]


def test_slot_words_move_fills_two_slots_and_recolor_names_the_new_colour():
    w = slot_words(Step.from_dict(MOVE_RECOLOR).parts(), 4)
    filled = {i // SLOT_LEN: w[i:i + SLOT_LEN] for i in range(0, len(w), SLOT_LEN) if w[i] != "[PAD]"}
    assert filled == {1: ["remove", "red", "circle"], 15: ["add", "red", "circle"], 4: ["recolor", "blue", "square"]}
    assert slot_words((Step("generate", prompt="a red circle"),), 4) == ["[PAD]"] * 48


def test_slots_reach_the_text_encoder_and_a_slotless_model_ignores_them():
    parts = [Step.from_dict(MOVE_RECOLOR).parts(), ()]
    slotted = tiny(cell_slots=True)
    ids = slotted.slot_ids(parts)
    assert ids.shape == (2, 48) and (ids[1] == slotted.tokenizer.pad_token_id).all()
    assert ids[0, 15 * 3:16 * 3].tolist() == slotted.tokenizer.convert_tokens_to_ids(["add", "red", "circle"])
    with torch.no_grad():
        e = slotted.encode_text(["move it", "move it"], parts)
        assert e.shape == (2, 48 + slotted.config.max_text_len, 32) and not torch.allclose(e[0], e[1])
        plain = tiny()
        assert plain.n_slots == 0 and plain.ids(16)[1].tolist() == [[0, 0, 0, i] for i in range(16)]
        assert torch.equal(plain.encode_text(["move it"] * 2, parts), plain.encode_text(["move it"] * 2))


def test_shipped_slotless_base_behaves_as_before(tmp_path):
    """The shipped weights are slotless: they load so, and a request's step changes nothing."""
    assert not json.loads((load_pipeline.__globals__["WEIGHTS_DIR"] / "base" /
                           "model_index.json").read_text()).get("cell_slots", False)
    pipe = load_pipeline("base")
    assert pipe.config.cell_slots is False and pipe.text_len == 16
    reqs, _ = multi_requests(2, 3, 4, 16, seed=5)
    bare = [GenRequest(r.instruction, r.trace, r.reference, r.regions, r.seed) for r in reqs]
    gen = WorldGenerator(pipe, 2, 1.0)
    assert all(np.array_equal(a.image, b.image) for a, b in zip(gen.generate_batch(reqs), gen.generate_batch(bare)))
    pipe.use_cell_slots()  # the flag is saved with the model and comes back
    pipe.save_pretrained(tmp_path / "slots")
    back = load_pipeline(tmp_path / "slots")
    assert back.config.cell_slots is True and back.text_len == 64


# ---- multi-op samples ------------------------------------------------------------------------------------------

def test_multi_op_edits_are_valid_steps_on_distinct_cells():
    rng = np.random.default_rng(0)
    for k in (2, 4, 8):
        for _ in range(20):
            scene, step, adds = random_multi_edit(rng, 4, k, 10)
            assert len(step.parts()) == k and Step.from_dict(step.to_dict()) == step  # the one validator agrees
            cells = [c for p in step.parts() for c in p.regions()]
            assert len(cells) == len(set(cells))
            assert step.apply(scene) != scene and len(adds) == len(scene.objects)


def test_multi_mix_draws_coarse_steps_and_layouts():
    prompts = PromptSource(4, [1.0], pool=4)
    b = sample_batch(np.random.default_rng(1), 64, 4, 0.7, 0.8, 0.0, 10, prompts,
                     multi=MultiMix(1.0, 8, 0.0, 12))
    ks = [len(p) for p in b.parts]
    assert b.edit.all() and min(ks) >= 2 and max(ks) <= 8 and len(set(ks)) > 3
    assert all(b.region[i].sum() == len({c for p in b.parts[i] for c in p.regions()}) for i in range(64))
    lay = sample_batch(np.random.default_rng(2), 32, 4, 0.7, 0.8, 0.0, 10, prompts, multi=MultiMix(0.0, 8, 1.0, 12))
    assert (lay.ref == 0).all() and all(p.op == "add" for ps in lay.parts for p in ps)
    assert max(len(p) for p in lay.parts) > 6 and (lay.changed.sum(1) == [len(p) for p in lay.parts]).all()


def test_data_engine_example_trains_on_its_own_images(tmp_path):
    ref = render(Scene((Obj("circle", "red", 0, 0),), 4), 16)
    tgt = render(Scene((Obj("circle", "red", 0, 0), Obj("square", "blue", 2, 3)), 4), 16)
    Image.fromarray(ref).save(tmp_path / "a.png"), Image.fromarray(tgt).save(tmp_path / "b.png")
    step = Step.from_dict({"op": "add", "shape": "square", "color": "blue", "cell": [2, 3]})
    b = sft.example_batch(Example(tmp_path / "a.png", tmp_path / "b.png", ("add a red circle at row 0 column 0",),
                                      step), 4, 16, 0.0, np.random.default_rng(0))
    x0, r, changed = batch_tokens(b, 4, 16)
    assert changed[0].nonzero().flatten().tolist() == [11] and b.region[0, 11] == 1 and b.parts == [(step,)]
    assert torch.equal(x0[0, 11], torch.from_numpy(tgt[32:48, 48:64].reshape(-1).astype(np.float32)) / 127.5 - 1)
    assert b.texts == ["add a red circle at row 0 column 0. add a blue square at row 2 column 3"]
    Image.fromarray(ref[:32]).save(tmp_path / "a.png")
    sft._png.cache_clear()
    with pytest.raises(ClvrError, match="a.png is 64x32"):
        sft.example_batch(Example(tmp_path / "a.png", tmp_path / "b.png", (), step), 4, 16, 0.0,
                          np.random.default_rng(0))


# ---- the sft stage ---------------------------------------------------------------------------------------------

def test_lora_adapter_saves_loads_and_merges(tmp_path, tiny_dir):
    """LoRA on the attention + MLP projections only; final/ is the merged diffusers model and final/adapter the
    peft adapter, which a fresh base + PeftModel.from_pretrained + merge turns into the same weights."""
    from peft import PeftModel

    res = sft.run(ci(tmp_path, tiny_dir, "sft.mode=lora", "sft.lora_rank=4"))
    final = load_pipeline(res["final"])
    assert final.config.cell_slots is True
    cfg = json.loads((tmp_path / "sft" / "final" / "adapter" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 4
    targets = set(cfg["target_modules"])
    assert "transformer_blocks.0.attn.to_q" in targets and "single_transformer_blocks.0.attn.to_out" in targets
    assert not any(t.startswith(("x_embedder", "proj_out", "norm_out")) or "modulation" in t for t in targets)
    base = load_pipeline(tiny_dir)
    fresh = PeftModel.from_pretrained(base.transformer, str(tmp_path / "sft" / "final" / "adapter"))
    merged = fresh.merge_and_unload().state_dict()
    got = final.transformer.state_dict()
    assert merged.keys() == got.keys() and all(torch.allclose(merged[k], got[k], atol=1e-6) for k in got)
    changed = [k for k in got if not torch.equal(got[k], load_pipeline(tiny_dir).transformer.state_dict()[k])]
    assert changed and all(any(f"{t}.weight" == k for t in targets) for k in changed)  # only the adapted layers
    assert weights(final).keys() == weights(base).keys()
    te = load_pipeline(tiny_dir).text_encoder.state_dict()
    assert all(torch.equal(v, te[k]) for k, v in final.text_encoder.state_dict().items())  # frozen


def test_full_sft_trains_everything_and_resumes_exactly(tmp_path, tiny_dir, die_at_step):
    straight = sft.run(ci(tmp_path / "a", tiny_dir))
    assert {"eval_multi_k2", "eval_multi_k8", "eval_edit_mean"} <= set(straight["metrics"])
    before, after = weights(load_pipeline(tiny_dir)), weights(load_pipeline(straight["final"]))
    assert sum(not torch.equal(before[k], after[k]) for k in before) > 0.9 * len(before)
    cfg = ci(tmp_path / "b", tiny_dir)
    die_at_step(sft.run, cfg, 2)  # dies during step 3, after the step-2 checkpoint
    resumed = weights(load_pipeline(sft.run(cfg)["final"]))
    assert all(torch.equal(after[k], resumed[k]) for k in after)


def test_lora_run_resumes_exactly(tmp_path, tiny_dir, die_at_step):
    extra = ("sft.mode=lora", "sft.lora_rank=2")
    straight = weights(load_pipeline(sft.run(ci(tmp_path / "a", tiny_dir, *extra))["final"]))
    cfg = ci(tmp_path / "b", tiny_dir, *extra)
    die_at_step(sft.run, cfg, 2)
    resumed = weights(load_pipeline(sft.run(cfg)["final"]))
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)  # the adapter's init is seeded too


@pytest.mark.parametrize("override,needle", [
    ("sft.mode=qlora", "sft.mode must be one of"),
    ("sft.layout_frac=0.5", "sft.multi_frac + layout_frac must be <= 1"),
    ("sft.max_k=1", "sft.max_k must be in 2..128"),
    ("sft.lora_rank=0", "sft.lora_rank must be >= 1"),
])
def test_sft_config_errors_name_the_key(override, needle):
    with pytest.raises(ConfigError, match=needle.replace("+", r"\+")):
        load_config("ci", [override])


def test_sft_refuses_a_data_set_it_cannot_read(tmp_path, tiny_dir):
    with pytest.raises(ClvrError, match="no trajectory data set"):
        sft.trainer(ci(tmp_path, tiny_dir, f"sft.data={tmp_path}/nope"), out=None)


def test_bench_generator_reports_multi_op_success_by_k_for_an_sft_model(tmp_path):
    tiny(cell_slots=True).save_pretrained(tmp_path / "sft")
    from clvr.train.bench import MULTI_KS, run_bench

    res = run_bench(load_config("ci"), trials=1, prompts=1, tiers=1, sft=str(tmp_path / "sft"), speed=False)
    assert set(res["multi_op_success"]) == {"base_28_cfg", "base_4", "distilled_4", "sft", "sft_4"}
    assert all(list(v) == [str(k) for k in MULTI_KS] for v in res["multi_op_success"].values())
    assert res["multi_op_success"]["base_4"]["1"] == 1.0 and "train_samples_per_s" not in res
    assert res["models"]["sft"] == str(tmp_path / "sft")
    assert all(list(v) == ["4", "8", "12"] for v in res["layout_success"].values())


def test_layout_success_counts_a_drawn_layout_and_nothing_less():
    from clvr.loop.oracle import noisy_oracle, oracle
    from clvr.train.bench import layout_requests, layout_success
    from clvr.world.render import blank

    reqs, targets = layout_requests(12, 3, 4, 16, seed=5)
    assert all(len(r.step.ops) == 12 and len(t.objects) == 12 for r, t in zip(reqs, targets))
    assert all((r.reference == blank(4, 16)).all() for r in reqs)
    class Batched:  # the benchmark's generators batch; the oracles draw one request at a time
        def __init__(self, gen):
            self.generate_batch = lambda reqs: [gen.generate(r) for r in reqs]

    assert layout_success(Batched(oracle()), (4, 8, 12), 5, 4, 16) == {"4": 1.0, "8": 1.0, "12": 1.0}
    noisy = layout_success(Batched(noisy_oracle(p_err=0.5)), (12,), 20, 4, 16)["12"]
    assert noisy < 0.2  # one spoilt object of 12 fails the whole layout
