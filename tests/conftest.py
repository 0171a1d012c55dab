"""Fixtures shared by the test files."""

from __future__ import annotations

import pytest

from clvr.train import loop


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
