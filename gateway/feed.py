"""The relay's upstream events: in batches for the stream's task, or delivered straight from
the upstream's read callback when nothing in them needs the task (the fast lane).

Most of a stream's events are plain: text the stream's current lease covers, or events that
are forwarded untouched. For those there is nothing to wait for, so the read callback does
what the relay would do (inspect, count, grant, forward, record the delivery) and writes them
to the client itself (:class:`~gateway.sse_response.DirectWriter`). The stream's task is not
woken, and three async generators and the server's ``send`` are not run, for each read
(benchmarks/RESULTS.md, session 22).

Everything else goes to the task, which handles it exactly as before: the end of the stream,
usage, an error, text the lease does not cover, an undecodable event. The first such event
and everything after it in the same read become a :class:`Batch` for the task. A read that
arrives while the client is gone or not reading is left to the task whole, unread.

The lane runs only while the task waits for data with nothing left unprocessed (see
``Connection.on_body``). Events are therefore handled in order, and each is inspected once,
by one side or the other. That matters: a dialect's ``inspect`` keeps the stream's state for
a later cut. The lane's grant is all or nothing (``StreamMeter.take_all``), so a partial
grant, a lease renewal, a pause or a cut always happen in the task, at the event that needs
them.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from gateway.dialects import DialectStream, EventInfo
from gateway.sse import EventSplitter, SSEEvent, SSEProtocolError
from gateway.sse_response import DirectWriter
from gateway.upstream import UpstreamResponse
from meters.meter import StreamMeter
from meters.tokens import TokenCounter


@dataclass(frozen=True, slots=True)
class Batch:
    """Events for the relay's task, in order."""

    events: list[SSEEvent]
    #: True when the lane inspected ``events[0]`` already; its result is :attr:`first`.
    inspected: bool = False
    #: The first event's info (None: its JSON did not decode), when :attr:`inspected`.
    first: EventInfo | None = None
    #: The stream broke after these events (not SSE): the task ends it with an error.
    error: SSEProtocolError | None = None


def inspect(stream: DialectStream, event: SSEEvent) -> EventInfo | None:
    """The dialect's view of ``event``; None when its JSON does not decode (orjson raises a
    ValueError)."""
    try:
        return stream.inspect(event)
    except ValueError:
        return None


class Feed:
    """One stream's upstream events: :meth:`next_batch` for the relay's task, and the fast
    lane (with a ``writer``) for the plain ones."""

    def __init__(self, response: UpstreamResponse, stream: DialectStream, meter: StreamMeter,
                 counter: TokenCounter, writer: DirectWriter | None) -> None:
        self.response, self.stream, self.meter, self.counter = response, stream, meter, counter
        self.writer = writer
        self.splitter = EventSplitter()
        self._stash: Batch | None = None
        self._ended = False
        #: Reads whose events the lane delivered (the tests' and benchmarks' evidence).
        self.lane_reads = 0

    def start(self) -> None:
        """Open the fast lane (when there is a writer to the client)."""
        if self.writer is not None:
            self.response.set_sink(self._lane)

    def stop(self) -> None:
        """Close the fast lane: from now on nothing is delivered but by the task."""
        self.response.set_sink(None)

    async def next_batch(self) -> Batch | None:
        """The next events for the task (waiting for the upstream if none arrived); None at
        the end of the upstream's body. A batch may end with the stream's :attr:`Batch.error`;
        ``UpstreamStreamError`` is raised for a body that broke off."""
        while True:
            stash = self._stash
            if stash is not None:
                self._stash = None
                return stash
            if self._ended:
                return None
            chunk = self.response.poll()
            if chunk is None:
                self._ended = True
                last = self.splitter.finish()
                error = self.splitter.error
                return Batch(last, error=error) if last or error else None
            if chunk:
                events = self.splitter.feed(chunk)
                error = self.splitter.error
                if events or error:
                    if error is not None:
                        self._ended = True
                    return Batch(events, error=error)
            else:
                await self.response.wait()

    def buffered(self) -> bool:
        """Whether :meth:`next_batch` returns without waiting for the upstream."""
        return self._stash is not None or self.response.buffered()

    # -- the fast lane: runs in the upstream's read callback, so it must not raise ----------

    def _lane(self, data: bytes) -> bool:
        """Deliver ``data``'s plain events and hand the rest to the task; False (nothing
        taken) when the client cannot be written to now."""
        writer = self.writer
        if writer is None or not writer.ready():
            return False
        events = self.splitter.feed(data)
        error = self.splitter.error
        stream, meter, counter = self.stream, self.meter, self.counter
        out: list[bytes] = []
        tokens = 0  # granted in `out`
        for index, event in enumerate(events):
            info = inspect(stream, event)
            if (info is None or info.usage is not None or info.error is not None
                    or info.terminal or info.final):
                return self._hand_over(out, tokens, Batch(events[index:], True, info, error))
            if info.texts:
                n = counter.measure(info.texts)
                if not meter.take_all(n):
                    return self._hand_over(out, tokens, Batch(events[index:], True, info, error))
                counter.commit(info.texts)
                tokens += n
                out.append(event.raw)
            elif info.forward:
                out.append(event.raw)
        if error is not None:  # the stream broke after these: the task ends it
            return self._hand_over(out, tokens, Batch([], error=error))
        self._deliver(out, tokens)
        # The read the task waits on was answered: its read timeout starts again.
        self.response.waiting_since = time.monotonic()
        return True

    def _deliver(self, out: list[bytes], tokens: int) -> None:
        if out:
            # Nothing between ready() and here can have changed the client's connection: a
            # chunk written now is delivered as the task's ``send`` would deliver it.
            assert self.writer is not None
            self.writer.write(b"".join(out))
            self.meter.delivered_tokens(tokens)
            self.lane_reads += 1

    def _hand_over(self, out: list[bytes], tokens: int, batch: Batch) -> bool:
        """Deliver what the lane granted, then leave ``batch`` (an event that needs the task
        and what followed it, inspected once) to the task, and wake it."""
        self._deliver(out, tokens)
        if batch.error is not None:
            self._ended = True
        self._stash = batch
        self.response.wake()
        return True


__all__ = ["Batch", "Feed", "inspect"]
