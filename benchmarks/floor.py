"""The floor under the gateway's CPU per chunk: what relaying small chunks costs in Python's
event loop with nothing else to do (no HTTP, no parsing, no metering), on this machine.

A feeder process writes one SSE-sized chunk to each of ``--streams`` connections
``--rate`` times a second; the relay (this process) forwards every chunk it reads to a sink
process over a connection of its own, and its CPU per chunk is measured over the middle of
``--seconds`` (the first and last 1.5 s left out). Two relays:

* ``protocol``: the read callback writes to the outgoing transport (no task per chunk);
* ``streams``: one task per connection, ``await reader.read()`` then ``write``, the shape of
  the gateway's relay (a task woken by the read, then a write).

    python -m benchmarks.floor                    # both relays, 64 streams at 50 chunks/s
    python -m benchmarks.floor --relay streams --streams 256 --seconds 10
    python -m benchmarks.floor --loop uvloop      # the relay on uvloop (installed by hand)
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import resource
import sys
import time
from collections.abc import Callable
from multiprocessing.synchronize import Event

from gateway.background import free_port

CHUNK = b'data: {"choices":[{"index":0,"delta":{"content":" tok"}}]}\n\n'
#: Seconds left out at each end of the run (connections opening, the feeder stopping).
MARGIN = 1.5


def _feed(port: int, streams: int, rate: float, seconds: float) -> None:
    async def main() -> None:
        writers = [(await asyncio.open_connection("127.0.0.1", port))[1]
                   for _ in range(streams)]
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            tick = time.monotonic()
            for writer in writers:
                writer.write(CHUNK)
            await asyncio.sleep(max(0.0, 1 / rate - (time.monotonic() - tick)))
        for writer in writers:
            writer.close()

    asyncio.run(main())


def _sink(port: int, ready: Event, seconds: float) -> None:
    async def main() -> None:
        async def drain(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            while await reader.read(1 << 16):
                pass
            writer.close()

        async with await asyncio.start_server(drain, "127.0.0.1", port):
            ready.set()
            await asyncio.sleep(seconds + 10)

    asyncio.run(main())


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def _relay(kind: str, streams: int, sink_port: int, start_feed: Callable[[int], None],
                 seconds: float) -> tuple[float, int]:
    """(CPU seconds, chunks) over the middle of the run."""
    loop = asyncio.get_running_loop()
    chunks = 0

    class Out(asyncio.Protocol):
        pass

    outs = [(await loop.create_connection(Out, "127.0.0.1", sink_port))[0]
            for _ in range(streams)]
    spare = iter(outs)

    class Forward(asyncio.Protocol):
        def __init__(self) -> None:
            self.out = next(spare)

        def data_received(self, data: bytes) -> None:
            nonlocal chunks
            chunks += 1
            self.out.write(data)

    forwarding: set[asyncio.Task[None]] = set()

    async def forward(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal chunks
        task = asyncio.current_task()
        assert task is not None
        forwarding.add(task)
        out = next(spare)
        while data := await reader.read(1 << 16):
            chunks += 1
            out.write(data)
        writer.close()

    port = free_port()
    if kind == "protocol":
        server = await loop.create_server(Forward, "127.0.0.1", port)
    else:
        server = await asyncio.start_server(forward, "127.0.0.1", port)
    async with server:
        start_feed(port)
        await asyncio.sleep(MARGIN)
        cpu, before = _cpu(), chunks
        await asyncio.sleep(seconds - 2 * MARGIN)
        used, counted = _cpu() - cpu, chunks - before
        if forwarding:  # each ends when the feeder, done, closes its connection
            await asyncio.wait(forwarding, timeout=MARGIN + 10)
    for out in outs:
        out.close()
    return used, counted


def run(kind: str, streams: int, rate: float, seconds: float, loop: str = "asyncio"
        ) -> tuple[float, int]:
    """One relay's (CPU seconds, chunks), with its feeder and sink started and stopped;
    ``loop``: the relay's event loop (the feeder and sink use asyncio's)."""
    runner: Callable[..., tuple[float, int]] = asyncio.run
    if loop == "uvloop":
        try:
            import uvloop
        except ImportError as exc:  # not a dependency of the project
            raise SystemExit("--loop uvloop: uvloop is not installed") from exc
        runner = uvloop.run
    sink_port, ready = free_port(), multiprocessing.Event()
    sink = multiprocessing.Process(target=_sink, args=(sink_port, ready, seconds), daemon=True)
    sink.start()
    feeders: list[multiprocessing.Process] = []

    def start_feed(port: int) -> None:
        feeder = multiprocessing.Process(target=_feed, args=(port, streams, rate, seconds),
                                         daemon=True)
        feeder.start()
        feeders.append(feeder)

    try:
        if not ready.wait(30):
            raise RuntimeError("the sink did not start")
        return runner(_relay(kind, streams, sink_port, start_feed, seconds))
    finally:
        for process in (*feeders, sink):
            process.terminate()
            process.join(10)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.floor", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--relay", choices=["protocol", "streams", "both"], default="both")
    parser.add_argument("--streams", type=int, default=64)
    parser.add_argument("--rate", type=float, default=50.0, help="chunks/s per stream")
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--loop", choices=["asyncio", "uvloop"], default="asyncio",
                        help="the relay's event loop")
    args = parser.parse_args(argv)
    if args.seconds <= 2 * MARGIN:
        parser.error(f"--seconds must be more than {2 * MARGIN:g}")
    kinds = ["protocol", "streams"] if args.relay == "both" else [args.relay]
    for kind in kinds:
        cpu, chunks = run(kind, args.streams, args.rate, args.seconds, args.loop)
        if not chunks:
            print(f"{kind:>8}: no chunk relayed", file=sys.stderr)
            return 1
        print(f"{kind:>8}: {cpu / chunks * 1e6:.1f} us of CPU per chunk ({chunks} chunks, "
              f"{args.streams} streams at {args.rate:g}/s, {args.loop})", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
