"""Ground-truth suites (`clvr world render-suite`, the main job) and `clvr world bench`.

Suites: grammar prompts over the tiers plus the six GenEval suites, rendered from the solver's layouts in
GenEval's folder layout; by construction the judge scores them 1.0.

`clvr world bench`: is the world's verifier exact, and fast?

For scenes spread over the 10 tiers (a grammar prompt, the solver's layout as ground truth):
* detector_accuracy: detect(render(scene)) equals the scene's ground-truth detections (shape, colour, cell,
  box, area) -- over the ground truth and every corrupted copy;
* judge_agreement: the judge's verdict on the detected image vs the known answer, for the ground truth
  (known: correct) and for three corruptions of it (one object recoloured, moved, removed). The known
  answer of a corrupted scene comes from `expected_verdict`, which applies the prompt's constraints to
  the scene's objects symbolically, by cells, without boxes, pixels or the detector; corruptions whose
  relation outcome is not decided by cells alone (outside the 45-degree cone but in the right direction)
  are redrawn;
* ms_per_image: render + detect, wall time per image (numpy, one thread).

With a varied `appearance` (config `world.appearance`), every ground-truth object gets a random look
(size, offset, orientation, anti-aliasing) and corrupted copies keep the looks of the objects they keep.
"""

from __future__ import annotations

import time

import numpy as np

from clvr.world.scene import Obj, Scene
from clvr.world.solver import strict_relation
from clvr.world.vocab import CELL, COLORS, GRID

CORRUPTIONS = ("recolor", "move", "remove")


def suite_metadata(n_per_tier: int, geneval_n: int, seed: int = 0, grid: int = GRID) -> list[dict]:
    """`n_per_tier` grammar prompts per tier, then `geneval_n` prompts per GenEval tag (seeded)."""
    from clvr.world.grammar import GENEVAL_TAGS, TIERS, geneval_suite, sample_prompt

    out = []
    for tier in TIERS:
        rng = np.random.default_rng([seed, tier])
        out += [sample_prompt(tier, rng, grid) for _ in range(n_per_tier)]
    for k, tag in enumerate(GENEVAL_TAGS):
        out += geneval_suite(tag, geneval_n, np.random.default_rng([seed, 100 + k]))
    return out


def render_suite(metadata: list[dict], out, samples: int = 1, seed: int = 0, grid: int = GRID,
                 cell: int = CELL, where: str = "metadata", owner: str = "world render-suite",
                 legacy=None, appearance=None) -> bool:
    """Ground truth for every prompt in GenEval's layout: `samples` solver layouts per prompt (with random looks
    when `appearance` is varied), rendered, written as one folder that replaces `out` whole (see
    write_geneval_folder; `out` is checked before any work). A prompt the world cannot draw raises ClvrError
    naming its line. True when an earlier suite was replaced."""
    from clvr.io import claim_dir
    from clvr.judge import write_geneval_folder
    from clvr.world.render import render
    from clvr.world.solver import Unsatisfiable, solve

    claim_dir(out, owner, legacy)

    images = []
    for i, md in enumerate(metadata):
        try:
            rngs = [np.random.default_rng([seed, i, k]) for k in range(samples)]
            scenes = [solve(md, grid, rng=r, appearance=appearance) for r in rngs]
        except Unsatisfiable as e:
            raise Unsatisfiable(f"{where} line {i + 1} ('{md.get('prompt', '')}'): {e}") from None
        images.append([render(s, cell) for s in scenes])
    return write_geneval_folder(out, metadata, images, owner, legacy)


def cell_relation(a: Obj, b: Obj, rel: str, varied: bool = False) -> bool | None:
    """True inside the direction's cone, False when not strictly in that direction, None in between. With
    varied looks the cone's diagonal edge is None too: offsets inside the cells decide it there."""
    if strict_relation(a.cell, b.cell, rel):
        diagonal = abs(a.row - b.row) == abs(a.col - b.col)
        return None if varied and diagonal else True
    dr, dc = a.row - b.row, a.col - b.col
    ahead = {"above": dr < 0, "below": dr > 0, "left of": dc < 0, "right of": dc > 0}[rel]
    return None if ahead else False


def expected_verdict(metadata: dict, scene: Scene, varied: bool = False) -> bool | None:
    """The prompt's verdict on a scene from its objects alone (None if a relation is undecided by cells)."""
    objs = sorted(scene.objects, key=lambda o: o.cell)

    def pool(c: dict) -> list[Obj]:
        return [o for o in objs if o.shape == c["class"] and (not c.get("color") or o.color == c["color"])]

    verdict: bool | None = True
    groups: list[list[Obj] | None] = []
    for c in metadata.get("include", []):
        found = pool(c)[: int(c["count"])]
        ok: bool | None = len(found) >= int(c["count"])
        if ok and "position" in c:
            rel, j = c["position"]
            target = groups[j]
            if target is None:
                ok = False
            else:
                outcomes = [cell_relation(a, b, rel, varied) for a in found for b in target]
                ok = False if False in outcomes else (None if None in outcomes else True)
        if ok is False:
            verdict = False
        elif ok is None and verdict is not False:
            verdict = None
        groups.append(found if ok is not False else None)  # undecided: its objects are still there
    for e in metadata.get("exclude", []):
        if len(pool(e)) >= int(e["count"]):
            return False
    return verdict


def corrupt(scene: Scene, kind: str, rng: np.random.Generator) -> Scene:
    """One object recoloured, moved to a free cell, or removed."""
    o = scene.objects[int(rng.integers(len(scene.objects)))]
    if kind == "recolor":
        return scene.recolor(o.cell, str(rng.choice([c for c in COLORS if c != o.color])))
    if kind == "move":
        free = scene.free_cells()
        return scene.move(o.cell, free[int(rng.integers(len(free)))]) if free else scene.remove(o.cell)
    return scene.remove(o.cell)


def run_bench(n: int = 1000, seed: int = 0, grid: int = GRID, cell: int = CELL, appearance=None) -> dict:
    from clvr.judge import judge
    from clvr.world.detector import detect, scene_detections
    from clvr.world.grammar import TIERS, sample_prompt
    from clvr.world.render import render
    from clvr.world.solver import solve

    rng = np.random.default_rng(seed)
    varied = appearance is not None and appearance.varied
    images = exact = checks = agree = corrupted_fail = corrupted = 0
    seconds = 0.0
    disagreements: list[str] = []
    for i in range(n):
        tier = TIERS[i % len(TIERS)]
        md = sample_prompt(tier, rng, grid)
        truth = solve(md, grid, rng=rng, appearance=appearance)
        cases = [("truth", truth, True)]
        for kind in CORRUPTIONS:
            for _ in range(20):  # redraw corruptions whose answer cells alone do not decide
                bad = corrupt(truth, kind, rng)
                known = expected_verdict(md, bad, varied)
                if known is not None:
                    cases.append((kind, bad, known))
                    corrupted += 1
                    corrupted_fail += not known
                    break
        for kind, scene, known in cases:
            t = time.perf_counter()
            dets = detect(render(scene, cell), grid)
            seconds += time.perf_counter() - t
            images += 1
            exact += dets == scene_detections(scene, cell)
            ok, reason = judge(md, dets)
            checks += 1
            agree += ok == known
            if ok != known and len(disagreements) < 5:
                disagreements.append(f"tier {tier} {kind}: '{md['prompt']}' judge={ok} known={known} ({reason})")
    return {"scenes": n, "images": images, "detector_accuracy": round(exact / images, 4),
            "judge_agreement": round(agree / checks, 4), "judge_checks": checks,
            "corrupted_failing": round(corrupted_fail / max(1, corrupted), 4),
            "ms_per_image": round(1000 * seconds / images, 3),
            "appearance": "varied" if varied else "fixed",
            "disagreements": disagreements}


def tier_figure(path, seed: int = 0, grid: int = GRID, cell: int = CELL, appearance=None) -> None:
    """A PNG of one seeded grammar prompt per tier, rendered from the solver's layout (with random looks
    when `appearance` is varied), with its prompt."""
    import textwrap

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from clvr.io import save_figure
    from clvr.world.grammar import TIERS, sample_prompt
    from clvr.world.render import render
    from clvr.world.solver import solve

    fig, axes = plt.subplots(2, 5, figsize=(15, 8.2))
    for ax, tier in zip(axes.flat, TIERS):
        rng = np.random.default_rng([seed, tier])
        md = sample_prompt(tier, rng, grid)
        ax.imshow(render(solve(md, grid, rng=rng, appearance=appearance), cell), interpolation="nearest")
        ax.set_xticks([]), ax.set_yticks([])
        ax.set_title(f"tier {tier} (C_task {md['c_task']:g})", fontsize=11)
        ax.set_xlabel("\n".join(textwrap.wrap(md["prompt"], 38)), fontsize=8)
    fig.tight_layout()
    save_figure(fig, path, dpi=80)
