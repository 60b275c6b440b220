"""The load client of the benchmarks: N concurrent streams of chat completions, one phase.

An asyncio client: raw httpx streaming (``client="httpx"``, the single run's, kept so its
figures compare with earlier runs), or aiohttp (``client="aiohttp"``, the sweep's: httpx's
connection pool scans every connection on each request, ~6 ms of client CPU per request at
2,000 streams, where aiohttp's costs a fraction). It counts the
content tokens it receives (o200k, once per stream), the time to each stream's first token,
the streams that failed (their first error kept) and, when the phase's time is up, stops
waiting and reports what was done by then (``timed_out``). A progress line (streams done,
tokens/s, elapsed) goes to stderr while it runs, when asked.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TextIO

import aiohttp
import httpx
import orjson

from meters.tokens import get_tokenizer

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
    completed: int = 0
    errors: int = 0
    error: str = ""
    timed_out: bool = False


class Progress:
    """Counters a phase updates as it streams, and the line that shows them."""

    def __init__(self, label: str, total: int, *, show: bool, out: TextIO = sys.stderr,
                 every: float = 0.5) -> None:
        self.label, self.total, self.show, self.out, self.every = label, total, show, out, every
        self.done = self.errors = self.tokens = 0
        self.started = time.perf_counter()
        self.tty = out.isatty()
        self._printed = 0.0

    def line(self) -> str:
        elapsed = max(time.perf_counter() - self.started, 1e-9)
        failed = f", {self.errors} failed" if self.errors else ""
        return (f"  {self.label}: {self.done}/{self.total} streams{failed}, {self.tokens:,} "
                f"tokens, {self.tokens / elapsed:,.0f} tok/s, {elapsed:.1f} s")

    def tick(self, final: bool = False) -> None:
        if not self.show:
            return
        now = time.perf_counter()
        if self.tty:  # one line, rewritten in place
            self.out.write("\r\033[K" + self.line() + ("\n" if final else ""))
        elif final or now - self._printed >= 5.0:  # a log: one line every 5 s
            self.out.write(self.line() + "\n")
            self._printed = now
        self.out.flush()


async def one_stream(client: httpx.AsyncClient, url: str, headers: dict[str, str],
                     body: dict[str, Any], progress: Progress | None = None,
                     per_chunk: int = 1) -> tuple[int, float]:
    """Stream one completion; returns (content tokens received, seconds to first token).
    ``progress`` counts ``per_chunk`` tokens per content event as they come (the exact count
    replaces the estimate when the stream ends)."""
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
                    if progress is not None:
                        progress.tokens += per_chunk
    tokens = O200K.count("".join(text))
    if progress is not None:
        progress.tokens += tokens - per_chunk * len(text)
    return tokens, first


async def one_stream_aiohttp(session: aiohttp.ClientSession, url: str,
                             headers: dict[str, str], body: dict[str, Any],
                             progress: Progress | None = None,
                             per_chunk: int = 1) -> tuple[int, float]:
    """:func:`one_stream` on aiohttp."""
    started = time.perf_counter()
    first = 0.0
    text: list[str] = []
    async with session.post(url, headers=headers, json=body) as response:
        if response.status != 200:
            raise RuntimeError(f"HTTP {response.status}: {(await response.read())[:200]!r}")
        async for line in response.content:
            if not line.startswith(b"data: {") or b'"content":"' not in line:
                continue
            for choice in orjson.loads(line[6:]).get("choices") or []:
                content = (choice.get("delta") or {}).get("content")
                if content:
                    if not first:
                        first = time.perf_counter() - started
                    text.append(content)
                    if progress is not None:
                        progress.tokens += per_chunk
    tokens = O200K.count("".join(text))
    if progress is not None:
        progress.tokens += tokens - per_chunk * len(text)
    return tokens, first


def percentile(sorted_values: list[float], fraction: float) -> float:
    if not sorted_values:
        return 0.0
    return sorted_values[min(len(sorted_values) - 1, int(len(sorted_values) * fraction))]


async def run_phase(base: str, key: str, profile: Profile, *, target: str, streams: int,
                    requests: int, timeout: float, model: str = "bench",
                    progress: bool = False, label: str | None = None,
                    on_tick: Callable[[], None] | None = None, client: str = "httpx",
                    ramp: float = 0.0) -> Phase:
    """``requests`` streams, ``streams`` at a time, against ``base``/v1/chat/completions.

    Within ``timeout`` seconds: then the streams still running are cancelled and the phase
    reports what was done (``timed_out``). A failed stream is counted (``errors``, the first
    one's message in ``error``), never retried. The streams' first requests start evenly
    over ``ramp`` seconds (0: all at once). ``on_tick`` runs every half second (to sample a
    server's memory while the phase runs)."""
    headers = {"authorization": f"Bearer {key}",
               "x-sim-tokens-per-second": str(profile.rate),
               "x-sim-tokens-per-chunk": str(profile.per_chunk)}
    body = {"model": model, "stream": True, "max_tokens": profile.tokens,
            "messages": [{"role": "user", "content": "benchmark"}]}
    url = f"{base}/v1/chat/completions"
    results: list[tuple[int, float]] = []
    errors: list[str] = []
    queue = iter(range(requests))
    meter = Progress(label or f"{profile.name} {target}", requests, show=progress)
    async with contextlib.AsyncExitStack() as stack:
        if client == "aiohttp":
            session = await stack.enter_async_context(aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=0, force_close=False),
                timeout=aiohttp.ClientTimeout(total=None, connect=timeout,
                                              sock_read=timeout)))

            def stream() -> Any:
                return one_stream_aiohttp(session, url, headers, body, meter,
                                          profile.per_chunk)
        else:
            limits = httpx.Limits(max_connections=streams, max_keepalive_connections=streams)
            http = await stack.enter_async_context(httpx.AsyncClient(timeout=timeout,
                                                                     limits=limits))

            def stream() -> Any:
                return one_stream(http, url, headers, body, meter, profile.per_chunk)

        async def worker(index: int) -> None:
            if ramp:
                await asyncio.sleep(ramp * index / streams)
            for _ in queue:
                try:
                    results.append(await stream())
                except (httpx.HTTPError, aiohttp.ClientError, RuntimeError, OSError,
                        ValueError) as exc:
                    errors.append(f"{type(exc).__name__}: {exc}"[:300])
                    meter.errors += 1
                meter.done += 1

        async def ticker() -> None:
            while True:
                await asyncio.sleep(meter.every)
                if on_tick is not None:
                    on_tick()
                meter.tick()

        started = meter.started = time.perf_counter()
        ticking = asyncio.create_task(ticker())
        timed_out = False
        try:
            await asyncio.wait_for(asyncio.gather(*(worker(i) for i in range(streams))),
                                   timeout)
        except TimeoutError:
            timed_out = True
        finally:
            ticking.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await ticking
        seconds = time.perf_counter() - started
        if on_tick is not None:
            on_tick()
        meter.tick(final=True)
    tokens = sum(n for n, _ in results)
    ttfts = sorted(t * 1000 for _, t in results if t)
    return Phase(profile=profile.name, target=target, streams=streams, requests=requests,
                 tokens=tokens, seconds=seconds, tokens_per_s=tokens / seconds,
                 ttft_p50_ms=statistics.median(ttfts) if ttfts else 0.0,
                 ttft_p99_ms=percentile(ttfts, 0.99), completed=len(results),
                 errors=len(errors), error=errors[0] if errors else "", timed_out=timed_out)
