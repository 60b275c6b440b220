"""How the gateway's process runs: its event loop, its start-up heap out of the garbage
collector's sight; and an ASGI app run under uvicorn in a background thread, a child process
stopped (demo, benchmarks, tests)."""

from __future__ import annotations

import contextlib
import gc
import logging
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from typing import Any

import uvicorn

log = logging.getLogger("tollstream")


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


def default_loop() -> str:
    """The event loop the gateway runs on: uvloop where it is installed (a dependency except
    on Windows), else asyncio's.

    uvloop costs 7-11% less CPU per streamed chunk and per request (benchmarks/RESULTS.md,
    session 22). Its socket calls keep the GIL, so a busy uvloop thread starves the other
    threads of its process: the gateway gets a process of its own (`tollstream serve`), and
    in a shared one (:func:`serve`) only the gateway runs on it, never the helpers."""
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return "asyncio"
    return "uvloop"


def freeze_startup_heap() -> int:
    """Take what start-up built (modules, tokenizers, settings, the app) out of the cyclic
    garbage collector's sight for the life of the process; return how many objects that is.

    That heap (about 130,000 objects, most of them from web3's and eth-account's modules)
    never becomes garbage, yet every full collection walked it again: about 95 ms each, in
    which no stream moved (three in a two-minute benchmark run). ``gc.freeze`` moves it to a
    generation the collector never scans: in the same run, three full collections then
    took 24 ms in all instead of 289. What the process allocates later is collected as
    before. Start-up's own garbage is collected first, so none of it is kept. The CPU it
    saves is within the benchmark's noise (benchmarks/RESULTS.md, session 23): this is for
    the streams' worst-case latency."""
    gc.collect()
    gc.freeze()
    frozen = gc.get_freeze_count()
    log.info("garbage collector: %d start-up objects frozen (never scanned again)", frozen)
    return frozen


@contextlib.contextmanager
def serve(app: Any, *, port: int | None = None, timeout: float = 15.0) -> Iterator[str]:
    """Serve ``app`` on 127.0.0.1 in a daemon thread; yield its base URL.

    The gateway (an app with ``production_loop``) runs on :func:`default_loop`, as
    `tollstream serve` runs it; anything else (the simulator, the test servers standing in
    for Stripe or a facilitator) on asyncio's loop, which lets go of the GIL around its
    socket calls: measured, the simulator bursting 50 streams on uvloop in a test's process
    kept the gateway's thread from its Redis connects past their 1 s timeout."""
    port = port or free_port()
    loop = default_loop() if getattr(app, "production_loop", False) else "asyncio"
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",
                            lifespan="on", timeout_graceful_shutdown=2, loop=loop,
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
