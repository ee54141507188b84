"""``python -m pipeline serve`` with two workers (tests/service/served.py serves the
fakes' app the same way): a client's few keep-alive connections reach both workers,
and the supervisor's servers never outlive it or each other."""

from __future__ import annotations

import http.client
import os
import signal
import subprocess
import sys
import time
from urllib.parse import urlsplit

import psutil

from tests.support import LOOPBACK, ROOT, clean_env, free_port, started, wait_until

CONNECTIONS = 16  # all on one of two workers by chance: 2 in 65,536


def holders(port: int, client_ports: set[int]) -> set[int]:
    """The processes holding the server side of these client connections."""
    found = set()
    for proc in psutil.process_iter():
        try:
            for conn in proc.net_connections(kind="tcp"):
                if conn.laddr and conn.laddr.port == port and conn.raddr and conn.raddr.port in client_ports:
                    found.add(proc.pid)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return found


def served(tmp_path, port: int) -> list[str]:
    return [sys.executable, "-m", "tests.service.served", str(tmp_path), str(port), "2"]


def test_a_few_keep_alive_connections_reach_both_workers(tmp_path):
    """granian's workers share one listening socket, which handed all of a burst of
    connections to one worker; each worker is a server of its own on the port."""
    port = free_port()
    with started(served(tmp_path, port), f"http://{LOOPBACK}:{port}/readyz", clean_env(), cwd=ROOT, timeout=60):
        # both servers listening (the first one ready answers /readyz already)
        wait_until(lambda: sum(c.laddr.port == port and c.status == psutil.CONN_LISTEN
                               for c in psutil.net_connections(kind="tcp")) == 2, 30, "both servers to listen")
        conns = [http.client.HTTPConnection(LOOPBACK, port, timeout=10) for _ in range(CONNECTIONS)]
        try:
            for conn in conns:
                conn.request("GET", "/healthz")
                assert conn.getresponse().read() and conn.sock is not None
            client_ports = {conn.sock.getsockname()[1] for conn in conns}
            assert len(holders(port, client_ports)) == 2
        finally:
            for conn in conns:
                conn.close()


def test_the_servers_stop_with_the_supervisor_and_with_each_other(tmp_path):
    port = free_port()
    with started(served(tmp_path, port), f"http://{LOOPBACK}:{port}/readyz", clean_env(), cwd=ROOT,
                 timeout=60) as proc:
        wait_until(lambda: len(psutil.Process(proc.pid).children()) == 2, 30, "two servers")
        servers = psutil.Process(proc.pid).children()
        # one server gone by itself: the supervisor stops the other and exits non-zero
        servers[0].kill()
        assert proc.wait(40) not in (0, None)
        assert not any(s.is_running() and s.status() != psutil.STATUS_ZOMBIE for s in servers)

    port = free_port()
    with started(served(tmp_path, port), f"http://{LOOPBACK}:{port}/readyz", clean_env(), cwd=ROOT,
                 timeout=60) as proc:
        wait_until(lambda: len(psutil.Process(proc.pid).children()) == 2, 30, "two servers")
        family = psutil.Process(proc.pid).children(recursive=True)  # servers and their workers
        os.kill(proc.pid, signal.SIGKILL)  # the supervisor killed outright
        proc.wait(10)
        gone, alive = psutil.wait_procs(family, timeout=30)
        assert not alive, [p.cmdline() for p in alive]
        # nothing holds the port any more
        assert not [c for c in psutil.net_connections(kind="tcp") if c.laddr and c.laddr.port == port
                    and c.status == psutil.CONN_LISTEN]


def test_sigterm_stops_every_server_cleanly(tmp_path):
    port = free_port()
    proc = subprocess.Popen(served(tmp_path, port), env=clean_env(), cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        from tests.support import wait_http

        wait_http(f"http://{LOOPBACK}:{port}/readyz", 60, proc, lambda status: status == 200)
        family = psutil.Process(proc.pid).children(recursive=True)
        started_at = time.monotonic()
        proc.terminate()
        assert proc.wait(40) == 0
        assert time.monotonic() - started_at < 30
        gone, alive = psutil.wait_procs(family, timeout=10)
        assert not alive
    finally:
        if proc.poll() is None:
            proc.kill()
