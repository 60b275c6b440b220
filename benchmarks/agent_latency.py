"""Time the real agents through tollstream: what the gateway adds to a Codex or Claude Code
run, and what Codex's WebSocket attempt costs once the gateway answers it with 426.

Starts the simulator, a Valkey server and the gateway (in this process, on free loopback
ports), funds an account, then runs each variant ``--runs`` times, alternating, and prints the
median and maximum wall time of the whole agent process (start to exit; the model is the
simulator, answering 40 tokens at once):

* ``codex direct``: Codex with a custom provider pointed straight at the simulator;
* ``codex gateway http``: the same provider pointed at the gateway (HTTP streaming only);
* ``codex gateway builtin``: Codex's built-in OpenAI provider (``-c openai_base_url=...``),
  which opens ``GET /v1/responses`` as a WebSocket first: the gateway answers 426 and Codex
  falls back to HTTP in the same turn;
* ``claude direct`` / ``claude gateway``: Claude Code in print mode, same comparison.

    python -m benchmarks.agent_latency --runs 5
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import httpx

from gateway.app import create_app
from gateway.background import serve
from gateway.embedded import start_valkey
from gateway.settings import Settings
from gateway.simulator import SimConfig
from gateway.simulator import create_app as create_sim

BIN = Path(__file__).resolve().parents[1] / "node_modules" / ".bin"
ADMIN = "bench-admin-token-0123"


def _env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("ANTHROPIC_", "OPENAI_", "CLAUDE_", "CODEX_"))}
    env.update(HOME=str(home), CODEX_HOME=str(home / ".codex"), DISABLE_TELEMETRY="1",
               DISABLE_AUTOUPDATER="1", CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC="1")
    (home / ".codex").mkdir(parents=True, exist_ok=True)
    return env


def codex_custom(base: str, key: str, home: Path) -> float:
    env = _env(home)
    env["TS_KEY"] = key
    provider = (f'model_providers.ts={{name="ts", base_url="{base}/v1", env_key="TS_KEY", '
                'wire_api="responses", http_headers={"x-sim-output-tokens"="40"}}')
    return _time([str(BIN / "codex"), "exec", "--skip-git-repo-check", "-c",
                  "model_provider=ts", "-c", provider, "say hi"], env, home)


def codex_builtin(base: str, key: str, home: Path) -> float:
    env = _env(home)
    env["CODEX_API_KEY"] = key
    return _time([str(BIN / "codex"), "exec", "--skip-git-repo-check", "-c",
                  f"openai_base_url={base}/v1", "say hi"], env, home)


def claude(base: str, key: str, home: Path) -> float:
    env = _env(home)
    env.update(ANTHROPIC_BASE_URL=base, ANTHROPIC_API_KEY=key,
               ANTHROPIC_CUSTOM_HEADERS="x-sim-output-tokens: 40")
    return _time([str(BIN / "claude"), "-p", "say hi"], env, home)


def _time(argv: list[str], env: dict[str, str], home: Path) -> float:
    started = time.monotonic()
    result = subprocess.run(argv, env=env, cwd=home, capture_output=True, text=True,
                            timeout=120, stdin=subprocess.DEVNULL)
    elapsed = time.monotonic() - started
    if result.returncode != 0:
        raise RuntimeError(f"{argv[0]} failed: {result.stderr[-500:]}")
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.agent_latency")
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    redis = start_valkey(Path(tempfile.mkdtemp(prefix="tollstream-agents-")))
    try:
        with serve(create_sim(SimConfig())) as sim:
            settings = Settings.from_mapping({
                "admin_token": ADMIN, "key_prefix": "bench-agents:",
                "upstreams": {"sim": {"base_url": f"{sim}/v1", "api_key": "k",
                                      "forward_headers": ["x-sim-"]}},
                "routes": [{"match": "claude-*", "upstream": "sim",
                            "dialect": "anthropic_messages", "tokenizer": "estimate"},
                           {"match": "gpt-*", "upstream": "sim",
                            "dialect": "openai_responses"}]})
            with serve(create_app(settings, str(redis.connection_url))) as gw:
                key = httpx.post(f"{gw}/admin/accounts", json={"balance": "100000000"},
                                 headers={"authorization": f"Bearer {ADMIN}"},
                                 timeout=10).json()["api_key"]
                variants: dict[str, Callable[[Path], float]] = {
                    "codex direct": lambda h: codex_custom(sim, "sim", h),
                    "codex gateway http": lambda h: codex_custom(gw, key, h),
                    "codex gateway builtin (ws -> 426)": lambda h: codex_builtin(gw, key, h),
                    "claude direct": lambda h: claude(sim, "sim", h),
                    "claude gateway": lambda h: claude(gw, key, h),
                }
                times: dict[str, list[float]] = {name: [] for name in variants}
                for i in range(args.runs):
                    for name, run in variants.items():
                        home = Path(tempfile.mkdtemp(prefix=f"agent-{i}-"))
                        times[name].append(run(home))
    finally:
        redis.stop()
    print(f"{'variant':<36} {'median s':>9} {'max s':>7}  ({args.runs} runs each)")
    for name, values in times.items():
        print(f"{name:<36} {statistics.median(values):>9.2f} {max(values):>7.2f}")


if __name__ == "__main__":
    main()
