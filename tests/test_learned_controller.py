"""The learned controller's core: tokenizer, state text, constrained decoding, model folders, the registry key."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from clvr.errors import CheckpointError
from clvr.learned.controller import LearnedController, greedy_step
from clvr.learned.grammar import Lexicon, StepLogitsProcessor, StepParse
from clvr.learned.model import MARKER, build_model, load_controller, save_controller
from clvr.learned.state import state_text
from clvr.learned.tokens import build_tokenizer, decode_step, encode_example, encode_state, step_lexemes
from clvr.loop.controller import WorldController
from clvr.loop.roles import LoopState, make_controller
from clvr.loop.run import transition_error
from clvr.loop.verify import WorldVerifier
from clvr.steps import Step
from clvr.world.render import blank
from clvr.world.scene import Obj, Scene
from clvr.world.vocab import COLORS, SHAPES

PROMPT = "two red circles, a blue square left of a green triangle and no yellow squares"


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


def random_scene(rng: np.random.Generator, grid: int = 4) -> Scene:
    cells = [(r, c) for r in range(grid) for c in range(grid)]
    n = int(rng.integers(0, len(cells) + 1))
    picked = [cells[i] for i in rng.permutation(len(cells))[:n]]
    return Scene(tuple(Obj(str(rng.choice(SHAPES)), str(rng.choice(list(COLORS))), r, c) for r, c in picked), grid)


def first_state(prompt: str = PROMPT, max_calls: int = 4) -> LoopState:
    w = WorldController()
    plan, v = w.plan(prompt), WorldVerifier()
    seen = v.perceive(blank(4, 16))
    return LoopState(plan, seen.scene, None, active=v.active(seen, plan), max_calls=max_calls)


def test_decoding_is_concatenation_and_round_trips(tok):
    step = {"op": "edit", "ops": [{"op": "add", "shape": "circle", "color": "red", "cell": [0, 1]},
                                  {"op": "move", "shape": "square", "color": "blue", "cell": [1, 1], "to": [2, 2]},
                                  {"op": "recolor", "shape": "square", "color": "blue", "cell": [3, 3],
                                   "new_color": "red"}]}
    lexemes = step_lexemes(step)
    ids = tok.convert_tokens_to_ids(lexemes)
    assert tok.unk_token_id not in ids and len(ids) == 1 + 2 + 3 + 3
    assert tok.decode(ids) == "".join(lexemes) == json.dumps(step, separators=(",", ":"))
    assert decode_step(tok, ids) == step
    assert step_lexemes({"op": "stop"}) == ['{"op":"stop"}']
    with pytest.raises(ValueError, match="generate"):
        step_lexemes({"op": "generate", "prompt": "a red circle"})


def test_state_text_reads_the_loop_state(tok):
    st = first_state()
    text = state_text(st)
    assert text.startswith("prompt two red circles , a blue square")
    assert "calls left 4" in text and "canvas empty" in text and "judge failed" in text
    assert text.count(" red circle ") >= 2  # both missing red circles are listed
    ids, labels = encode_example(tok, text, WorldController().next(st))
    n_state = len(encode_state(tok, text))
    assert labels[:n_state] == [-100] * n_state and labels[n_state:] == ids[n_state:]
    assert ids[-1] == tok.eos_token_id
    st.max_calls = 0
    assert "calls left unbounded" in state_text(st)


@pytest.mark.parametrize("seed", range(3))
def test_any_path_through_the_grammar_is_a_step_that_runs(tok, seed):
    """Random logits, 300 random scenes: every finished output parses and fits the scene."""
    lex, rng = Lexicon(tok, 4), np.random.default_rng(seed)
    ops = set()
    for _ in range(100):
        scene, parse, ids = random_scene(rng), None, []
        parse = StepParse(lex, scene)
        while not parse.done:
            allowed = parse.allowed()
            tok_id = int(rng.choice(allowed if rng.random() < 0.7 or len(allowed) < 3 else allowed[-2:]))
            parse.feed(tok_id)
            ids.append(tok_id)
        step = Step.from_dict(decode_step(tok, ids))
        assert transition_error(step, scene, 1) is None
        ops.update(p.op for p in step.parts())
        assert parse.allowed() == [tok.eos_token_id]
    assert {"add", "remove", "recolor", "move", "stop"} <= ops | {"stop"}


def test_grammar_refuses_what_the_state_forbids(tok):
    lex = Lexicon(tok, 4)
    full = Scene(tuple(Obj("circle", "red", r, c) for r in range(4) for c in range(4)), 4)
    parse = StepParse(lex, full)
    heads = {lex.heads[i] for i in parse.allowed() if i in lex.heads}
    assert heads == {("remove", "circle", "red"), ("recolor", "circle", "red")}  # no add, no move: no free cell
    parse = StepParse(lex, Scene((), 4))
    assert {lex.heads[i][0] for i in parse.allowed() if i in lex.heads} == {"add"}
    with pytest.raises(ValueError, match="not allowed"):
        parse.feed(tok.eos_token_id)


def test_greedy_decoder_matches_generate_with_the_logits_processor(tok):
    model, lex, st = build_model(len(tok), seed=3).eval(), Lexicon(tok, 4), first_state()
    ids, done = greedy_step(model, tok, lex, st, 40)
    assert done
    prompt = torch.tensor([encode_state(tok, state_text(st))])
    proc = StepLogitsProcessor(lex, [st.scene], prompt.shape[1])
    out = model.generate(prompt, logits_processor=[proc], max_new_tokens=40, do_sample=False,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    assert out[0, prompt.shape[1]:].tolist() == [*ids, tok.eos_token_id]


def test_controller_folder_round_trip_and_bad_folders(tok, tmp_path):
    model = build_model(len(tok), seed=1)
    save_controller(model, tok, tmp_path / "c", 4)
    loaded, _ = load_controller(tmp_path / "c", 4)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.state_dict().values()))
    with pytest.raises(CheckpointError, match="no learned controller at"):
        load_controller(tmp_path / "nothing", 4)
    with pytest.raises(CheckpointError, match="grid 4"):
        load_controller(tmp_path / "c", 5)
    (tmp_path / "c" / "model.safetensors").write_bytes(b"not weights")
    with pytest.raises(CheckpointError, match="corrupt learned controller"):
        load_controller(tmp_path / "c", 4)
    (tmp_path / "c" / MARKER).write_text("{")
    with pytest.raises(CheckpointError, match="corrupt learned controller"):
        load_controller(tmp_path / "c", 4)


def test_registry_key_and_truncation_is_a_counted_reject(tok, tmp_path):
    save_controller(build_model(len(tok), seed=3), tok, tmp_path / "c", 4)  # its first lexeme is not stop
    with pytest.raises(CheckpointError, match="controller_model"):
        make_controller("learned")
    ctrl = make_controller("learned", model=str(tmp_path / "c"), max_new_tokens=1)
    st = first_state()
    out = ctrl.next(st)
    assert out["op"] is None and "cut off at 1 tokens" in out["truncated"] and ctrl.stats.truncated == 1
    assert ctrl.next(st) == {"op": "stop"}  # the trajectory ends
    assert isinstance(ctrl, LearnedController) and ctrl.stats.decisions == 1
