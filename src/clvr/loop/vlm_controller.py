"""The "openai" controller backend: a VLM behind an OpenAI-compatible endpoint (clvr.vlm) proposes every next step.

Planning stays symbolic: the world controller's parser and solver turn the prompt into constraints and a target
layout (what the verifier and the judge check against). Each next step is the VLM's: it sees the prompt, the
current canvas as an image, the steps so far with their passive reports, and the latest active report
(`OpenAIController.propose`). The loop validates its answer like any controller output (schema + state), so it
can never run an op outside the allowed set or past a budget. Single-step mode (the baseline) needs no VLM; in
rewrite mode (the open-loop baseline) the VLM is asked once, on the blank canvas, for one step that places every
object (`REWRITE_STEP`).

When the endpoint gives no valid step within its bounded retries (`VLMControllerError`), the trajectory ends.
The loop has no error channel from a controller, so `next` returns a give-up record instead of a step: the loop
rejects it (a stop takes no arguments) and records it, its raw text carrying the error; the following call
returns STOP. `controller_error(trace)` reads the error back (the data engine marks such trajectories
`controller_error`).
"""

from __future__ import annotations

import ast

from clvr.config import ControllerCfg
from clvr.loop.controller import STOP, ModelController
from clvr.loop.roles import LoopState, register_controller
from clvr.vlm import NEXT_STEP, REWRITE_STEP, OpenAIController, VLMControllerError

GAVE_UP = "controller_error"  # key of the give-up record


class VLMController(ModelController):
    name = "openai"

    def __init__(self, cfg: ControllerCfg, grid: int = 4, retries_per_step: int = 2, max_prompt_chars: int = 500):
        super().__init__(grid, retries_per_step, max_prompt_chars)
        self.client = OpenAIController(cfg, grid)

    @property
    def stats(self):
        """Wire statistics of the endpoint (clvr.vlm.VLMStats): requests, ok, retries, rejects by category."""
        return self.client.stats

    def propose(self, state: LoopState) -> tuple[dict, bool]:
        rewrite = state.plan.mode == "rewrite"
        if rewrite and state.calls:
            return dict(STOP), False
        try:
            step = self.client.propose(state.plan.prompt, state.canvas, state.history, state.active,
                                       REWRITE_STEP if rewrite else NEXT_STEP)
        except VLMControllerError as e:
            return {"op": "stop", GAVE_UP: str(e)}, True
        return step.to_dict(), False

    def close(self) -> None:
        self.client.close()


def controller_error(trace) -> str | None:
    """The endpoint error that ended a trajectory (from its give-up record), or None."""
    for s in trace.steps:
        if s.kind == "rejected" and GAVE_UP in s.raw:
            try:
                raw = ast.literal_eval(s.raw)
            except (ValueError, SyntaxError):  # clipped at 500 characters
                return s.raw
            if isinstance(raw, dict) and GAVE_UP in raw:
                return str(raw[GAVE_UP])
    return None


@register_controller("openai")
def openai_loop_controller(grid: int = 4, retries_per_step: int = 2, max_prompt_chars: int = 500,
                           controller_cfg: ControllerCfg | None = None, cfg=None) -> VLMController:
    """Registry factory; the endpoint settings are `controller_cfg`, else the config's `controller` section."""
    controller_cfg = controller_cfg or (cfg.controller if cfg is not None else ControllerCfg())
    return VLMController(controller_cfg, grid, retries_per_step, max_prompt_chars)
