"""The routes on the model paths that call no metered model: ``HEAD`` payment actions, the
Responses WebSocket refused, and Anthropic's ``count_tokens`` (free, but authenticated).
The metered model calls are :mod:`gateway.routes`."""

from __future__ import annotations

import logging

import orjson
from fastapi import APIRouter, Request, WebSocket
from fastapi.responses import JSONResponse, Response

from gateway.body import read_json
from gateway.dialects import ErrorInfo, get_dialect
from gateway.dialects.anthropic_messages import AnthropicMessages
from gateway.errors import UpstreamError
from gateway.routes import MAX_RESPONSE_BYTES, find_model, keep_payment_headers, query_string
from gateway.state import Gateway
from gateway.upstream import UpstreamStreamError

router = APIRouter()


@router.head("/v1/chat/completions")
@router.head("/v1/messages")
@router.head("/v1/responses")
async def payment_action(request: Request) -> Response:
    """``HEAD`` on a model route carries a payment action alone (an MPP session voucher,
    "Voucher Submission Transport"): answered without a model call."""
    gw: Gateway = request.app.state.gateway
    managed = await gw.rail.manage(request)
    if managed is not None:
        return managed
    await gw.challenged(request)
    raise gw.rail.challenge(request, needed=0, reason="HEAD carries a payment action only "
                            "(Authorization: Payment with a session voucher)",
                            code="payment_required")


@router.websocket("/v1/responses")
async def responses_websocket(websocket: WebSocket) -> None:
    """Refuse the Responses WebSocket transport with 426 Upgrade Required.

    Codex opens ``GET /v1/responses`` as a WebSocket first when its provider claims WebSocket
    support (the built-in OpenAI provider does). tollstream meters the HTTP stream; on a 426
    Codex falls back to HTTP within the same turn, while any other refusal (403, 404, 501)
    costs it ~7 s of retries and a 400 fails the turn (measured with Codex CLI 0.169; Codex's
    own test servers answer 426 to force HTTP).
    """
    gw: Gateway = websocket.app.state.gateway
    gw.metrics.websocket_refused.inc()
    body = get_dialect("openai_responses").error_body(ErrorInfo(
        426, "websocket_unsupported", "tollstream serves the Responses API over HTTP "
        "streaming only: POST /v1/responses"))
    await websocket.send_denial_response(JSONResponse(body, status_code=426))


class _DenialIsNotAnError(logging.Filter):
    """uvicorn 0.54's websocket protocols log "ASGI callable returned without completing
    handshake." after a denial response was sent in full (the 426 above reaches the client):
    not an error, and the gateway serves no other WebSocket route."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.getMessage() != "ASGI callable returned without completing handshake."


logging.getLogger("uvicorn.error").addFilter(_DenialIsNotAnError())


@router.post("/v1/messages/count_tokens")
async def count_tokens(request: Request) -> Response:
    """Free and unmetered, but authenticated first: the upstream's count when it has the
    endpoint, else the model tokenizer's (for Claude, the conservative estimate)."""
    gw: Gateway = request.app.state.gateway
    dialect = get_dialect("anthropic_messages")
    assert isinstance(dialect, AnthropicMessages)
    parsed = dialect.parse_request(await read_json(request, gw.settings.max_body_bytes),
                                   count_only=True)
    model = find_model(gw, parsed.model, dialect)
    # A payment credential authenticates too (an MPP session's voucher: agents paying by
    # session have no API key); free here, as with a key.
    paid = await gw.rail.authenticate(request, needed=0) if gw.rail.claims(request) else None
    if paid is None:
        await gw.authenticate(request)
    answer_headers = paid.headers if paid is not None else {}
    if paid is not None:
        keep_payment_headers(request, paid)
    upstream_body = {k: v for k, v in parsed.body.items() if k not in ("max_tokens", "stream")}
    upstream_body["model"] = model.upstream_model
    headers = dialect.upstream_headers(request.headers,
                                       gw.settings.upstreams[model.upstream].key())
    try:
        response = await gw.upstreams.open(model.upstream, "/messages/count_tokens",
                                           upstream_body, headers, query=query_string(request))
    except UpstreamError:
        count = model.tokenizer.count(parsed.prompt_text) + parsed.prompt_overhead
        return Response(orjson.dumps({"input_tokens": count}), media_type="application/json",
                        headers=answer_headers)
    try:
        raw = await response.read(MAX_RESPONSE_BYTES)
    except UpstreamStreamError as exc:
        raise UpstreamError("the model API's token count could not be read") from exc
    finally:
        response.close()
    return Response(raw, media_type="application/json", headers=answer_headers)
