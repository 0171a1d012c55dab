"""The real-scale path of the controller SFT (`controller_sft.model_class: vlm`, clvr.learned.vlm): a tiny
Qwen3VLForConditionalGeneration built from config trains two steps on one real data-engine trajectory with its
canvas images, on the same trainer and engine; its folder reloads; a pretrained id that is not present locally is a
CheckpointError naming it; the gpu profiles name the real checkpoints."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import synthesized
from clvr.config import load_config
from clvr.errors import CheckpointError, ConfigError
from clvr.learned import train, vlm
from clvr.learned.tokens import step_lexemes
from clvr.trajectories import load_image, load_trajectories

TINY = ("controller_sft.model_class=vlm", "controller_sft.layers=1", "controller_sft.hidden=32",
        "controller_sft.heads=2", "controller_sft.kv_heads=1", "controller_sft.intermediate=64")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """One trajectory of the real data engine (the oracle generator, a tier-3 prompt: 5 calls and a stop)."""
    out = synthesized(tmp_path_factory.mktemp("data"), "synthesize.generator=oracle", "synthesize.n_per_tier=1",
                      "synthesize.tiers=[3]")
    assert len(list(load_trajectories(out))) == 1
    return out


def cfg_for(data: Path, out: Path, *overrides: str):
    return load_config("ci", [f"controller_sft.data={data}", f"controller_sft.out={out}", "controller_sft.steps=2",
                              "controller_sft.batch_size=4", "controller_sft.eval_frac=0.01", *TINY, *overrides])


def test_two_sft_steps_of_a_tiny_vlm_on_one_trajectory_with_its_images(data, tmp_path):
    from transformers import Qwen3VLForConditionalGeneration

    tr = vlm.VLMTrainer(cfg_for(data, tmp_path / "run"), tmp_path / "run", log=lambda m: None)
    assert isinstance(tr.model, Qwen3VLForConditionalGeneration) and tr.lex is not None
    # every example carries the canvas the controller looked at: a call's input image; the stop sees the final one
    traj = next(load_trajectories(data))
    seen = [load_image(data, p) for p in [*(s.input for s in traj.steps if s.input), traj.final]]
    assert tr.train and all(any(np.array_equal(d.canvas, im) for im in seen) for d in tr.train)
    stop = [d for d in tr.train if d.step == '{"op": "stop"}']
    assert stop and all(np.array_equal(d.canvas, seen[-1]) for d in stop)
    assert len({d.canvas.tobytes() for d in tr.train}) > 1  # different canvases, not one image for all

    # one example's model inputs: image placeholders as the processor expands them, labels on the step only
    d = tr.train[0]
    ex = vlm.encode_example(tr.proc, d.text, d.canvas, json.loads(d.step))
    assert set(ex) >= {"input_ids", "attention_mask", "pixel_values", "image_grid_thw", "labels", "mm_token_type_ids"}
    n_img = int((ex["input_ids"] == tr.proc.image_pad).sum())
    assert n_img == int(ex["image_grid_thw"][0].prod()) // tr.proc.merge**2 > 0
    labelled = ex["input_ids"][ex["labels"] != -100].tolist()
    assert labelled == [*tr.tokenizer.convert_tokens_to_ids(step_lexemes(json.loads(d.step))),
                        tr.tokenizer.eos_token_id]
    assert list(ex["input_ids"][0]) == list(d.ids)
    # the model reads the image: another canvas changes the logits of the same text
    with torch.no_grad():
        other = dict(ex, pixel_values=vlm.collate(tr.proc, [vlm.VLMExample(d.ids, d.labels, 255 - d.canvas)])["pixel_values"])
        a = tr.model(**{k: v for k, v in ex.items() if k != "labels"}).logits
        b = tr.model(**{k: v for k, v in other.items() if k != "labels"}).logits
    assert not torch.allclose(a, b)

    before = {k: v.detach().clone() for k, v in tr.model.state_dict().items()}
    res = tr.fit()
    m = res["metrics"]
    assert m["steps"] == 2 and math.isfinite(m["train_loss"]) and m["train_loss"] > 0 and m["train_examples"] > 10
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines if x["split"] == "train"] == [1, 2]

    model, proc = vlm.load_vlm(res["final"])  # the saved model folder reloads
    after = model.state_dict()
    assert set(after) == set(before)
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert any("visual" in k for k in changed) and any("language_model" in k for k in changed)
    assert proc.tokenizer.convert_tokens_to_ids(vlm.IMAGE_PAD) == tr.proc.image_pad and proc.lexemes
    assert (tmp_path / "run" / "checkpoints").is_dir()
    # exact match (greedy constrained decoding, teacher-forced, with the images) runs on the VLM
    em = tr.measure(model, tr.train[:8])
    assert 0 <= em["exact_match"] <= 1


def pretrained_like(folder: Path) -> Path:
    """A stand-in for a pretrained checkpoint folder (what `init: Qwen/Qwen3-VL-...` resolves to): a tiny VLM over
    a byte-level BPE tokenizer that has the vision tokens but none of the controller's step lexemes."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from clvr.learned.tokens import input_words

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer, bpe.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    bpe.train_from_iterator([" ".join(input_words()), '{"op":"stop"}'], trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<|endoftext|>", *vlm.VISION_TOKENS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    proc = vlm.VLMProcessor(tok, vlm.build_processor(4).image_processor)
    assert not proc.lexemes
    vlm.build_vlm(proc, layers=1, hidden=32, heads=2, kv_heads=1, intermediate=64).save_pretrained(folder)
    proc.save(folder)
    return folder


def test_a_pretrained_vlm_folder_with_its_own_tokenizer_fine_tunes(data, tmp_path):
    init = pretrained_like(tmp_path / "pretrained")
    before = vlm.load_vlm(init)[0].state_dict()
    tr = vlm.VLMTrainer(cfg_for(data, tmp_path / "run", f"controller_sft.init={init}"), tmp_path / "run",
                        log=lambda m: None)
    assert tr.lex is None  # no step lexemes: the step is its JSON in the checkpoint's own tokens
    d = tr.train[0]
    target = [i for i in d.labels if i != -100]
    assert tr.tokenizer.decode(target) == json.dumps(json.loads(d.step), separators=(",", ":")) + "<|endoftext|>"
    res = tr.fit()
    assert math.isfinite(res["metrics"]["train_loss"])
    after = vlm.load_vlm(res["final"], 4)[0].state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert 0 <= tr.measure(tr.plain(), tr.train[:4])["exact_match"] <= 1  # teacher-forced, whole vocabulary


def test_missing_pretrained_vlm_is_a_checkpoint_error_naming_it(data, tmp_path):
    for init in ("Qwen/Qwen3-VL-8B-Instruct", str(tmp_path / "no-such-folder")):
        with pytest.raises(CheckpointError, match=init.replace("/", ".")):
            train.run(cfg_for(data, tmp_path / "bad", f"controller_sft.init={init}"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="empty"):
        vlm.load_vlm(tmp_path / "empty")
    ok = vlm.save_vlm(vlm.build_vlm(vlm.build_processor(4), 1, 32, 2, 1, 64), vlm.build_processor(4), tmp_path / "g4", 4)
    with pytest.raises(CheckpointError, match="grid 4"):
        vlm.load_vlm(ok, grid=5)


def test_config_keys_and_the_gpu_profiles_name_the_real_checkpoints():
    for profile, ckpt in (("gpu-4b", "Qwen/Qwen3-VL-4B-Instruct"), ("gpu-9b", "Qwen/Qwen3-VL-8B-Instruct")):
        s = load_config(profile, []).controller_sft
        assert (s.model_class, s.init) == ("vlm", ckpt)
    assert load_config("cpu", []).controller_sft.model_class == "causal_lm"
    with pytest.raises(ConfigError, match="controller_sft.model_class"):
        load_config("ci", ["controller_sft.model_class=vit"])
    with pytest.raises(ConfigError, match="controller_sft.dagger_rounds"):
        load_config("ci", ["controller_sft.model_class=vlm", "controller_sft.dagger_rounds=1"])
