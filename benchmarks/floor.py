"""The floor under the gateway's CPU per chunk: what relaying small chunks costs in Python's
event loop with nothing else to do (no HTTP, no parsing, no metering), on this machine.

A feeder process writes one SSE-sized chunk to each of ``--streams`` connections
``--rate`` times a second; the relay (this process) forwards every chunk it reads to a sink
process over a connection of its own, and its CPU per chunk is measured over the middle of
``--seconds`` (the first and last 1.5 s left out). Five relays:

* ``protocol``: the read callback writes to the outgoing transport (no task per chunk);
* ``streams``: one task per connection, ``await reader.read()`` then ``write``, the shape of
  the gateway's relay (a task woken by the read, then a write);
* ``work``: ``protocol`` doing in its read callback the gateway's own per-chunk work, with its
  own code: the upstream's HTTP/1.1 chunked body decoded (httptools, as uvicorn parses),
  the SSE split (``gateway.sse.parse_event``), the OpenAI chat dialect's ``inspect``, the
  o200k token count, the stream meter's grant from its lease, and the chunked framing to the
  client. What a push-style relay without aiohttp, uvicorn's ``send`` and a task per chunk
  would cost at best (the lease renewals, one Redis call per lease, left out);
* ``work-task``: the same work done by one task per connection that the protocol wakes for
  each body chunk: the gateway's relay shape (a task per stream, woken by the read) on a lean
  upstream protocol and direct writes;
* ``work-aiohttp``: the same work in one task per stream reading its upstream with aiohttp's
  ``readany``, as the gateway does (the relay is the feeder's HTTP client here): against
  ``work-task``, what aiohttp's receive path costs per chunk.

    python -m benchmarks.floor                    # all five, 64 streams at 50 chunks/s
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
from typing import cast

import aiohttp
import httptools

from gateway.background import free_port
from gateway.dialects import get_dialect
from gateway.sse import parse_event
from meters.ledger import Ledger
from meters.meter import StreamMeter
from meters.money import Asset
from meters.rates import Rate
from meters.tokens import get_tokenizer

CHUNK = b'data: {"choices":[{"index":0,"delta":{"content":" tok"}}]}\n\n'
#: What the ``work`` relay reads: a chunk as the OpenAI API (and the simulator) writes it.
API_CHUNK = (b'data: {"id":"chatcmpl-1","object":"chat.completion.chunk","created":1700000000,'
             b'"model":"bench","choices":[{"index":0,"delta":{"content":" tok"},'
             b'"logprobs":null,"finish_reason":null}]}\n\n')
HEAD = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
RELAYS = ["protocol", "streams", "work", "work-task", "work-aiohttp"]
#: Seconds left out at each end of the run (connections opening, the feeder stopping).
MARGIN = 1.5


def _feed(port: int, streams: int, rate: float, seconds: float, http: bool) -> None:
    """``http``: an HTTP/1.1 response head, then each chunk framed as a chunked body's."""
    chunk = b"%x\r\n%s\r\n" % (len(API_CHUNK), API_CHUNK) if http else CHUNK

    async def main() -> None:
        writers = [(await asyncio.open_connection("127.0.0.1", port))[1]
                   for _ in range(streams)]
        if http:
            for writer in writers:
                writer.write(HEAD)
        await _paced(writers, chunk, rate, seconds)
        for writer in writers:
            writer.close()

    asyncio.run(main())


async def _paced(writers: list[asyncio.StreamWriter], chunk: bytes, rate: float,
                 seconds: float) -> None:
    """``chunk`` to every writer ``rate`` times a second for ``seconds``."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        tick = time.monotonic()
        for writer in writers:
            writer.write(chunk)
        await asyncio.sleep(max(0.0, 1 / rate - (time.monotonic() - tick)))


def _serve_feed(port: int, streams: int, rate: float, seconds: float, ready: Event) -> None:
    """The feeder as an HTTP server (for ``work-aiohttp``, whose relay is the client): each
    request gets a chunked response head, then, once ``streams`` requests came, the
    chunks."""
    chunk = b"%x\r\n%s\r\n" % (len(API_CHUNK), API_CHUNK)

    async def main() -> None:
        writers: list[asyncio.StreamWriter] = []
        arrived = asyncio.Event()

        async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(HEAD)
            writers.append(writer)
            if len(writers) == streams:
                arrived.set()

        async with await asyncio.start_server(answer, "127.0.0.1", port):
            ready.set()
            await arrived.wait()
            await _paced(writers, chunk, rate, seconds)
            for writer in writers:
                writer.write(b"0\r\n\r\n")
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


class _Alive:
    """What the meter's grant asks of its ledger: alive, in the epoch of the hold."""

    epoch = 0

    @staticmethod
    def is_alive() -> bool:
        return True


def _leased_meter() -> StreamMeter:
    """A stream meter whose lease covers every token of the run (no Redis call: the
    benchmark measures the grant, not the lease renewals)."""
    meter = StreamMeter(cast(Ledger, _Alive()), "bench", Rate.parse(
        Asset(), input_per_mtok="0", output_per_mtok="1"), lease_tokens=1)
    meter.epoch, meter.opened, meter.covered = 0, True, 1 << 62
    return meter


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def _relay(kind: str, streams: int, sink_port: int, start_feed: Callable[[int], None],
                 seconds: float, feed_url: str) -> tuple[float, int, int]:
    """(CPU seconds, chunks, tokens granted: ``work`` only) over the middle of the run."""
    loop = asyncio.get_running_loop()
    chunks = tokens = 0

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

    class Work(asyncio.Protocol):
        """The gateway's per-chunk work in the read callback (see the module docstring)."""

        def __init__(self) -> None:
            self.out = next(spare)
            self.parser = httptools.HttpResponseParser(self)
            self.buffer = b""
            self.stream = dialect.open_stream(request)
            self.meter = _leased_meter()

        def data_received(self, data: bytes) -> None:
            self.parser.feed_data(data)

        def on_body(self, body: bytes) -> None:
            self.process(body)

        def process(self, body: bytes) -> None:
            nonlocal chunks, tokens
            chunks += 1
            buffer = self.buffer + body if self.buffer else body
            start, out, pending = 0, [], 0
            while (end := buffer.find(b"\n\n", start)) >= 0:
                event = parse_event(buffer[start:end])
                start = end + 2
                if event is None:
                    continue
                info = self.stream.inspect(event)
                if info.texts:
                    n = tokenizer.measure(info.texts)
                    pending += self.meter.take(n)
                    tokenizer.commit(info.texts)
                    out.append(event.raw)
                elif info.forward:
                    out.append(event.raw)
            self.buffer = buffer[start:]
            if out:
                sent = b"".join(out)
                self.out.write(b"%x\r\n%s\r\n" % (len(sent), sent))
                self.meter.delivered_tokens(pending)
                tokens += pending

    class WorkTask(Work):
        """:class:`Work` with the work done by one task per connection, woken by each body
        chunk the protocol receives (the gateway's relay shape, on a lean protocol)."""

        def __init__(self) -> None:
            super().__init__()
            self.bodies: list[bytes] = []
            self.waiter: asyncio.Future[None] | None = None
            self.ended = False
            task = loop.create_task(self.run())
            forwarding.add(task)

        def on_body(self, body: bytes) -> None:
            self.bodies.append(body)
            self._wake()

        def connection_lost(self, exc: Exception | None) -> None:
            self.ended = True
            self._wake()

        def _wake(self) -> None:
            if self.waiter is not None and not self.waiter.done():
                self.waiter.set_result(None)

        async def run(self) -> None:
            while True:
                if not self.bodies:
                    if self.ended:
                        return
                    self.waiter = loop.create_future()
                    await self.waiter
                    continue
                bodies, self.bodies = self.bodies, []
                for body in bodies:
                    self.process(body)

    async def through_aiohttp(session: aiohttp.ClientSession, url: str) -> None:
        """One stream read with aiohttp as the gateway reads its upstreams (``readany``),
        the work done in this task."""
        work = Work()
        async with session.get(url) as response:
            while chunk := await response.content.readany():
                work.process(chunk)

    dialect = get_dialect("openai_chat")
    request = dialect.parse_request({"model": "bench", "stream": True, "messages": [
        {"role": "user", "content": "benchmark"}]})
    tokenizer = get_tokenizer("o200k_base").counter()
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

    if kind == "work-aiohttp":
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
            feeding = [loop.create_task(through_aiohttp(session, feed_url))
                       for _ in range(streams)]
            await asyncio.sleep(MARGIN)
            cpu, before, granted = _cpu(), chunks, tokens
            await asyncio.sleep(seconds - 2 * MARGIN)
            used, counted, granted = _cpu() - cpu, chunks - before, tokens - granted
            await asyncio.wait(feeding, timeout=MARGIN + 10)
        for out in outs:
            out.close()
        return used, counted, granted
    port = free_port()
    if kind == "protocol":
        server = await loop.create_server(Forward, "127.0.0.1", port)
    elif kind == "work":
        server = await loop.create_server(Work, "127.0.0.1", port)
    elif kind == "work-task":
        server = await loop.create_server(WorkTask, "127.0.0.1", port)
    else:
        server = await asyncio.start_server(forward, "127.0.0.1", port)
    async with server:
        start_feed(port)
        await asyncio.sleep(MARGIN)
        cpu, before, granted = _cpu(), chunks, tokens
        await asyncio.sleep(seconds - 2 * MARGIN)
        used, counted, granted = _cpu() - cpu, chunks - before, tokens - granted
        if forwarding:  # each ends when the feeder, done, closes its connection
            await asyncio.wait(forwarding, timeout=MARGIN + 10)
    for out in outs:
        out.close()
    return used, counted, granted


def run(kind: str, streams: int, rate: float, seconds: float, loop: str = "asyncio"
        ) -> tuple[float, int, int]:
    """One relay's (CPU seconds, chunks, tokens), with its feeder and sink started and
    stopped; ``loop``: the relay's event loop (the feeder and sink use asyncio's)."""
    runner: Callable[..., tuple[float, int, int]] = asyncio.run
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
        feeder = multiprocessing.Process(
            target=_feed, args=(port, streams, rate, seconds, kind.startswith("work")),
            daemon=True)
        feeder.start()
        feeders.append(feeder)

    feed_url = ""
    if kind == "work-aiohttp":  # the relay is the feeder's HTTP client
        feed_port, feeding = free_port(), multiprocessing.Event()
        server = multiprocessing.Process(target=_serve_feed, daemon=True, args=(
            feed_port, streams, rate, seconds, feeding))
        server.start()
        feeders.append(server)
        if not feeding.wait(30):
            raise RuntimeError("the feeder did not start")
        feed_url = f"http://127.0.0.1:{feed_port}/v1/chat/completions"
    try:
        if not ready.wait(30):
            raise RuntimeError("the sink did not start")
        return runner(_relay(kind, streams, sink_port, start_feed, seconds, feed_url))
    finally:
        for process in (*feeders, sink):
            process.terminate()
            process.join(10)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.floor", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--relay", choices=[*RELAYS, "all"], default="all")
    parser.add_argument("--streams", type=int, default=64)
    parser.add_argument("--rate", type=float, default=50.0, help="chunks/s per stream")
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--loop", choices=["asyncio", "uvloop"], default="asyncio",
                        help="the relay's event loop")
    args = parser.parse_args(argv)
    if args.seconds <= 2 * MARGIN:
        parser.error(f"--seconds must be more than {2 * MARGIN:g}")
    kinds = RELAYS if args.relay == "all" else [args.relay]
    for kind in kinds:
        cpu, chunks, tokens = run(kind, args.streams, args.rate, args.seconds, args.loop)
        if not chunks:
            print(f"{kind:>12}: no chunk relayed", file=sys.stderr)
            return 1
        granted = f", {tokens} tokens metered" if kind.startswith("work") else ""
        print(f"{kind:>12}: {cpu / chunks * 1e6:.1f} us of CPU per chunk ({chunks} chunks"
              f"{granted}, {args.streams} streams at {args.rate:g}/s, {args.loop})",
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
