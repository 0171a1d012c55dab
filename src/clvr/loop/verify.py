"""The world verifier: the exact detector + the GenEval-format judge.

* `perceive` runs the detector once per canvas; the loop caches the result, so every canvas is detected
  exactly once and both verifications below read the same detections.
* *Passive* verification gates one step: the cells the step names now hold what the step intends, and no
  object that already matched the target layout elsewhere was changed. New objects in other cells do not
  fail the step (its own work is kept); active verification finds them and they are corrected. A multi-op
  step is also checked op by op: `parts[i]` says whether op i's cells hold what it intends (the loop keeps
  the ops that did, see clvr.loop.run).
* *Active* verification checks the whole canvas: the judge on the whole prompt, plus the detected scene
  against the target layout (which objects are missing, which are wrong), from which the controller plans
  corrections.
"""

from __future__ import annotations

import numpy as np

from clvr.loop.roles import Perception, Plan, register_verifier
from clvr.steps import Step, cell_text
from clvr.world.scene import Obj, Scene


def obj_text(o: Obj | None) -> str:
    return "empty" if o is None else f"{o.color} {o.shape}"


def scene_diff(scene: Scene, target: Scene) -> tuple[list[Obj], list[Obj]]:
    """(missing, wrong): target objects not on the canvas at their cell; canvas objects not in the target there."""
    missing = [t for t in target.objects if scene.at(t.cell) != t]
    wrong = [o for o in scene.objects if target.at(o.cell) != o]
    return missing, wrong


class WorldVerifier:
    name = "world"

    def __init__(self, grid: int = 4):
        self.grid = grid

    def perceive(self, image: np.ndarray) -> Perception:
        from clvr.world.detector import detect, to_scene

        dets = detect(image, self.grid)
        return Perception(dets, to_scene(dets, self.grid))

    def passive(self, step: Step, before: Perception, after: Perception, plan: Plan) -> dict:
        if step.op == "generate":  # text-to-image: the image against its own prompt
            ok, reason = self._judge(plan.metadata if step.prompt == plan.prompt else None, step.prompt, after)
            return {"ok": ok, "detail": reason}
        expected = step.apply(before.scene)
        regions = step.regions()
        wrong_at = [c for c in regions if after.scene.at(c) != expected.at(c)]
        right_before = [o for o in before.scene.objects if plan.target.at(o.cell) == o and o.cell not in regions]
        broken = [o for o in right_before if after.scene.at(o.cell) != o]
        new = [o for o in after.scene.objects
               if o.cell not in regions and before.scene.at(o.cell) != o and o not in right_before]
        detail = [f"{cell_text(c)}: wanted {obj_text(expected.at(c))}, found {obj_text(after.scene.at(c))}"
                  for c in wrong_at]
        detail += [f"broke the {obj_text(o)} at {cell_text(o.cell)}" for o in broken]
        detail += [f"new {obj_text(o)} at {cell_text(o.cell)}" for o in new]
        report = {"ok": not wrong_at and not broken, "intended": not wrong_at,
                  "broken": [o.to_dict() for o in broken], "new": [o.to_dict() for o in new],
                  "detail": "; ".join(detail) or "as intended"}
        if step.op == "edit":
            report["parts"] = [all(c not in wrong_at for c in p.regions()) for p in step.parts()]
        return report

    def active(self, perception: Perception, plan: Plan) -> dict:
        ok, reason = self._judge(plan.metadata, plan.prompt, perception)
        missing, wrong = scene_diff(perception.scene, plan.target)
        cells = [(d.row, d.col) for d in perception.detections]
        crowded = sorted({c for c in cells if cells.count(c) > 1})  # debris beside an object: the scene hides it
        return {"ok": ok, "reason": reason, "missing": [o.to_dict() for o in missing],
                "wrong": [o.to_dict() for o in wrong], "crowded": [list(c) for c in crowded]}

    @staticmethod
    def _judge(metadata: dict | None, prompt: str | None, perception: Perception) -> tuple[bool, str]:
        from clvr.judge import judge
        from clvr.world.parser import parse

        ok, reason = judge(metadata if metadata is not None else parse(prompt or ""), perception.detections)
        return bool(ok), str(reason)


@register_verifier("world")
def world_verifier(grid: int = 4, **_: object) -> WorldVerifier:
    return WorldVerifier(grid)
