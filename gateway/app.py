"""The ASGI application: wiring, lifespan, the one error handler, info routes."""

from __future__ import annotations

import contextlib
import logging
import secrets
from collections.abc import AsyncIterator, Mapping
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException
from starlette.types import Message, Receive, Scope, Send

from gateway import admin, routes, status
from gateway.dialects import ErrorInfo, get_dialect
from gateway.errors import GatewayError, NotFound, ServiceUnavailable
from gateway.idempotency import RequestIdempotency
from gateway.metrics import Metrics
from gateway.rails import PaymentRail, Rails
from gateway.rails.mpp.factory import create_mpp_rail
from gateway.rails.stripe.client import StripeApi
from gateway.rails.stripe.meter_events import MeterEventSender
from gateway.rails.x402_deposits import X402Deposits
from gateway.ratelimit import Limit, RateLimiter
from gateway.routing import ModelRouter
from gateway.settings import Settings
from gateway.sse import remember_connection
from gateway.state import Gateway
from gateway.upstream import Upstreams
from meters.errors import MeterError
from meters.keeper import Keeper
from meters.ledger import Ledger, connect
from meters.notices import CreditNotices

log = logging.getLogger("tollstream")


def build_gateway(settings: Settings, redis_url: str, *,
                  rail: PaymentRail | None = None) -> Gateway:
    client = connect(redis_url)
    ledger = Ledger(client, prefix=settings.key_prefix,
                    owner_ttl_seconds=settings.reservation_ttl_seconds,
                    key_cache_seconds=settings.key_cache_seconds)
    if rail is None:
        rail = build_rails(settings, ledger)
    limits = settings.rate_limit
    limiter = RateLimiter(client, prefix=settings.key_prefix, enabled=limits.enabled,
                          client_header=limits.client_header, limits={
                              "auth": Limit(limits.auth_failures_burst,
                                            limits.auth_failures_per_second),
                              "challenge": Limit(limits.challenges_burst,
                                                 limits.challenges_per_second)})
    usage = None
    stripe = settings.stripe
    if stripe.enabled and stripe.meter_event_name:
        secret = stripe.secret_key()
        assert secret is not None  # the settings refuse stripe without one
        usage = MeterEventSender(api=StripeApi(secret, api_base=stripe.api_base,
                                               timeout=stripe.timeout_seconds),
                                 ledger=ledger, event_name=stripe.meter_event_name,
                                 interval=stripe.meter_events_interval_seconds)
        ledger.usage_queue = usage.queue  # final charges queue their usage records
    metrics = Metrics()
    metrics.add(rail.metrics)
    return Gateway(settings=settings, redis=client, ledger=ledger, keeper=Keeper(ledger),
                   upstreams=Upstreams(settings), metrics=metrics,
                   router=ModelRouter(settings), limiter=limiter, rail=rail,
                   notices=CreditNotices(ledger),
                   idempotency=RequestIdempotency(client, settings.key_prefix),
                   usage=usage)


class GatewayApp(FastAPI):
    """The ASGI application: FastAPI, with its entry point noting the server's connection
    object for exact delivery accounting (see :class:`gateway.sse.EventStreamResponse`)."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        remember_connection(scope, send)  # uvicorn's own send: before it is wrapped
        if scope["type"] != "http":
            await super().__call__(scope, receive, send)
            return
        # Every answer names its request (X-Request-Id); a metered request's reservation,
        # log line and Stripe meter event carry the same id.
        request_id = secrets.token_hex(10)
        scope.setdefault("state", {})["request_id"] = request_id
        header = (b"x-request-id", request_id.encode())

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), header]
            await send(message)

        await super().__call__(scope, receive, send_with_id)


def build_rails(settings: Settings, ledger: Ledger) -> PaymentRail:
    """Every enabled rail; several stand behind one :class:`Rails` set."""
    rails: list[PaymentRail] = []
    x402 = X402Deposits(settings, ledger) if settings.x402.enabled else None
    if x402 is not None:
        rails.append(x402)
    if settings.mpp.enabled:
        rails.append(create_mpp_rail(settings, ledger, x402))
    if len(rails) > 1:
        return Rails(rails)
    return rails[0] if rails else PaymentRail()


def create_app(settings: Settings, redis_url: str, *, rail: PaymentRail | None = None
               ) -> FastAPI:
    """The gateway app for ``settings``, metering against the Redis at ``redis_url``."""
    gw = build_gateway(settings, redis_url, rail=rail)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await gw.keeper.start()
        await gw.notices.start()
        await gw.rail.start()
        if gw.usage is not None:
            await gw.usage.start()
        try:
            yield
        finally:
            if gw.usage is not None:
                await gw.usage.stop()
                await gw.usage.api.aclose()
            await gw.rail.aclose()
            await gw.notices.stop()
            await gw.keeper.stop()
            await gw.upstreams.aclose()
            await gw.redis.aclose()

    app = GatewayApp(title="tollstream", version="0.1.0", lifespan=lifespan,
                  docs_url=None, redoc_url=None)
    app.state.gateway = gw
    app.include_router(routes.router)
    app.include_router(status.router)
    app.include_router(admin.router)
    app.include_router(info_router())
    app.add_exception_handler(GatewayError, _handle_error)
    app.add_exception_handler(MeterError, _handle_error)
    app.add_exception_handler(RequestValidationError, _handle_validation)
    app.add_exception_handler(HTTPException, _handle_http)
    return app


def _dialect_for(path: str) -> str:
    if path.startswith("/v1/messages"):
        return "anthropic_messages"
    if path.startswith("/v1/responses"):
        return "openai_responses"
    return "openai_chat"


def render_error(request: Request, info: ErrorInfo,
                 headers: dict[str, str] | None = None) -> JSONResponse:
    """An error in the shape of the API the client called (so its SDK raises as usual).

    A request whose payment was settled before it failed still carries the settlement and the
    issued key (``request.state.payment_headers``): the payer keeps what it paid for.
    """
    name = _dialect_for(request.url.path)
    try:
        dialect = get_dialect(name)
    except KeyError:
        dialect = get_dialect("openai_chat")
    return JSONResponse(dialect.error_body(info), status_code=info.status,
                        headers=_with_payment(request, headers))


def _with_payment(request: Request, headers: dict[str, str] | None) -> dict[str, str]:
    paid: dict[str, str] = getattr(request.state, "payment_headers", None) or {}
    return {**(headers or {}), **paid}


async def _handle_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, GatewayError | MeterError)
    if exc.status >= 500:
        log.warning("%s %s -> %s %s", request.method, request.url.path, exc.status, exc.code)
    headers = exc.headers if isinstance(exc, GatewayError) else None
    extra = exc.extra if isinstance(exc, GatewayError) else {}
    if isinstance(exc, GatewayError) and exc.body is not None:
        response = JSONResponse(exc.body, status_code=exc.status,
                                headers=_with_payment(request, headers),
                                media_type=exc.media_type)
    else:
        response = render_error(request, ErrorInfo(exc.status, exc.code, exc.message,
                                                   exc.param, extra), headers)
    if isinstance(exc, GatewayError):
        for name, value in exc.header_list:  # repeated fields (WWW-Authenticate)
            response.headers.append(name, value)
    return response


async def _handle_validation(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestValidationError)
    first: dict[str, Any] = exc.errors()[0] if exc.errors() else {}
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    param = ".".join(loc) or "body"
    message = f"{param}: {first.get('msg', 'invalid request')}"
    return render_error(request, ErrorInfo(400, "invalid_request", message, param))


async def _handle_http(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
    message = ("no such route" if exc.status_code == 404 else str(exc.detail))
    return render_error(request, ErrorInfo(exc.status_code, code, message),
                        dict(exc.headers or {}))


def info_router() -> APIRouter:
    """Models, balance, health, readiness and metrics."""
    router = APIRouter()

    @router.get("/v1/models")
    async def list_models(request: Request) -> dict[str, Any]:
        gw: Gateway = request.app.state.gateway
        asset = gw.asset
        data = []
        for m, pattern in gw.router.listing():
            rate = m.rate
            info: dict[str, Any] = {
                "dialect": m.dialect.name, "asset": asset.symbol,
                "input_per_mtok": asset.format(rate.input_per_mtok),
                "output_per_mtok": asset.format(rate.output_per_mtok)}
            for key in ("cache_read_per_mtok", "cache_write_per_mtok"):
                value = getattr(rate, key)
                if value is not None:
                    info[key] = asset.format(value)
            fiat = gw.settings.fiat_asset()
            if fiat is not None:  # what a fiat balance pays, converted and rounded up
                converted = gw.router.fiat_rate(m)
                info[fiat.symbol.lower()] = {
                    "input_per_mtok": fiat.format(converted.input_per_mtok),
                    "output_per_mtok": fiat.format(converted.output_per_mtok)}
            if pattern is not None:
                info["route"] = pattern
            data.append({"id": m.name, "object": "model", "created": 0,
                         "owned_by": m.upstream, "tollstream": info})
        return {"object": "list", "data": data}

    @router.get("/v1/balance")
    async def balance(request: Request) -> dict[str, Any]:
        gw: Gateway = request.app.state.gateway
        account = await gw.ledger.get_account(await gw.authenticate(request))
        return admin.account_view(gw, account)

    @router.post("/v1/balance/close")
    async def close_balance(request: Request) -> Mapping[str, Any]:
        """The caller is done: a pre-authorized hold funding its account is captured for
        exactly what was spent and the rest released (404 for other accounts)."""
        gw: Gateway = request.app.state.gateway
        account_id = await gw.authenticate(request)
        closed = await gw.rail.close_balance(account_id)
        if closed is None:
            raise NotFound("this account is not funded by a hold: nothing to close",
                           code="no_hold")
        return closed

    @router.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @router.get("/readyz")
    async def readyz(request: Request) -> dict[str, str]:
        gw: Gateway = request.app.state.gateway
        if not await gw.ledger.ping():
            raise ServiceUnavailable("the ledger (Redis) is unreachable",
                                     code="ledger_unavailable")
        return {"status": "ready"}

    @router.get("/metrics")
    async def metrics(request: Request) -> Response:
        gw: Gateway = request.app.state.gateway
        return Response(gw.metrics.render(), media_type="text/plain; version=0.0.4")

    return router
