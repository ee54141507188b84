"""A real Redis Cluster for tests and benchmarks: 3 masters and 3 replicas of Debian's
redis-server on free loopback ports, append-only files, a password.

Nothing here imports pytest. :func:`redis_cluster` raises :class:`NoRedisServer`
where redis-server or redis-cli is missing (the tests turn that into a skip
locally and a failure on CI).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from tests.support import LOOPBACK, free_port, stop, wait_until

NODE_TIMEOUT_MS = 1000  # how long a silent master takes to be declared failed


class NoRedisServer(RuntimeError):
    """Debian's redis-server and redis-cli are needed (.ci/run installs them)."""


def required() -> bool:
    """Whether a missing redis-server is a failure (CI) rather than a skip (a laptop)."""
    return bool(os.environ.get("CI")) or os.environ.get("MLOPS_REQUIRE_DOCKER") == "1"


@dataclass
class Cluster:
    ports: list[int]
    password: str
    procs: dict[int, subprocess.Popen] = field(default_factory=dict)

    def url(self, port: int | None = None) -> str:
        """The URL of one node, as MLOPS_REDIS_URL names it."""
        return f"redis://:{self.password}@{LOOPBACK}:{port or self.ports[0]}/0"

    def node(self, port: int) -> redis.Redis:
        """A plain client to one node (no slot routing)."""
        return redis.Redis(host=LOOPBACK, port=port, password=self.password, socket_timeout=5)

    def client(self) -> redis.cluster.RedisCluster:
        live = next(p for p in self.ports if self.procs[p].poll() is None)
        return redis.cluster.RedisCluster(host=LOOPBACK, port=live, password=self.password, socket_timeout=5)

    def masters(self) -> dict[int, list[tuple[int, int]]]:
        """Port of each live master and its slot ranges, as a live node sees them."""
        live = next(p for p in self.ports if self.procs[p].poll() is None)
        out: dict[int, list[tuple[int, int]]] = {}
        for start, end, master, *_ in self.node(live).execute_command("CLUSTER SLOTS"):
            out.setdefault(int(master[1]), []).append((int(start), int(end)))
        return out

    def master_of(self, slot: int) -> int:
        return next(port for port, ranges in self.masters().items()
                    if any(start <= slot <= end for start, end in ranges))

    def ok(self) -> bool:
        """Every live node says cluster_state:ok and agrees on 3 masters covering all slots."""
        try:
            live = [port for port in self.ports if self.procs[port].poll() is None]
            if any(self.node(port).execute_command("CLUSTER INFO")["cluster_state"] != "ok" for port in live):
                return False
            masters = self.masters()
            return len(masters) == 3 and sum(e - s + 1 for r in masters.values() for s, e in r) == 16384
        except redis.exceptions.RedisError:
            return False

    def kill(self, port: int) -> None:
        """kill -9 one node."""
        self.procs[port].send_signal(signal.SIGKILL)
        self.procs[port].wait(10)


START_ATTEMPTS = 3  # a port free when picked can be taken before redis-server binds it


def start_node(folder: Path, password: str, taken: set[int],
               extra: Callable[[int, int], list[str]]) -> tuple[int, subprocess.Popen]:
    """One redis-server on a free loopback port (and a free bus port for ``extra``),
    answering as itself (its pid). A node that exits at start (its port was taken in the meantime)
    is started again on other ports; after START_ATTEMPTS the error quotes its log."""
    log = ""
    for _ in range(START_ATTEMPTS):
        port, bus = distinct_free_ports(2, taken)
        home = folder / str(port)
        home.mkdir(parents=True, exist_ok=True)
        proc = subprocess.Popen(
            ["redis-server", "--port", str(port), "--bind", LOOPBACK, "--save", "", "--requirepass", password,
             "--dir", str(home), "--logfile", str(home / "redis.log"), *extra(port, bus)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        # one short try per poll: a port someone else holds must not stall the loop
        client = redis.Redis(host=LOOPBACK, port=port, password=password, socket_timeout=1,
                             retry=Retry(NoBackoff(), 0))

        def settled() -> str | None:
            if proc.poll() is not None:
                return "exited"
            with contextlib.suppress(redis.exceptions.RedisError):
                # our node, not a server that took the port first (it answers, then ours exits)
                return "up" if client.info("server")["process_id"] == proc.pid else None
            return None

        try:
            if wait_until(settled, 20, f"redis-server on port {port} to answer") == "up":
                return port, proc
        except BaseException:
            stop(proc, timeout=10)
            raise
        finally:
            client.close()
        log = (home / "redis.log").read_text(errors="replace")[-1000:] if (home / "redis.log").exists() else ""
    raise RuntimeError(f"redis-server exited at start {START_ATTEMPTS} times; its last log:\n{log}")


def distinct_free_ports(count: int, taken: set[int]) -> list[int]:
    """``count`` ports free on loopback now, none of them in ``taken`` (which grows)."""
    ports: list[int] = []
    while len(ports) < count:
        port = free_port()
        if port not in taken:
            taken.add(port)
            ports.append(port)
    return ports


@contextlib.contextmanager
def redis_cluster(folder: Path, password: str = "cluster-test-pw") -> Iterator[Cluster]:
    """A 3-master/3-replica cluster, every node answering cluster_state:ok; every node
    stopped on exit, on failure too."""
    if shutil.which("redis-server") is None or shutil.which("redis-cli") is None:
        raise NoRedisServer("needs Debian's redis-server and redis-cli (apt-get install redis-server)")
    cluster = Cluster(ports=[], password=password)
    taken: set[int] = set()
    try:
        for _ in range(6):
            port, proc = start_node(folder, password, taken, lambda port, bus: [
                "--cluster-enabled", "yes", "--cluster-port", str(bus),
                "--cluster-config-file", f"nodes-{port}.conf", "--cluster-node-timeout", str(NODE_TIMEOUT_MS),
                "--appendonly", "yes", "--masterauth", password])
            cluster.ports.append(port)
            cluster.procs[port] = proc
        subprocess.run(["redis-cli", "--no-auth-warning", "-a", password, "--cluster", "create",
                        *(f"{LOOPBACK}:{p}" for p in cluster.ports), "--cluster-replicas", "1",
                        "--cluster-yes"], check=True, capture_output=True, timeout=60)
        wait_until(cluster.ok, 30, "cluster_state:ok on every node", interval=0.1)
        yield cluster
    finally:
        for proc in cluster.procs.values():
            if proc.poll() is None:
                stop(proc, timeout=10)


@contextlib.contextmanager
def redis_single(folder: Path, password: str = "single-test-pw") -> Iterator[str]:
    """One plain (non-cluster) redis-server on a free loopback port; yields its URL."""
    if shutil.which("redis-server") is None:
        raise NoRedisServer("needs Debian's redis-server (apt-get install redis-server)")
    proc = None
    try:
        port, proc = start_node(folder, password, set(), lambda port, bus: [])
        yield f"redis://:{password}@{LOOPBACK}:{port}/0"
    finally:
        if proc is not None:
            stop(proc, timeout=10)


def cluster_or_skip(folder: Path):
    """A fixture's body: the running cluster, or a skip (a failure on CI) where
    Debian's redis-server is not installed."""
    import pytest

    try:
        with redis_cluster(folder) as running:
            yield running
    except NoRedisServer as exc:
        (pytest.fail if required() else pytest.skip)(str(exc))
