"""A real HTTP server on loopback that speaks the LLM APIs' wire formats, with scripted
replies, and records every request it received.

Tests queue replies with ``server.reply(...)`` (bodies from ``openai_reply`` /
``anthropic_reply`` / ``gemini_reply``) and read ``server.requests`` afterwards. A request
with no reply queued gets a 500, so a test that calls more often than it planned fails.
The ``llm_server`` fixture (``tests/llm/conftest.py``) starts one per test.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass
class Reply:
    """One scripted HTTP answer; ``delay`` seconds pass before it is sent."""

    status: int = 200
    body: Any = None
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0


@dataclass(frozen=True)
class Received:
    """One request as the server received it."""

    method: str
    path: str
    headers: dict[str, str]
    raw: bytes

    @property
    def json(self) -> Any:
        """The body parsed as JSON."""
        return json.loads(self.raw)


class LLMServer:
    """The scripted server: ``url``, ``reply()``, ``requests``."""

    def __init__(self) -> None:
        self.requests: list[Received] = []
        self._replies: list[Reply] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", "0"))
                raw = self.rfile.read(length)
                reply = server._record(
                    Received("POST", self.path, {k.lower(): v for k, v in self.headers.items()},
                             raw)
                )
                if reply.delay and server._stop.wait(reply.delay):
                    return
                body = reply.body if isinstance(reply.body, bytes | str) else json.dumps(
                    reply.body)
                data = body.encode() if isinstance(body, str) else body
                self.send_response(reply.status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for key, value in reply.headers.items():
                    self.send_header(key, value)
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args: Any) -> None:
                pass  # keep the test output clean

        class Server(ThreadingHTTPServer):
            daemon_threads = True

            def handle_error(self, request: Any, client_address: Any) -> None:
                pass  # a client that gave up (timeout tests) closes its socket early

        self._httpd = Server(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._httpd.server_address[1]}"
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)

    def reply(self, *replies: Reply) -> None:
        """Queue replies, answered in order."""
        with self._lock:
            self._replies.extend(replies)

    def _record(self, received: Received) -> Reply:
        with self._lock:
            self.requests.append(received)
            if self._replies:
                return self._replies.pop(0)
        return Reply(500, {"error": {"message": "no scripted reply left", "type": "server"}})

    def start(self) -> None:
        """Serve in a background thread."""
        self._thread.start()

    def stop(self) -> None:
        """Stop serving; sleeping handlers wake up and drop their reply."""
        self._stop.set()
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)


def openai_reply(
    text: str, *, prompt_tokens: int = 11, completion_tokens: int = 7, model: str = "m"
) -> Reply:
    """A successful chat completion, as OpenAI (and Ollama, llama.cpp, vLLM) send it."""
    return Reply(200, {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "created": 1_700_000_000,
        "model": model,
        "choices": [{
            "index": 0,
            "message": {"role": "assistant", "content": text},
            "finish_reason": "stop",
        }],
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        },
    })


def openai_error(status: int, message: str, headers: dict[str, str] | None = None) -> Reply:
    """An OpenAI-style error body."""
    return Reply(status, {"error": {"message": message, "type": "error", "code": None}},
                 headers=headers or {})


def anthropic_reply(text: str, *, input_tokens: int = 13, output_tokens: int = 5) -> Reply:
    """A successful Messages API answer."""
    return Reply(200, {
        "id": "msg_1",
        "type": "message",
        "role": "assistant",
        "model": "claude-test",
        "content": [{"type": "text", "text": text}],
        "stop_reason": "end_turn",
        "stop_sequence": None,
        "usage": {"input_tokens": input_tokens, "output_tokens": output_tokens},
    })


def gemini_reply(text: str, *, prompt_tokens: int = 17, candidates_tokens: int = 3) -> Reply:
    """A successful generateContent answer."""
    return Reply(200, {
        "candidates": [{
            "content": {"role": "model", "parts": [{"text": text}]},
            "finishReason": "STOP",
            "index": 0,
        }],
        "usageMetadata": {
            "promptTokenCount": prompt_tokens,
            "candidatesTokenCount": candidates_tokens,
            "totalTokenCount": prompt_tokens + candidates_tokens,
        },
        "modelVersion": "gemini-test-001",
    })
