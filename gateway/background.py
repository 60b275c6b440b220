"""Run an ASGI app under uvicorn in a background thread, and stop a child process (demo,
benchmarks, tests)."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from typing import Any

import uvicorn


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def stop_process(proc: subprocess.Popen[bytes], *, grace: float = 5.0) -> None:
    """Terminate ``proc`` if it still runs; kill it if it has not exited ``grace`` seconds
    later."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


@contextlib.contextmanager
def serve(app: Any, *, port: int | None = None, timeout: float = 15.0) -> Iterator[str]:
    """Serve ``app`` on 127.0.0.1 in a daemon thread; yield its base URL."""
    port = port or free_port()
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",
                            lifespan="on", timeout_graceful_shutdown=2, loop="asyncio",
                            http="httptools")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name=f"uvicorn-{port}", daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError(f"uvicorn did not start on port {port}")
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout)
    if thread.is_alive():  # said, not left behind: a shutdown that hangs is a bug
        raise RuntimeError(f"uvicorn on port {port} did not stop within {timeout:g} s")
