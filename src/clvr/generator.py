"""The generator role: one call = one step (text-to-image, or an edit of the current canvas).

Backends (the world's tiny Flux2 model, FLUX.2 [klein] at real scale, scripted fakes in tests)
implement `Generator` and register under a string key with `register_generator`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from clvr.registry import Registry
from clvr.steps import Step
from clvr.world.scene import Cell


@dataclass
class GenRequest:
    instruction: str  # this step's text (prompt for text-to-image, edit instruction otherwise)
    trace: list[str] = field(default_factory=list)  # earlier steps' instructions (the reasoning trace)
    reference: np.ndarray | None = None  # current canvas (H, W, 3) uint8; None = text-to-image
    regions: tuple[Cell, ...] = ()  # grounded target cells, when the controller knows them
    seed: int = 0
    step: Step | None = None  # the step itself, when the caller has one: a cell-slot model reads its ops per cell


@dataclass
class GenResult:
    image: np.ndarray  # (H, W, 3) uint8
    nfe: int  # network evaluations spent (CFG counts 2 per step)
    seconds: float


class Generator(Protocol):
    name: str

    def generate(self, req: GenRequest) -> GenResult: ...


GENERATORS: Registry[Generator] = Registry("generator")
register_generator = GENERATORS.register
make_generator = GENERATORS.make
