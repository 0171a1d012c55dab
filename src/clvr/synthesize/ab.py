"""The A/B judge: how one image does on its prompt (constraints satisfied, artefact level) and the verdict of the
loop's final canvas against the single-step baseline."""

from __future__ import annotations

import numpy as np

from clvr.errors import ClvrError


def explained(dets: list, grid: int, cell: int, image: np.ndarray) -> np.ndarray:
    """(H, W, 3) int16: the picture the detections explain, for a varied world, whose looks (size, offset,
    turn) the detector does not report. Background everywhere, except inside each detection's box, where a
    pixel is whichever of the detection's colour and the background it is nearer to. So a clean object of any
    look costs nothing, and debris outside the boxes and off colours inside them do."""
    from clvr.world.vocab import BACKGROUND, COLORS

    img = image.astype(np.int16)
    clean = np.empty_like(img)
    clean[:] = np.asarray(BACKGROUND, np.int16)
    for d in dets:
        x0, y0, x1, y1 = d.bbox
        patch = img[y0:y1, x0:x1]
        fg, bg = np.asarray(COLORS[d.color], np.int16), np.asarray(BACKGROUND, np.int16)
        near_fg = np.abs(patch - fg).sum(-1) < np.abs(patch - bg).sum(-1)
        clean[y0:y1, x0:x1] = np.where(near_fg[..., None], fg, bg)
    return clean


def image_score(md: dict, image: np.ndarray, grid: int, cell: int, appearance=None) -> dict:
    """How one image does on its prompt: the judge's verdict, its failures (clvr.judge.Failure, one per broken
    clause) and their text, constraints satisfied (the prompt's include + exclude clauses less the broken ones)
    and the artefact level: mean |pixel - clean picture of the detected scene| (0..255), i.e. whatever the
    detector does not explain (smudges, debris, off colours). The clean picture is the render of the detected
    scene in the fixed world, and `explained` (objects of any look) when `appearance` is varied."""
    from clvr.judge import failures, reason_text, unsupported
    from clvr.world.detector import WorldDetector, to_scene
    from clvr.world.render import render

    detector = WorldDetector(grid)
    why = unsupported(md, detector)
    if why:
        raise ClvrError(f"unsupported prompt '{md.get('prompt', '')}': {why}")
    dets = detector(image)
    broken = failures(md, dets)
    total = len(md.get("include", [])) + len(md.get("exclude", []))
    if appearance is not None and appearance.varied:
        clean = explained(dets, grid, cell, image)
    else:
        clean = render(to_scene(dets, grid), cell).astype(np.int16)
    artefact = float(np.abs(image.astype(np.int16) - clean).mean())
    return {"passed": not broken, "reason": reason_text(broken), "failures": [f.to_dict() for f in broken],
            "satisfied": total - len(broken), "constraints": total, "artefact": round(artefact, 3)}


def ab_verdict(loop: dict, base: dict, margin: float) -> dict:
    """The loop's final canvas (A) against the single-step baseline (B), same prompt and seed:
    1. more constraints satisfied wins;
    2. equal: the lower artefact level wins if it is lower by more than `margin`; else a tie."""
    n = loop["constraints"]
    if loop["satisfied"] != base["satisfied"]:
        verdict = "win" if loop["satisfied"] > base["satisfied"] else "loss"
        reason = f"constraints satisfied: loop {loop['satisfied']}/{n}, single step {base['satisfied']}/{n}"
        if base.get("reason"):
            reason += f" (single step: {base['reason']})"
    else:
        diff = base["artefact"] - loop["artefact"]
        verdict = "win" if diff > margin else "loss" if -diff > margin else "tie"
        reason = (f"both satisfy {loop['satisfied']}/{n}; artefacts loop {loop['artefact']:.2f}, single step "
                  f"{base['artefact']:.2f} (margin {margin})")
    keys = ("passed", "satisfied", "constraints", "artefact")
    return {"verdict": verdict, "reason": reason, "loop": {k: loop[k] for k in keys},
            "baseline": {k: base[k] for k in keys}}
