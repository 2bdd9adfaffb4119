"""A small client for any OpenAI-compatible chat-completions endpoint (OpenAI, vLLM, SGLang, ...).

Standard library only: urllib for HTTP, a bounded thread pool for concurrency.

* POST {base_url}/chat/completions with {"model", "messages", **params}.
* Retries with exponential backoff and jitter on 429, 5xx, timeouts and dropped connections; a
  Retry-After header is honoured. Other 4xx fail at once with the status and the body's message.
* Token accounting from each response's `usage` (prompt and completion tokens summed, optional cost).
* The API key comes from an environment variable (default OPENAI_API_KEY), never from a file; when the
  variable is unset no Authorization header is sent (local servers need none). Every error message has the
  key and any `Bearer ...` token redacted (some servers echo the request's headers in their error body).
* Each request has a wall-clock deadline (`timeout_s`, connecting and reading together: a server that
  trickles bytes cannot hold a worker forever) and a cap on the response size (`max_response_bytes`).
* `map` runs many requests with at most `max_concurrency` in flight and yields results as they
  complete, so callers can append each one to a JSONL file; resuming is the caller's job.

The command-line flags of a client (`opsd-jax rationales`, `opsd-jax eval`'s LLM extractor) are declared by
`add_client_arguments` and read back by `client_from_arguments`.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import email.utils
import http.client
import json
import os
import random
import re
import socket
import threading
import time
import urllib.error
import urllib.request
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

from tqdm import tqdm

Message = Mapping[str, Any]


class ChatClientError(RuntimeError):
    """A request failed for good. `status` is the HTTP status, or None for a network failure."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


@dataclasses.dataclass(frozen=True)
class ChatResponse:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str | None
    raw: dict[str, Any]


@dataclasses.dataclass(frozen=True)
class ChatRequest:
    messages: Sequence[Message]
    params: Mapping[str, Any] = dataclasses.field(default_factory=dict)  # temperature, max_tokens, ...


@dataclasses.dataclass(frozen=True)
class TokenUsage:
    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost: float = 0.0  # in the unit of the per-1k rates given to the client

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


class _Retryable(Exception):
    def __init__(self, message: str, retry_after_s: float | None = None, status: int | None = None):
        super().__init__(message)
        self.retry_after_s = retry_after_s
        self.status = status


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Retry-After as seconds: delta-seconds (fractions accepted) or an HTTP date; None if absent/invalid."""
    if value is None:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        moment = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, moment.timestamp() - (time.time() if now is None else now))


def _error_message(body: bytes) -> str:
    """The `error.message` of an OpenAI-style error body, else the body text (truncated)."""
    text = body.decode("utf-8", errors="replace")
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        return text.strip()[:500]
    if isinstance(data, dict):
        error = data.get("error", data)
        if isinstance(error, dict) and "message" in error:
            return str(error["message"])
        if isinstance(error, str):
            return error
    return text.strip()[:500]


_BEARER = re.compile(r"(?i)\bbearer\s+[^\s\"',;]+")
REDACTED = "[REDACTED]"
_ERROR_BODY_BYTES = 1 << 16  # an error body is read for its message only


class _Deadline:
    """The sockets of one request, shut down when its wall-clock deadline passes (a blocked read then fails)."""

    def __init__(self, seconds: float):
        self.expired = False
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        self._timer = threading.Timer(seconds, self._expire)
        self._timer.daemon = True
        self._timer.start()

    def _expire(self) -> None:
        with self._lock:
            self.expired = True
            for sock in self._sockets:
                _shut(sock)

    def watch(self, sock: socket.socket) -> None:
        with self._lock:
            self._sockets.append(sock)
            if self.expired:
                _shut(sock)

    def cancel(self) -> None:
        self._timer.cancel()

    def opener(self) -> urllib.request.OpenerDirector:
        """urllib's opener (proxies from the environment included) whose connections this deadline watches."""
        deadline = self

        def watched(base: type[http.client.HTTPConnection]) -> type[http.client.HTTPConnection]:
            class Connection(base):
                def connect(self):
                    super().connect()
                    deadline.watch(self.sock)

            return Connection

        class HTTPHandler(urllib.request.HTTPHandler):
            def http_open(self, req):
                return self.do_open(watched(http.client.HTTPConnection), req)

        class HTTPSHandler(urllib.request.HTTPSHandler):
            def https_open(self, req):
                return self.do_open(watched(http.client.HTTPSConnection), req, context=self._context)

        return urllib.request.build_opener(HTTPHandler, HTTPSHandler)


def _shut(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


def _read_capped(response, limit: int, url: str) -> bytes:
    """The body of `response`, refusing more than `limit` bytes (before reading them, when announced)."""
    announced = response.headers.get("Content-Length")
    if announced and announced.strip().isdigit() and int(announced) > limit:
        raise ChatClientError(
            f"{url} announced a {int(announced)}-byte response, over the {limit}-byte limit (max_response_bytes)"
        )
    chunks, total = [], 0
    while chunk := response.read(1 << 16):
        total += len(chunk)
        if total > limit:
            raise ChatClientError(f"{url} sent more than {limit} bytes, over the limit (max_response_bytes)")
        chunks.append(chunk)
    return b"".join(chunks)


class ChatClient:
    def __init__(
        self,
        base_url: str,
        model: str,
        *,
        api_key_env: str | None = "OPENAI_API_KEY",
        timeout_s: float = 120.0,
        max_retries: int = 6,
        max_concurrency: int = 8,
        backoff_base_s: float = 1.0,
        backoff_max_s: float = 60.0,
        cost_per_1k_prompt_tokens: float = 0.0,
        cost_per_1k_completion_tokens: float = 0.0,
        default_params: Mapping[str, Any] | None = None,
        sleep: Callable[[float], None] = time.sleep,
        seed: int | None = None,
        max_response_bytes: int = 16 * 2**20,
    ):
        if not base_url.startswith(("http://", "https://")):
            raise ValueError(f"base_url: expected an http(s) URL such as https://api.openai.com/v1, got {base_url!r}")
        for name, value in (
            ("timeout_s", timeout_s),
            ("max_concurrency", max_concurrency),
            ("max_response_bytes", max_response_bytes),
        ):
            if value <= 0:
                raise ValueError(f"{name}: expected a positive value, got {value}")
        if max_retries < 0:
            raise ValueError(f"max_retries: expected >= 0, got {max_retries}")
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model = model
        self.api_key_env = api_key_env
        self.timeout_s = timeout_s
        self.max_response_bytes = max_response_bytes
        self.max_retries = max_retries
        self.max_concurrency = max_concurrency
        self.backoff_base_s = backoff_base_s
        self.backoff_max_s = backoff_max_s
        self.cost_per_1k_prompt_tokens = cost_per_1k_prompt_tokens
        self.cost_per_1k_completion_tokens = cost_per_1k_completion_tokens
        self.default_params = dict(default_params or {})
        self._sleep = sleep
        self._random = random.Random(seed)
        self._lock = threading.Lock()
        self._usage = TokenUsage()

    @property
    def usage(self) -> TokenUsage:
        """Totals over every successful request so far."""
        with self._lock:
            return self._usage

    def redact(self, text: str) -> str:
        """`text` without the API key or any `Bearer ...` token: for every message that may be written or shown."""
        key = os.environ.get(self.api_key_env) if self.api_key_env else None
        if key:
            text = text.replace(key, REDACTED)
        return _BEARER.sub(f"Bearer {REDACTED}", text)

    def _headers(self) -> dict[str, str]:
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        key = os.environ.get(self.api_key_env) if self.api_key_env else None
        if key:
            headers["Authorization"] = f"Bearer {key}"
        return headers

    def backoff_delay(self, attempt: int, retry_after_s: float | None = None) -> float:
        """Seconds to wait before retry number `attempt` (0-based): Retry-After if given, else
        exponential backoff with equal jitter, in [d/2, d] for d = min(max, base * 2**attempt)."""
        if retry_after_s is not None:
            return retry_after_s
        delay = min(self.backoff_max_s, self.backoff_base_s * 2.0**attempt)
        with self._lock:
            return delay / 2 + self._random.uniform(0.0, delay / 2)

    def _post_once(self, payload: bytes) -> dict[str, Any]:
        request = urllib.request.Request(self.url, data=payload, headers=self._headers(), method="POST")
        deadline = _Deadline(self.timeout_s)
        try:
            with deadline.opener().open(request, timeout=self.timeout_s) as response:
                body = _read_capped(response, self.max_response_bytes, self.url)
            if deadline.expired:  # a socket shut down mid-body reads as a (short) end of the body
                raise _Retryable(f"no complete response from {self.url} within the {self.timeout_s} s deadline")
        except urllib.error.HTTPError as err:
            body = err.read(_ERROR_BODY_BYTES) if err.fp is not None else b""
            message = f"HTTP {err.code} from {self.url}: {_error_message(body)}"
            if err.code == 429 or err.code >= 500:
                raise _Retryable(message, parse_retry_after(err.headers.get("Retry-After")), err.code) from None
            hint = f" (is ${self.api_key_env} set?)" if err.code in (401, 403) and self.api_key_env else ""
            raise ChatClientError(message + hint, status=err.code) from None
        except ChatClientError:
            raise
        except (OSError, http.client.HTTPException) as err:
            if deadline.expired:
                raise _Retryable(
                    f"no complete response from {self.url} within the {self.timeout_s} s deadline"
                ) from None
            if isinstance(err, urllib.error.URLError):
                if isinstance(err.reason, (TimeoutError, socket.timeout)):
                    raise _Retryable(f"timed out after {self.timeout_s} s connecting to {self.url}") from None
                if isinstance(err.reason, ConnectionResetError):
                    raise _Retryable(f"connection to {self.url} dropped: {err.reason}") from None
                raise ChatClientError(f"cannot reach {self.url}: {err.reason}") from None
            if isinstance(err, (TimeoutError, socket.timeout)):
                raise _Retryable(f"no response from {self.url} within {self.timeout_s} s") from None
            if isinstance(err, (ConnectionError, http.client.RemoteDisconnected, http.client.IncompleteRead)):
                raise _Retryable(f"connection to {self.url} dropped: {err!r}") from None
            raise
        finally:
            deadline.cancel()
        try:
            data = json.loads(body)
        except json.JSONDecodeError:
            raise ChatClientError(f"{self.url} returned a body that is not JSON: {body[:200]!r}") from None
        if not isinstance(data, dict):
            raise ChatClientError(f"{self.url} returned {type(data).__name__}, expected a JSON object")
        return data

    def complete(self, messages: Sequence[Message], **params: Any) -> ChatResponse:
        """One chat completion (with retries). `params` override the client's default_params. A failure raises
        `ChatClientError` with the API key redacted from its message."""
        try:
            return self._complete(messages, **params)
        except ChatClientError as err:
            raise ChatClientError(self.redact(str(err)), err.status) from None

    def _complete(self, messages: Sequence[Message], **params: Any) -> ChatResponse:
        body = {"model": self.model, "messages": list(messages), **self.default_params, **params}
        payload = json.dumps(body).encode()
        for attempt in range(self.max_retries + 1):
            try:
                data = self._post_once(payload)
                break
            except _Retryable as err:
                if attempt == self.max_retries:
                    message = f"gave up after {attempt + 1} attempts; last error: {err}"
                    raise ChatClientError(message, err.status) from None
                self._sleep(self.backoff_delay(attempt, err.retry_after_s))
        return self._parse(data)

    def _parse(self, data: dict[str, Any]) -> ChatResponse:
        try:
            choice = data["choices"][0]
            text = choice["message"]["content"]
        except (KeyError, IndexError, TypeError):
            body = json.dumps(data)[:300]
            raise ChatClientError(f"{self.url} returned no choices[0].message.content: {body}") from None
        usage = data.get("usage") or {}
        prompt_tokens = int(usage.get("prompt_tokens") or 0)
        completion_tokens = int(usage.get("completion_tokens") or 0)
        cost = (
            prompt_tokens * self.cost_per_1k_prompt_tokens + completion_tokens * self.cost_per_1k_completion_tokens
        ) / 1000
        with self._lock:
            self._usage = TokenUsage(
                requests=self._usage.requests + 1,
                prompt_tokens=self._usage.prompt_tokens + prompt_tokens,
                completion_tokens=self._usage.completion_tokens + completion_tokens,
                cost=self._usage.cost + cost,
            )
        return ChatResponse(text or "", prompt_tokens, completion_tokens, choice.get("finish_reason"), data)

    def map(
        self, requests: Iterable[ChatRequest], *, progress: bool = True, description: str = "chat completions"
    ) -> Iterator[tuple[int, ChatResponse | ChatClientError]]:
        """Run requests with at most `max_concurrency` in flight; yield (index, response or error) in
        completion order. A failed request yields its ChatClientError instead of stopping the others.
        Closing the iterator early cancels the requests not yet started."""
        requests = list(requests)
        executor = concurrent.futures.ThreadPoolExecutor(max_workers=self.max_concurrency)
        try:
            futures = {
                executor.submit(self.complete, request.messages, **request.params): index
                for index, request in enumerate(requests)
            }
            with tqdm(total=len(requests), desc=description, disable=not progress, unit="req") as bar:
                for future in concurrent.futures.as_completed(futures):
                    bar.update(1)
                    error = future.exception()
                    if error is not None and not isinstance(error, ChatClientError):
                        raise error
                    yield futures[future], error if error is not None else future.result()
        finally:
            executor.shutdown(wait=True, cancel_futures=True)


def positive_int(text: str) -> int:
    """An argparse type: an integer >= 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def json_object(text: str) -> dict:
    """An argparse type: a JSON object (request parameters given on the command line)."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise argparse.ArgumentTypeError(f"not valid JSON: {err}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {text!r}")
    return value


def add_client_arguments(
    group: argparse._ActionsContainer, *, prefix: str = "", timeout_s: float, max_retries: int, model_example: str
) -> None:
    """The endpoint flags of a `ChatClient`, each `--{prefix}NAME` (e.g. `--llm-base-url` with prefix "llm-"):
    base URL, model, API-key variable, concurrency, timeout, retries and backoff, response size, token prices.
    `timeout_s` and `max_retries` are the command's defaults; `client_from_arguments` builds the client."""
    group.add_argument(
        f"--{prefix}base-url",
        help="OpenAI-compatible base URL, e.g. https://api.openai.com/v1 or http://localhost:8000/v1",
    )
    group.add_argument(f"--{prefix}model", help=f"model name on the endpoint, e.g. {model_example}")
    group.add_argument(
        f"--{prefix}api-key-env",
        default="OPENAI_API_KEY",
        help="environment variable holding the API key (default: %(default)s); unset = no key",
    )
    group.add_argument(
        f"--{prefix}concurrency",
        f"--{prefix}max-concurrency",
        dest=f"{prefix.replace('-', '_')}max_concurrency",
        type=positive_int,
        default=8,
        help="requests in flight (default: %(default)s)",
    )
    group.add_argument(
        f"--{prefix}timeout",
        type=float,
        default=timeout_s,
        help="wall-clock seconds per request, connecting and reading together (default: %(default)s)",
    )
    group.add_argument(
        f"--{prefix}max-response-bytes",
        type=positive_int,
        default=16 * 2**20,
        help="refuse a response larger than this (default: %(default)s, 16 MiB)",
    )
    group.add_argument(
        f"--{prefix}max-retries",
        type=int,
        default=max_retries,
        help="retries of a request on 429, 5xx and timeouts, with backoff (default: %(default)s)",
    )
    group.add_argument(
        f"--{prefix}backoff-base",
        type=float,
        default=1.0,
        help="first backoff delay in seconds, doubled per retry (default: %(default)s)",
    )
    group.add_argument(
        f"--{prefix}cost-per-1k-input", type=float, default=0.0, help="price of 1000 prompt tokens, for the summary"
    )
    group.add_argument(
        f"--{prefix}cost-per-1k-output",
        type=float,
        default=0.0,
        help="price of 1000 completion tokens, for the summary",
    )


def client_from_arguments(args: argparse.Namespace, *, prefix: str = "") -> ChatClient:
    """The `ChatClient` of the flags `add_client_arguments` declared with `prefix`."""

    def flag(name: str) -> Any:
        return getattr(args, prefix.replace("-", "_") + name)

    return ChatClient(
        flag("base_url"),
        flag("model"),
        api_key_env=flag("api_key_env"),
        timeout_s=flag("timeout"),
        max_retries=flag("max_retries"),
        max_concurrency=flag("max_concurrency"),
        backoff_base_s=flag("backoff_base"),
        cost_per_1k_prompt_tokens=flag("cost_per_1k_input"),
        cost_per_1k_completion_tokens=flag("cost_per_1k_output"),
        max_response_bytes=flag("max_response_bytes"),
    )
