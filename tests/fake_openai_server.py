"""A fake OpenAI-compatible chat-completions server for tests: a real HTTP server on 127.0.0.1 (ephemeral port)
in a thread. Each POST takes the next scripted `Answer` (good, malformed, hostile, slow, error, dropped) and
is recorded (path, headers, JSON body) so tests can check what the client sent. With no scripted answer left, a
`responder` (if given) computes the answer from the request's JSON body: e.g. `world_judge`, a VLM judge that
looks at the attached image (the world detector) and answers every constraint key truthfully.
"""

from __future__ import annotations

import json
import threading
import base64
import io
import re
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable


@dataclass
class Answer:
    body: bytes = b""
    status: int = 200
    delay: float = 0.0  # seconds before anything is sent
    trickle: float = 0.0  # seconds between body bytes (headers go out at once)
    content_length: bool = True  # False: no Content-Length, the body ends when the connection closes
    drop: bool = False  # close the connection without any response


def envelope(content: object, **message: object) -> bytes:
    """A chat.completion body whose choices[0].message.content is `content`."""
    return json.dumps({
        "id": "chatcmpl-fake", "object": "chat.completion", "created": 0, "model": "fake",
        "choices": [{"index": 0, "finish_reason": "stop",
                     "message": {"role": "assistant", "content": content, **message}}],
        "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
    }).encode()


def step_answer(step: dict, **kw) -> Answer:
    return Answer(envelope(json.dumps(step)), **kw)


def content_answer(text: str, **kw) -> Answer:
    return Answer(envelope(text), **kw)


def verdict_answer(verdicts: dict[str, bool], **kw) -> Answer:
    """A judge's answer: {"c1": true, ...}."""
    return Answer(envelope(json.dumps(verdicts)), **kw)


def request_image(body: dict):
    """The (H, W, 3) uint8 image of a chat-completions request's data-URL image part."""
    import numpy as np
    from PIL import Image

    part = next(p for p in body["messages"][-1]["content"] if p["type"] == "image_url")
    data = base64.b64decode(part["image_url"]["url"].split(",", 1)[1])
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def world_judge(metadata_of: Callable[[str], dict], grid: int = 4) -> Callable[[dict], Answer]:
    """A responder that judges like a perfect VLM in the world: it reads the prompt from the request's text,
    takes its metadata from `metadata_of(prompt)`, checks that the request's constraint lines are that
    metadata's (clvr.judge.constraint_texts), and answers each key with the world judge's verdict on the
    attached image."""
    from clvr.judge import constraint_of, constraint_texts, failures
    from clvr.world.detector import detect

    def respond(body: dict) -> Answer:
        text = next(p["text"] for p in body["messages"][-1]["content"] if p["type"] == "text")
        prompt = json.loads(re.match(r"Prompt: (.*)\n", text).group(1))
        md = metadata_of(prompt)
        lines = re.findall(r"^(c\d+): (.*)$", text, re.M)
        assert [t for _, t in lines] == constraint_texts(md), (lines, md)
        broken = {constraint_of(f, md) for f in failures(md, detect(request_image(body), grid))}
        return verdict_answer({k: i not in broken for i, (k, _) in enumerate(lines)})

    return respond


class FakeOpenAI:
    """with FakeOpenAI() as srv: srv.push(step_answer({...})); ... srv.url -> "http://127.0.0.1:PORT/v1"."""

    def __init__(self, responder: Callable[[dict], Answer] | None = None) -> None:
        self.responder = responder
        self.script: list[Answer] = []
        self.requests: list[dict] = []
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def push(self, *answers: Answer) -> None:
        with self.lock:
            self.script.extend(answers)

    def next_answer(self, body: object = None) -> Answer:
        with self.lock:
            if self.script:
                return self.script.pop(0)
        if self.responder is not None and isinstance(body, dict):
            return self.responder(body)
        return Answer(b'{"error": {"message": "fake server: no scripted answer left"}}', status=500)

    def __enter__(self) -> "FakeOpenAI":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stopping.set()  # wakes handlers still sleeping on a slow answer
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)


def _handler(server: FakeOpenAI) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args) -> None:  # keep test output quiet
            pass

        def do_POST(self) -> None:
            n = int(self.headers.get("Content-Length", "0"))
            raw = self.rfile.read(n)
            try:
                body = json.loads(raw)
            except ValueError:
                body = None
            with server.lock:
                server.requests.append({"path": self.path, "headers": dict(self.headers), "json": body})
            try:
                ans = server.next_answer(body)
            except Exception as e:  # a responder's assertion: answered as a server error the test sees
                ans = Answer(json.dumps({"error": {"message": f"fake server: {e!r}"}}).encode(), status=500)
            try:
                self.answer(ans)
            except (BrokenPipeError, ConnectionResetError):  # the client gave up first: fine
                pass

        def answer(self, ans: Answer) -> None:
            if ans.delay and server.stopping.wait(ans.delay):
                return
            if ans.drop:
                self.close_connection = True
                return
            self.send_response(ans.status)
            self.send_header("Content-Type", "application/json")
            if ans.content_length:
                self.send_header("Content-Length", str(len(ans.body)))
            self.end_headers()
            if not ans.trickle:
                self.wfile.write(ans.body)
                return
            for i in range(len(ans.body)):
                self.wfile.write(ans.body[i:i + 1])
                self.wfile.flush()
                if server.stopping.wait(ans.trickle):
                    return

    return Handler
