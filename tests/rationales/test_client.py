"""ChatClient against a fake OpenAI-compatible server on 127.0.0.1 (every test bounded in requests and time)."""

from __future__ import annotations

import email.utils
import threading
import time

import pytest

from opsd_jax.rationales.client import ChatClient, ChatClientError, ChatRequest, parse_retry_after
from tests.eval.fake_chat_server import FakeChatServer, Reply, SleepRecorder, last_user_message


def _client(server, sleep=None, **kwargs) -> ChatClient:
    options = dict(timeout_s=2.0, max_retries=3, max_concurrency=4, backoff_base_s=0.5, seed=0)
    options.update(kwargs)
    return ChatClient(server.base_url, "test-model", sleep=sleep or SleepRecorder(), **options)


def test_completion_body_headers_and_token_accounting(monkeypatch):
    monkeypatch.setenv("TEST_CHAT_KEY", "sk-test")
    with FakeChatServer(lambda request, attempt: Reply(text="hello", prompt_tokens=7, completion_tokens=2)) as server:
        client = _client(
            server,
            api_key_env="TEST_CHAT_KEY",
            default_params={"temperature": 0.7, "max_tokens": 9},
            cost_per_1k_prompt_tokens=1.0,
            cost_per_1k_completion_tokens=3.0,
        )
        response = client.complete([{"role": "user", "content": "hi"}], temperature=0.0)
        client.complete([{"role": "user", "content": "again"}])
    assert response.text == "hello" and response.finish_reason == "stop"
    assert (response.prompt_tokens, response.completion_tokens) == (7, 2)
    assert server.requests[0] == {
        "model": "test-model",
        "messages": [{"role": "user", "content": "hi"}],
        "temperature": 0.0,
        "max_tokens": 9,
    }
    assert server.headers[0]["Authorization"] == "Bearer sk-test"
    usage = client.usage
    assert (usage.requests, usage.prompt_tokens, usage.completion_tokens, usage.total_tokens) == (2, 14, 4, 18)
    assert usage.cost == pytest.approx((14 * 1.0 + 4 * 3.0) / 1000)


def test_no_authorization_header_without_the_environment_variable(monkeypatch):
    monkeypatch.delenv("TEST_CHAT_KEY", raising=False)
    with FakeChatServer(lambda request, attempt: Reply(text="ok")) as server:
        _client(server, api_key_env="TEST_CHAT_KEY").complete([{"role": "user", "content": "hi"}])
    assert "Authorization" not in server.headers[0]


def test_429_honours_retry_after_and_5xx_backs_off_with_jitter():
    def reply(request, attempt):
        message = last_user_message(request)
        if message == "rate" and attempt == 0:
            return Reply(status=429, headers={"Retry-After": "7"}, error_message="slow down")
        if message == "flaky" and attempt < 2:
            return Reply(status=503 if attempt == 0 else 500)
        return Reply(text=f"done {message}")

    sleep = SleepRecorder()
    with FakeChatServer(reply) as server:
        client = _client(server, sleep=sleep, backoff_base_s=0.5)
        assert client.complete([{"role": "user", "content": "rate"}]).text == "done rate"
        assert sleep.delays == [7.0]  # exactly the server's Retry-After
        assert client.complete([{"role": "user", "content": "flaky"}]).text == "done flaky"
    assert server.count() == 2 + 3
    first, second = sleep.delays[1:]
    assert 0.25 <= first <= 0.5 and 0.5 <= second <= 1.0  # equal jitter in [d/2, d], d = 0.5 * 2**attempt
    assert client.usage.requests == 2  # failed attempts are not counted


def test_timeout_is_retried(monkeypatch):
    with FakeChatServer(
        lambda request, attempt: Reply(text="late" if attempt else "never", delay_s=0 if attempt else 4.0)
    ) as server:
        client = _client(server, timeout_s=1.0)
        start = time.monotonic()
        assert client.complete([{"role": "user", "content": "hang"}]).text == "late"
        elapsed = time.monotonic() - start
    assert server.count() == 2
    assert 1.0 <= elapsed < 3.5  # gave up on the hanging attempt instead of waiting for it


def test_other_4xx_fail_at_once_with_status_and_message():
    with FakeChatServer(lambda request, attempt: Reply(status=400, error_message="messages: bad role")) as server:
        client = _client(server)
        with pytest.raises(ChatClientError, match="HTTP 400 .*messages: bad role") as info:
            client.complete([{"role": "user", "content": "x"}])
    assert info.value.status == 400 and server.count() == 1


def test_unauthorised_names_the_key_variable():
    with FakeChatServer(lambda request, attempt: Reply(status=401, error_message="invalid api key")) as server:
        with pytest.raises(ChatClientError, match=r"HTTP 401 .*invalid api key.*\$MY_KEY"):
            _client(server, api_key_env="MY_KEY").complete([{"role": "user", "content": "x"}])


def test_gives_up_after_max_retries():
    with FakeChatServer(lambda request, attempt: Reply(status=502, error_message="bad gateway")) as server:
        with pytest.raises(ChatClientError, match="gave up after 3 attempts.*HTTP 502.*bad gateway") as info:
            _client(server, max_retries=2).complete([{"role": "user", "content": "x"}])
    assert info.value.status == 502 and server.count() == 3


def test_map_bounds_concurrency_and_yields_every_result_or_error():
    # The first three requests hold their replies until all three are in flight (at most 10 s), so the
    # peak does not depend on how fast a loaded machine starts the client's threads.
    arrived, three_in_flight, lock = [0], threading.Event(), threading.Lock()

    def reply(request, attempt):
        message = last_user_message(request)
        with lock:
            arrived[0] += 1
            if arrived[0] == 3:
                three_in_flight.set()
        three_in_flight.wait(timeout=10.0)
        if message == "bad":
            return Reply(status=422, error_message="unprocessable")
        return Reply(text=message.upper(), delay_s=0.05)

    prompts = [f"p{i}" for i in range(10)] + ["bad"]
    with FakeChatServer(reply) as server:
        client = _client(server, max_concurrency=3)
        results = dict(
            client.map(
                [ChatRequest([{"role": "user", "content": p}], {"max_tokens": 4}) for p in prompts], progress=False
            )
        )
    assert sorted(results) == list(range(len(prompts)))
    assert [results[i].text for i in range(10)] == [p.upper() for p in prompts[:10]]
    assert isinstance(results[10], ChatClientError) and results[10].status == 422
    assert server.peak_in_flight == 3
    assert all(request["max_tokens"] == 4 for request in server.requests)


def test_parse_retry_after():
    assert parse_retry_after("3") == 3.0 and parse_retry_after("0.25") == 0.25 and parse_retry_after(None) is None
    now = 1_700_000_000.0
    assert parse_retry_after(email.utils.formatdate(now + 30, usegmt=True), now=now) == pytest.approx(30.0)
    assert parse_retry_after("soon") is None


def test_bad_arguments_name_the_field():
    with pytest.raises(ValueError, match="base_url"):
        ChatClient("localhost:8000", "m")
    with pytest.raises(ValueError, match="max_concurrency"):
        ChatClient("http://localhost:8000/v1", "m", max_concurrency=0)


def test_a_trickling_server_meets_the_wall_clock_deadline():
    # One byte every 0.1 s: each read returns well within the socket timeout, the whole body would take minutes.
    with FakeChatServer(lambda request, attempt: Reply(text="x" * 2000, drip_s=0.1)) as server:
        began = time.monotonic()
        with pytest.raises(ChatClientError, match=r"no complete response .* within the 1\.0 s deadline"):
            _client(server, timeout_s=1.0, max_retries=0).complete([{"role": "user", "content": "hi"}])
        assert time.monotonic() - began < 3.0


@pytest.mark.parametrize("send_length", [True, False])
def test_a_response_over_the_size_cap_is_refused(send_length):
    with FakeChatServer(lambda request, attempt: Reply(text="x" * 300_000, send_length=send_length)) as server:
        client = _client(server, max_response_bytes=100_000)
        with pytest.raises(ChatClientError, match=r"over the 100000-byte limit|more than 100000 bytes"):
            client.complete([{"role": "user", "content": "hi"}])
        assert server.count() == 1  # not retried: the same request would get the same answer
        assert (
            _client(server, max_response_bytes=400_000).complete([{"role": "user", "content": "hi"}]).text
            == "x" * 300_000
        )


def test_an_echoed_key_is_redacted_from_errors(monkeypatch):
    monkeypatch.setenv("TEST_CHAT_KEY", "sk-very-secret-123")
    reply = lambda request, attempt: Reply(status=400, error_message="bad request", echo_authorization=True)  # noqa: E731
    with FakeChatServer(reply) as server:
        with pytest.raises(ChatClientError) as error:
            _client(server, api_key_env="TEST_CHAT_KEY").complete([{"role": "user", "content": "hi"}])
    assert "sk-very-secret" not in str(error.value) and "Bearer [REDACTED]" in str(error.value)
