"""The `foundation` flow: the recipe that makes the released world weights (at real scale these are downloaded:
FLUX.2 [klein] base and distilled). The registry's foundation stages vae -> pretrain -> finetune (move-heavy) ->
distill (teacher: the fine-tune's final) -> trajectory -> rebalance (the student on, on the fine-tune's own
trajectory) -> ship (installs the fine-tune as "base" and rebalance's student as "distilled" in `ship.root`, "" =
src/clvr/weights), each through DVC, tracked in MLflow (flows/common.py).

    clvr pipeline run --flow foundation --profile release    # `make weights`: the shipped weights, from scratch
    clvr pipeline run --flow foundation --profile ci         # seconds; ships into runs/ci/weights (ci.yaml)
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `python flows/foundation.py` imports tasks/ from here
    sys.path.insert(0, str(ROOT))

from prefect import flow  # noqa: E402

from flows.common import run_flow  # noqa: E402


@flow(name="foundation")
def foundation(profile: str = "release", overrides: list[str] | None = None, root: str = ".",
               stages: list[str] | None = None, dry_run: bool = False) -> dict:
    """Run the foundation flow for a config profile; `stages`, `dry_run` and the lock as in the retrain flow."""
    return run_flow("foundation", profile, overrides, root, stages, dry_run)


if __name__ == "__main__":
    print(foundation(profile=sys.argv[1] if len(sys.argv) > 1 else "release"))
