"""Model routes: one handler serves every dialect; the dialect does the API-specific parts."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import anyio
import orjson
from fastapi import APIRouter, Request
from fastapi.responses import Response

from gateway.body import read_json
from gateway.dialects import Dialect, ParsedRequest, get_dialect
from gateway.errors import GatewayError, PaymentRequired, UpstreamError
from gateway.idempotency import Record, RequestIdempotency
from gateway.logs import request_done
from gateway.rails import Paid
from gateway.relay import RelayContext, relay
from gateway.sse_response import DirectWriter, EventStreamResponse
from gateway.state import Gateway, Model
from gateway.upstream import UpstreamResponse, UpstreamStreamError
from meters.errors import InsufficientFunds, MeterError
from meters.meter import Bill, Outcome, Policy, StreamMeter

router = APIRouter()
log = logging.getLogger("tollstream.routes")

#: A non-streaming upstream answer larger than this is refused rather than buffered.
MAX_RESPONSE_BYTES = 16 * 1024 * 1024


def find_model(gw: Gateway, name: str, dialect: Dialect) -> Model:
    """The model asked for (see :mod:`gateway.routing`); 404 or 400 naming ``model``."""
    return gw.router.resolve(name, dialect)


def query_string(request: Request) -> str:
    """The client's query string, as ``request.url.query`` gives it, without building the
    URL (1.4% of a one-token request's CPU)."""
    raw: bytes = request.scope.get("query_string", b"")
    return raw.decode() if raw else ""


def rough_prompt_tokens(parsed: ParsedRequest) -> int:
    """A prompt size known without running a tokenizer: one token per 3 characters.

    It prices the payment a request is asked for before the caller has proved anything (402
    challenges and the payment that answers them must agree on it), so an anonymous client
    cannot make the gateway tokenize megabytes. English runs ~4 characters per token: this
    asks a little more than the exact count, and the hold is then made on the exact count.
    """
    return -(-len(parsed.prompt_text) // 3) + parsed.prompt_overhead


def keep_payment_headers(request: Request, paid: Paid) -> None:
    """From here on every answer, errors included, carries the settlement and the key: the
    payment was taken, the payer must be able to use it (see app.py). Except an MPP
    Payment-Receipt: "Servers MUST NOT return a Payment-Receipt header on error responses"
    (draft-httpauth-payment, "Receipt Status Semantics"); the key suffices."""
    request.state.payment_headers = {k: v for k, v in paid.headers.items()
                                     if k.lower() != "payment-receipt"}


async def handle(request: Request, dialect: Dialect) -> Response:
    """Authenticate, hold, forward, meter and bill one model request."""
    gw: Gateway = request.app.state.gateway
    managed = await gw.rail.manage(request)
    if managed is not None:
        return managed  # a payment action that needs no model (an MPP session close)
    parsed = dialect.parse_request(await read_json(request, gw.settings.max_body_bytes))
    idempotency_key = RequestIdempotency.key_of(request.headers)
    model = find_model(gw, parsed.model, dialect)
    needed = model.rate.charge(rough_prompt_tokens(parsed), gw.rail.min_output_tokens)
    # The most this request can cost (its prompt and whole output): what an authorization
    # for a maximum (x402 ``upto``) is asked for.
    request.state.max_charge = model.rate.charge(
        rough_prompt_tokens(parsed), parsed.max_output or model.max_output_tokens)
    try:
        paid = await gw.rail.authenticate(request, needed=needed, rate=model.rate)
    except PaymentRequired:
        await gw.challenged(request)  # a rejected payment is one more challenge
        raise
    if paid is not None:
        keep_payment_headers(request, paid)
    else:
        paid = Paid(await gw.authenticate(request, needed=needed, rate=model.rate), {})
    try:
        if idempotency_key is None:
            return await _serve(request, gw, dialect, parsed, model, paid, needed, None)
        claim = await gw.idempotency.begin(paid.account_id, idempotency_key,
                                           request.url.path, parsed.body)
        if isinstance(claim, Response):
            return claim  # answered before: not metered again
        try:
            return await _serve(request, gw, dialect, parsed, model, paid, needed, claim)
        except BaseException:
            await gw.idempotency.abandon(claim)  # nothing was charged: a retry runs anew
            raise
    except BaseException:
        if paid.finish is not None:
            # The request failed before it streamed: what it paid for is settled (nothing,
            # usually) now rather than when the keeper finds the authorization idle.
            with anyio.CancelScope(shield=True):
                await _finish(paid)
        raise


async def _finish(paid: Paid) -> dict[str, str]:
    """Run ``paid.finish``; an outage is left to the rail's keeper (it retries)."""
    assert paid.finish is not None
    try:
        return await paid.finish()
    except (GatewayError, MeterError) as exc:
        log.warning("settling the payment failed (%s); its keeper retries", exc.code)
        return {}


async def _finishing(events: AsyncIterator[bytes], paid: Paid) -> AsyncIterator[bytes]:
    """``events``, then ``paid.finish`` however the stream ended (a disconnect included)."""
    try:
        async for chunk in events:
            yield chunk
    finally:
        with anyio.CancelScope(shield=True):
            await _finish(paid)


async def _serve(request: Request, gw: Gateway, dialect: Dialect, parsed: ParsedRequest,
                 model: Model, paid: Paid, needed: int, claim: Record | None) -> Response:
    """Hold, forward, meter and bill one authenticated request (its answer kept for
    ``claim``'s retries). ``needed``: what a payment for it was asked (402s ask as much)."""
    started = time.monotonic()
    account_id, payment_headers, paying = paid.account_id, paid.headers, paid.stream
    # Only an authenticated (or paying) caller gets the tokenizer's time.
    input_tokens = model.tokenizer.count(parsed.prompt_text) + parsed.prompt_overhead
    cap = parsed.max_output or model.max_output_tokens
    # A stream meters lease by lease; a non-streaming answer cannot be cut, so it holds its
    # whole (affordable) output up front and the upstream is told not to exceed it.
    # An exhausted allowance cuts a stream, or pauses it: always a pre-authorized one (an
    # MPP session waits for the next voucher), others as the operator chose.
    policy = Policy.CUT
    pause_timeout = gw.settings.pause_timeout_seconds
    if parsed.stream and paying is not None:
        if paying.pauses:
            policy, pause_timeout = Policy.PAUSE, paying.pause_timeout
    elif parsed.stream:
        policy = Policy(gw.settings.exhausted_policy)
    rate = gw.router.rate_for(model, account_id)  # in what the account holds
    asset = gw.settings.asset_of(account_id)
    meter = StreamMeter(gw.ledger, account_id, rate, rid=request.state.request_id,
                        lease_tokens=gw.settings.lease_tokens if parsed.stream else cap,
                        max_output=parsed.max_output if parsed.stream else cap,
                        policy=policy, pause_timeout=pause_timeout, notices=gw.notices)
    try:
        await meter.open(input_tokens)
    except InsufficientFunds as exc:
        await gw.challenged(request)
        # At least what a payment for this request is verified against (``needed``, from
        # the request alone): its paid retry must find the amount this 402 asked acceptable.
        error = gw.insufficient(request, exc, needed=max(needed, model.rate.charge(
            input_tokens, gw.rail.min_output_tokens)), rate=model.rate)
        if paying is not None and error.body is not None:
            # What the next voucher must reach for this request to start.
            error.body.update(await paying.shortfall(meter, exc.needed))
        if asset != gw.asset:
            # The balance and what it lacks are in the account's fiat currency, not in the
            # asset the offers (x402, evm) ask for.
            for target in (error.extra, error.body if error.body is not None else {}):
                target.update(balance_asset=asset.symbol, balance_decimals=asset.decimals)
        raise error from exc
    try:
        upstream_max = None if parsed.stream else min(meter.covered, cap)
        body = dialect.upstream_body(parsed, model=model.upstream_model, max_output=upstream_max)
        headers = {**gw.upstreams.forwarded(model.upstream, request.headers),
                   **dialect.upstream_headers(request.headers,
                                              gw.settings.upstreams[model.upstream].key())}
        response = await gw.upstreams.open(model.upstream, dialect.path, body, headers,
                                           query=query_string(request))
    except BaseException:
        with anyio.CancelScope(shield=True):
            await meter.refund_all()
        raise
    if not parsed.stream:
        answer = await _complete(gw, model, meter, dialect, response, payment_headers,
                                 started)
        if paid.finish is not None:
            answer.headers.update(await _finish(paid))
        if claim is not None:
            await gw.idempotency.finish(claim, bytes(answer.body),
                                        media_type="application/json")
        return answer

    async def cut_reason(m: StreamMeter, bill: Bill | None) -> dict[str, Any]:
        reason: dict[str, Any] = {
            "type": "allowance_exhausted", "code": "insufficient_funds",
            "message": "the allowance ran out: the stream was stopped at the last paid token"
            if m.policy is Policy.CUT else f"no payment arrived within {m.pause_timeout:g} s "
            "of the pause: the stream was stopped at the last paid token",
            "balance": str(bill.balance if bill is not None else m.balance_seen),
            "asset": asset.symbol, "decimals": asset.decimals,
            "delivered_tokens": m.delivered,
            "top_up": dict(await gw.rail.top_up_hint(account_id, request))}
        if bill is not None:
            reason["charged"] = str(bill.charged)
        else:
            # The final charge could not be made yet (the ledger is unreachable; the keeper
            # retries it): the balance is the one seen before it.
            reason["balance_provisional"] = True
        return reason

    async def pause_events(m: StreamMeter, tokens: int) -> list[bytes]:
        # An SSE comment: every SDK ignores it, an agent watching the raw stream (or a
        # payment rail's client) learns it should top up within pause_timeout_seconds.
        notice = {"type": "payment_required", "balance": str(m.balance_seen),
                  "delivered_tokens": m.granted, "waits_seconds": m.pause_timeout,
                  "top_up": dict(await gw.rail.top_up_hint(account_id, request))}
        return [b": tollstream payment-required " + orjson.dumps(notice) + b"\n\n"]

    ctx = RelayContext(model=model.name, stream=dialect.open_stream(parsed), meter=meter,
                       tokenizer=model.tokenizer, keeper=gw.keeper, metrics=gw.metrics,
                       cut_reason=cut_reason,
                       pause_events=paying.need if paying is not None else pause_events,
                       final_events=paying.receipt if paying is not None else None,
                       started=started,
                       # The fast lane writes to the client past this generator: not when
                       # the answer is recorded for replay (the recorder must see it all).
                       writer=DirectWriter() if claim is None else None)
    events = relay(ctx, response)
    if paid.finish is not None:
        events = _finishing(events, paid)
    if claim is not None:
        events = gw.idempotency.recording(claim, events, media_type="text/event-stream")
    return EventStreamResponse(events, ping=15, headers=payment_headers, writer=ctx.writer)


async def _complete(gw: Gateway, model: Model, meter: StreamMeter, dialect: Dialect,
                    response: UpstreamResponse, headers: dict[str, str],
                    started: float) -> Response:
    """Non-streaming: read the answer, bill its reported usage (or counted output)."""
    try:
        raw = await response.read(MAX_RESPONSE_BYTES)
        usage, text = dialect.response_usage(orjson.loads(raw))
    except (UpstreamStreamError, orjson.JSONDecodeError) as exc:
        with anyio.CancelScope(shield=True):
            await meter.refund_all()
        raise UpstreamError("the model API returned an unreadable answer") from exc
    finally:
        response.close()
    meter.delivered_tokens(usage.output_tokens if usage.output_tokens is not None
                           else model.tokenizer.count(text))
    with anyio.CancelScope(shield=True):
        bill = await meter.close(Outcome.COMPLETED, reported_input=usage.prompt,
                                 reported_output=usage.output_tokens)
    gw.metrics.record(model.name, bill)
    request_done(request_id=meter.rid, model=model.name, account_id=meter.account_id,
                 bill=bill, started=started)
    return Response(raw, media_type="application/json", headers=headers)


@router.post("/v1/chat/completions")
async def chat_completions(request: Request) -> Response:
    return await handle(request, get_dialect("openai_chat"))


@router.post("/v1/messages")
async def messages(request: Request) -> Response:
    return await handle(request, get_dialect("anthropic_messages"))


@router.post("/v1/responses")
async def responses(request: Request) -> Response:
    return await handle(request, get_dialect("openai_responses"))


#: The model routes by path: the application serves their ``POST`` without Starlette's
#: router and middleware (see :meth:`gateway.app.GatewayApp.model_route`); the routes above
#: serve them when it cannot.
MODEL_ROUTES = {"/v1/chat/completions": chat_completions, "/v1/messages": messages,
                "/v1/responses": responses}
