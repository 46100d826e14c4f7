"""Tests of seal.remote: ChatClient and OpenAITeacher against a real loopback HTTP server.

The server speaks the OpenAI chat-completions protocol on 127.0.0.1, answers with ``n`` choices
and injects faults on request (markers in the prompt).
"""

from __future__ import annotations

import logging
import re
import socket
import time

import pytest
from openai_stub import OpenAIStubHandler, OpenAIStubServer

from seal.grading import JudgeConfigError
from seal.remote import (
    ChatClient,
    OpenAITeacher,
    RemoteConfigError,
    RemoteError,
    is_loopback,
)

# The stub server (openai_stub) answers each request with n choices "TAG edit SERIAL.I" (TAG: the
# prompt's first word, SERIAL: the number of requests received so far). "[[choices:K]]" in the
# prompt makes it return at most K choices. A prompt may carry "[[fault:KIND:COUNT]]": the first
# COUNT requests for that prompt fail with KIND (COUNT "inf": always). KIND is one of the stub's
# shared kinds (timeout, close, 400, 401, 429, 500, 503, malformed, nochoices), echo (a 400 whose
# message echoes the Authorization header) or slow429 (429 with Retry-After 0.3).
_CHOICES_RE = re.compile(r"\[\[choices:(\d+)\]\]")


class TeacherHandler(OpenAIStubHandler):
    def _answer(self, payload: dict, prompt: str):
        server = self.stub
        n = payload.get("n", 1)
        cap = _CHOICES_RE.search(prompt)
        if cap:
            n = min(n, int(cap.group(1)))
        if server.delay_s:
            time.sleep(server.delay_s)
        with server.lock:
            serial = len(server.requests)
        tag = prompt.split()[0]
        self._reply(payload, [f"{tag} edit {serial}.{i}" for i in range(n)])

    def _fault(self, kind: str):
        if kind == "echo":
            auth = self.headers.get("Authorization", "")
            self._error(400, f"bad request from {auth}")
        elif kind == "slow429":
            self._error(429, "rate limited", retry_after="0.3")
        else:
            super()._fault(kind)


class FakeOpenAIServer(OpenAIStubServer):
    """The teacher's server: n numbered choices per request, with fault injection."""

    handler_class = TeacherHandler

    def __init__(self, hang_s: float = 2.0, delay_s: float = 0.0):
        super().__init__(hang_s=hang_s)
        self.delay_s = delay_s  # added to every successful reply (to observe concurrency)


@pytest.fixture
def server():
    with FakeOpenAIServer() as srv:
        yield srv


SECRET = "sk-planted-SECRET-key-0123456789"
KEY_ENV = "SEAL_TEST_REMOTE_KEY"
# A 1-s timeout against the server's 2-s "timeout" fault: room for a plain request on a busy
# machine (a retried request would change the request counts the tests assert).
FAST = dict(timeout=1.0, max_retries=2, backoff_base=0.01, backoff_max=0.05)


@pytest.fixture
def client_factory(server, monkeypatch):
    monkeypatch.setenv(KEY_ENV, SECRET)
    made = []

    def make(cls=ChatClient, **kw):
        args = dict(base_url=server.base_url, model="teacher-model", api_key_env=KEY_ENV, **FAST)
        args.update(kw)
        obj = cls(**args)
        made.append(obj)
        return obj

    yield make
    for obj in made:
        obj.close()


@pytest.fixture
def free_port():
    with socket.socket() as sock:  # a port with nothing listening on it
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# ---------------------------------------------------------------------------------------------
# ChatClient
# ---------------------------------------------------------------------------------------------


def test_complete_returns_n_completions(server, client_factory):
    client = client_factory()
    texts = client.complete("p1 write notes", temperature=0.7, top_p=0.9, max_tokens=64, n=3)
    assert texts == ["p1 edit 1.0", "p1 edit 1.1", "p1 edit 1.2"]
    (sent,) = server.requests
    assert sent["n"] == 3 and sent["temperature"] == 0.7 and sent["top_p"] == 0.9
    assert sent["max_tokens"] == 64 and sent["model"] == "teacher-model"
    assert sent["messages"] == [{"role": "user", "content": "p1 write notes"}]
    assert server.auth_headers == [f"Bearer {SECRET}"]

    # Defaults: one completion, temperature 0; n and top_p at their API defaults are not sent.
    assert client.complete("p2") == ["p2 edit 2.0"]
    sent = server.requests[1]
    assert sent["temperature"] == 0 and sent["max_tokens"] == 256
    assert "n" not in sent and "top_p" not in sent


def test_complete_fills_up_short_answers(server, client_factory):
    client = client_factory()
    texts = client.complete("p [[choices:2]]", temperature=1.0, n=5)
    assert len(texts) == 5 and len(set(texts)) == 5
    # 2 + 2 + 1 choices; each further request asks only for what is missing.
    assert [r.get("n", 1) for r in server.requests] == [5, 3, 1]


def test_complete_rejects_bad_n(client_factory):
    with pytest.raises(ValueError, match="n must be >= 1"):
        client_factory().complete("p", n=0)


@pytest.mark.parametrize(
    "kind", ["timeout", "close", "429", "500", "503", "malformed", "nochoices"]
)
def test_complete_retries_transient_faults(server, client_factory, kind):
    client = client_factory()
    texts = client.complete(f"p [[fault:{kind}:2]]", n=2, temperature=1.0)
    assert len(texts) == 2 and all(t.startswith("p edit") for t in texts)
    assert server.n_requests == 3  # two faults, then success


@pytest.mark.parametrize("kind", ["timeout", "close", "429", "503", "malformed"])
def test_complete_persistent_faults_raise(server, client_factory, kind):
    client = client_factory()
    with pytest.raises(RemoteError, match="gave up after 3 attempts") as info:
        client.complete(f"p [[fault:{kind}:inf]]")
    assert info.value.message == str(info.value)
    assert server.n_requests == 3  # 1 + max_retries


@pytest.mark.parametrize("status", ["400", "401"])
def test_complete_non_retryable_4xx(server, client_factory, status):
    with pytest.raises(RemoteError, match=f"HTTP {status}"):
        client_factory().complete(f"p [[fault:{status}:inf]]")
    assert server.n_requests == 1  # no retries


def test_complete_honours_retry_after(server, client_factory):
    client = client_factory(backoff_max=0.5)
    start = time.monotonic()
    assert client.complete("p [[fault:slow429:1]]") == ["p edit 2.0"]
    assert time.monotonic() - start >= 0.3
    # ... but never beyond backoff_max.
    client = client_factory(backoff_max=0.05)
    start = time.monotonic()
    client.complete("q [[fault:slow429:1]]")
    assert time.monotonic() - start < 0.25


def test_connection_refused(free_port, monkeypatch):
    monkeypatch.delenv("SEAL_TEST_NO_SUCH_KEY", raising=False)
    with (
        ChatClient(f"http://127.0.0.1:{free_port}/v1", "m", "SEAL_TEST_NO_SUCH_KEY", **FAST) as c,
        pytest.raises(RemoteError, match="connection error"),
    ):
        c.complete("p")


def test_missing_key_for_remote_endpoint(monkeypatch):
    monkeypatch.delenv("SEAL_TEST_NO_SUCH_KEY", raising=False)
    with pytest.raises(RemoteConfigError, match="SEAL_TEST_NO_SUCH_KEY"):
        ChatClient("https://api.example.com/v1", "gpt-4.1", "SEAL_TEST_NO_SUCH_KEY")
    with pytest.raises(RemoteConfigError, match="SEAL_TEST_NO_SUCH_KEY"):
        OpenAITeacher("https://api.example.com/v1", "gpt-4.1", "SEAL_TEST_NO_SUCH_KEY")
    monkeypatch.setenv("SEAL_TEST_NO_SUCH_KEY", "")  # set but empty counts as missing
    with pytest.raises(RemoteConfigError, match="SEAL_TEST_NO_SUCH_KEY"):
        ChatClient("https://api.example.com/v1", "gpt-4.1", "SEAL_TEST_NO_SUCH_KEY")
    assert issubclass(JudgeConfigError, RemoteConfigError)


def test_loopback_without_key_uses_dummy(server, monkeypatch):
    monkeypatch.delenv("SEAL_TEST_NO_SUCH_KEY", raising=False)
    with ChatClient(server.base_url, "m", "SEAL_TEST_NO_SUCH_KEY", **FAST) as client:
        assert client.complete("p") == ["p edit 1.0"]
    assert server.auth_headers == ["Bearer sk-local-dummy"]


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("http://127.0.0.1:8000/v1", True),
        ("http://127.5.0.1/v1", True),
        ("http://localhost:8000/v1", True),
        ("http://api.localhost/v1", True),
        ("http://[::1]:8000/v1", True),
        ("https://api.openai.com/v1", False),
        ("http://10.0.0.1/v1", False),
        ("http://localhost.example.com/v1", False),
    ],
)
def test_is_loopback(url, expected):
    assert is_loopback(url) is expected


def test_key_never_leaks(server, client_factory, caplog):
    caplog.set_level(logging.DEBUG)
    client = client_factory()
    assert SECRET not in repr(client) and KEY_ENV in repr(client)
    # The server echoes the Authorization header in its error message: it must be scrubbed.
    with pytest.raises(RemoteError) as info:
        client.complete("p [[fault:echo:inf]]")
    assert "HTTP 400" in info.value.message and "***" in info.value.message
    assert SECRET not in info.value.message and SECRET not in str(info.value)
    with pytest.raises(RemoteError) as info:
        client.complete("q [[fault:500:inf]]")
    assert SECRET not in str(info.value)
    teacher = client_factory(OpenAITeacher)
    assert SECRET not in repr(teacher) and KEY_ENV in repr(teacher)
    assert teacher.write(["r [[fault:echo:inf]]"], n=1, temperature=1, top_p=1, max_tokens=8) == [
        None
    ]
    assert "***" in teacher.errors[0] and SECRET not in teacher.errors[0]
    assert SECRET not in caplog.text


# ---------------------------------------------------------------------------------------------
# OpenAITeacher
# ---------------------------------------------------------------------------------------------


def test_teacher_writes_n_per_prompt_concurrently(monkeypatch):
    monkeypatch.setenv(KEY_ENV, SECRET)
    with (
        FakeOpenAIServer(delay_s=0.1) as server,
        OpenAITeacher(server.base_url, "t", KEY_ENV, concurrency=3, **{**FAST, "timeout": 2}) as t,
    ):
        prompts = [f"p{i} passage" for i in range(6)]
        out = t.write(prompts, n=4, temperature=1.0, top_p=0.95, max_tokens=32)
        assert t.errors == {}
        assert len(out) == 6
        for i, edits in enumerate(out):  # in prompt order
            assert edits is not None and len(edits) == 4
            assert all(e.startswith(f"p{i} edit") for e in edits)
        assert server.n_requests == 6
        assert all(r["n"] == 4 and r["top_p"] == 0.95 for r in server.requests)
        assert 1 < server.max_in_flight <= 3  # concurrent, but a bounded thread pool
        assert t.write([], n=2, temperature=1.0, top_p=1.0, max_tokens=8) == []


def test_teacher_failed_prompt_gets_none(server, client_factory):
    teacher = client_factory(OpenAITeacher, concurrency=4)
    prompts = [
        "ok0 passage",
        "bad1 [[fault:503:inf]]",
        "flaky2 [[fault:close:1]] [[choices:1]]",
        "bad3 [[fault:400:inf]]",
        "ok4 passage",
    ]
    out = teacher.write(prompts, n=2, temperature=0.8, top_p=1.0, max_tokens=16)
    assert out[1] is None and out[3] is None
    for i in (0, 2, 4):
        assert out[i] is not None and len(out[i]) == 2
    assert set(teacher.errors) == {1, 3}
    assert "gave up after 3 attempts" in teacher.errors[1] and "HTTP 503" in teacher.errors[1]
    assert "HTTP 400" in teacher.errors[3]
    assert len(server.requests_for("bad1")) == 3 and len(server.requests_for("bad3")) == 1
    assert len(server.requests_for("flaky2")) == 3  # one fault, then 1 + 1 choices

    # errors is reset on each call.
    assert teacher.write(["ok5"], n=1, temperature=0.8, top_p=1.0, max_tokens=16)[0] is not None
    assert teacher.errors == {}


def test_teacher_unexpected_error_gets_none(client_factory, monkeypatch):
    teacher = client_factory(OpenAITeacher)

    def boom(prompt, **kw):
        raise RuntimeError(f"exploded near {SECRET}")

    monkeypatch.setattr(teacher._client, "complete", boom)
    assert teacher.write(["a", "b"], n=1, temperature=1.0, top_p=1.0, max_tokens=8) == [None, None]
    assert "RuntimeError" in teacher.errors[0] and SECRET not in teacher.errors[0]


def test_teacher_connection_refused(free_port, monkeypatch):
    monkeypatch.delenv("SEAL_TEST_NO_SUCH_KEY", raising=False)
    url = f"http://127.0.0.1:{free_port}/v1"
    with OpenAITeacher(url, "t", "SEAL_TEST_NO_SUCH_KEY", **FAST) as teacher:
        out = teacher.write(["a", "b"], n=2, temperature=1.0, top_p=1.0, max_tokens=8)
    assert out == [None, None]
    assert all("connection error" in teacher.errors[i] for i in (0, 1))


def test_teacher_rejects_bad_arguments(client_factory):
    with pytest.raises(ValueError, match="concurrency"):
        client_factory(OpenAITeacher, concurrency=0)
    with pytest.raises(ValueError, match="n must be >= 1"):
        client_factory(OpenAITeacher).write(["a"], n=0, temperature=1.0, top_p=1.0, max_tokens=8)
