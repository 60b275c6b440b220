"""The metered relay: upstream events in, paid events out.

For each upstream event the dialect names the generated text in it; the stream's token counter
measures it; the meter grants the tokens from the stream's lease (no I/O) or renews the lease
(one Redis call). A fully granted event is forwarded byte for byte. A partly granted one is
truncated at the last paid token, followed by the dialect's clean terminal events, and the
upstream connection is closed so the model stops generating.

Plain events (text the lease covers, events forwarded untouched) usually never reach this
generator: the fast lane (gateway/feed.py) delivers them from the upstream's read callback
while the generator waits for data, and hands it the first event that needs it (and the rest
of that read). This generator stays the one place where leases are renewed, streams pause,
cut, end and settle.

The bill is settled *before* the client sees the end of the stream: before the protocol's last
event of a completed stream, and before the closing events of a cut (which then carry the
balance after the final charge). A client that saw the stream end therefore sees a settled
ledger. Whatever other way the stream ends (disconnect, upstream failure, ledger failure), the
``finally`` block charges exactly what the billing rule says, shielded from cancellation.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

import anyio

from gateway.dialects import DialectStream, ErrorInfo, Usage
from gateway.feed import Feed, inspect
from gateway.logs import request_done
from gateway.metrics import Metrics
from gateway.sse import SSEProtocolError
from gateway.sse_response import DirectWriter
from gateway.upstream import UpstreamResponse, UpstreamStreamError
from meters.errors import LedgerUnavailable
from meters.keeper import Keeper
from meters.meter import Bill, Outcome, Policy, StreamMeter
from meters.tokens import Tokenizer

log = logging.getLogger("tollstream.relay")

#: How long the shielded clean-up (closing upstream, final charge) may take.
SETTLE_TIMEOUT = 5.0


@dataclass(frozen=True, slots=True)
class RelayContext:
    """Everything one metered stream needs besides the upstream response."""

    model: str
    stream: DialectStream
    meter: StreamMeter
    tokenizer: Tokenizer
    keeper: Keeper
    metrics: Metrics
    #: Builds the machine-readable reason of a cut (balance, how to top up) from the meter
    #: and the final bill (``None`` when the final charge had to be deferred).
    cut_reason: Callable[[StreamMeter, Bill | None], Awaitable[Mapping[str, Any]]]
    #: Events that ask the client to pay for ``tokens`` more output tokens when the stream
    #: pauses (PAUSE policy only): (meter, tokens) -> events.
    pause_events: Callable[[StreamMeter, int], Awaitable[list[bytes]]] | None = None
    #: Events that end a stream which completed or was cut, after its final charge (an MPP
    #: session's ``payment-receipt``).
    final_events: Callable[[StreamMeter, Bill], Awaitable[list[bytes]]] | None = None
    #: ``time.monotonic()`` when the request arrived (the log line's duration).
    started: float = 0.0
    #: The client's connection for the fast lane (gateway/feed.py); None: every event goes
    #: through this generator (the answer is wrapped, e.g. recorded for idempotent replay).
    writer: DirectWriter | None = None


class _Settlement:
    """The one final charge of a stream, made at most once, wherever the stream ends."""

    def __init__(self, ctx: RelayContext) -> None:
        self.ctx = ctx
        self.done = False
        self.ended = False
        self.bill: Bill | None = None

    async def __call__(self, outcome: Outcome, usage: Usage) -> Bill | None:
        """Charge the billing rule's total (shielded); None if it was deferred to the keeper
        because the ledger could not be reached."""
        if self.done:
            return self.bill
        self.done = True
        ctx, meter = self.ctx, self.ctx.meter
        with anyio.CancelScope(shield=True):
            try:
                # asyncio's timeout, not anyio's ``fail_after``: the same deadline at half
                # the CPU (a scope, a clock read and a generator less per request).
                async with asyncio.timeout(SETTLE_TIMEOUT):
                    bill = await meter.close(outcome, reported_input=usage.prompt,
                                             reported_output=usage.output_tokens)
            except (LedgerUnavailable, TimeoutError):
                # The charge may or may not have run: settle.lua is idempotent, so the keeper
                # retries it until Redis answers.
                billed_in, billed_out, total = meter.final_charge(
                    outcome, reported_input=usage.prompt, reported_output=usage.output_tokens)
                ctx.keeper.defer(meter.account_id, meter.rid, total, billed_in + billed_out)
                log.error("final charge deferred: ledger unreachable")
                return None
        self.bill = bill
        ctx.metrics.record(ctx.model, bill)
        request_done(request_id=meter.rid, model=ctx.model, account_id=meter.account_id,
                     bill=bill, started=ctx.started)
        return bill

    async def ending(self, outcome: Outcome, usage: Usage) -> list[bytes]:
        """Settle, then the events that end a paid stream (an MPP receipt), once. They go
        before the dialect's end marker (``[DONE]``, ``message_stop``, ``response.*``): the
        SDKs stop reading there. None if the final charge had to be deferred."""
        bill = await self(outcome, usage)
        if self.ended or bill is None or self.ctx.final_events is None:
            return []
        self.ended = True
        return await self.ctx.final_events(self.ctx.meter, bill)


async def relay(ctx: RelayContext, response: UpstreamResponse) -> AsyncIterator[bytes]:
    """Yield the client's SSE bytes for one upstream streaming response."""
    meter, stream = ctx.meter, ctx.stream
    counter = ctx.tokenizer.counter()
    settle = _Settlement(ctx)
    outcome = Outcome.DISCONNECTED  # unless the loop below says otherwise
    usage = Usage()
    feed = Feed(response, stream, meter, counter, ctx.writer)
    ctx.metrics.active_streams.inc()
    try:
        try:
            feed.start()
            while True:
                # Events that arrive together are sent together: one write per upstream
                # read. The plain ones may have gone out already from the read callback
                # (gateway/feed.py); what needs this task comes here.
                batch = await feed.next_batch()
                if batch is None:
                    if outcome is not Outcome.COMPLETED:
                        # The upstream closed without saying it was done.
                        outcome = Outcome.UPSTREAM_ERROR
                        for chunk in stream.error(ErrorInfo(
                                502, "upstream_error", "the model API ended the stream early")):
                            yield chunk
                    break
                out: list[bytes] = []
                pending = 0  # granted tokens in `out`, delivered once it is sent
                stop = False
                first = batch.inspected
                for event in batch.events:
                    if first:
                        info, first = batch.first, False
                    else:
                        info = inspect(stream, event)
                    if info is None:
                        # Undecodable upstream JSON: what came before it in this read is
                        # still sent (and billed), then the error.
                        log.warning("upstream sent an undecodable event")
                        outcome = Outcome.UPSTREAM_ERROR
                        out += stream.error(ErrorInfo(502, "upstream_error",
                                                      "the model API stream failed"))
                        stop = True
                        break
                    if info.usage is not None:
                        usage = info.usage
                        if usage.prompt is not None and not meter.granted:
                            # The upstream counted the prompt before any output: meter it at
                            # that count, not the gateway's estimate (re-prices the hold).
                            meter.reprice_input(usage.prompt)
                    if info.error is not None:
                        outcome = Outcome.UPSTREAM_ERROR
                        out.append(event.raw)
                        stop = True
                        break
                    if info.texts:
                        n = counter.measure(info.texts)
                        granted = meter.take(n)
                        if granted < n:
                            granted += await meter.acquire(n - granted)
                        if granted < n and meter.policy is Policy.PAUSE and ctx.pause_events:
                            # Pause: what was paid goes out first, then the request for
                            # money; the upstream is not read meanwhile (its flow control
                            # holds it) and a disconnect cancels the wait.
                            if out:
                                yield b"".join(out)
                                meter.delivered_tokens(pending)
                                out, pending = [], 0
                            ctx.metrics.event("pause", ctx.model)
                            deadline = time.monotonic() + meter.pause_timeout
                            while granted < n:  # asked again while a payment falls short
                                yield b"".join(await ctx.pause_events(meter, n - granted))
                                got = await meter.wait_for(n - granted, until=deadline)
                                if not got and time.monotonic() >= deadline:
                                    ctx.metrics.event("pause_timeout", ctx.model)
                                    break
                                # Nothing, before the deadline: a credit went to another
                                # stream on the account; ask again for what is needed now.
                                granted += got
                            else:
                                ctx.metrics.event("resume", ctx.model)
                        if granted < n:
                            outcome = Outcome.CUT
                            partial = stream.truncate(granted, counter) if granted else None
                            if partial is not None:
                                out.append(partial[0])
                                pending += partial[1]  # only what the cut kept is billed
                            if out:
                                yield b"".join(out)
                                meter.delivered_tokens(pending)
                                out, pending = [], 0
                            ending = await settle.ending(outcome, usage)
                            reason = await ctx.cut_reason(meter, settle.bill)
                            cut = stream.cut(reason, Usage(meter.input_tokens, meter.delivered))
                            out += cut[:-1] + ending + cut[-1:]
                            stop = True
                            break
                        counter.commit(info.texts)
                        out.append(event.raw)
                        pending += n
                    elif info.terminal:
                        # Everything before it reaches the client, then the bill is settled,
                        # then the client learns the stream is over.
                        outcome = Outcome.COMPLETED
                        if out:
                            yield b"".join(out)
                            meter.delivered_tokens(pending)
                            out, pending = [], 0
                        out += await settle.ending(outcome, usage)
                        out.append(event.raw)
                        continue
                    elif info.forward:
                        out.append(event.raw)
                    if info.final:
                        outcome = Outcome.COMPLETED
                if out:
                    yield b"".join(out)
                    meter.delivered_tokens(pending)
                    if feed.buffered():
                        # The next read will not wait: let the loop process I/O (a client's
                        # disconnect among it) before the next send. When it will wait, that
                        # wait lets the loop run; a yield here too cost a loop turn per send.
                        await asyncio.sleep(0)
                if stop:
                    break
                if batch.error is not None:
                    raise batch.error
            if outcome is Outcome.COMPLETED:  # without an end marker from the upstream
                ending = await settle.ending(outcome, usage)
                if ending:
                    yield b"".join(ending)
        except (UpstreamStreamError, SSEProtocolError) as exc:
            outcome = Outcome.UPSTREAM_ERROR
            log.warning("upstream stream failed: %s", type(exc).__name__)
            for chunk in stream.error(ErrorInfo(502, "upstream_error",
                                                "the model API stream failed")):
                yield chunk
        except LedgerUnavailable:
            outcome = Outcome.LEDGER_ERROR
            for chunk in stream.error(ErrorInfo(503, "ledger_unavailable",
                                                "the ledger is unreachable; the stream was "
                                                "stopped at the last paid token")):
                yield chunk
    finally:
        # No await before the settlement, which shields itself (and returns at once when the
        # stream was settled already, as every completed one was).
        feed.stop()
        ctx.metrics.active_streams.dec()
        ctx.metrics.lane_reads.inc(feed.lane_reads)
        response.close()
        await settle(outcome, usage)


__all__ = ["Bill", "RelayContext", "relay"]
