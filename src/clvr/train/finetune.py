"""The `finetune` stage (foundation flow): the move-heavy fine-tune of the pretrained base, the model shipped as
"base". It is the pretrain trainer (clvr.train.pretrain) on the `finetune` config section, starting from
`finetune.init` ("" = `<pretrain.out>/final`); resumable like pretrain. `make weights` used to run it as
`clvr world pretrain` with overrides; conf/release.yaml's `finetune` section holds those values.
"""

from __future__ import annotations

from pathlib import Path

from clvr.config import Config
from clvr.registry import check_checkpoint


def init_model(cfg: Config) -> str:
    """`finetune.init`, or "" = the pretrain stage's final model (a CheckpointError naming the key if it is missing)."""
    return check_checkpoint(cfg.finetune.init or str(Path(cfg.pretrain.out) / "final"), "finetune.init")


def run(cfg: Config) -> dict:
    from clvr.train import pretrain

    return pretrain.run(cfg, section="finetune", init=init_model(cfg))
