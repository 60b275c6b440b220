"""Commits against each other: gateways built from several revisions, side by side, alternated.

A change to the hot path is judged by what it does to the gateway's CPU on the same machine in
the same minutes, not against a figure recorded on another day (the CPU time of the same work
moves by 1.5x from one run to the next on a shared 2-core machine). Each revision given is
exported with ``git archive`` and served by its own ``tollstream serve`` process, all on one
Valkey and one simulator (each with an account of its own: their key layouts may differ).
Every round runs, for each gateway in turn (the order rotated and reversed from round to
round so no gateway is always first or last):

* ``--requests`` one-token streams, ``--concurrency`` at a time: CPU per request;
* ``--streams`` paced streams of ``--tokens`` one-token chunks at ``--rate`` tokens/s (two
  per stream): CPU per chunk, with the requests' own CPU (the figure above) taken out;

and the same paced phase straight to the simulator, for throughput against direct.

    python -m benchmarks.ab 9dbcb2d HEAD                 # five rounds, the issue's load
    python -m benchmarks.ab 9dbcb2d f31d9bd HEAD --rounds 5 --json out.json

Ratios are paired within each round against the first revision; medians and ranges printed.

All revisions share this virtualenv. A C accelerator that a revision's ``pyproject.toml`` does
not depend on is hidden from its process (:data:`OPTIONAL_C`: hiredis, which redis-py picks
up by itself when installed), so an old revision runs as it shipped, not faster for a
dependency added later.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx

from benchmarks.client import Profile, run_phase
from benchmarks.procs import Process, cpu_since, tree_cpu, wait_http
from benchmarks.stack import ADMIN, SIM_KEY, Stack
from gateway.background import free_port

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Figures:
    """One revision's figures, one entry per round."""

    revision: str
    per_request_ms: list[float] = field(default_factory=list)
    per_chunk_ms: list[float] = field(default_factory=list)
    all_in_ms: list[float] = field(default_factory=list)
    vs_direct: list[float] = field(default_factory=list)
    #: The gateway's full garbage collections during the rounds (:func:`full_collections`).
    gc_full: str = ""


@dataclass
class Gateway:
    revision: str
    url: str
    pid: int
    key: str


def export(revision: str, into: Path) -> Path:
    """The tree of ``revision`` (``git archive``) in a directory of its own."""
    tree = into / revision.replace("/", "_")
    tree.mkdir(parents=True)
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", revision],
                             check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(tree)], input=archive, check=True)
    return tree


#: Packages other packages use when they are installed, hidden from a revision whose
#: pyproject.toml does not name them.
OPTIONAL_C = ("hiredis",)


def hide_undeclared(tree: Path) -> list[str]:
    """Directories to put first on ``tree``'s path: each holds a stand-in, which raises
    ImportError, for an :data:`OPTIONAL_C` package the tree does not depend on."""
    declared = (tree / "pyproject.toml").read_text(encoding="utf-8")
    paths = []
    for name in OPTIONAL_C:
        if f'"{name}' in declared:
            continue
        stand_in = tree.parent / f"without-{name}" / name
        stand_in.mkdir(parents=True, exist_ok=True)
        (stand_in / "__init__.py").write_text(
            f"raise ImportError('{name} is hidden: this revision does not depend on it')\n")
        paths.append(str(stand_in.parent))
    return paths


def start(stack: Stack, revision: str, tree: Path) -> Gateway:
    """``tollstream serve`` from ``tree`` (its own modules first on the path, then stand-ins
    for the accelerators it does not depend on: :func:`hide_undeclared`), funded."""
    port = free_port()
    path = os.pathsep.join([str(tree), *hide_undeclared(tree)])
    with (stack.work / f"gateway-{revision}.log").open("ab") as log:
        popen = subprocess.Popen(
            [sys.executable, "-m", "gateway.cli", "serve", "--config", str(stack.config),
             "--port", str(port), "--log-level", "warning"], cwd=tree, stdout=log,
            stderr=subprocess.STDOUT, start_new_session=True,
            env={**os.environ, "PYTHONPATH": path})
    stack.processes.append(Process(popen))
    url = f"http://127.0.0.1:{port}"
    wait_http(f"{url}/healthz", timeout=60)
    answer = httpx.post(f"{url}/admin/accounts", timeout=30, json={"balance": str(10**12)},
                        headers={"authorization": f"Bearer {ADMIN}"})
    answer.raise_for_status()
    return Gateway(revision, url, popen.pid, answer.json()["api_key"])


_FULL_GC = re.compile(r'tollstream_gc_pause_seconds_bucket\{generation="2",le="([^"]+)"\} (\S+)')
_FULL_GC_SUM = re.compile(r'tollstream_gc_pause_seconds_sum\{generation="2"\} (\S+)')


def gc_histogram(url: str) -> tuple[list[tuple[str, float]], float] | None:
    """The gateway's full collections so far: its ``tollstream_gc_pause_seconds`` buckets for
    generation 2 (cumulative) and their seconds; None for a revision without the metric (or
    a gateway that did not answer)."""
    try:
        text = httpx.get(f"{url}/metrics", timeout=30).text
    except httpx.HTTPError:
        return None  # the rounds' figures are not lost for want of this one
    buckets = [(bound, float(count)) for bound, count in _FULL_GC.findall(text)]
    total = _FULL_GC_SUM.search(text)
    if not buckets or total is None:
        return None
    return buckets, float(total.group(1))


def full_collections(before: tuple[list[tuple[str, float]], float] | None,
                     after: tuple[list[tuple[str, float]], float] | None) -> str:
    """What the full collections between two :func:`gc_histogram` readings held the gateway:
    how many, for how long in all, and the bucket of the longest."""
    if before is None or after is None:
        return "no figure (no tollstream_gc_pause_seconds read from this gateway)"
    counts = [(bound, b - a) for (bound, b), (_, a) in zip(after[0], before[0], strict=True)]
    n = int(counts[-1][1])
    if not n:
        return "no full collection"
    longest = next(bound for bound, count in counts if count == n)
    return (f"{n} full collection{'s' if n > 1 else ''}, {(after[1] - before[1]) * 1000:.1f} "
            f"ms in all, the longest <= {longest} s")


def order(names: list[str], round_: int) -> list[str]:
    """Rotated by the round, reversed every other round."""
    turn = names[round_ % len(names):] + names[:round_ % len(names)]
    return turn[::-1] if round_ % 2 else turn


async def measure(args: argparse.Namespace, stack: Stack, gateways: list[Gateway]
                  ) -> dict[str, Figures]:
    figures = {g.revision: Figures(g.revision) for g in gateways}
    by_name = {g.revision: g for g in gateways}
    one = Profile("one-token", 0.0, 1, 1)
    paced = Profile("paced", args.rate, 1, args.tokens)

    async def phase(base: str, key: str, profile: Profile, streams: int, requests: int,
                    target: str) -> tuple[int, float, int]:
        done = await run_phase(base, key, profile, target=target, streams=streams,
                               requests=requests, timeout=args.timeout, client="aiohttp")
        if done.errors or done.timed_out:
            raise RuntimeError(f"{target} {profile.name}: {done.errors} errors, timed out "
                               f"{done.timed_out}: {done.error}")
        return done.requests, done.tokens_per_s, done.tokens

    for gateway in gateways:  # warm-up: pools open, the tokenizer loads
        await phase(gateway.url, gateway.key, one, args.concurrency, 4 * args.concurrency,
                    gateway.revision)
    collections = {g.revision: gc_histogram(g.url) for g in gateways}
    for round_ in range(args.rounds):
        _, direct_rate, _ = await phase(stack.sim.url, SIM_KEY, paced, args.streams,
                                        2 * args.streams, "direct")
        for name in order(list(by_name), round_):
            gateway, mine = by_name[name], figures[name]
            before = tree_cpu(gateway.pid)
            requests, _, _ = await phase(gateway.url, gateway.key, one, args.concurrency,
                                         args.requests, name)
            per_request = cpu_since(gateway.pid, before) / requests
            before = tree_cpu(gateway.pid)
            requests, rate, tokens = await phase(gateway.url, gateway.key, paced,
                                                 args.streams, 2 * args.streams, name)
            cpu = cpu_since(gateway.pid, before)
            mine.per_request_ms.append(per_request * 1000)
            mine.per_chunk_ms.append((cpu - per_request * requests) / tokens * 1000)
            mine.all_in_ms.append(cpu / tokens * 1000)
            mine.vs_direct.append(rate / direct_rate)
            print(f"round {round_} {name:>12}  per request {per_request * 1000:.3f} ms  "
                  f"per chunk {mine.per_chunk_ms[-1]:.4f} ms  all in "
                  f"{mine.all_in_ms[-1]:.4f} ms  vs direct {mine.vs_direct[-1]:.2f}",
                  flush=True)
    for gateway in gateways:
        figures[gateway.revision].gc_full = full_collections(collections[gateway.revision],
                                                             gc_histogram(gateway.url))
    return figures


def summary(figures: dict[str, Figures]) -> list[str]:
    """Medians per revision, then each revision's paired ratios to the first one."""
    lines = ["medians (ms; throughput as a share of direct):"]
    for f in figures.values():
        lines.append(f"  {f.revision:>12}  per request {statistics.median(f.per_request_ms):.3f}"
                     f"  per chunk {statistics.median(f.per_chunk_ms):.4f}  all in "
                     f"{statistics.median(f.all_in_ms):.4f}  vs direct "
                     f"{statistics.median(f.vs_direct):.2f}")
    lines.append("full garbage collections during the rounds:")
    lines.extend(f"  {f.revision:>12}  {f.gc_full}" for f in figures.values())
    first, *others = figures.values()
    for f in others:
        for label, mine, theirs in (("per request", f.per_request_ms, first.per_request_ms),
                                    ("per chunk", f.per_chunk_ms, first.per_chunk_ms),
                                    ("all in", f.all_in_ms, first.all_in_ms)):
            ratios = [a / b for a, b in zip(mine, theirs, strict=True)]
            lines.append(f"  {f.revision}/{first.revision} {label}: median "
                         f"{statistics.median(ratios):.3f} (range {min(ratios):.3f}-"
                         f"{max(ratios):.3f})")
    return lines


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.ab", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("revisions", nargs="+", help="git revisions (the first: the baseline)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--streams", type=int, default=64, help="paced streams at once")
    parser.add_argument("--tokens", type=int, default=200, help="tokens per paced stream")
    parser.add_argument("--rate", type=float, default=50.0, help="paced tokens/s per stream")
    parser.add_argument("--requests", type=int, default=1000, help="one-token requests")
    parser.add_argument("--concurrency", type=int, default=16,
                        help="one-token requests at once")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per phase")
    parser.add_argument("--json", type=Path, help="write every round's figures here")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if len(set(args.revisions)) != len(args.revisions):
        raise SystemExit("each revision once")
    with tempfile.TemporaryDirectory(prefix="tollstream-ab-") as tmp:
        work = Path(tmp)
        trees = {rev: export(rev, work / "trees") for rev in args.revisions}
        stack = Stack(work / "run", lease_tokens=64)
        try:
            gateways = [start(stack, rev, tree) for rev, tree in trees.items()]
            figures = asyncio.run(measure(args, stack, gateways))
        finally:
            stack.close()
    for line in summary(figures):
        print(line)
    if args.json:
        args.json.write_text(json.dumps({"args": {**vars(args), "json": str(args.json)},
                                         "figures": [asdict(f) for f in figures.values()]},
                                        indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
