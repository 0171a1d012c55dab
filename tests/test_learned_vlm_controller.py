"""The VLM controller (clvr.learned.vlm_controller): a tiny random Qwen3-VL saved with `save_vlm`, or a pretrained-
like folder with a byte-level BPE tokenizer, loads through `loop.controller=learned`; under constrained decoding every
output is a step that parses and fits the state even with random weights; the prefix cache changes nothing; the
loop runs end to end; bad folders are CheckpointErrors naming them."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import clvr

from clvr.config import LoopCfg, load_config
from clvr.errors import CheckpointError
from clvr.learned import vlm
from clvr.learned.grammar import Lexicon, StepParse
from clvr.learned.model import build_model
from clvr.learned.textgrammar import TextGrammar
from clvr.learned.tokens import build_tokenizer, output_lexemes, step_lexemes
from clvr.learned.vlm_controller import VLMController, build_random_vlm_controller
from clvr.loop import make_controller, make_verifier, run_loop
from clvr.loop.oracle import OracleGenerator
from clvr.loop.roles import LoopState
from clvr.loop.run import build_controller, transition_error
from clvr.steps import Step
from clvr.world.render import blank, render
from clvr.world.scene import Obj, Scene
from clvr.world.vocab import COLORS, SHAPES

PROMPTS = ("two red circles, a blue square left of a green triangle and no yellow squares", "a red circle")
TINY = dict(layers=1, hidden=32, heads=2, kv_heads=1, intermediate=64)


def random_scene(rng: np.random.Generator, grid: int = 4) -> Scene:
    cells = [(r, c) for r in range(grid) for c in range(grid)]
    n = int(rng.integers(0, len(cells) + 1))
    picked = [cells[i] for i in rng.permutation(len(cells))[:n]]
    return Scene(tuple(Obj(str(rng.choice(SHAPES)), str(rng.choice(list(COLORS))), r, c) for r, c in picked), grid)


def states(n: int, seed: int = 0) -> list[LoopState]:
    """Loop states over random scenes, each with its rendered canvas and the verifier's report, two prompts."""
    ctl, v, rng = make_controller("world"), make_verifier("world"), np.random.default_rng(seed)
    out = []
    for i in range(n):
        plan = ctl.plan(PROMPTS[i % 2])
        scene = random_scene(rng) if i else Scene((), 4)
        seen = v.perceive(render(scene, 16) if scene.objects else blank(4, 16))
        out.append(LoopState(plan, seen.scene, render(seen.scene, 16), active=v.active(seen, plan), max_calls=4))
    return out


def runs(step: dict, st: LoopState) -> None:
    assert transition_error(Step.from_dict(step), st.scene, 0) is None, step


@pytest.fixture(scope="module")
def lexeme_folder(tmp_path_factory) -> Path:
    proc = vlm.build_processor(4)
    return vlm.save_vlm(vlm.build_vlm(proc, seed=1, **TINY), proc, tmp_path_factory.mktemp("vlm") / "c", 4)


def bpe_tokenizer():
    """A byte-level BPE (as Qwen's) trained here on random runs of step lexemes and the state words: tokens end
    inside lexemes and run across their boundaries (e.g. `]},{"`); no step lexeme is one token of it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from clvr.learned.tokens import input_words

    rng, lexemes = np.random.default_rng(0), output_lexemes(4)
    corpus = ["".join(rng.choice(lexemes, 6)) for _ in range(300)] + [" ".join(input_words())]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer, bpe.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    bpe.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=700, special_tokens=["<|endoftext|>", *vlm.VISION_TOKENS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>", pad_token="<|endoftext|>")


@pytest.fixture(scope="module")
def bpe_folder(tmp_path_factory) -> Path:
    """A pretrained-like checkpoint folder (what a Qwen3-VL hub id resolves to): no clvr marker, its own tokenizer."""
    folder = tmp_path_factory.mktemp("pretrained")
    proc = vlm.VLMProcessor(bpe_tokenizer(), vlm.build_processor(4).image_processor)
    assert not proc.lexemes
    vlm.build_vlm(proc, seed=2, **TINY).save_pretrained(folder)
    proc.save(folder)
    return folder


def test_saved_vlm_loads_through_the_config_and_every_output_runs(lexeme_folder):
    cfg = load_config("ci", ["loop.controller=learned", f"loop.controller_model={lexeme_folder}"])
    ctl = build_controller(cfg)
    assert isinstance(ctl, VLMController) and ctl.proc.lexemes
    for st in states(6):
        step, gave_up = ctl.propose(st)
        assert not gave_up
        runs(step, st)
    assert ctl.stats.decisions == 6 and ctl.stats.truncated == 0
    # it looks at the canvas: another image of the same state changes what it reads
    st = states(1)[0]
    a = ctl.prefill(*ctl.inputs(st))[1]
    st.canvas = 255 - st.canvas
    b = ctl.prefill(*ctl.inputs(st))[1]
    assert not torch.allclose(a, b)


def test_text_grammar_allows_exactly_the_tokens_that_keep_a_step_prefix():
    """At every position of random paths, `allowed()` (the trie walk) equals a brute force over the vocabulary:
    a token is allowed iff the text with it is a prefix of a concatenation of lexemes StepParse accepts."""
    tok = bpe_tokenizer()
    g = TextGrammar(tok, 4)
    lex, strings = Lexicon(build_tokenizer(4), 4), g.trie.strings
    assert not set(g.lexeme.values()) & {s for s in strings if s}  # not one step lexeme is a token of this BPE

    def ok(parse: StepParse, rest: str) -> bool:
        if not rest:
            return True
        if parse.done:
            return False
        for i in parse.allowed():
            s = g.lexeme[i]
            if s.startswith(rest):
                return True
            if rest.startswith(s):
                p = parse.copy()
                p.feed(i)
                if ok(p, rest[len(s):]):
                    return True
        return False

    rng, crossed = np.random.default_rng(1), 0
    for _ in range(3):
        scene = random_scene(rng)
        tp, text, ends = g.start(scene), "", []
        while not tp.done:
            if len(ends) < 30:  # (the brute force is slow; the walk alone after that)
                want = [i for i, s in enumerate(strings) if s and ok(StepParse(lex, scene), text + s)]
                assert tp.allowed() == want
            t = int(rng.choice(tp.allowed()))
            tp.feed(t)
            ends.append(len(text) + len(strings[t]))
            text += strings[t]
        assert tp.allowed() == [tok.eos_token_id] and tp.text == text
        step = json.loads(text)
        assert transition_error(Step.from_dict(step), scene, 0) is None
        assert text == json.dumps(step, separators=(",", ":"))
        bounds = np.cumsum([len(x) for x in step_lexemes(step)])
        crossed += sum(any(a < b < e for b in bounds) for a, e in zip([0, *ends], ends))  # a token spans a boundary
    assert crossed > 0


def test_pretrained_bpe_folder_decodes_text_constrained_steps_that_run(bpe_folder):
    ctl = make_controller("learned", model=str(bpe_folder))
    assert isinstance(ctl, VLMController) and not ctl.proc.lexemes
    for st in states(4, seed=3):
        step, gave_up = ctl.propose(st)
        assert not gave_up
        runs(step, st)
    assert ctl.stats.truncated == 0


@pytest.mark.parametrize("kind", ["lexeme", "bpe"])
def test_prefix_cache_gives_the_same_logits_and_tokens_as_a_full_prefill(kind, lexeme_folder, bpe_folder):
    folder = lexeme_folder if kind == "lexeme" else bpe_folder
    cached = make_controller("learned", model=str(folder), max_new_tokens=40)  # (the tokens compared, done or not)
    model, proc = cached.model, cached.proc
    plain = VLMController(model, proc, 4, prefix_cache_size=0, max_new_tokens=40)
    sts = states(4, seed=4)
    for st in sts:
        prefix, rest, pix = cached.inputs(st)
        # the prompt's logits as the model's own forward computes them (its M-RoPE from mm_token_type_ids)
        ids = torch.tensor([prefix + rest])
        ref = model(input_ids=ids, mm_token_type_ids=(ids == proc.image_pad).int(), **pix).logits[0, -1]
        for ctl in (cached, plain):
            assert torch.allclose(ctl.prefill(prefix, rest, pix)[1], ref, atol=1e-5)
        assert cached.decode(st)[0] == plain.decode(st)[0]
    assert cached.cache.hits >= len(sts) and cached.cache.misses == 2  # one prefill per prompt
    assert all(c.get_seq_length() == len(k) for k, c in cached.cache.entries.items())  # cropped back to the prefix


def test_the_loop_runs_end_to_end_with_the_vlm_controller(lexeme_folder, monkeypatch, capsys, tmp_path):
    ctl = make_controller("learned", model=str(lexeme_folder))
    budget = LoopCfg(max_iters=6, max_nfe=10_000, max_calls=4)
    trace = run_loop(PROMPTS[0], ctl, OracleGenerator(), make_verifier("world"), budget, seed=1)
    assert trace.ended_by and trace.rejected == 0 and trace.calls >= 2
    assert ctl.stats.decisions == len(trace.steps) and ctl.stats.truncated == 0
    # the CLI: `clvr generate --controller learned` with the VLM folder as loop.controller_model
    args = ("generate", PROMPTS[1], "--model", "oracle", "--controller", "learned", "--profile", "ci", "--set")
    code, _, err = clvr(monkeypatch, capsys, *args, f"loop.controller_model={lexeme_folder}", "--out", str(tmp_path / "g"))
    assert code == 0, err
    trace = json.loads((tmp_path / "g" / "trace.json").read_text())
    assert trace["steps"] and trace["rejected"] == 0
    code, _, err = clvr(monkeypatch, capsys, *args, "loop.controller_model=Qwen/Qwen3-VL-8B-Instruct", "--out",
                        str(tmp_path / "h"))
    assert code == 2 and "weights must be present locally" in err and "Traceback" not in err


def test_bad_folders_and_truncation(lexeme_folder, tmp_path):
    with pytest.raises(CheckpointError, match="loop.controller_model 'Qwen/Qwen3-VL-8B-Instruct'.*locally"):
        make_controller("learned", model="Qwen/Qwen3-VL-8B-Instruct")
    with pytest.raises(CheckpointError, match="grid 4"):
        make_controller("learned", model=str(lexeme_folder), grid=5)
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in lexeme_folder.iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    (bad / "model.safetensors").write_bytes(b"not weights")
    with pytest.raises(CheckpointError, match=f"VLM controller '{bad}' does not load"):
        make_controller("learned", model=str(bad))
    (bad / vlm.MARKER).write_text("{")
    with pytest.raises(CheckpointError, match="corrupt VLM controller"):
        make_controller("learned", model=str(bad))
    text_only = tmp_path / "text-only"  # a model folder of another class (a text-only causal LM, no clvr marker)
    build_model(len(build_tokenizer(4)), layers=1, hidden=32, heads=2, kv_heads=1, intermediate=64).save_pretrained(text_only)
    with pytest.raises(CheckpointError, match=f"VLM controller '{text_only}' does not load"):
        make_controller("learned", model=str(text_only))
    # a generation cut off by the token limit is a counted reject, never a step; the trajectory then stops
    ctl = make_controller("learned", model=str(lexeme_folder), max_new_tokens=1)
    st = states(1)[0]
    out = ctl.next(st)
    assert out["op"] is None and "cut off at 1 tokens" in out["truncated"] and ctl.stats.truncated == 1
    assert ctl.next(st) == {"op": "stop"}


def test_random_controllers_for_the_benchmark():
    tiny = build_random_vlm_controller("tiny", 4)
    st = states(1)[0]
    step, gave_up = tiny.propose(st)
    runs(step, st)
    big = build_random_vlm_controller("8b", 4, device="meta")  # the architecture only, no memory
    n = sum(p.numel() for p in big.model.parameters())
    assert 8.7e9 < n < 8.8e9 and big.model.dtype == torch.bfloat16  # Qwen3-VL-8B-Instruct: 8.77B parameters
    with pytest.raises(ValueError, match="tiny | 8b"):
        build_random_vlm_controller("70b", 4)
