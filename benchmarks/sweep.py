"""A sweep over stream counts: ``python -m benchmarks.loadgen --sweep 64,256,... --out DIR``.

One stack (Valkey, the simulator), one tollstream gateway per ``--workers`` value and, with
``--peer litellm``, LiteLLM's proxy, all started once on 127.0.0.1. At each stream count the
same requests (``streams x --rounds`` of them, one profile) run straight to the simulator
("direct"), through each gateway and through the peer, one phase after the other, so every
ratio comes from phases measured minutes apart on the same machine. Per phase: client-side
tokens/s and TTFT, the CPU of the proxy's whole process tree (a parent and its workers), its
resident memory (sampled every half second, summed over the tree, the peak kept), the
simulator's and the load client's CPU. ``sweep.json`` is rewritten after every phase (a run
stopped half-way keeps what it measured), then ``sweep.md`` and the PNG plots are written.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from benchmarks import peer, plots, report
from benchmarks.client import Profile, run_phase
from benchmarks.procs import cpu_since, raise_open_files, tree_cpu, tree_rss_mb
from benchmarks.stack import SIM_KEY, Server, Stack

#: Open files the load client keeps beside its streams' sockets.
FD_MARGIN = 64


@dataclass
class Target:
    series: str  # "direct", "tollstream-w1", "litellm-w1"
    label: str
    base: str
    key: str
    server: Server | None  # None: straight to the simulator (no proxy to measure)


def sweep_profile(args: argparse.Namespace) -> Profile:
    if args.profile == "burst":
        return Profile("burst", 0.0, args.per_chunk, args.burst_tokens)
    return Profile("paced", args.rate, 1, args.tokens)


def commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, timeout=10, cwd=Path(__file__).parent,
                              check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


async def measure(target: Target, stack: Stack, profile: Profile, streams: int,
                  args: argparse.Namespace) -> dict[str, Any]:
    """One phase against ``target``: the client's figures and what its processes used."""
    root = target.server.process.pid if target.server else None
    rss = [0.0]

    def sample() -> None:
        if root is not None:
            rss[0] = max(rss[0], tree_rss_mb(root))

    sim_root = stack.sim.process.pid
    cpu0 = tree_cpu(root) if root is not None else {}
    sim0, client0 = tree_cpu(sim_root), time.process_time()
    phase = await run_phase(target.base, target.key, profile, target=target.series,
                            streams=streams, requests=streams * args.rounds,
                            timeout=args.timeout, progress=args.progress,
                            label=f"{streams} streams, {target.label}", on_tick=sample,
                            client=args.client, ramp=args.ramp)
    cpu = cpu_since(root, cpu0) if root is not None else 0.0
    row: dict[str, Any] = asdict(phase)
    row.pop("gateway_cpu_s")
    row.pop("redis_commands")
    row.update(series=target.series, count=streams, proxy_cpu_s=cpu,
               cpu_per_token_ms=cpu / phase.tokens * 1000 if phase.tokens and root else None,
               peak_rss_mb=rss[0] if root is not None else None,
               sim_cpu_s=cpu_since(sim_root, sim0),
               client_cpu_s=time.process_time() - client0)
    return row


def print_row(row: dict[str, Any]) -> None:
    cpu = (f"cpu/token {row['cpu_per_token_ms']:.3f} ms, rss {row['peak_rss_mb']:.0f} MB"
           if row["cpu_per_token_ms"] is not None else "(no proxy)")
    trouble = (f", {row['errors']} FAILED ({row['error'][:80]})" if row["errors"] else "") + (
        ", TIMED OUT" if row["timed_out"] else "")
    print(f"  {row['count']:5d} streams  {row['series']:14} {row['tokens']:8d} tokens "
          f"{row['tokens_per_s']:8.0f} tok/s  ttft p50 {row['ttft_p50_ms']:7.1f} ms "
          f"p99 {row['ttft_p99_ms']:7.1f} ms  {cpu}{trouble}", flush=True)


def start_targets(args: argparse.Namespace, stack: Stack, notes: list[str]
                  ) -> list[Target]:
    targets = [Target("direct", "direct", stack.sim.url, SIM_KEY, None)]
    for i, workers in enumerate(args.workers):
        port = args.gateway_port + i if args.gateway_port else None
        gateway = stack.gateway(workers, port)
        targets.append(Target(f"tollstream-w{workers}", gateway.name, gateway.url,
                              stack.api_key(gateway), gateway))
    if args.peer == "litellm":
        why = peer.missing()
        if why:
            print(f"sweep: {why}", file=sys.stderr, flush=True)
            notes.append(why)
        else:
            server = peer.start_litellm(stack, workers=args.peer_workers, port=args.peer_port)
            targets.append(Target(f"litellm-w{args.peer_workers}", server.name, server.url,
                                  peer.MASTER_KEY, server))
    return targets


async def sweep(args: argparse.Namespace, stack: Stack, doc: dict[str, Any],
                out: Path, soft: int, hard: int) -> None:
    targets = start_targets(args, stack, doc["notes"])
    doc["series"] = [{"key": t.series, "label": t.label,
                      "workers": t.server.workers if t.server else 0} for t in targets]
    profile = sweep_profile(args)
    # Warm-up, not measured: pools open, tokenizers and the peer's first-request paths load.
    warm = Profile("warm-up", 0.0, 1, 1)
    for target in targets:
        phase = await run_phase(target.base, target.key, warm, target=target.series,
                                streams=min(args.sweep[0], 32), requests=min(args.sweep[0], 32),
                                timeout=args.timeout, client=args.client)
        if phase.errors or phase.timed_out:
            raise RuntimeError(f"warm-up through {target.label} failed: {phase.error}")
    for count in args.sweep:
        if count + FD_MARGIN > soft:
            why = (f"{count} streams need about {count + FD_MARGIN} open files in the load "
                   f"client; its limit is {soft} (hard {hard}): raise it (ulimit -n) to run "
                   "this count")
            print(f"sweep: skipped: {why}", file=sys.stderr, flush=True)
            doc["skipped"].append({"count": count, "reason": why})
            continue
        for target in targets:
            row = await measure(target, stack, profile, count, args)
            doc["phases"].append(row)
            print_row(row)
            write_json(out, doc)
            await asyncio.sleep(1.0)  # let the sockets of the phase close


def write_json(out: Path, doc: dict[str, Any]) -> None:
    doc["results"] = report.results(doc)
    tmp = out / "sweep.json.tmp"
    tmp.write_text(json.dumps(doc, indent=2))
    tmp.replace(out / "sweep.json")


def run_sweep(args: argparse.Namespace) -> int:
    """The sweep ``args`` ask for (loadgen's options); 0 when every phase completed."""
    if not args.no_plots:
        try:
            plots.require()
        except plots.PlotsUnavailable as exc:
            print(f"sweep: {exc}", file=sys.stderr)
            return 2
    args.client = args.client or "aiohttp"
    soft, hard = raise_open_files()
    out = args.out or Path("benchmarks/out") / time.strftime("sweep-%Y%m%d-%H%M%S")
    out.mkdir(parents=True, exist_ok=True)
    profile = sweep_profile(args)
    doc: dict[str, Any] = {
        "version": 1, "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": shlex.join(["python", "-m", "benchmarks.loadgen", *sys.argv[1:]])
        if sys.argv[0].endswith("loadgen.py") else None,
        "machine": {"cores": os.cpu_count() or 0, "platform": platform.platform(),
                    "python": platform.python_version(), "open_files": [soft, hard]},
        "commit": commit(),
        "settings": {"counts": args.sweep, "workers": args.workers, "rounds": args.rounds,
                     "ramp_s": args.ramp, "client": args.client,
                     "profile": asdict(profile), "timeout_s": args.timeout,
                     "lease_tokens": args.lease_tokens, "peer": args.peer,
                     "peer_workers": args.peer_workers},
        "peer_version": peer.litellm_version() if args.peer and not peer.missing() else None,
        "series": [], "phases": [], "skipped": [], "notes": []}
    print(f"sweep: {', '.join(map(str, args.sweep))} streams; {profile.name} "
          f"({profile.rate:g} tok/s per stream, {profile.tokens} tokens, {profile.per_chunk} "
          f"per chunk), {args.rounds} request(s) per stream; tollstream workers "
          f"{', '.join(map(str, args.workers))}"
          + (f"; peer {args.peer}" if args.peer else "") + f"; out {out}", flush=True)
    stack = Stack(out / "logs", lease_tokens=args.lease_tokens, valkey_port=args.valkey_port,
                  sim_port=args.sim_port)
    try:
        asyncio.run(sweep(args, stack, doc, out, soft, hard))
    finally:
        stack.close()
    doc["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    write_json(out, doc)
    (out / "sweep.md").write_text(report.markdown(doc, plots=not args.no_plots))
    if not args.no_plots:
        for path in plots.write_all(doc, out):
            print(f"sweep: wrote {path}")
    print(f"sweep: wrote {out / 'sweep.json'} and {out / 'sweep.md'}")
    troubled = [r for r in doc["phases"] if r["errors"] or r["timed_out"]]
    return 1 if troubled or doc["skipped"] else 0
