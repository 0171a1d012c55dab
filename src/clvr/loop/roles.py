"""The loop's roles behind string-keyed registries: Controller and Verifier (the Generator's lives in
clvr.generator). World backends register here; real-scale ones (a VLM controller, a VLM judge) plug in
under their own keys and are chosen by config (`loop.controller`, `loop.verifier`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from clvr.registry import Registry
from clvr.world.scene import Scene

# How the loop runs a prompt (`clvr.loop.run.loop`): "loop" = plan, generate, verify, correct, stop;
# "single" = one text-to-image call, no gate (the single-step baseline); "rewrite" = the open-loop rewrite
# baseline: the controller is asked once, on the blank canvas with a budget of 1 call, and rewrites the prompt
# into one grounded step (a layout of every object); the generator runs once, no gate, no correction.
MODES = ("loop", "single", "rewrite")


@dataclass
class Plan:
    """What a controller makes of a prompt: the constraints, a target layout, and the ordered first steps."""

    prompt: str
    metadata: dict  # GenEval-format constraints
    target: Scene  # a layout satisfying them
    steps: list[dict]  # the planned steps, as the controller would emit them
    mode: str = "loop"  # one of MODES


@dataclass
class Perception:
    """One look at a canvas: what the detector saw, and the same as a scene."""

    detections: list
    scene: Scene


@dataclass
class LoopState:
    """Everything a controller may read before it emits the next step."""

    plan: Plan
    scene: Scene  # detected scene of the current (accepted) canvas
    canvas: np.ndarray | None = None  # the current canvas itself (what a VLM controller would look at)
    history: list[dict] = field(default_factory=list)  # per executed step: {"step", "accepted", "passive"}
    last_step: dict | None = None  # the last executed step (validated), if any
    last_passive: dict | None = None  # its passive report
    active: dict | None = None  # active report of the current canvas
    failures: dict[str, int] = field(default_factory=dict)  # step key -> failed tries so far
    calls: int = 0  # generator calls so far
    max_calls: int = 0  # the call budget (loop.max_calls; 0 = none): a controller may plan by the calls left
    iteration: int = 0  # controller outputs so far (executed or not)
    nfe: int = 0
    rejected: int = 0


class Controller(Protocol):
    name: str

    def plan(self, prompt: str, mode: str = "loop", seed: int = 0) -> Plan:
        """Parse + solve + plan; raise ClvrError on a bad prompt."""
        ...

    def next(self, state: LoopState) -> Any:
        """The next step as an untrusted dict (the loop validates it; anything invalid is rejected)."""
        ...


class Verifier(Protocol):
    name: str

    def perceive(self, image: np.ndarray) -> Perception: ...

    def passive(self, step: Any, before: Perception, after: Perception, plan: Plan) -> dict:
        """Did this one step do what it meant, and break nothing already right? -> {"ok": bool, ...}"""
        ...

    def active(self, perception: Perception, plan: Plan) -> dict:
        """The whole canvas against the whole prompt -> {"ok": bool, "reason": str, ...}"""
        ...


CONTROLLERS: Registry[Controller] = Registry("controller")
VERIFIERS: Registry[Verifier] = Registry("verifier")
register_controller, make_controller = CONTROLLERS.register, CONTROLLERS.make
register_verifier, make_verifier = VERIFIERS.register, VERIFIERS.make
