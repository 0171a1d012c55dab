"""`clvr reproduce TAG`: rerun a tagged pipeline run from scratch and compare its metrics with the tag's.

The tag's commit is checked out into a temporary git worktree (the project's own checkout is untouched),
sharing this project's DVC cache and remote; its data are restored (`dvc pull`), the stages of the tagged run's
flow (`pipeline.flow` in its params.yaml) that its dvc.lock records are rerun from scratch (`dvc repro --force
--no-run-cache`) with that commit's code and params.yaml, and
`dvc metrics diff` compares the tag's committed metrics with the rerun's. Timing metrics
(`pipeline.reproduce_ignore`) are skipped; any other difference beyond `pipeline.reproduce_tol` fails.
"""

from __future__ import annotations

import fnmatch
import shutil
import tempfile
from pathlib import Path
from typing import Callable

from clvr.config import load_config_file
from clvr.errors import ClvrError
from clvr.stages import PARAMS_FILE
from tasks import dvc


def compare(diff: dict, tol: float, ignore: list[str]) -> tuple[list[dict], list[str]]:
    """Rows (file, metric, old, new, diff, ok) for compared metrics, and the names of ignored ones."""
    rows, ignored = [], []
    for path, metrics in sorted(diff.items()):
        for name, d in sorted(metrics.items()):
            if any(fnmatch.fnmatch(name, pat) for pat in ignore):
                ignored.append(f"{path}:{name}")
                continue
            old, new = d.get("old"), d.get("new")
            numbers = isinstance(old, (int, float)) and isinstance(new, (int, float))
            ok = (numbers and abs(new - old) <= tol) or old == new
            rows.append({"file": path, "metric": name, "old": old, "new": new,
                         "diff": new - old if numbers else None, "ok": bool(ok)})
    return rows, ignored


def _share_storage(root: Path, wt: Path) -> None:
    """Point the worktree at this project's DVC cache and default remote (config.local, never committed)."""
    dvc.run(dvc.dvc_cmd("cache", "dir", "--local", str(root / ".dvc" / "cache")), wt)
    default = dvc.run(dvc.dvc_cmd("remote", "default"), root, check=False).stdout.strip()
    for line in dvc.run(dvc.dvc_cmd("remote", "list"), root, check=False).stdout.splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[0] == default:
            dvc.run(dvc.dvc_cmd("remote", "modify", "--local", default, "url", parts[1]), wt)


def _outs_differ(wt: Path, cfg) -> list[str]:
    """Cached outputs (models, data sets) whose DVC md5 differs between the tag's dvc.lock and the rerun's."""
    import yaml

    from clvr.stages import STAGES, resolve

    cached = {resolve(o, cfg) for s in STAGES if s.flow == cfg.pipeline.flow for o in s.outs}
    old = dvc.cached_outs(yaml.safe_load(dvc.git(wt, "show", "HEAD:dvc.lock")) or {})
    new = dvc.cached_outs(dvc.lock(wt))
    return sorted(p for p in cached if old.get(p) != new.get(p))


def tagged_stages(wt: Path) -> list[str]:
    """The stages the tagged run ran: those of its flow (`pipeline.flow` in its params.yaml) that its dvc.lock
    records. dvc.lock holds the stages of both flows once both have run in a checkout; a tag from before the
    flows were split (no `pipeline.flow`) reruns every stage its dvc.lock records."""
    import yaml

    from clvr.stages import STAGES

    locked = list(dvc.lock(wt).get("stages", {}))
    flow = ((yaml.safe_load((wt / PARAMS_FILE).read_text()) or {}).get("pipeline") or {}).get("flow")
    if flow is None:
        return locked
    ours = {s.name for s in STAGES if s.flow == flow}
    return [name for name in locked if name in ours]


def reproduce(root: Path, tag: str, tol: float | None = None, keep: bool = False,
              log: Callable[[str], None] = print) -> dict:
    root = Path(root).resolve()
    if not (root / ".dvc").is_dir() or not dvc.head(root):
        raise ClvrError(f"'{root}' is not a clvr project with git history (no .dvc/ or no commits)")
    if not dvc.tag_exists(root, tag):
        known = dvc.run_tags(root)
        raise ClvrError(f"unknown tag '{tag}' (run tags: {', '.join(known[:5]) if known else 'none yet'})")
    tmp = Path(tempfile.mkdtemp(prefix="clvr-reproduce-"))
    wt = tmp / "worktree"
    dvc.git(root, "worktree", "add", "--detach", str(wt), tag)
    try:
        cfg = load_config_file(wt / PARAMS_FILE)
        tol = cfg.pipeline.reproduce_tol if tol is None else tol
        _share_storage(root, wt)
        log(f"[reproduce] {tag}: flow {cfg.pipeline.flow}, profile {cfg.profile}, worktree {wt}")
        pulled = dvc.run(dvc.dvc_cmd("pull", "--allow-missing"), wt, check=False)
        if pulled.returncode != 0:  # no remote reachable: the shared cache alone
            dvc.run(dvc.dvc_cmd("checkout", "--allow-missing"), wt, check=False)
        stages = tagged_stages(wt)
        rc, out = dvc.stream(dvc.dvc_cmd("repro", "--force", "--no-run-cache", *stages), wt, tmp / "repro.log",
                             on_line=lambda s: log(f"  {s}") if s.startswith(("Running stage", "[")) else None)
        if rc != 0:
            raise RuntimeError(f"rerun of {tag} failed (dvc exit {rc}); log: {tmp / 'repro.log'}\n"
                               + "\n".join(out.splitlines()[-10:]))
        rows, ignored = compare(dvc.metrics_diff(wt, "HEAD"), tol, cfg.pipeline.reproduce_ignore)
        outs_differ = _outs_differ(wt, cfg)
    finally:
        if not keep:
            dvc.git(root, "worktree", "remove", "--force", str(wt), check=False)
            shutil.rmtree(tmp, ignore_errors=True)
    bad = [r for r in rows if not r["ok"]]
    return {"tag": tag, "flow": cfg.pipeline.flow, "profile": cfg.profile, "tol": tol, "compared": len(rows), "different": len(bad),
            "ok": not bad and bool(rows), "rows": rows, "ignored": ignored, "outs_differ": outs_differ,
            "worktree": str(wt) if keep else None}
