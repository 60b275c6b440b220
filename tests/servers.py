"""Run ASGI apps under a real uvicorn server on a free loopback port (in a thread), or the
gateway in its own process, for tests."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Iterator

import httpx

from gateway.background import free_port, serve, stop_process

__all__ = ["free_port", "gateway_process", "serve"]


@contextlib.contextmanager
def gateway_process(config: str, *, env: dict[str, str] | None = None,
                    timeout: float = 30.0, log_level: str = "warning"
                    ) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """Run ``tollstream serve --config CONFIG`` in its own process; yield (URL, process)."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "gateway.cli", "serve", "--config", config,
         "--port", str(port), "--log-level", log_level],
        env={**os.environ, **(env or {})}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    try:
        while True:
            if proc.poll() is not None:
                err = proc.stderr.read().decode() if proc.stderr else ""
                raise RuntimeError(f"gateway process exited: {err[-2000:]}")
            try:
                if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("gateway process did not become healthy")
            time.sleep(0.1)
        yield url, proc
    finally:
        stop_process(proc, grace=10)
