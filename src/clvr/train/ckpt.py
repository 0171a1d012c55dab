"""Training metric logs: `metrics.jsonl` (one line per logged step) and `metrics.json` (the summary).
Checkpoints are the engine's (clvr.train.engine)."""

from __future__ import annotations

import json
from pathlib import Path

from clvr.io import atomic_write_text


class MetricsLog:
    """metrics.jsonl: one JSON object per logged step; on resume, lines after the resumed step are dropped."""

    def __init__(self, path: Path, resume_step: int = 0):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        keep = []
        if path.exists():
            for line in path.read_text().splitlines():
                try:
                    if json.loads(line)["step"] <= resume_step:
                        keep.append(line)
                except (ValueError, KeyError):
                    continue
        atomic_write_text(path, "".join(k + "\n" for k in keep))

    def log(self, step: int, split: str, **metrics: float) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps({"step": step, "split": split, **{k: float(v) for k, v in metrics.items()}}) + "\n")


def write_json(path: Path, data: dict) -> None:
    atomic_write_text(path, json.dumps(data, indent=2))


def read_json(path: Path) -> dict:
    return json.loads(Path(path).read_text())
