"""A stub OpenAI chat-completions server for the tests of the remote clients.

``OpenAIStubServer`` is a real HTTP server: a ``ThreadingHTTPServer`` on 127.0.0.1 (a free port)
serving ``POST /v1/chat/completions`` from a background thread. The code under test talks to it
through its ordinary HTTP client, so nothing in the client is mocked: requests, headers, status
codes, timeouts and dropped connections all go over a loopback socket.

``OpenAIStubHandler`` does the protocol plumbing that the test files share: it parses and records
each request (payload and Authorization header), counts requests in flight, answers 404 off the
one endpoint, sends JSON bodies and OpenAI-style errors (with an optional Retry-After), builds a
``chat.completion`` with one choice per content, and injects faults. A test file subclasses the
handler with its own ``_answer`` (and, where it needs them, its own fault kinds in ``_fault``)
and the server with ``handler_class`` set to that handler.

Fault injection: a prompt may carry ``[[fault:KIND:COUNT]]``; the first COUNT requests whose
fault key (``_fault_key``: the whole prompt unless overridden) carries it fail with KIND (COUNT
``inf``: always). The shared kinds are ``timeout`` (answer a 500 after ``hang_s`` seconds),
``close`` (drop the connection without a response), ``malformed`` (a 200 with truncated JSON),
``nochoices`` (a 200 without ``choices``), ``429`` (rate limited, Retry-After 0) and any other
numeric status code (an error with that status).
"""

from __future__ import annotations

import contextlib
import json
import re
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

FAULT_RE = re.compile(r"\[\[fault:(\w+):(\w+)\]\]")


class OpenAIStubHandler(BaseHTTPRequestHandler):
    """Request handler: shared plumbing; subclasses supply ``_answer`` and extra fault kinds."""

    @property
    def stub(self) -> OpenAIStubServer:
        return self.server.stub

    def log_message(self, *args):  # keep test output quiet
        pass

    def _send(self, status: int, body: bytes, headers: dict[str, str] | None = None):
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        with contextlib.suppress(OSError):  # the client may have given up already
            self.wfile.write(body)

    def _error(self, status: int, message: str, retry_after: str | None = None):
        body = json.dumps({"error": {"message": message, "type": "test", "code": None}})
        headers = {"Retry-After": retry_after} if retry_after is not None else None
        self._send(status, body.encode(), headers)

    def _reply(self, payload: dict, contents: list[str]):
        body = {
            "id": "chatcmpl-test",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": payload["model"],
            "choices": [
                {
                    "index": i,
                    "message": {"role": "assistant", "content": text},
                    "finish_reason": "stop",
                }
                for i, text in enumerate(contents)
            ],
            "usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15},
        }
        self._send(200, json.dumps(body).encode())

    def do_POST(self):
        length = int(self.headers.get("Content-Length", 0))
        payload = json.loads(self.rfile.read(length))
        stub = self.stub
        with stub.lock:
            stub.requests.append(payload)
            stub.auth_headers.append(self.headers.get("Authorization", ""))
            stub.in_flight += 1
            stub.max_in_flight = max(stub.max_in_flight, stub.in_flight)
        try:
            self._handle(payload)
        finally:
            with stub.lock:
                stub.in_flight -= 1

    def _handle(self, payload: dict):
        if self.path != "/v1/chat/completions":
            self._error(404, "not found")
            return
        prompt = payload["messages"][-1]["content"]
        key = self._fault_key(prompt)
        fault = FAULT_RE.search(key)
        if fault:
            kind, count = fault.group(1), fault.group(2)
            with self.stub.lock:
                self.stub.fault_counts[key] += 1
                seen = self.stub.fault_counts[key]
            if count == "inf" or seen <= int(count):
                self._fault(kind)
                return
        self._answer(payload, prompt)

    def _fault_key(self, prompt: str) -> str:
        """The text searched for a fault marker; its faults are counted together."""
        return prompt

    def _answer(self, payload: dict, prompt: str):
        """Answer a request that is not failed on purpose (subclasses: call ``_reply``)."""
        raise NotImplementedError

    def _fault(self, kind: str):
        if kind == "timeout":
            time.sleep(self.stub.hang_s)
            self._error(500, "too late")
        elif kind == "close":
            self.close_connection = True  # drop the connection without a response
        elif kind == "malformed":
            self._send(200, b'{"id": "chatcmpl-x", "choices": [')
        elif kind == "nochoices":
            self._send(200, b'{"id": "chatcmpl-x", "object": "chat.completion"}')
        elif kind == "429":
            self._error(429, "rate limited", retry_after="0")
        else:
            self._error(int(kind), f"injected {kind}")


class OpenAIStubServer:
    """Threaded HTTP server implementing POST /v1/chat/completions on 127.0.0.1.

    Use it as a context manager (the serving thread runs inside the ``with``). ``requests`` and
    ``auth_headers`` record every request in arrival order; ``max_in_flight`` is the most
    requests handled at once.
    """

    handler_class: type[OpenAIStubHandler] = OpenAIStubHandler

    def __init__(self, hang_s: float = 1.0):
        self.hang_s = hang_s  # how long a "timeout" fault waits before answering
        self.lock = threading.Lock()
        self.requests: list[dict] = []
        self.auth_headers: list[str] = []
        self.fault_counts: Counter[str] = Counter()
        self.in_flight = 0
        self.max_in_flight = 0
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), self.handler_class)
        self.httpd.stub = self
        self.httpd.daemon_threads = True
        self.httpd.block_on_close = False
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.02,), daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    @property
    def n_requests(self) -> int:
        with self.lock:
            return len(self.requests)

    def requests_for(self, marker: str) -> list[dict]:
        """The recorded requests whose last message contains ``marker``."""
        with self.lock:
            return [r for r in self.requests if marker in r["messages"][-1]["content"]]

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()
