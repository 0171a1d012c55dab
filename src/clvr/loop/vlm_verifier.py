"""The "openai" verifier: a VLM judge behind an OpenAI-compatible endpoint gives one verdict per GenEval
constraint of the prompt.

Request: POST {judge.base_url}/chat/completions with a system text (the judging task), a user turn listing the
plan's constraints one per line, keyed c1..cN ("c1: 2 red circles", "c2: 1 blue square above the red circle",
"c3: no green triangles": clvr.judge's wording, include clauses then exclude clauses), the canvas as a PNG
data-URL image part, and `response_format` set to a strict JSON Schema: an object with one boolean per key,
every key required, nothing else. The wire (capped reads, deadline, retries with backoff, the API key from the
environment only, `stats`) is clvr.vlm.ChatClient, the controller's own machinery.

Active verification (the whole canvas against the whole prompt): ok = every verdict true; reason = the failing
constraints, each as the judge words a failure ("expected 2 red circles; expected no green triangles"). The
report also carries `verdicts` and the perception verifier's scene diff (`missing`, `wrong`, `crowded`), which is
what a controller plans its corrections from. When the endpoint gives no verdicts within its retries, the canvas
is reported not ok with reason "judge error: ..." (also under `judge_error`): no pass is claimed without a
verdict; the controller still corrects from the detected scene, and the loop's budgets end it.

Perception and passive verification are the `judge.perception` verifier's (default "world": the detector). Why:
a step is gated on the cells it names (did this cell get this object, did nothing already right break), a
geometric question a detector answers exactly per cell, and the controller needs the detected scene anyway. The
VLM answers what only it can, the whole image against the prompt, once per accepted canvas; a VLM call per step
as well would double the endpoint's requests for a check the detector already makes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np

from clvr.config import Config, JudgeCfg
from clvr.judge import constraint_texts
from clvr.loop.roles import Perception, Plan, Verifier, make_verifier, register_verifier
from clvr.steps import Step
from clvr.vlm import ChatClient, Reject, VLMEndpointError, strict_schema, user_message


class VLMJudgeError(VLMEndpointError):
    """The judge endpoint gave no verdicts within the retries, refused the request, or is misconfigured."""


SYSTEM = ("You are the verifier of an image generator. You check one image against constraints taken from the "
          "user's prompt, one per line, each with a key (c1, c2, ...). A count means at least that many, unless "
          "another constraint limits it ('no ...', 'fewer than ...'). A position is as seen in the image (above = "
          "higher in the image, left of = further left). For every key answer true when the image satisfies "
          "that constraint, else false. Reply with one JSON object mapping every key to true or false, and "
          "nothing else.")


def keys(n: int) -> list[str]:
    return [f"c{i + 1}" for i in range(n)]


def verdict_schema(n: int) -> dict:
    """Strict JSON Schema of the answer: {"c1": bool, ..., "cN": bool}, all required, nothing else."""
    return {"type": "object", "properties": {k: {"type": "boolean"} for k in keys(n)}, "required": keys(n),
            "additionalProperties": False}


@dataclass
class SeenImage(Perception):
    """A perception that keeps the image itself (the VLM judge looks at it; active gets only the perception)."""

    image: np.ndarray | None = None


class JudgeClient(ChatClient):
    """verdicts(prompt, constraints, canvas) -> one bool per constraint, from an OpenAI-compatible endpoint."""

    def __init__(self, cfg: JudgeCfg):
        super().__init__(cfg, "judge", VLMJudgeError)

    def request_body(self, prompt: str, constraints: list[str], canvas: np.ndarray) -> dict:
        lines = "\n".join(f"{k}: {c}" for k, c in zip(keys(len(constraints)), constraints))
        text = f"Prompt: {json.dumps(prompt)}\nConstraints:\n{lines}\nThe image is attached."
        return {
            "model": self.cfg.model,
            "messages": [{"role": "system", "content": SYSTEM}, user_message(text, canvas)],
            "response_format": strict_schema("verdicts", verdict_schema(len(constraints))),
            "max_tokens": self.cfg.max_tokens,
            "temperature": self.cfg.temperature,
        }

    def verdicts(self, prompt: str, constraints: list[str], canvas: np.ndarray) -> list[bool]:
        """One verdict per constraint; VLMJudgeError when no attempt gives them all."""
        n = len(constraints)
        return self.ask(self.request_body(prompt, constraints, canvas), lambda c: self._verdicts(c, n), "verdicts")

    def _verdicts(self, content: str, n: int) -> list[bool]:
        raw = self.json_content(content)
        want = keys(n)
        if not isinstance(raw, dict) or set(raw) != set(want):
            got = sorted(raw) if isinstance(raw, dict) else type(raw).__name__
            raise Reject("schema", f"expected an object with keys {want}, got {self.quote(str(got))}")
        bad = [k for k in want if not isinstance(raw[k], bool)]
        if bad:
            raise Reject("schema", f"verdict {bad[0]} is {self.quote(repr(raw[bad[0]]))}, not true/false")
        return [raw[k] for k in want]


class VLMVerifier:
    """Verifier role: perception and passive checks by `perception` (a detector-based verifier), active
    verification by the VLM judge (see the module docstring)."""

    name = "openai"

    def __init__(self, cfg: JudgeCfg, perception: Verifier):
        self.client = JudgeClient(cfg)
        self.base = perception

    @property
    def stats(self):
        """Wire statistics of the endpoint (clvr.vlm.VLMStats)."""
        return self.client.stats

    def close(self) -> None:
        self.client.close()

    def __enter__(self) -> "VLMVerifier":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def perceive(self, image: np.ndarray) -> SeenImage:
        p = self.base.perceive(image)
        return SeenImage(p.detections, p.scene, image)

    def passive(self, step: Step, before: Perception, after: Perception, plan: Plan) -> dict:
        return self.base.passive(step, before, after, plan)

    def active(self, perception: Perception, plan: Plan) -> dict:
        report = self.base.active(perception, plan)  # the scene diff the controller corrects from
        image = getattr(perception, "image", None)
        if image is None:
            raise TypeError("VLMVerifier.active needs a perception from its own perceive (it keeps the image)")
        constraints = constraint_texts(plan.metadata)
        try:
            verdicts = self.client.verdicts(plan.prompt, constraints, image) if constraints else []
        except VLMJudgeError as e:
            report.update(ok=False, reason=f"judge error: {e}", judge_error=str(e), verdicts=None)
            return report
        failing = [c for c, ok in zip(constraints, verdicts) if not ok]
        report.update(ok=not failing, reason="; ".join(f"expected {c}" for c in failing), verdicts=verdicts)
        return report


@register_verifier("openai")
def openai_verifier(grid: int = 4, cfg: Config | None = None, **_: object) -> VLMVerifier:
    """Registry factory: the endpoint is the config's `judge` section; perception is `judge.perception`'s
    verifier, built with the same grid and config."""
    judge_cfg = cfg.judge if cfg is not None else JudgeCfg()
    return VLMVerifier(judge_cfg, make_verifier(judge_cfg.perception, grid=grid, cfg=cfg))
