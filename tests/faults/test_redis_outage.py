"""Redis stops (SIGSTOP), comes back, is killed, restarts, all while /predict is
under load from granian over real sockets: answers turn into 503 JSON within
100 ms, /readyz fails, /healthz stays up, and service recovers by itself."""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request

import pytest

from pipeline.cli import run_stages
from pipeline.dag import STAGE_NAMES as STAGES
from tests.support import clean_env, make_settings, redis_url, running_server, wait_until

pytestmark = [pytest.mark.faults, pytest.mark.docker]
CLIENTS, MAX_REQUESTS, MAX_SECONDS = 4, 40_000, 90


def call(url: str) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


class Load:
    """CLIENTS threads of GET /predict, bounded in count and time."""

    def __init__(self, url: str) -> None:
        self.url, self.log, self.stop = url, [], threading.Event()
        self.threads = [threading.Thread(target=self.loop, args=(i,)) for i in range(CLIENTS)]

    def loop(self, i: int) -> None:
        deadline = time.monotonic() + MAX_SECONDS
        entity = 1000 + i
        while not self.stop.is_set() and time.monotonic() < deadline and len(self.log) < MAX_REQUESTS:
            started = time.monotonic()
            status, body = call(f"{self.url}?customer_id={entity}")
            self.log.append((started, time.monotonic() - started, status, body))

    def __enter__(self):
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        for t in self.threads:
            t.join(30)

    def between(self, start: float, end: float) -> list:
        return [r for r in self.log if start <= r[0] < end]

    def answers(self, after: float, status: int) -> list:
        return [r for r in self.log if r[0] >= after and r[2] == status]

    def first(self, after: float, status: int) -> float:
        """Seconds from ``after`` to the first ``status`` answer (waits up to 30 s)."""
        hits = wait_until(lambda: self.answers(after, status), 30, f"a {status} answer")
        return min(r[0] + r[1] for r in hits) - after

    def keep_answering(self, after: float, status: int, count: int, seconds: float = 0.0) -> None:
        """Wait until ``count`` answers with ``status`` came after ``after``, the last
        of them started at least ``seconds`` after it (the phase lasted that long)."""
        wait_until(lambda: (len(hits := self.answers(after, status)) >= count
                            and hits[-1][0] >= after + seconds), 60,
                   f"{count} answers {status} spanning {seconds} s")


def test_redis_outage_under_load(tmp_path, figures, durable_redis):
    container, password = durable_redis
    url = redis_url(container, password)
    settings = make_settings(tmp_path, redis_url=url)
    run_stages(settings, STAGES)
    env = clean_env(MLOPS_SHARED_DIR=str(tmp_path), MLOPS_REDIS_URL=url)
    redis_proc = container.get_wrapped_container()
    with running_server(env) as base:
        with Load(f"{base}/predict") as load:
            load.keep_answering(0, 200, 100)  # warmed up: every client is served
            stopped = time.monotonic()
            redis_proc.kill(signal="SIGSTOP")
            detect = load.first(stopped, 503)
            # a 2 s outage spans several back-off windows, so the store is re-probed
            # (each probe bounded by its socket timeout) while answers stay fast
            load.keep_answering(stopped, 503, 20, seconds=2.0)
            ready, _ = call(f"{base}/readyz")
            alive, _ = call(f"{base}/healthz")
            resumed = time.monotonic()
            redis_proc.kill(signal="SIGCONT")
            recover_cont = load.first(resumed, 200)

            load.keep_answering(resumed, 200, 100)
            killed = time.monotonic()
            redis_proc.kill(signal="SIGKILL")
            load.first(killed, 503)
            load.keep_answering(killed, 503, 20, seconds=1.0)
            restarted = time.monotonic()
            redis_proc.start()
            recover_restart = load.first(restarted, 200)
            load.keep_answering(restarted + recover_restart + 0.2, 200, 100)

        outage = [r for r in load.between(stopped + 0.01, resumed) if r[2] != 200]
        before = load.between(0, stopped)
        assert before and all(r[2] == 200 for r in before)
        assert len(outage) >= 20
        assert {r[2] for r in outage} == {503}
        assert all("online store unreachable" in r[3]["message"] for r in outage)
        outage_ms = sorted(r[1] * 1000 for r in outage)
        p95 = outage_ms[int(0.95 * (len(outage_ms) - 1))]
        # Fast failure for a store that is really down: 95 % of the 503s within 100 ms, none
        # held for long. (One answer in a run can meet a scheduling stall of a loaded machine:
        # a single maximum would test the machine, not the service.)
        assert p95 < 100, f"95 % of the 503s within {p95:.0f} ms (all: {outage_ms[-10:]})"
        assert outage_ms[-1] < 500, f"a 503 took {outage_ms[-1]:.0f} ms"
        assert ready == 503 and alive == 200
        assert recover_cont < 5 and recover_restart < 10
        after = [r for r in load.log if r[0] > restarted + recover_restart + 0.2]
        assert after and all(r[2] == 200 for r in after)  # the data outlived the restart
        figures["redis outage: requests answered while Redis was stopped"] = len(outage)
        figures["redis outage: 503 latency p50 / p95 / max (ms)"] = (
            round(outage_ms[len(outage_ms) // 2], 1), round(p95, 1), round(outage_ms[-1], 1))
        figures["redis outage: first 503 after SIGSTOP (s)"] = round(detect, 3)
        figures["redis outage: first 200 after SIGCONT (s)"] = round(recover_cont, 3)
        figures["redis outage: first 200 after kill + restart (s)"] = round(recover_restart, 3)
        figures["redis outage: requests in the whole test"] = len(load.log)
