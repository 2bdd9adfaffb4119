"""A local fake OpenAI-compatible chat-completions server for tests (127.0.0.1, random port).

`FakeChatServer(reply)` calls `reply(request_json, attempt)` for each POST to /v1/chat/completions,
where `attempt` counts earlier requests with the same last user message (0 for the first one); it
returns a `Reply`. Every request is recorded; the peak number of requests in flight is tracked.
"""

from __future__ import annotations

import dataclasses
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable


@dataclasses.dataclass
class Reply:
    text: str = ""
    status: int = 200
    delay_s: float = 0.0
    headers: dict[str, str] = dataclasses.field(default_factory=dict)
    error_message: str = ""
    prompt_tokens: int = 10
    completion_tokens: int = 3
    drip_s: float = 0.0  # > 0: the body is sent one byte at a time, this many seconds apart
    send_length: bool = True  # False: no Content-Length, the body ends when the connection closes
    echo_authorization: bool = False  # the error message repeats the request's Authorization header


class SleepRecorder:
    """Stands in for time.sleep: records the requested delays and sleeps for none of them."""

    def __init__(self):
        self.delays: list[float] = []
        self._lock = threading.Lock()

    def __call__(self, seconds: float) -> None:
        with self._lock:
            self.delays.append(seconds)


def last_user_message(request: dict[str, Any]) -> str:
    return request["messages"][-1]["content"]


class FakeChatServer:
    def __init__(self, reply: Callable[[dict[str, Any], int], Reply]):
        self.reply = reply
        self.requests: list[dict[str, Any]] = []
        self.headers: list[dict[str, str]] = []
        self.in_flight = 0
        self.peak_in_flight = 0
        self._lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output quiet
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with server._lock:
                    attempt = sum(last_user_message(r) == last_user_message(body) for r in server.requests)
                    server.requests.append(body)
                    server.headers.append(dict(self.headers))
                    server.in_flight += 1
                    server.peak_in_flight = max(server.peak_in_flight, server.in_flight)
                counted = [True]

                def leave() -> None:
                    # Before the reply's first byte: a client that has read its reply may send its next
                    # request before this handler's thread runs again, and must not be counted twice.
                    if counted[0]:
                        counted[0] = False
                        with server._lock:
                            server.in_flight -= 1

                try:
                    answer = server.reply(body, attempt)
                    time.sleep(answer.delay_s)
                    if answer.status == 200:
                        payload = {
                            "id": "chatcmpl-test",
                            "object": "chat.completion",
                            "model": body["model"],
                            "choices": [
                                {
                                    "index": 0,
                                    "message": {"role": "assistant", "content": answer.text},
                                    "finish_reason": "stop",
                                }
                            ],
                            "usage": {
                                "prompt_tokens": answer.prompt_tokens,
                                "completion_tokens": answer.completion_tokens,
                                "total_tokens": answer.prompt_tokens + answer.completion_tokens,
                            },
                        }
                    else:
                        message = answer.error_message or f"status {answer.status}"
                        if answer.echo_authorization:
                            message += f" (you sent Authorization: {self.headers.get('Authorization')})"
                        payload = {"error": {"message": message, "type": "test"}}
                    data = json.dumps(payload).encode()
                    leave()
                    self.send_response(answer.status)
                    self.send_header("Content-Type", "application/json")
                    if answer.send_length:
                        self.send_header("Content-Length", str(len(data)))
                    else:
                        self.close_connection = True
                    for key, value in answer.headers.items():
                        self.send_header(key, value)
                    self.end_headers()
                    if answer.drip_s:
                        for index in range(len(data)):
                            self.wfile.write(data[index : index + 1])
                            self.wfile.flush()
                            time.sleep(answer.drip_s)
                    else:
                        self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (timeout test)
                finally:
                    leave()

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)

    @property
    def base_url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}/v1"

    def count(self, predicate: Callable[[str], bool] = lambda message: True) -> int:
        with self._lock:
            return sum(predicate(last_user_message(request)) for request in self.requests)

    def __enter__(self) -> FakeChatServer:
        self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)
