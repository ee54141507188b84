"""The RSGI front (pipeline/front.py) without a server: fake RSGI scope and
protocol objects on an asyncio loop. What a request sees of its arrival, which
the online store uses to fail at once those that waited behind a late read."""

from __future__ import annotations

import asyncio
import json
import time

from pipeline.api import ARRIVED
from pipeline.front import RSGIFront


class Headers(dict):
    pass


class Scope:
    proto, http_version, method, query_string, scheme = "http", "1.1", "GET", "", "http"
    server, client = "127.0.0.1:8000", "127.0.0.1:50000"

    def __init__(self, path: str) -> None:
        self.path, self.headers = path, Headers()


class Protocol:
    def __init__(self, body: bytes = b"") -> None:
        self.body, self.answer = body, None

    async def _chunks(self):
        await asyncio.sleep(0)
        if self.body:
            yield self.body

    def __aiter__(self):
        return self._chunks()

    def response_bytes(self, status, headers, body):
        self.answer = (status, headers, body)


class SlowApp:
    """A WSGI app that holds its thread for ``seconds`` and keeps what each request saw."""

    def __init__(self, seconds: float) -> None:
        self.seconds, self.seen = seconds, []

    def __call__(self, environ, start_response):
        self.seen.append((environ["PATH_INFO"], environ[ARRIVED], time.monotonic()))
        time.sleep(self.seconds)
        start_response("200 OK", [("Content-Type", "application/json")])
        return [json.dumps({"ok": True}).encode()]

    def record(self, *args) -> None:
        pass

    def route_of(self, path: str) -> str:
        return path


def test_a_request_that_waited_for_the_loop_arrived_when_the_call_before_it_started():
    app = SlowApp(0.05)
    front = RSGIFront(app, body_timeout_seconds=1.0, max_body_bytes=1024, threads=1)
    first, second = Protocol(), Protocol()

    async def scenario():
        loop = asyncio.get_running_loop()
        task = loop.create_task(front.__rsgi__(Scope("/first"), first))
        # the second arrives 10 ms into the first's 50 ms call, while the loop is held
        loop.call_later(0.01, lambda: loop.create_task(front.__rsgi__(Scope("/second"), second)))
        await task
        await asyncio.sleep(0.2)

    asyncio.run(scenario())
    (_, first_arrived, first_called), (_, second_arrived, second_called) = app.seen
    assert first.answer[0] == second.answer[0] == 200
    assert second_called - first_called >= 0.05  # it waited for the first call
    assert second_arrived <= first_called  # and it is told so


def test_a_request_on_a_free_loop_arrives_when_it_arrives():
    app = SlowApp(0.0)
    front = RSGIFront(app, body_timeout_seconds=1.0, max_body_bytes=1024, threads=1)

    async def scenario():
        await front.__rsgi__(Scope("/a"), Protocol())
        await asyncio.sleep(0.05)
        before = time.monotonic()
        await front.__rsgi__(Scope("/b"), Protocol())
        return before

    before = asyncio.run(scenario())
    assert app.seen[1][1] >= before
