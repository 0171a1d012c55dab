"""The controller SFT stage on a real (tiny) data-engine data set: trains and writes a controller folder, measures
exact match as greedy constrained decoding would, resumes after a kill, LoRA writes a peft adapter, DAgger adds the
student's own states, bad config values are one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import synthesized
from clvr.config import load_config
from clvr.learned import train
from clvr.learned.model import load_controller

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return synthesized(tmp_path_factory.mktemp("data"), "synthesize.generator=noisy-oracle", "synthesize.n_per_tier=3",
                       "synthesize.shard_size=30")


def cfg_for(data: Path, out: Path, *overrides: str):
    return load_config("ci", [f"controller_sft.data={data}", f"controller_sft.out={out}", "controller_sft.eval_frac=0.3",
                              *overrides])


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_controller(folder, 4)[0].state_dict()


def test_tiny_run_writes_a_controller_and_its_exact_match_is_greedy_decoding(data, tmp_path):
    from clvr.learned.controller import greedy_step
    from clvr.learned.decisions import decision_states, teacher_labels
    from clvr.learned.grammar import Lexicon
    from clvr.learned.tokens import decode_step
    from clvr.loop.controller import WorldController
    from clvr.trajectories import load_trajectories

    cfg = cfg_for(data, tmp_path / "run", "controller_sft.steps=12", "controller_sft.lr=0.01")
    res = train.run(cfg)
    m = res["metrics"]
    assert m["steps"] == 12 and m["train_examples"] > 100 and m["eval_examples"] > 0 and m["wall_s"] > 0
    assert 0 <= m["eval_exact_match"] <= 1 and "eval_exact_match_b0" in m and "eval_exact_match_b4" in m
    assert m["held_out_trajectories"] >= 0 and m["train_trajectories"] + m["eval_trajectories"] + \
        m["held_out_trajectories"] == m["trajectories"] == 30
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines if x["split"] == "train"] == list(range(1, 13))
    model, tok = load_controller(res["final"], 4)  # the folder the learned controller reads

    # exact match, measured teacher-forced, is exactly "greedy constrained decoding gives the teacher's step"
    lex, teacher = Lexicon(tok, 4), WorldController(4, 2)
    trajs = list(load_trajectories(data))[:6]
    pairs = teacher_labels([s for t in trajs for s in decision_states(t)], teacher, (1, 0))
    hits = []
    for q, step in pairs:
        ids, complete = greedy_step(model, tok, lex, q, 160)
        ex = train.label_examples([q], teacher, (q.max_calls - q.calls if q.max_calls else 0,), tok, set())
        assert ex[0].step == json.dumps(step, sort_keys=True)
        hits.append((complete and decode_step(tok, ids) == step,
                     train.exact_match(model, lex, ex, tok.pad_token_id)["exact_match"] == 1.0))
    assert all(a == b for a, b in hits) and any(a for a, _ in hits)


def test_killed_run_resumes_to_the_same_weights(data, tmp_path, monkeypatch):
    over = ("controller_sft.steps=4", "controller_sft.ckpt_every=2")
    ref = train.run(cfg_for(data, tmp_path / "ref", *over))
    real_step = train.ControllerTrainer.train_step

    def dying_step(self, *args):
        if self.step == 2:  # after its step-2 checkpoint, as a killed process would
            raise KeyboardInterrupt
        return real_step(self, *args)

    monkeypatch.setattr(train.ControllerTrainer, "train_step", dying_step)
    with pytest.raises(KeyboardInterrupt):
        train.run(cfg_for(data, tmp_path / "run", *over))
    monkeypatch.setattr(train.ControllerTrainer, "train_step", real_step)
    assert (tmp_path / "run" / "checkpoints" / "step-000002").is_dir() and not (tmp_path / "run" / "final").exists()
    res = train.run(cfg_for(data, tmp_path / "run", *over))
    a, b = weights(Path(ref["final"])), weights(Path(res["final"]))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    steps = [json.loads(x)["step"] for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
             if json.loads(x)["split"] == "train"]
    assert steps == [1, 2, 3, 4]  # nothing lost, nothing twice
    assert res["metrics"]["train_loss"] == ref["metrics"]["train_loss"]


def test_lora_writes_a_merged_controller_and_a_peft_adapter(data, tmp_path):
    from peft import PeftModel

    init = train.run(cfg_for(data, tmp_path / "full", "controller_sft.steps=2"))["final"]
    res = train.run(cfg_for(data, tmp_path / "lora", "controller_sft.mode=lora", f"controller_sft.init={init}",
                            "controller_sft.steps=2", "controller_sft.lr=0.05"))
    final = Path(res["final"])
    assert json.loads((final / "adapter" / "adapter_config.json").read_text())["r"] == 8
    merged, base = weights(final), weights(Path(init))
    changed = [k for k in merged if not torch.equal(merged[k], base[k])]
    assert changed and all(k.endswith("proj.weight") for k in changed)  # only the adapted projections moved
    plain = load_controller(init, 4)[0]
    with_adapter = PeftModel.from_pretrained(plain, str(final / "adapter")).merge_and_unload()
    assert all(torch.allclose(with_adapter.state_dict()[k], merged[k], atol=1e-6) for k in changed)


def test_dagger_round_adds_the_students_own_states(data, tmp_path):
    res = train.run(cfg_for(data, tmp_path / "run", "controller_sft.steps=2", "controller_sft.dagger_rounds=1",
                            "controller_sft.dagger_prompts=5"))
    m, out = res["metrics"], tmp_path / "run"
    assert m["steps"] == 4 and m["dagger_r1_states"] > 0 and m["dagger_r1_new_examples"] > 0
    assert {"dagger_r1_before_exact_match", "dagger_r1_after_exact_match", "dagger_r1_own_exact_match",
            "dagger_r1_student_pass_b0"} <= set(m)
    rows = (out / "rounds" / "round-1.jsonl").read_text().splitlines()
    assert len(rows) == m["dagger_r1_new_examples"]


@pytest.mark.parametrize("override, message", [
    ("controller_sft.budgets=[4,-1]", "controller_sft.budgets must be a non-empty list of calls-left budgets >= 0 "
                                      "(0 = unbounded), got [4, -1]"),
    ("controller_sft.hidden=130", "controller_sft.hidden must be a multiple of heads (4), got 130"),
    ("controller_sft.eval_frac=1.0", "controller_sft.eval_frac must be in 0..1 (both excluded), got 1.0"),
])
def test_bad_config_value_names_the_key(override, message):
    from clvr.errors import ConfigError

    with pytest.raises(ConfigError) as e:
        load_config("ci", [override])
    assert str(e.value) == message


def test_cli_bad_input_is_a_one_line_error_exit_2(tmp_path):
    p = subprocess.run([sys.executable, "-m", "clvr", "world", "controller-sft", "--profile", "ci",
                        f"controller_sft.out={tmp_path / 'o'}", "controller_sft.mode=qlora"], cwd=ROOT,
                       capture_output=True, text=True)
    assert p.returncode == 2 and p.stderr == "error: controller_sft.mode must be one of ['full', 'lora'], got 'qlora'\n"


def test_a_data_set_that_is_not_there_is_a_clear_error(tmp_path):
    from clvr.errors import ClvrError

    with pytest.raises(ClvrError, match="^no trajectory data set at .*none"):
        train.run(cfg_for(tmp_path / "none", tmp_path / "o"))


def test_batch_encoding_is_encode_example(data):
    from clvr.learned.decisions import decision_states, teacher_labels
    from clvr.learned.state import state_text
    from clvr.learned.tokens import build_tokenizer, encode_example
    from clvr.loop.controller import WorldController
    from clvr.trajectories import load_trajectories

    tok = build_tokenizer(4)
    states = [s for t in load_trajectories(data) for s in decision_states(t)]
    pairs = [(state_text(q), step) for q, step in teacher_labels(states, WorldController(4, 2), (2, 0))]
    assert train.encode_examples(tok, pairs) == [encode_example(tok, t, s) for t, s in pairs]
    with pytest.raises(ValueError, match="outside the controller's vocabulary"):
        train.encode_examples(tok, [("prompt a mauve circle", {"op": "stop"})])


def test_balance_repeats_rare_kinds_of_step():
    from clvr.world.scene import Scene

    def ex(op: str, i: int) -> train.Decision:
        return train.Decision(f"s{i}", json.dumps({"op": op}), Scene((), 4), 0, (i,), (i,))

    pool = [ex("add", i) for i in range(90)] + [ex("remove", 90 + i) for i in range(3)] + [ex("stop", 99)]
    out = train.balance(pool, 0.1)
    count = lambda op: sum(json.loads(d.step)["op"] == op for d in out)  # noqa: E731
    assert count("add") == 90 and count("remove") == 9 and count("stop") == 9  # 10 % of 94, in whole copies
    assert train.balance(pool, 0.0) is pool


def test_output_lexemes_start_as_the_sum_of_their_words():
    from clvr.learned import tokens as T
    from clvr.learned.model import build_model

    tok = T.build_tokenizer(4)
    model = build_model(len(tok))
    before = model.get_input_embeddings().weight.detach().clone()
    assert train.compose_embeddings(model, tok, 4) == len(T.output_lexemes(4)) - 1  # all but the edit opening
    after, v = model.get_input_embeddings().weight.detach(), tok.get_vocab()
    head = v[T.head("add", "circle", "red")]
    words = sum(before[v[T.MARK + w]] for w in ("add", "circle", "red"))
    assert torch.allclose(after[head] - before[head], words, atol=1e-6)
    assert torch.equal(after[v[T.MARK + "red"]], before[v[T.MARK + "red"]])  # input words stay
    assert torch.equal(after[v[T.EDIT_OPEN]], before[v[T.EDIT_OPEN]])
    a, b = (after[v[T.cell_lexeme(*c)]] - before[v[T.cell_lexeme(*c)]] for c in ((0, 1), (1, 0)))
    assert not torch.allclose(a, b)  # a cell's row and column play different parts
