"""Model routes: one handler serves every dialect; the dialect does the API-specific parts."""

from __future__ import annotations

from typing import Any

import anyio
import orjson
from fastapi import APIRouter, Request
from fastapi.responses import Response

from gateway.dialects import Dialect, get_dialect
from gateway.errors import BadRequest, NotFound, PayloadTooLarge, UpstreamError
from gateway.relay import RelayContext, relay
from gateway.sse import EventStreamResponse
from gateway.state import Gateway, Model
from gateway.upstream import UpstreamResponse, UpstreamStreamError
from meters.errors import InsufficientFunds
from meters.meter import Outcome, Policy, StreamMeter

router = APIRouter()

#: A non-streaming upstream answer larger than this is refused rather than buffered.
MAX_RESPONSE_BYTES = 16 * 1024 * 1024


async def read_json(request: Request, limit: int) -> Any:
    """The request body as JSON; 413 over ``limit`` bytes, 400 if it is not JSON."""
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise PayloadTooLarge(f"the request body is over the limit of {limit} bytes",
                              param="body")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise PayloadTooLarge(f"the request body is over the limit of {limit} bytes",
                                  param="body")
    if not body:
        raise BadRequest("the request body is empty; send a JSON object", code="invalid_json",
                         param="body")
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise BadRequest(f"the request body is not valid JSON: {exc.args[0][:120]}",
                         code="invalid_json", param="body") from exc


def find_model(gw: Gateway, name: str, dialect: Dialect) -> Model:
    model = gw.models.get(name)
    if model is None:
        raise NotFound(f"the model {name!r} does not exist on this gateway; "
                       "GET /v1/models lists the models you can use",
                       code="model_not_found", param="model")
    if model.dialect.name != dialect.name:
        raise BadRequest(f"the model {name!r} speaks {model.dialect.name}, "
                         f"not {dialect.name}: use its own endpoint",
                         code="wrong_endpoint", param="model")
    return model


async def handle(request: Request, dialect: Dialect) -> Response:
    """Authenticate, hold, forward, meter and bill one model request."""
    gw: Gateway = request.app.state.gateway
    parsed = dialect.parse_request(await read_json(request, gw.settings.max_body_bytes))
    model = find_model(gw, parsed.model, dialect)
    input_tokens = model.tokenizer.count(parsed.prompt_text) + parsed.prompt_overhead
    needed = model.rate.charge(input_tokens, gw.rail.min_output_tokens)
    paid = await gw.rail.authenticate(request, needed=needed)
    extra_headers: dict[str, str] = {}
    if paid is not None:
        account_id, extra_headers = paid
    else:
        account_id = await gw.authenticate(request, needed=needed)
    cap = parsed.max_output or model.max_output_tokens
    # A stream meters lease by lease; a non-streaming answer cannot be cut, so it holds its
    # whole (affordable) output up front and the upstream is told not to exceed it.
    meter = StreamMeter(gw.ledger, account_id, model.rate,
                        lease_tokens=gw.settings.lease_tokens if parsed.stream else cap,
                        max_output=parsed.max_output if parsed.stream else cap,
                        policy=Policy(gw.settings.exhausted_policy) if parsed.stream
                        else Policy.CUT, pause_timeout=gw.settings.pause_timeout_seconds)
    try:
        await meter.open(input_tokens)
    except InsufficientFunds as exc:
        raise gw.insufficient(request, exc, needed=needed) from exc
    try:
        upstream_max = None if parsed.stream else min(meter.covered, cap)
        body = dialect.upstream_body(parsed, model=model.upstream_model, max_output=upstream_max)
        headers = {**gw.upstreams.forwarded(model.upstream, request.headers),
                   **dialect.upstream_headers(request.headers,
                                              gw.settings.upstreams[model.upstream].key())}
        response = await gw.upstreams.open(model.upstream, dialect.path, body, headers)
    except BaseException:
        with anyio.CancelScope(shield=True):
            await meter.refund_all()
        raise
    if not parsed.stream:
        return await _complete(gw, model, meter, dialect, response, extra_headers)

    async def cut_reason(m: StreamMeter, delivered: int) -> dict[str, Any]:
        return {"type": "allowance_exhausted", "code": "insufficient_funds",
                "message": "the allowance ran out: the stream was stopped at the last paid "
                           "token",
                "balance": str(m.balance_seen), "asset": gw.asset.symbol,
                "decimals": gw.asset.decimals, "delivered_tokens": delivered,
                "top_up": dict(await gw.rail.top_up_hint(account_id, request))}

    async def pause_events(m: StreamMeter) -> list[bytes]:
        # An SSE comment: every SDK ignores it, an agent watching the raw stream (or a
        # payment rail's client) learns it should top up within pause_timeout_seconds.
        notice = {"type": "payment_required", "balance": str(m.balance_seen),
                  "delivered_tokens": m.granted, "waits_seconds": m.pause_timeout,
                  "top_up": dict(await gw.rail.top_up_hint(account_id, request))}
        return [b": tollstream payment-required " + orjson.dumps(notice) + b"\n\n"]

    ctx = RelayContext(model=model.name, stream=dialect.open_stream(parsed), meter=meter,
                       tokenizer=model.tokenizer, keeper=gw.keeper, metrics=gw.metrics,
                       cut_reason=cut_reason, pause_events=pause_events)
    return EventStreamResponse(relay(ctx, response), ping=15, headers=extra_headers)


async def _complete(gw: Gateway, model: Model, meter: StreamMeter, dialect: Dialect,
                    response: UpstreamResponse, headers: dict[str, str]) -> Response:
    """Non-streaming: read the answer, bill its reported usage (or counted output)."""
    try:
        raw = await response.read(MAX_RESPONSE_BYTES)
        usage, text = dialect.response_usage(orjson.loads(raw))
    except (UpstreamStreamError, orjson.JSONDecodeError, AttributeError) as exc:
        with anyio.CancelScope(shield=True):
            await meter.refund_all()
        raise UpstreamError("the model API returned an unreadable answer") from exc
    finally:
        response.close()
    meter.delivered_tokens(usage.output_tokens if usage.output_tokens is not None
                           else model.tokenizer.count(text))
    with anyio.CancelScope(shield=True):
        bill = await meter.close(Outcome.COMPLETED, reported_input=usage.input_tokens,
                                 reported_output=usage.output_tokens)
    gw.metrics.record(model.name, bill)
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


@router.post("/v1/messages/count_tokens")
async def count_tokens(request: Request) -> Response:
    """Free and unmetered, but authenticated: the upstream's count when it has the endpoint,
    else the model tokenizer's (for Claude, the conservative estimate)."""
    gw: Gateway = request.app.state.gateway
    dialect = get_dialect("anthropic_messages")
    body = await read_json(request, gw.settings.max_body_bytes)
    if isinstance(body, dict):
        body.setdefault("max_tokens", 1)  # count_tokens does not take max_tokens
    parsed = dialect.parse_request(body)
    model = find_model(gw, parsed.model, dialect)
    await gw.authenticate(request)
    upstream_body = {k: v for k, v in parsed.body.items() if k not in ("max_tokens", "stream")}
    upstream_body["model"] = model.upstream_model
    headers = dialect.upstream_headers(request.headers,
                                       gw.settings.upstreams[model.upstream].key())
    try:
        response = await gw.upstreams.open(model.upstream, "/messages/count_tokens",
                                           upstream_body, headers)
    except UpstreamError:
        count = model.tokenizer.count(parsed.prompt_text) + parsed.prompt_overhead
        return Response(orjson.dumps({"input_tokens": count}), media_type="application/json")
    try:
        raw = await response.read(MAX_RESPONSE_BYTES)
    except UpstreamStreamError as exc:
        raise UpstreamError("the model API's token count could not be read") from exc
    finally:
        response.close()
    return Response(raw, media_type="application/json")
