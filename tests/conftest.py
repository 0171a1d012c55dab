"""Fixtures shared by the test files."""

from __future__ import annotations

import sys

import pytest

from clvr.train import loop


def pytest_collection_modifyitems(items) -> None:
    """The pipeline tests first: their file is the longest (about 7 min, shared fixtures), so under
    `-n 2 --dist loadfile` (`make test`) one worker starts it while the other takes every other file."""
    items.sort(key=lambda item: item.path.name != "test_pipeline.py")


@pytest.fixture
def die_at_step(monkeypatch):
    """`die_at_step(run, cfg, step)`: run a trainer (`run(cfg)`) that dies with KeyboardInterrupt when it starts
    step `step` + 1, after its step-`step` checkpoint, as a killed process would; then the real step is back."""

    def die(run, cfg, step: int) -> None:
        real_step = loop.Trainer.train_step

        def dying_step(self):
            if self.step == step:
                raise KeyboardInterrupt
            return real_step(self)

        monkeypatch.setattr(loop.Trainer, "train_step", dying_step)
        try:
            with pytest.raises(KeyboardInterrupt):
                run(cfg)
        finally:
            monkeypatch.setattr(loop.Trainer, "train_step", real_step)

    return die


def synthesized(out, *overrides: str):
    """`out` holding a data-engine data set made by the real synthesize stage (profile ci, one worker, quiet)."""
    from clvr import synthesize
    from clvr.config import load_config

    synthesize.run(load_config("ci", [f"synthesize.out={out}", *overrides]), workers=1, log=lambda m: None)
    return out


def clvr(monkeypatch, capsys, *args: str) -> tuple[int, str, str]:
    """Run `clvr ARGS...` in-process (tests import it: `from conftest import clvr`) -> (exit code, stdout, stderr)."""
    from clvr.cli import main

    monkeypatch.setattr(sys, "argv", ["clvr", *args])
    with pytest.raises(SystemExit) as e:
        main()
    out, err = capsys.readouterr()
    return e.value.code or 0, out, err
