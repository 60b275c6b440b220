"""``tollstream wallet``: a loopback proxy that pays the gateway for an unmodified agent.

Claude Code, Codex and most agents speak neither x402 nor MPP. Point them at this proxy
(``ANTHROPIC_BASE_URL=http://127.0.0.1:8403``, or Codex with a custom provider whose
``base_url`` is ``http://127.0.0.1:8403/v1``) and it

* forwards every request to the gateway as it came (method, path, query, body, headers), except
  the agent's own credentials, which the gateway would not know: it sends the API key the
  gateway issued to this wallet instead, once it has one;
* answers the gateway's 402 by paying (an x402 deposit signed by the wallet's key, through
  :class:`gateway.agent.x402.AsyncPayingTransport`, the same code an SDK-based agent uses),
  then sends the request again, never past its spending cap: past it, the agent gets the 402
  and stops, no retry loop keeps paying;
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
from collections.abc import AsyncIterator, Callable
from typing import Any

import orjson
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket

from gateway.agent.x402 import AsyncPayingTransport, SpendCapExceeded, Wallet, httpx

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


def _is_payment_control(event: bytes) -> bool:
    """A gateway event meant for a payment client, not for the agent's SDK."""
    for line in event.splitlines():
        if line.startswith(b": tollstream payment") or line.startswith(b"event: payment-"):
            return True
    return False


async def strip_payment_events(chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    """An SSE byte stream without its payment control events; everything else byte for
    byte, forwarded as soon as an event is complete."""
    buffer = b""
    async for chunk in chunks:
        buffer += chunk
        out: list[bytes] = []
        while True:
            end, size = buffer.find(b"\n\n"), 2
            crlf = buffer.find(b"\r\n\r\n")
            if crlf >= 0 and (end < 0 or crlf < end):
                end, size = crlf, 4
            if end < 0:
                break
            event, buffer = buffer[:end + size], buffer[end + size:]
            if not _is_payment_control(event):
                out.append(event)
        if out:
            yield b"".join(out)
    if buffer and not _is_payment_control(buffer):
        yield buffer


def _error(status: int, code: str, message: str) -> JSONResponse:
    # One body both SDK families read: anthropic's {"type": "error", "error": {...}} and
    # openai's {"error": {"message", "code"}}.
    return JSONResponse({"type": "error", "error": {
        "type": "billing_error" if status == 402 else "api_error", "code": code,
        "message": message}}, status_code=status)


def create_proxy(gateway_url: str, wallet: Wallet, *, timeout: float = 600.0,
                 transport: httpx.AsyncBaseTransport | None = None,
                 on_shutdown: Callable[[], None] | None = None) -> Starlette:
    """The proxy as an ASGI app forwarding to ``gateway_url`` and paying with ``wallet``;
    ``on_shutdown`` runs when the server stops (uvicorn re-raises SIGTERM after its graceful
    shutdown, so code after ``uvicorn.run`` may never run)."""
    base = gateway_url.rstrip("/")
    state: dict[str, httpx.AsyncClient] = {}

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        state["client"] = httpx.AsyncClient(
            transport=AsyncPayingTransport(wallet, transport),
            timeout=httpx.Timeout(timeout, connect=10.0))
        try:
            yield
        finally:
            await state["client"].aclose()
            if on_shutdown is not None:
                on_shutdown()

    async def forward(request: Request) -> Response:
        client = state["client"]
        headers = [(name, value) for name, value in request.headers.items()
                   if name not in _NOT_FORWARDED and name not in _CREDENTIALS]
        url = base + request.url.path + (f"?{request.url.query}" if request.url.query else "")
        outgoing = client.build_request(request.method, url, headers=headers,
                                        content=await request.body())
        try:
            response = await client.send(outgoing, stream=True)
        except SpendCapExceeded as exc:
            log.warning("not paying: %s", exc)
            return _error(402, "wallet_cap_reached", f"tollstream wallet: {exc}")
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
    amount = int(payment["amount"])
    whole, frac = divmod(amount, 10**decimals)
    status = "settled" if payment.get("success") else "NOT settled"
    return (f"paid {whole}.{str(frac).rjust(decimals, '0')} on {payment['network']}: "
            f"{status}, transaction {payment.get('transaction') or '-'}")


def summary(wallet: Wallet, decimals: int) -> str:
    settled = [p for p in wallet.payments if p.get("success")]
    total = sum(int(p["amount"]) for p in settled)
    whole, frac = divmod(total, 10**decimals)
    return (f"tollstream wallet: {len(settled)} payment(s), "
            f"{whole}.{str(frac).rjust(decimals, '0')} in all "
            f"(cap {wallet.spend_cap / 10**decimals:g}); "
            + orjson.dumps([{k: p.get(k) for k in ("amount", "network", "transaction")}
                            for p in settled]).decode())


def printer(decimals: int, emit: Callable[[str], None]) -> Callable[[dict[str, Any]], None]:
    def on_payment(payment: dict[str, Any]) -> None:
        emit(f"tollstream wallet: {describe(payment, decimals)}")
    return on_payment
