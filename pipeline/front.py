"""The HTTP front of the service: granian's RSGI interface in front of the WSGI app.

granian has no time limit on reading a request body, and under its WSGI
interface a worker thread that waits on a stalled body cannot be taken back
(a few slow clients then take the whole server). Here the body is read on the
event loop within ``MLOPS_BODY_TIMEOUT_SECONDS`` (a JSON 408, the connection
closed, after that), a too-long ``Content-Length`` is refused before a byte is
read (JSON 413), chunked bodies are read whole, and only then is the werkzeug
app (:mod:`pipeline.serve`) called with a complete body: ``/predict`` through
its hot path (:meth:`~pipeline.serve.PredictionService.answer_predict`, handed
the few fields it reads), every other route as WSGI.
"""

from __future__ import annotations

import asyncio
import io
import logging
import sys
import time
from concurrent.futures import ThreadPoolExecutor

from pipeline.api import ARRIVED, BODY
from pipeline.serve import PredictionService
from pipeline.settings import Settings

log = logging.getLogger(__name__)


# A request taken up by the event loop this soon after an app call ran inline on it
# arrived while that call ran (the loop takes up waiting requests at once when free,
# within a millisecond or two; more on a loaded machine).
QUEUED_SLACK_SECONDS = 0.02


class BodyTooLarge(Exception):
    pass


class RSGIFront:
    """What granian runs: its RSGI interface in front of the WSGI app.

    The request body is read here, on the worker's event loop, whole and
    bounded: at most ``MLOPS_MAX_BODY_BYTES`` (413 past that) within
    ``MLOPS_BODY_TIMEOUT_SECONDS`` (408 past that, and the connection is
    closed); a chunked body is read the same way. Only then is the app
    called (``/predict``'s hot path, else the WSGI app), with the body in
    memory, so it never waits on a client: on the
    event loop itself with ``MLOPS_THREADS=1`` (the default), else on a pool of
    that many threads. Measured on the two-core machine over the in-memory
    fakes with wrk (2 workers, 2 and 8 connections): the app on the loop
    answered as many requests per second as granian's WSGI interface with one
    thread (about 2,000 to 4,500, the machine was noisy), the hop to a pool
    thread and back cost about 40 % of that. One app call at a time per worker
    is what ``MLOPS_THREADS=1`` meant under WSGI too.

    Why not granian's WSGI interface: there the app reads ``wsgi.input`` on its
    worker thread, and that read waits, with no time limit, for bytes the client
    may never send. granian 2.5 bounds only the time to read the headers
    (``http1_settings.header_read_timeout``), not the body; ``backpressure``
    and ``blocking_threads`` only bound how many requests wait. Sixteen clients
    that announce a body and send one byte held every thread of both workers,
    and /healthz timed out for everyone. More threads with a deadline in the app
    would not have helped: a thread cannot be taken back from a read in
    progress, so each stalled client keeps one for as long as its socket stays
    open. Here a stalled body is one pending await on the event loop: 64 of them
    cost nothing, other clients' requests answer as before, and each one is cut
    with a 408 when its deadline passes (tests/faults/test_slow_clients.py).
    """

    JSON = [("content-type", "application/json")]

    def __init__(self, service: PredictionService, *, body_timeout_seconds: float, max_body_bytes: int,
                 threads: int) -> None:
        self.service = service
        self.body_timeout_seconds = body_timeout_seconds
        self.max_body_bytes = max_body_bytes
        self.executor = ThreadPoolExecutor(threads, thread_name_prefix="app") if threads > 1 else None
        # the last app call run on the loop (inline): requests picked up just after it waited for it
        self._call_started = self._call_ended = float("-inf")

    # granian's hooks
    def __rsgi_init__(self, loop) -> None:
        pass

    def __rsgi_del__(self, loop) -> None:
        if self.executor is not None:
            self.executor.shutdown(wait=False)
        if getattr(self.service, "metrics", None) is not None:
            self.service.metrics.close()  # what this worker counted last, before it goes
        if getattr(self.service, "predlog", None) is not None:
            self.service.predlog.close(timeout=5)  # a graceful stop (SIGTERM) writes what was queued

    async def __rsgi__(self, scope, protocol) -> None:
        if scope.proto != "http":  # no websockets here
            return
        started, arrived = time.perf_counter(), time.monotonic()
        if arrived - self._call_ended < QUEUED_SLACK_SECONDS:
            # Picked up as the loop came free: this request arrived while the app
            # call before it ran (inline, one at a time), so it has waited since then.
            arrived = min(arrived, self._call_started)
        headers = scope.headers
        try:
            if "transfer-encoding" not in headers and headers.get("content-length", "0").strip() == "0":
                body = b""  # no body (a GET): nothing to wait for, no round trip through granian
            else:
                # asyncio.timeout, not wait_for: the read stays in this task (no task made per body)
                async with asyncio.timeout(self.body_timeout_seconds):
                    body = await self._read_body(scope, protocol)
        except asyncio.TimeoutError:
            return self._refuse(scope, protocol, started, 408, "request body not received within "
                                f"{self.body_timeout_seconds:g} s; send the whole body at once")
        except BodyTooLarge:
            return self._refuse(scope, protocol, started, 413, f"request body over {self.max_body_bytes} "
                                "bytes; send fewer instances per request")
        except Exception as exc:  # a malformed chunked body, a client gone mid-body
            log.info("serve: could not read a request body: %s", exc)
            return self._refuse(scope, protocol, started, 400, "request body could not be read "
                                "(malformed chunked encoding?); send JSON with a Content-Length")
        method = scope.method
        if scope.path == "/predict" and (method == "GET" or method == "POST"):
            # the hot path needs no WSGI environ: only what PredictionService.predict reads
            call, args = self.service.answer_predict, (
                {"QUERY_STRING": scope.query_string, BODY: body, ARRIVED: arrived,
                 "HTTP_X_REQUEST_ID": headers.get("x-request-id")}, method)
        else:
            environ = self._environ(scope, body)
            environ[ARRIVED], environ[BODY] = arrived, body
            call, args = call_wsgi, (self.service, environ)
        try:
            if self.executor is None:
                self._call_started = time.monotonic()
                try:
                    status, headers, payload = call(*args)
                finally:
                    self._call_ended = time.monotonic()
            else:
                status, headers, payload = await asyncio.get_running_loop().run_in_executor(
                    self.executor, call, *args)
        except Exception:
            log.exception("serve: unexpected error on %s", scope.path)
            return self._refuse(scope, protocol, started, 500, "internal error; see the server log")
        protocol.response_bytes(status, headers, payload)

    async def _read_body(self, scope, protocol) -> bytes:
        declared = scope.headers.get("content-length")
        if declared is not None and declared.strip().isdigit() and int(declared) > self.max_body_bytes:
            raise BodyTooLarge()  # refused before a byte of it is read
        parts, size = [], 0
        async for part in protocol:
            size += len(part)
            if size > self.max_body_bytes:
                raise BodyTooLarge()
            parts.append(part)
        return b"".join(parts)

    def _refuse(self, scope, protocol, started: float, status: int, message: str) -> None:
        """An error answered here, before the app: the same JSON as the app's, counted the same
        way; the connection is closed, as the rest of the body may still be on its way."""
        from pipeline.api import JSONHTTPException

        body = JSONHTTPException(status, message).get_body().encode()
        protocol.response_bytes(status, [*self.JSON, ("connection", "close")], body)
        self.service.record(self.service.route_of(scope.path), scope.method, status,
                            time.perf_counter() - started)

    @staticmethod
    def _environ(scope, body: bytes) -> dict:
        """The WSGI environ (PEP 3333) of an RSGI request whose body was read whole."""
        host, _, port = scope.server.rpartition(":")
        environ = {
            "REQUEST_METHOD": scope.method, "SCRIPT_NAME": "",
            # PEP 3333: the decoded path's bytes, as latin-1 text
            "PATH_INFO": scope.path.encode("utf-8", "surrogateescape").decode("latin-1"),
            "QUERY_STRING": scope.query_string, "SERVER_NAME": host, "SERVER_PORT": port,
            "SERVER_PROTOCOL": f"HTTP/{scope.http_version}", "REMOTE_ADDR": scope.client.rpartition(":")[0],
            "CONTENT_LENGTH": str(len(body)),
            "wsgi.version": (1, 0), "wsgi.url_scheme": scope.scheme, "wsgi.input": io.BytesIO(body),
            "wsgi.errors": sys.stderr, "wsgi.multithread": True, "wsgi.multiprocess": True,
            "wsgi.run_once": False, "wsgi.input_terminated": True,
        }
        for name, value in scope.headers.items():
            if name in ("content-length", "transfer-encoding"):  # the body is whole now
                continue
            key = "CONTENT_TYPE" if name == "content-type" else "HTTP_" + name.upper().replace("-", "_")
            environ[key] = f"{environ[key]},{value}" if key in environ else value
        return environ


def call_wsgi(app, environ: dict) -> tuple[int, list[tuple[str, str]], bytes]:
    """``(status, headers, body)`` of one call of a WSGI app."""
    started: list = []

    def start_response(status, headers, exc_info=None):
        started[:] = [status, headers]

    chunks = app(environ, start_response)
    try:
        body = b"".join(chunks)
    finally:
        if hasattr(chunks, "close"):
            chunks.close()
    status, headers = started
    return int(status.split(" ", 1)[0]), [(k.lower(), v) for k, v in headers], body


def rsgi_app(service: PredictionService, settings: Settings) -> RSGIFront:
    return RSGIFront(service, body_timeout_seconds=settings.body_timeout_seconds,
                     max_body_bytes=settings.max_body_bytes, threads=settings.threads)


