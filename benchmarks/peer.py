"""LiteLLM's proxy as the benchmark's peer: the same requests, on the same simulator.

``benchmarks/litellm/install`` puts ``litellm[proxy]`` (pinned to a 1.106.x release) in its
own virtualenv, ``benchmarks/.litellm-venv``; this module starts its ``litellm`` command with
``benchmarks/litellm/config.yaml`` on 127.0.0.1, its output in the run's log directory. Its
CPU is counted over its whole process tree (``--num_workers`` spawns workers).
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from benchmarks.stack import SIM_KEY, Server, Stack, wait_ready
from gateway.background import free_port

HERE = Path(__file__).parent
#: Where benchmarks/litellm/install puts LiteLLM (``TOLLSTREAM_BENCH_LITELLM_VENV``: another
#: virtualenv with ``litellm[proxy]`` in it).
VENV = Path(os.environ.get("TOLLSTREAM_BENCH_LITELLM_VENV") or HERE / ".litellm-venv")
CONFIG = HERE / "litellm" / "config.yaml"
INSTALL = "benchmarks/litellm/install"
MASTER_KEY = "sk-bench-litellm-0123456789"


def litellm_command() -> Path:
    return VENV / "bin" / "litellm"


def missing() -> str | None:
    """Why the LiteLLM peer cannot run here (None: it can)."""
    if not litellm_command().exists():
        return (f"the LiteLLM peer is not installed ({VENV} has no litellm): run {INSTALL} "
                "(a few minutes; it needs PyPI); the peer phase is skipped")
    return None


def litellm_version() -> str:
    try:
        return subprocess.run(
            [str(VENV / "bin" / "python"), "-c",
             "from importlib.metadata import version; print(version('litellm'))"],
            capture_output=True, text=True, timeout=60, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def start_litellm(stack: Stack, *, workers: int = 1, port: int | None = None) -> Server:
    """LiteLLM's proxy on the stack's simulator; returns once it answers."""
    port = port or free_port()
    env = {**os.environ,
           "BENCH_SIM_URL": f"{stack.sim.url}/v1", "BENCH_SIM_KEY": SIM_KEY,
           "BENCH_LITELLM_MASTER_KEY": MASTER_KEY,
           # No network at start-up (the price map ships in the package), quiet logs.
           "LITELLM_LOCAL_MODEL_COST_MAP": "True", "LITELLM_LOG": "ERROR",
           "LITELLM_TELEMETRY": "False", "NO_PROXY": "127.0.0.1,localhost",
           "no_proxy": "127.0.0.1,localhost"}
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy",
                 "all_proxy"):
        env.pop(name, None)
    log = stack.work / "litellm.log"
    process = stack.start_child(
        [str(litellm_command()), "--config", str(CONFIG), "--host", "127.0.0.1", "--port",
         str(port), "--num_workers", str(workers)], log, env)
    server = Server(f"LiteLLM ({workers} worker{'s' if workers > 1 else ''})",
                    f"http://127.0.0.1:{port}", process, workers)
    wait_ready(server, f"{server.url}/health/liveliness", log,
               workers + 1 if workers > 1 else 1, timeout=180.0)
    return server
