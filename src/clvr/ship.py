"""The `ship` stage (foundation flow, last): install the flow's models as the released weights the retrain flow
starts from: `<finetune.out>/final` as "base" and `<rebalance.out>/final` (the last of the three distillation
stages: distill, trajectory, rebalance) as "distilled", each through `clvr.models.backend.ship` (loaded, so a bad
folder fails naming it; re-saved clean; swapped in atomically; the model card already there is kept), into
`ship.root` ("" = the packaged weights, src/clvr/weights; see clvr.registry.ship_root).

Writes `<ship.out>/metrics.json`: for each shipped name its source, destination and sha256 (clvr.registry.
model_digest). DVC keeps that file in git, so a run's tag records exactly which weights it shipped; the weights
folder itself is not a DVC output (git tracks src/clvr/weights).
"""

from __future__ import annotations

import json
from pathlib import Path

from clvr.config import Config
from clvr.io import atomic_write_text
from clvr.registry import SHIPPED, model_digest, ship_root


def sources(cfg: Config) -> dict[str, str]:
    """Shipped name -> the trained folder installed under it."""
    return dict(zip(SHIPPED, (str(Path(cfg.finetune.out) / "final"), str(Path(cfg.rebalance.out) / "final"))))


def _here(path: Path) -> str:
    """`path` relative to the working directory (the project root, under DVC) when inside it."""
    path, cwd = path.resolve(), Path.cwd().resolve()
    return str(path.relative_to(cwd)) if path.is_relative_to(cwd) else str(path)


def run(cfg: Config) -> dict:
    from clvr.models.backend import ship

    root, out = ship_root(cfg.ship.root), Path(cfg.ship.out)
    out.mkdir(parents=True, exist_ok=True)
    receipt: dict[str, str] = {}
    for name, src in sources(cfg).items():
        dest = ship(src, name, root)
        receipt.update({f"{name}_source": src, f"{name}_path": _here(dest), f"{name}_sha256": model_digest(str(dest))})
        print(f"[ship] {src} -> {dest}", flush=True)
    atomic_write_text(out / "metrics.json", json.dumps(receipt, indent=2))
    return {"metrics": receipt, "final": None}
