"""An OpenAI-compatible VLM controller (vLLM, hosted VLMs): asks a chat-completions endpoint for the NEXT step.

Protocol: POST {base_url}/chat/completions with the prompt, the earlier steps and their verifier reports
as text, the current canvas as a PNG data-URL image part, and `response_format` set to the step's JSON
Schema (`clvr.steps.step_json_schema`, strict), so a server with guided decoding can only emit a step.

The answer is still untrusted. Its body is read up to `max_response_bytes` within `timeout_s`, the envelope
is checked, `choices[0].message.content` is parsed as JSON and validated by `Step.from_dict`: only a `Step`
ever leaves `propose`. Every failure is counted by category in `stats`. Failures a new attempt may fix
(timeouts, dropped connections, HTTP 408/409/429/5xx, unusable answers) are retried up to `max_retries`
times with exponential backoff; other HTTP 4xx (bad key, unknown model) fail at once. When no attempt
gives a step, `VLMControllerError` is raised and the loop can stop or fall back.

The API key is read from the environment variable named by `controller.api_key_env` at each request: it is
never stored on the object, in the config, in `stats`, in logs or in error messages.

The wire machinery (capped reads, deadline, retries with backoff, the envelope, the key, `stats`) is
`ChatClient`, shared by every chat-completions role: the controller here and the VLM judge
(clvr.loop.vlm_verifier). A role only builds its request body and parses `message.content`.
"""

from __future__ import annotations

import base64
import io
import json
import logging
import os
import time
from dataclasses import asdict, dataclass
from typing import Callable, TypeVar

import httpx
import numpy as np
from PIL import Image

from clvr.config import ControllerCfg, EndpointCfg
from clvr.errors import ClvrError
from clvr.steps import OP_ARGS, SchemaError, Step, step_json_schema
from clvr.world.vocab import COLORS, EDIT_OPS, GRID, SHAPES

log = logging.getLogger(__name__)

MAX_BACKOFF_S = 8.0
REPORT_CHARS = 1500  # a verifier report is shown to the model up to this many characters
MESSAGE_CHARS = 300  # quoted server text in a log line or error message


class VLMEndpointError(ClvrError):
    """A chat-completions endpoint gave no usable answer within the retries, refused the request, or is
    misconfigured."""


class VLMControllerError(VLMEndpointError):
    """The endpoint gave no valid step within the retries, refused the request, or is misconfigured."""


T = TypeVar("T")


@dataclass
class VLMStats:
    """What happened on the wire, by category (read it, log it; it never holds the key)."""

    requests: int = 0  # HTTP attempts
    ok: int = 0  # usable answers returned (a valid step, a verdict per constraint)
    retries: int = 0  # attempts after a failed one
    gave_up: int = 0  # requests that raised (VLMControllerError, VLMJudgeError)
    timeout: int = 0  # no full answer within timeout_s
    transport: int = 0  # connection refused / dropped
    http_4xx: int = 0
    http_5xx: int = 0
    oversize: int = 0  # body over max_response_bytes (not read further)
    bad_envelope: int = 0  # body not JSON, or no choices[0].message.content string
    refusal: int = 0  # message.refusal set
    bad_json: int = 0  # content is not JSON
    schema: int = 0  # JSON that is not a valid answer (step, verdicts)

    def rejected(self) -> int:
        """Answers that gave no step (each counted under exactly one category)."""
        return self.requests - self.ok

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


class Reject(Exception):
    """One unusable attempt, under its `stats` category; `retry`: a new attempt may fix it."""

    def __init__(self, category: str, message: str, retry: bool = True):
        super().__init__(message)
        self.category, self.message, self.retry = category, message, retry


def encode_png_data_url(canvas: np.ndarray) -> str:
    """(H, W, 3) uint8 -> "data:image/png;base64,..." (how the chat-completions protocol takes an image)."""
    if not (isinstance(canvas, np.ndarray) and canvas.dtype == np.uint8 and canvas.ndim == 3
            and canvas.shape[2] == 3):
        what = f"{canvas.dtype} {canvas.shape}" if isinstance(canvas, np.ndarray) else type(canvas).__name__
        raise ClvrError(f"canvas must be an (H, W, 3) uint8 array, got {what}")
    buf = io.BytesIO()
    Image.fromarray(canvas, "RGB").save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


NEXT_STEP = "What is the next step?"
REWRITE_STEP = ("This is the only step: the generator runs once on this blank canvas and nothing is checked or "
                "corrected after it. Reply with one step that places every object of the prompt: an edit whose "
                "ops add them all at their cells (one add when there is one object).")


def system_text(grid: int) -> str:
    """The controller's standing instructions, written from the schema and the vocabulary."""
    ops = "\n".join(f"- {op}: " + (", ".join(args) if args else "no arguments") for op, args in OP_ARGS.items())
    ops += (f"\n(edit's ops: a list of {'/'.join(EDIT_OPS)} steps done together in ONE generator call, no two on "
            "one cell)")
    return (
        f"You are the controller of a closed-loop image generator. The canvas is a {grid}x{grid} grid of cells; "
        f"a cell is [row, column], 0-based, row 0 at the top. Shapes: {', '.join(SHAPES)}. "
        f"Colours: {', '.join(COLORS)}.\n"
        "Each turn you see the user's prompt, the current canvas, the steps so far with their verification "
        "reports, and the latest report on the whole canvas. Reply with the ONE next step as a JSON object "
        "that matches the schema, and nothing else. Ops and their arguments:\n"
        f"{ops}\n"
        "`cell` is where the op acts; `to` is a move's destination; `new_color` is a recolour's target. "
        "Use generate only for a first text-to-image step. Reply {\"op\": \"stop\"} when the canvas "
        "satisfies the prompt or nothing more can be done."
    )


def _clip(text: str, n: int) -> str:
    return text if len(text) <= n else text[:n] + f"... [{len(text) - n} more chars]"


def _report_text(report: object) -> str:
    return _clip(json.dumps(report, sort_keys=True, default=str), REPORT_CHARS)


def history_text(history: list[dict], max_items: int) -> str:
    """Earlier steps, one line each: "3. add a red circle at row 1 column 2 -> {report}"."""
    if not history:
        return "(none yet)"
    lines = []
    skipped = max(0, len(history) - max_items)
    if skipped:
        lines.append(f"({skipped} earlier steps omitted)")
    for i, item in enumerate(history[skipped:], start=skipped + 1):
        instruction = item.get("instruction") or json.dumps(item.get("step"), default=str)
        report = item.get("report", item.get("passive"))
        kept = "" if "accepted" not in item else (" [kept]" if item["accepted"] else " [undone]")
        lines.append(f"{i}. {_clip(str(instruction), 300)}{kept} -> {_report_text(report)}")
    return "\n".join(lines)


class ChatClient:
    """The chat-completions wire protocol for one role (section `section` of the config): `ask(body, parse)`
    posts the body, reads the answer under the size cap and the deadline, checks the envelope and hands
    `message.content` to `parse`, which returns the role's value or raises `Reject`; retries what a retry may
    fix; raises `error` when no attempt gives a value. One `httpx.Client` (connection reuse) per object."""

    def __init__(self, cfg: EndpointCfg, section: str, error: type[VLMEndpointError] = VLMEndpointError):
        cfg.check(section)  # the rules live in clvr.config (a config section may be built in code)
        self.cfg, self.section, self.error = cfg, section, error
        self.url = cfg.base_url.rstrip("/") + "/chat/completions"
        self.stats = VLMStats()
        self._api_key()  # a missing key fails here, before any work (the value is not kept)
        self._client = httpx.Client(timeout=httpx.Timeout(cfg.timeout_s), follow_redirects=False)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(url={self.url!r}, model={self.cfg.model!r}, "
                f"api_key_env={self.cfg.api_key_env!r})")

    def close(self) -> None:
        self._client.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def ask(self, body: dict, parse: Callable[[str], T], what: str) -> T:
        """POST `body`; the first attempt whose content `parse` accepts wins. `what` names the value in the
        give-up error ("step", "verdicts")."""
        data = json.dumps(body).encode()
        last, tried = "", 0
        attempts = self.cfg.max_retries + 1
        for attempt in range(attempts):
            tried = attempt + 1
            if attempt:
                self.stats.retries += 1
                time.sleep(min(self.cfg.backoff_s * 2 ** (attempt - 1), MAX_BACKOFF_S))
            self.stats.requests += 1
            try:
                value = parse(self._attempt(data))
            except Reject as r:
                setattr(self.stats, r.category, getattr(self.stats, r.category) + 1)
                last = f"{r.category}: {r.message}"
                log.warning("%s %s: attempt %d/%d rejected (%s)", self.section, self.cfg.model, tried, attempts, last)
                if not r.retry:
                    break
                continue
            self.stats.ok += 1
            return value
        self.stats.gave_up += 1
        raise self.error(f"{self.section} {self.cfg.model!r} at {self.url}: no valid {what} after "
                         f"{tried} attempt(s); last {last}")

    # ---- one attempt -------------------------------------------------------------------------------------
    def _attempt(self, body: bytes) -> str:
        deadline = time.monotonic() + self.cfg.timeout_s
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        key = self._api_key()
        if key:
            headers["Authorization"] = f"Bearer {key}"
        try:
            with self._client.stream("POST", self.url, content=body, headers=headers) as resp:
                data = self._read_capped(resp, deadline)
                status = resp.status_code
        except httpx.TimeoutException:
            raise Reject("timeout", f"no answer within {self.cfg.timeout_s} s") from None
        except httpx.TransportError as e:
            raise Reject("transport", type(e).__name__ + ": " + self.quote(str(e))) from None
        if status >= 400:
            category = "http_5xx" if status >= 500 else "http_4xx"
            retry = status >= 500 or status in (408, 409, 429)
            raise Reject(category, f"HTTP {status}: {self.quote(data.decode('utf-8', 'replace'))}", retry)
        return self._content(data)

    def _read_capped(self, resp: httpx.Response, deadline: float) -> bytes:
        """The body, or a rejection when it is larger than max_response_bytes or arrives after the deadline
        (httpx's timeout bounds each read; the deadline bounds the whole answer, e.g. one trickled byte at a time)."""
        cap, key = self.cfg.max_response_bytes, f"{self.section}.max_response_bytes"
        declared = resp.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > cap:
            raise Reject("oversize", f"answer of {declared} bytes (max {cap}, {key})")
        chunks, size = [], 0
        for chunk in resp.iter_bytes():
            size += len(chunk)
            if size > cap:
                raise Reject("oversize", f"answer over {cap} bytes ({key})")
            if time.monotonic() > deadline:
                raise Reject("timeout", f"answer not complete within {self.cfg.timeout_s} s")
            chunks.append(chunk)
        return b"".join(chunks)

    def _content(self, data: bytes) -> str:
        """Envelope -> choices[0].message.content, each failure rejected under its own category."""
        try:
            envelope = json.loads(data)
        except (ValueError, RecursionError):
            raise Reject("bad_envelope", f"body is not JSON: {self.quote(data.decode('utf-8', 'replace'))}") from None
        choices = envelope.get("choices") if isinstance(envelope, dict) else None
        message = choices[0].get("message") if isinstance(choices, list) and choices and isinstance(choices[0], dict) else None
        if not isinstance(message, dict):
            raise Reject("bad_envelope", f"no choices[0].message in {self.quote(data.decode('utf-8', 'replace'))}")
        if message.get("refusal"):
            raise Reject("refusal", self.quote(str(message["refusal"])))
        content = message.get("content")
        if not isinstance(content, str):
            raise Reject("bad_envelope", f"choices[0].message.content is {type(content).__name__}, not a string")
        return content

    def json_content(self, content: str) -> object:
        """`content` parsed as JSON, or a "bad_json" rejection."""
        try:
            return json.loads(content)
        except (ValueError, RecursionError):
            raise Reject("bad_json", f"content is not JSON: {self.quote(content)}") from None

    # ---- secrets -----------------------------------------------------------------------------------------
    def _api_key(self) -> str:
        name = self.cfg.api_key_env
        if not name:
            return ""
        key = os.environ.get(name, "")
        if not key:
            raise self.error(f"environment variable {name} is not set: it holds the {self.section}'s API key "
                             f"({self.section}.api_key_env; set it to '' for an endpoint without a key)")
        return key

    def quote(self, text: str) -> str:
        """Server text fit for a log line or an error: clipped, one line, the API key blanked (a hostile
        server may echo our headers back)."""
        key = os.environ.get(self.cfg.api_key_env, "") if self.cfg.api_key_env else ""
        if key:
            text = text.replace(key, "[api key]")
        return repr(_clip(text, MESSAGE_CHARS))


def user_message(text: str, canvas: np.ndarray) -> dict:
    """A user turn of text plus the canvas as a PNG data-URL image part."""
    return {"role": "user", "content": [{"type": "text", "text": text},
                                        {"type": "image_url", "image_url": {"url": encode_png_data_url(canvas)}}]}


def strict_schema(name: str, schema: dict) -> dict:
    """`response_format` for a strict JSON Schema (guided decoding on servers that support it)."""
    return {"type": "json_schema", "json_schema": {"name": name, "strict": True, "schema": schema}}


class OpenAIController(ChatClient):
    """propose(prompt, canvas, history, report) -> the next `Step`, from an OpenAI-compatible endpoint."""

    name = "openai"

    def __init__(self, cfg: ControllerCfg, grid: int = GRID):
        super().__init__(cfg, "controller", VLMControllerError)
        self.grid = grid
        self.schema = step_json_schema(grid)

    def __repr__(self) -> str:
        return super().__repr__()[:-1] + f", grid={self.grid})"

    def __enter__(self) -> "OpenAIController":
        return self

    def request_body(self, prompt: str, canvas: np.ndarray, history: list[dict], report: dict | None,
                     ask: str = NEXT_STEP) -> dict:
        """The chat-completions request (no credentials in it); `ask` is its last sentence."""
        text = (f"Prompt: {json.dumps(prompt)}\n"
                f"Steps so far:\n{history_text(history, self.cfg.max_history)}\n"
                f"Latest report on the whole canvas: {_report_text(report)}\n"
                f"The current canvas is attached. {ask}")
        return {
            "model": self.cfg.model,
            "messages": [{"role": "system", "content": system_text(self.grid)}, user_message(text, canvas)],
            "response_format": strict_schema("step", self.schema),
            "max_tokens": self.cfg.max_tokens,
            "temperature": self.cfg.temperature,
        }

    def propose(self, prompt: str, canvas: np.ndarray, history: list[dict], report: dict | None,
                ask: str = NEXT_STEP) -> Step:
        """Ask for the next step; retry what a retry may fix; raise VLMControllerError when none is valid."""
        return self.ask(self.request_body(prompt, canvas, history, report, ask), self._step, "step")

    def _step(self, content: str) -> Step:
        raw = self.json_content(content)
        try:
            return Step.from_dict(raw, self.grid)
        except (SchemaError, TypeError, ValueError) as e:  # TypeError: e.g. an unhashable value in a field
            raise Reject("schema", self.quote(str(e))) from None


def openai_controller(cfg: ControllerCfg, grid: int = GRID) -> OpenAIController:
    """Controller-backend factory (registry key "openai"): the endpoint settings come from `cfg.controller`."""
    return OpenAIController(cfg, grid)
