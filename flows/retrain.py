"""The `retrain` flow, CLVR's method: it starts from the released weights (`weights.base`, `weights.distilled`: the
shipped src/clvr/weights or registry-pinned folders), as CLVR starts from FLUX.2 [klein], and runs the registry's
retrain stages synthesize -> controller_sft -> sft -> evaluate, each through DVC, tracked in MLflow (flows/common.py).

    clvr pipeline run --profile ci              # locally, on Prefect's ephemeral server (`make run`: --profile cpu)
    clvr pipeline serve --cron "0 3 * * 0"      # a cron deployment served from this machine
    prefect deploy --all                        # infra/prefect.yaml: process and Kubernetes-GPU work pools

The released weights themselves come from the `foundation` flow (flows/foundation.py).
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `prefect deploy` entrypoints and `python flows/retrain.py` import tasks/ from here
    sys.path.insert(0, str(ROOT))

from prefect import flow  # noqa: E402

from flows.common import run_flow  # noqa: E402


@flow(name="retrain")
def retrain(profile: str = "cpu", overrides: list[str] | None = None, root: str = ".",
            stages: list[str] | None = None, dry_run: bool = False) -> dict:
    """Run the retrain flow for a config profile. `stages` limits it to some of its stages (in registry order).
    One run at a time per project (tasks/lock.py). `dry_run` checks the project and the config and takes the
    lock, then returns the stages it would run without running them (to try a schedule cheaply)."""
    return run_flow("retrain", profile, overrides, root, stages, dry_run)


def local_deployment(profile: str, root: str, name: str = "retrain-local", cron: str | None = None,
                     interval: float | None = None, overrides: list[str] | None = None, dry_run: bool = False):
    """The retrain flow as a scheduled deployment served from this machine (`clvr pipeline serve`).

    Overlap: at most one run of the deployment at a time (`concurrency_limit` 1, CANCEL_NEW: a run that comes
    due while another is running is cancelled, not queued, so a long run never builds a backlog). A run
    started any other way is kept apart by the project's pipeline lock (tasks/lock.py)."""
    from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy

    params = {"profile": profile, "root": root, "overrides": list(overrides or []), "dry_run": dry_run}
    what = f"profile {profile}" + (f", {' '.join(overrides)}" if overrides else "") + (", dry run" if dry_run else "")
    return retrain.to_deployment(
        name=name, cron=cron, interval=interval, parameters=params, paused=False,
        concurrency_limit=ConcurrencyLimitConfig(limit=1, collision_strategy=ConcurrencyLimitStrategy.CANCEL_NEW),
        description=f"clvr retrain pipeline ({what}) in {root}")


if __name__ == "__main__":
    print(retrain(profile=sys.argv[1] if len(sys.argv) > 1 else "cpu"))
