"""``python -m pipeline serve`` with two workers (tests/service/served.py serves the
fakes' app the same way): a client's few keep-alive connections reach both workers,
and the supervisor's servers never outlive it or each other."""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time

import psutil

from tests.support import LOOPBACK, ROOT, clean_env, free_port, listeners, started

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
    """granian's own workers share one listening socket, which handed a burst of
    connections to one worker; each worker is a server of its own on the port."""
    port = free_port()
    with started(served(tmp_path, port), f"http://{LOOPBACK}:{port}/readyz", clean_env(), cwd=ROOT, timeout=60):
        # both servers listening (the first one ready answers /readyz already)
        assert listeners(port) == 2  # /readyz waits for both workers
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


def gone(processes: list[psutil.Process], timeout: float = 30) -> list[str]:
    """The command lines of those still running after ``timeout`` (zombies are gone)."""
    _, alive = psutil.wait_procs(processes, timeout=timeout)
    return [" ".join(p.cmdline()) for p in alive if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]


def test_readyz_waits_for_every_worker_and_says_so(tmp_path):
    port = free_port()
    with started(served(tmp_path, port), f"http://{LOOPBACK}:{port}/readyz", clean_env(), cwd=ROOT, timeout=60):
        for _ in range(4):  # whichever worker answers
            conn = http.client.HTTPConnection(LOOPBACK, port, timeout=10)
            conn.request("GET", "/readyz")
            resp = conn.getresponse()
            assert (resp.status, json.loads(resp.read())["workers"]) == (200, "2 of 2 ready")
            conn.close()


def test_a_worker_marker_counts_only_while_its_process_lives(tmp_path):
    from pipeline.launcher import WorkerMarkers

    markers = WorkerMarkers(str(tmp_path), expected=2)
    markers.mark()
    assert markers.check() == (False, "1 of 2 ready")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / str(dead.pid)).touch()  # a worker that died (its respawn not ready yet)
    assert markers.check() == (False, "1 of 2 ready")
    assert not (tmp_path / str(dead.pid)).exists()
    (tmp_path / str(os.getppid())).touch()
    assert markers.check() == (True, "2 of 2 ready")


def test_servers_that_cannot_listen_make_a_non_zero_exit(tmp_path):
    """Both servers fail at start alike (the port held by a socket without SO_REUSEPORT)."""
    with socket.socket() as holder:
        holder.bind((LOOPBACK, 0))
        holder.listen()
        proc = subprocess.run(served(tmp_path, holder.getsockname()[1]), env=clean_env(), cwd=ROOT,
                              capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0, proc.stdout[-2000:]


def test_the_servers_stop_with_the_supervisor_and_with_each_other(tmp_path):
    port = free_port()
    with started(served(tmp_path, port), f"http://{LOOPBACK}:{port}/readyz", clean_env(), cwd=ROOT,
                 timeout=60) as proc:
        servers = psutil.Process(proc.pid).children()
        assert len(servers) == 2
        family = psutil.Process(proc.pid).children(recursive=True)  # the servers and their workers
        assert len(family) == 4
        # one server killed: the supervisor stops the other, and the killed one's worker,
        # and exits non-zero
        servers[0].kill()
        assert proc.wait(60) not in (0, None)
        assert not gone(family)

    port = free_port()
    with started(served(tmp_path, port), f"http://{LOOPBACK}:{port}/readyz", clean_env(), cwd=ROOT,
                 timeout=60) as proc:
        family = psutil.Process(proc.pid).children(recursive=True)  # servers and their workers
        assert len(family) == 4
        os.kill(proc.pid, signal.SIGKILL)  # the supervisor killed outright
        proc.wait(10)
        assert not gone(family)
        # nothing holds the port any more
        assert listeners(port) == 0


def test_sigterm_stops_every_server_cleanly(tmp_path):
    port = free_port()
    proc = subprocess.Popen(served(tmp_path, port), env=clean_env(), cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        from tests.support import wait_http

        wait_http(f"http://{LOOPBACK}:{port}/readyz", 60, proc, lambda status: status == 200)
        family = psutil.Process(proc.pid).children(recursive=True)
        assert len(family) == 4
        started_at = time.monotonic()
        proc.terminate()
        assert proc.wait(40) == 0
        assert time.monotonic() - started_at < 30
        assert not gone(family, timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
