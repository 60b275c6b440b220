"""``tollstream wallet``: a loopback proxy that pays the gateway for an unmodified agent.

Claude Code, Codex and most agents speak neither x402 nor MPP. Point them at this proxy
(``ANTHROPIC_BASE_URL=http://127.0.0.1:8403``, or Codex with a custom provider whose
``base_url`` is ``http://127.0.0.1:8403/v1``) and it

* forwards every request to the gateway as it came (method, path, query, body, headers), except
  the agent's own credentials, which the gateway would not know: it sends the API key the
  gateway issued to this wallet instead, once it has one;
* answers the gateway's 402 by paying, with the same transports an SDK-based agent uses,
  never past its spending cap (past it, the agent gets the 402 and stops: no retry loop keeps
  paying), then sends the request again:

  - ``--rail x402``: an x402 deposit signed by the wallet's key
    (:class:`gateway.agent.x402.AsyncPayingTransport`); the gateway issues a key it reuses;
  - ``--rail mpp``: an MPP session (:class:`gateway.agent.session_client.
    AsyncSessionTransport`): it opens one escrow channel, pays each paused stream with a
    voucher (``payment-need-voucher``), tops the channel up when asked, and closes it when
    the proxy stops, printing what was spent and refunded;
* streams the answer back as it arrives, without the gateway's payment control events
  (``: tollstream payment-...`` comments, ``event: payment-...`` events), so the agent sees
  only model events;
* refuses WebSocket upgrades with 426 (Codex then uses HTTP at once, see ``gateway.routes``);
* prints each payment as it happens and what it paid in all when it stops.

It listens on loopback only: whoever can reach it spends the wallet's money.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import orjson
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket

from gateway.agent.events import EventSplitter, is_payment_control
from gateway.agent.session_client import SessionCapExceeded, SessionPayer, SessionRefused
from gateway.agent.x402 import SpendCapExceeded, Wallet, httpx
from meters.money import format_decimal

log = logging.getLogger("tollstream.wallet")

#: Headers that belong to one connection, or that the proxy sets itself.
_NOT_FORWARDED = frozenset({"host", "connection", "keep-alive", "proxy-connection", "te",
                            "trailer", "transfer-encoding", "upgrade", "content-length",
                            "accept-encoding"})
#: The agent's own credentials: meaningless to the gateway, and not to be leaked to it.
_CREDENTIALS = frozenset({"authorization", "x-api-key"})
_NOT_RETURNED = frozenset({"connection", "keep-alive", "transfer-encoding", "content-length",
                           "content-encoding"})
_METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"]


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


async def strip_payment_events(chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    """An SSE byte stream without its payment control events; everything else byte for
    byte, forwarded as soon as an event is complete."""
    splitter = EventSplitter()
    async for chunk in chunks:
        out = [event for event in splitter.feed(chunk) if not is_payment_control(event)]
        if out:
            yield b"".join(out)
    rest = splitter.rest()
    if rest and not is_payment_control(rest):
        yield rest


def _error(status: int, code: str, message: str) -> JSONResponse:
    # One body both SDK families read: anthropic's {"type": "error", "error": {...}} and
    # openai's {"error": {"message", "code"}}.
    return JSONResponse({"type": "error", "error": {
        "type": "billing_error" if status == 402 else "api_error", "code": code,
        "message": message}}, status_code=status)


def create_proxy(gateway_url: str, paying: httpx.AsyncBaseTransport, *,
                 timeout: float = 600.0,
                 on_shutdown: Callable[[], Awaitable[None]] | None = None) -> Starlette:
    """The proxy as an ASGI app forwarding to ``gateway_url`` through ``paying`` (an
    :class:`~gateway.agent.x402.AsyncPayingTransport` or an
    :class:`~gateway.agent.session_client.AsyncSessionTransport`); ``on_shutdown`` runs when
    the server stops, before the transport closes (uvicorn re-raises SIGTERM after its
    graceful shutdown, so code after ``uvicorn.run`` may never run)."""
    base = gateway_url.rstrip("/")
    state: dict[str, httpx.AsyncClient] = {}

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        state["client"] = httpx.AsyncClient(transport=paying,
                                            timeout=httpx.Timeout(timeout, connect=10.0))
        try:
            yield
        finally:
            try:
                if on_shutdown is not None:
                    await on_shutdown()
            finally:
                await state["client"].aclose()

    async def forward(request: Request) -> Response:
        client = state["client"]
        headers = [(name, value) for name, value in request.headers.items()
                   if name not in _NOT_FORWARDED and name not in _CREDENTIALS]
        url = base + request.url.path + (f"?{request.url.query}" if request.url.query else "")
        outgoing = client.build_request(request.method, url, headers=headers,
                                        content=await request.body())
        try:
            response = await client.send(outgoing, stream=True)
        except (SpendCapExceeded, SessionCapExceeded) as exc:
            log.warning("not paying: %s", exc)
            return _error(402, "wallet_cap_reached", f"tollstream wallet: {exc}")
        except SessionRefused as exc:
            return _error(502, "payment_refused", f"tollstream wallet: {exc}")
        except httpx.TransportError as exc:
            return _error(502, "gateway_unreachable",
                          f"tollstream wallet: the gateway at {base} is unreachable "
                          f"({type(exc).__name__})")
        body: AsyncIterator[bytes] = response.aiter_raw()
        if response.headers.get("content-type", "").startswith("text/event-stream"):
            body = strip_payment_events(body)

        async def stream() -> AsyncIterator[bytes]:
            try:
                async for chunk in body:
                    yield chunk
            except (SessionCapExceeded, SessionRefused) as exc:
                # A paused stream the wallet will not (or cannot) pay for: the agent gets
                # what was paid, and the gateway ends the stream after its pause timeout.
                log.warning("stream not paid further: %s", exc)
            finally:
                await response.aclose()

        returned = {k: v for k, v in response.headers.items() if k not in _NOT_RETURNED}
        return StreamingResponse(stream(), status_code=response.status_code, headers=returned)

    async def refuse_websocket(websocket: WebSocket) -> None:
        await websocket.send_denial_response(_error(
            426, "websocket_unsupported", "tollstream wallet forwards HTTP only"))

    return Starlette(routes=[WebSocketRoute("/{path:path}", refuse_websocket),
                             Route("/{path:path}", forward, methods=_METHODS)],
                     lifespan=lifespan)


def describe(payment: dict[str, Any], decimals: int) -> str:
    status = "settled" if payment.get("success") else "NOT settled"
    return (f"paid {format_decimal(int(payment['amount']), decimals)} on "
            f"{payment['network']}: {status}, transaction {payment.get('transaction') or '-'}")


def summary(wallet: Wallet, decimals: int) -> str:
    settled = [p for p in wallet.payments if p.get("success")]
    total = sum(int(p["amount"]) for p in settled)
    return (f"tollstream wallet: {len(settled)} payment(s), "
            f"{format_decimal(total, decimals)} in all "
            f"(cap {format_decimal(wallet.spend_cap, decimals)}); "
            + orjson.dumps([{k: p.get(k) for k in ("amount", "network", "transaction")}
                            for p in settled]).decode())


def session_summary(closed: dict[str, Any] | None, payer: SessionPayer, decimals: int) -> str:
    """What an MPP session cost, once closed (or why it was not)."""
    if payer.channel_id is None:
        return "tollstream wallet: no session was opened, nothing paid"
    if closed is None:
        return (f"tollstream wallet: session {payer.channel_id} NOT closed: the gateway "
                "keeps what was spent, the rest comes back with requestClose + withdraw")
    return (f"tollstream wallet: session {closed['channelId']} closed (transaction "
            f"{closed['txHash']}): spent {format_decimal(closed['spent'], decimals)} of a "
            f"deposit of {format_decimal(closed['deposit'], decimals)}, refunded "
            f"{format_decimal(closed['refund'], decimals)}")


def printer(decimals: int, emit: Callable[[str], None]) -> Callable[[dict[str, Any]], None]:
    def on_payment(payment: dict[str, Any]) -> None:
        emit(f"tollstream wallet: {describe(payment, decimals)}")
    return on_payment
