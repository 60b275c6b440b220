"""The anvil process behind a dev chain: finding the binary, starting it on a free loopback
port with the dev chain's mining flags, waiting for its JSON-RPC, stopping it.

``TOLLSTREAM_ANVIL`` names the binary; otherwise the npm package ``@foundry-rs/anvil``
(``npm install`` at the repo root) or ``anvil`` on ``PATH``.
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import httpx

from gateway.background import free_port, stop_process

REPO_ROOT = Path(__file__).resolve().parents[2]
#: Seconds anvil has to answer its first JSON-RPC call.
STARTUP_TIMEOUT = 15.0


def find_anvil() -> str | None:
    """Path of an anvil binary, or None.

    The native binary inside the platform package is preferred over ``.bin/anvil`` (a node
    wrapper) so that stopping the process really stops the chain.
    """
    env = os.environ.get("TOLLSTREAM_ANVIL")
    if env:
        return env
    modules = REPO_ROOT / "node_modules"
    for native in sorted(modules.glob("@foundry-rs/anvil-*/bin/anvil")):
        if os.access(native, os.X_OK):
            return str(native)
    wrapper = modules / ".bin" / "anvil"
    if wrapper.exists() and shutil.which("node"):
        return str(wrapper)
    return shutil.which("anvil")


def mining_args(block_time: float | None) -> list[str]:
    """Mining and clock flags. ``--mixed-mining`` mines each transaction at once (automine:
    no latency added to settlement) *and* an empty block every ``block_time`` seconds, so the
    head never lags the wall clock by more than that; with automine alone an idle chain's head
    keeps the timestamp of its last transaction, and simulations against it think a fresh
    authorization is "not yet valid". Interval mining alone would add up to a block time to
    every settlement. 1 s is the finest useful interval: timestamps have 1 s resolution."""
    if block_time is None:
        return []
    return ["--block-time", f"{block_time:g}", "--mixed-mining"]


def start_anvil(binary: str, port: int | None, *, chain_id: int, block_time: float | None
                ) -> tuple[str, Callable[[], None]]:
    """Anvil on 127.0.0.1 (``port``, or a free one: another if that one is taken before anvil
    binds it), answering; its JSON-RPC URL and the function that stops it."""
    attempts = 1 if port else 3
    last: Exception | None = None
    for _ in range(attempts):
        use_port = port or free_port()
        proc = subprocess.Popen(
            [binary, "--host", "127.0.0.1", "--port", str(use_port),
             "--chain-id", str(chain_id), "--accounts", "1", "--silent",
             *mining_args(block_time)],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        url = f"http://127.0.0.1:{use_port}"
        try:
            wait_rpc(url, proc, STARTUP_TIMEOUT)
        except RuntimeError as exc:
            last = exc
            stop_process(proc)
            continue
        return url, functools.partial(stop_process, proc)
    raise RuntimeError(f"could not start anvil: {last}")


def wait_rpc(url: str, proc: subprocess.Popen[bytes] | None, timeout: float) -> None:
    """Until the node at ``url`` answers ``eth_chainId``; RuntimeError if ``proc`` exits or
    ``timeout`` seconds pass first."""
    deadline = time.monotonic() + timeout
    body = {"jsonrpc": "2.0", "id": 1, "method": "eth_chainId", "params": []}
    while True:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"anvil exited with code {proc.returncode}")
        try:
            if httpx.post(url, json=body, timeout=1.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"dev chain at {url} did not answer within {timeout}s")
        time.sleep(0.05)


__all__ = ["find_anvil", "mining_args", "start_anvil", "wait_rpc"]
