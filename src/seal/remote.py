"""Clients for models behind any OpenAI-compatible chat-completions endpoint.

``ChatClient`` is the shared HTTP layer: the API key comes from an environment variable only (a
loopback endpoint without one gets a dummy key), the ``openai`` client's own retries are off and
each request instead gets bounded retries with exponential backoff, jitter and ``Retry-After`` on
transient failures; the key is kept out of reprs, logs and error texts. Two users sit on top:

* ``seal.grading.OpenAIJudge`` — the LLM judge (temperature 0, a few tokens per verdict);
* ``OpenAITeacher`` — a teacher model that writes self-edits (n sampled completions per prompt,
  prompts served concurrently; a prompt whose requests fail gets None, never an exception).
"""

from __future__ import annotations

import concurrent.futures
import ipaddress
import logging
import os
import random
import time
from collections.abc import Sequence
from urllib.parse import urlsplit

logger = logging.getLogger(__name__)

__all__ = [
    "ChatClient",
    "OpenAITeacher",
    "RemoteConfigError",
    "RemoteError",
    "is_loopback",
]

_DUMMY_KEY = "sk-local-dummy"  # local servers usually ignore the key but the client needs one


class RemoteConfigError(RuntimeError):
    """A remote client cannot be set up (e.g. its API key variable is missing)."""


class RemoteError(RuntimeError):
    """A request failed for good: retries ran out, or the error was not retryable.

    ``message`` is the last error text (with the API key scrubbed).
    """

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


def is_loopback(base_url: str) -> bool:
    """Whether ``base_url`` points at this machine (localhost, *.localhost or a loopback IP)."""
    host = urlsplit(base_url).hostname or ""
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class EndpointClient:
    """What every client of an endpoint shares: a repr naming the endpoint (never the key),
    `close()` of the underlying HTTP client `self._client`, and use as a context manager."""

    base_url: str
    model: str
    api_key_env: str

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(base_url={self.base_url!r}, model={self.model!r}, "
            f"api_key_env={self.api_key_env!r})"
        )

    def close(self) -> None:
        """Close the HTTP client."""
        self._client.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class ChatClient(EndpointClient):
    """One model behind an OpenAI-compatible chat-completions endpoint, with bounded retries.

    The API key is read from the environment variable ``api_key_env`` only; when it is unset, a
    loopback ``base_url`` gets a dummy key and any other endpoint raises ``RemoteConfigError``
    naming the variable. The key is kept inside the client: it is not in the repr, log messages
    or error texts.

    The ``openai`` client's own retries are off; instead each request gets up to ``max_retries``
    retries with exponential backoff and jitter (``backoff_base * 2**attempt``, capped at
    ``backoff_max``, a random 50-100% of it; a server ``Retry-After`` is honoured up to the cap)
    on timeouts, connection errors, HTTP 408/429/5xx and unusable response bodies. Other 4xx
    errors fail at once. A request that fails for good raises ``RemoteError``.

    ``purpose`` only names the client in log and error messages ("judge", "teacher", ...).
    Thread-safe: one client may serve several threads.
    """

    def __init__(
        self,
        base_url: str,
        model: str,
        api_key_env: str = "OPENAI_API_KEY",
        timeout: float = 30,
        max_retries: int = 4,
        *,
        backoff_base: float = 1.0,
        backoff_max: float = 30.0,
        purpose: str = "remote",
    ):
        import openai  # deferred: only remote models need it

        if max_retries < 0:
            raise ValueError("max_retries must be >= 0")
        key = os.environ.get(api_key_env)
        if not key:
            if not is_loopback(base_url):
                raise RemoteConfigError(
                    f"environment variable {api_key_env} is not set; it must hold the API key "
                    f"for the {purpose} endpoint {base_url}"
                )
            key = _DUMMY_KEY
        self._key = key
        self._openai = openai
        self._client = openai.OpenAI(base_url=base_url, api_key=key, max_retries=0, timeout=timeout)
        self.base_url = base_url
        self.model = model
        self.api_key_env = api_key_env
        self.timeout = timeout
        self.max_retries = max_retries
        self.backoff_base = backoff_base
        self.backoff_max = backoff_max
        self.purpose = purpose

    # -- public API ----------------------------------------------------------------------------

    def complete(
        self,
        prompt: str,
        *,
        temperature: float = 0.0,
        max_tokens: int = 256,
        top_p: float = 1.0,
        n: int = 1,
    ) -> list[str]:
        """``n`` completion texts for ``prompt`` (sent as one user message).

        ``n`` is passed to the API; if the server returns fewer choices, further requests fill
        up the rest. A choice without text (null content) gives "". Raises ``RemoteError`` when a
        request fails for good (retries exhausted, or a non-retryable error).
        """
        texts = self._complete(
            prompt, temperature=temperature, max_tokens=max_tokens, top_p=top_p, n=n
        )
        return [t if t is not None else "" for t in texts]

    def scrub(self, text: str) -> str:
        """``text`` with the API key replaced by ``***``.

        Defensive: error texts should never hold the key, but make sure before recording them.
        (Very short keys are not real secrets and would mangle ordinary text.)
        """
        return text.replace(self._key, "***") if len(self._key) >= 8 else text

    # -- internals -----------------------------------------------------------------------------

    def _complete(
        self, prompt: str, *, temperature: float, max_tokens: int, top_p: float, n: int
    ) -> list[str | None]:
        # Like ``complete`` but keeps null contents as None (the judge records them as-is).
        if n < 1:
            raise ValueError("n must be >= 1")
        texts: list[str | None] = []
        # Each successful request yields at least one choice, so this ends after <= n requests.
        while len(texts) < n:
            texts.extend(
                self._with_retries(
                    prompt,
                    temperature=temperature,
                    max_tokens=max_tokens,
                    top_p=top_p,
                    n=n - len(texts),
                )
            )
        return texts[:n]

    def _backoff(self, attempt: int, retry_after: float | None) -> float:
        delay = min(self.backoff_max, self.backoff_base * 2**attempt)
        delay *= 0.5 + 0.5 * random.random()
        if retry_after is not None:
            delay = max(delay, min(retry_after, self.backoff_max))
        return delay

    def _classify(self, exc: Exception) -> tuple[bool, str, float | None]:
        """(retryable, message, retry_after seconds) for an exception from one request."""
        openai = self._openai
        retry_after = None
        if isinstance(exc, openai.APITimeoutError):
            return True, f"timeout after {self.timeout}s", None
        if isinstance(exc, openai.APIConnectionError):
            cause = exc.__cause__
            detail = f" ({type(cause).__name__}: {cause})" if cause is not None else ""
            return True, f"connection error: {exc}{detail}", None
        if isinstance(exc, openai.APIStatusError):
            status = exc.status_code
            try:
                header = exc.response.headers.get("retry-after")
                retry_after = float(header) if header is not None else None
            except (TypeError, ValueError, AttributeError):
                retry_after = None
            retryable = status in (408, 429) or status >= 500
            return retryable, f"HTTP {status}: {exc.message}", retry_after
        if isinstance(exc, (openai.APIResponseValidationError, ValueError, LookupError)):
            # Garbled or truncated bodies (JSON errors, missing fields) are usually transient.
            return True, f"bad response: {type(exc).__name__}: {exc}", None
        return False, f"{type(exc).__name__}: {exc}", None

    def _request(
        self, prompt: str, *, temperature: float, max_tokens: int, top_p: float, n: int
    ) -> list[str | None]:
        """One HTTP request; the message contents of its choices (at least one)."""
        kwargs: dict[str, object] = {}
        # n and top_p are sent only when they differ from the API defaults, so plain requests
        # also suit servers that reject those fields.
        if n != 1:
            kwargs["n"] = n
        if top_p != 1.0:
            kwargs["top_p"] = top_p
        response = self._client.chat.completions.create(
            model=self.model,
            messages=[{"role": "user", "content": prompt}],
            temperature=temperature,
            max_tokens=max_tokens,
            **kwargs,
        )
        # Some servers answer 200 with a body the client cannot model; surface it as a ValueError
        # so it is treated as a bad (retryable) response.
        choices = getattr(response, "choices", None)
        if not choices:
            raise ValueError(f"no choices in response: {str(response)[:200]!r}")
        texts: list[str | None] = []
        for i, choice in enumerate(choices):
            message = getattr(choice, "message", None)
            if message is None:
                raise ValueError(
                    "no message in first choice" if i == 0 else f"no message in choice {i}"
                )
            texts.append(message.content)
        return texts

    def _with_retries(self, prompt: str, **request: object) -> list[str | None]:
        error = "no attempt made"
        for attempt in range(self.max_retries + 1):
            try:
                return self._request(prompt, **request)  # type: ignore[arg-type]
            except Exception as exc:
                retryable, message, retry_after = self._classify(exc)
                error = self.scrub(message)
                if not retryable:
                    raise RemoteError(error) from None
                if attempt < self.max_retries:
                    delay = self._backoff(attempt, retry_after)
                    logger.info(
                        "%s request failed (%s); retry %d/%d in %.2fs",
                        self.purpose,
                        error,
                        attempt + 1,
                        self.max_retries,
                        delay,
                    )
                    time.sleep(delay)
        raise RemoteError(f"gave up after {self.max_retries + 1} attempts: {error}")


class OpenAITeacher(EndpointClient):
    """A teacher model behind an OpenAI-compatible endpoint that writes self-edits.

    ``write`` asks for ``n`` sampled completions per prompt, with at most ``concurrency`` prompts
    in flight. Key handling, retries and backoff are those of ``ChatClient`` (``backoff_base``,
    ``backoff_max``). A prompt whose request fails for good gets None in the result and its
    error text in ``errors`` (keyed by prompt index); ``write`` itself does not raise on remote
    failures, so the caller can report them and go on.
    """

    def __init__(
        self,
        base_url: str,
        model: str,
        api_key_env: str = "OPENAI_API_KEY",
        timeout: float = 60,
        max_retries: int = 4,
        concurrency: int = 4,
        *,
        backoff_base: float = 1.0,
        backoff_max: float = 30.0,
    ):
        if concurrency < 1:
            raise ValueError("concurrency must be >= 1")
        self._client = ChatClient(
            base_url,
            model,
            api_key_env,
            timeout,
            max_retries,
            backoff_base=backoff_base,
            backoff_max=backoff_max,
            purpose="teacher",
        )
        self.concurrency = concurrency
        self.errors: dict[int, str] = {}

    @property
    def base_url(self) -> str:
        return self._client.base_url

    @property
    def model(self) -> str:
        return self._client.model

    @property
    def api_key_env(self) -> str:
        return self._client.api_key_env

    def write(
        self,
        prompts: Sequence[str],
        n: int,
        temperature: float,
        top_p: float,
        max_tokens: int,
    ) -> list[list[str] | None]:
        """``n`` self-edits per prompt, in prompt order; None for a prompt that failed.

        ``errors`` is reset on each call and then maps the index of each failed prompt to its
        error text (key scrubbed).
        """
        if n < 1:
            raise ValueError("n must be >= 1")
        self.errors = {}

        def run(i: int) -> tuple[int, list[str] | None, str | None]:
            try:
                texts = self._client.complete(
                    prompts[i], temperature=temperature, max_tokens=max_tokens, top_p=top_p, n=n
                )
            except RemoteError as exc:
                return i, None, exc.message
            except Exception as exc:  # one bad prompt must not sink the batch
                return i, None, self._client.scrub(f"unexpected error: {type(exc).__name__}: {exc}")
            return i, texts, None

        indices = range(len(prompts))
        workers = max(1, min(self.concurrency, len(prompts)))
        if workers == 1:
            done = [run(i) for i in indices]
        else:
            with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
                done = list(pool.map(run, indices))
        results: list[list[str] | None] = [None] * len(prompts)
        for i, texts, error in done:
            results[i] = texts
            if error is not None:
                self.errors[i] = error
                logger.warning("teacher request for prompt %d failed: %s", i, error)
        return results
