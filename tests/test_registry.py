"""Model resolution lives in one place (clvr.registry): the shipped names, the oracle names, the weights folder, the
released models the retrain flow starts from, the ship target, the distill stage's default teacher; every stage and
backend reads it from there."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from clvr import registry
from clvr.config import load_config
from clvr.errors import CheckpointError, ClvrError

SRC = Path(registry.__file__).resolve().parent


def test_no_module_but_the_registry_spells_the_model_names_or_the_weights_folder():
    spelt = re.compile(r"""\(\s*["']base["'],\s*["']distilled["']\s*\)|\(\s*["']oracle["'],\s*["']noisy-oracle["']\s*\)"""
                       r"""|/\s*["']weights["']""")
    hits = [str(p.relative_to(SRC)) for p in SRC.rglob("*.py") if spelt.search(p.read_text())]
    assert hits == ["registry.py"]


def test_shipped_names_resolve_to_the_packaged_weights_and_anything_else_is_a_path(tmp_path):
    for name in registry.SHIPPED:
        assert registry.model_path(name) == registry.WEIGHTS_DIR / name and registry.is_checkpoint(registry.model_path(name))
    assert registry.model_path(tmp_path) == tmp_path and not registry.is_checkpoint(tmp_path)


def fake_checkpoint(out: Path) -> None:
    (out / "final").mkdir(parents=True)
    (out / "final" / registry.INDEX).write_text("{}")


def test_default_teacher_is_the_finetune_then_the_pretrain_then_the_shipped_base(tmp_path):
    ft, pre = tmp_path / "finetune", tmp_path / "pretrain"
    assert registry.default_teacher(ft, pre) == "base"
    (pre / "final").mkdir(parents=True)
    assert registry.default_teacher(ft, pre) == "base"  # a folder without model_index.json is no checkpoint
    (pre / "final" / registry.INDEX).write_text("{}")
    assert registry.default_teacher(ft, pre) == str(pre / "final")
    fake_checkpoint(ft)
    assert registry.default_teacher(ft, pre) == str(ft / "final")


def test_released_models_and_the_ship_root(tmp_path):
    assert registry.released("base", "distilled") == {"base": "base", "distilled": "distilled"}
    fake_checkpoint(tmp_path)
    assert registry.released(str(tmp_path / "final"), "base")["base"] == str(tmp_path / "final")
    with pytest.raises(CheckpointError, match=r"^weights.distilled: no generator checkpoint at '/no/such'"):
        registry.released("base", "/no/such")
    assert registry.ship_root("") == registry.WEIGHTS_DIR and registry.ship_root(str(tmp_path)) == tmp_path


def test_stages_resolve_through_the_registry(tmp_path):
    from clvr import synthesize
    from clvr.models import backend
    from clvr.train.distill import teacher_path

    assert backend.SHIPPED is registry.SHIPPED and backend.WEIGHTS_DIR is registry.WEIGHTS_DIR
    cfg = load_config("ci", [f"pretrain.out={tmp_path}", f"finetune.out={tmp_path / 'ft'}",
                             f"synthesize.out={tmp_path / 's'}"])
    assert synthesize.resolve_model(cfg) == teacher_path(cfg) == cfg.sft.init == "base"
    fake_checkpoint(tmp_path)
    assert teacher_path(cfg) == str(tmp_path / "final")
    assert synthesize.resolve_model(cfg) == "base"  # the retrain flow starts from the released base, not a pretrain
    pinned = load_config("ci", [f"weights.base={tmp_path / 'final'}"])  # one key pins the base of every retrain stage
    assert synthesize.resolve_model(pinned) == pinned.sft.init == str(tmp_path / "final")
    oracle = load_config("ci", ["synthesize.generator=noisy-oracle", "synthesize.model=/no/such"])
    assert synthesize.resolve_model(oracle) == "noisy-oracle"  # an oracle needs no model


def test_bad_model_names_are_named_in_the_error(tmp_path):
    with pytest.raises(CheckpointError, match=r"^synthesize.model: no generator checkpoint at '/no/such'"):
        registry.check_checkpoint("/no/such", "synthesize.model")
    assert registry.check_checkpoint("distilled", "x") == "distilled"
    with pytest.raises(ClvrError, match="did you mean 'distilled'"):
        registry.check_model_name("distiled")
    registry.check_model_name("noisy-oracle")


def test_model_digest_covers_names_and_bytes(tmp_path):
    assert registry.model_digest("oracle") == ""
    (tmp_path / "a.bin").write_bytes(b"1")
    d1 = registry.model_digest(str(tmp_path))
    (tmp_path / "a.bin").write_bytes(b"2")
    d2 = registry.model_digest(str(tmp_path))
    (tmp_path / "a.bin").rename(tmp_path / "b.bin")
    assert len({d1, d2, registry.model_digest(str(tmp_path))}) == 3
    assert registry.model_digest("base") != registry.model_digest("distilled")
