"""The ASGI application: wiring, lifespan, the one error handler, info routes."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import resource
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any, cast

# anyio loads its event-loop backend lazily, reading a file: loaded now, not first under
# load when the process may be out of file descriptors (it then fails as a KeyError).
import anyio._backends._asyncio  # noqa: F401
from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import PlainTextResponse, Response
from starlette.types import Message, Receive, Scope, Send

from gateway import admin, error_answers, routes, status, unmetered_routes
from gateway.background import freeze_startup_heap
from gateway.dialects import ErrorInfo
from gateway.error_answers import render_error
from gateway.errors import NotFound, ServiceUnavailable
from gateway.idempotency import RequestIdempotency
from gateway.logs import configure as configure_logs
from gateway.metrics import Metrics
from gateway.rails import PaymentRail, Rails
from gateway.rails.mpp.factory import create_mpp_rail
from gateway.rails.stripe.client import StripeApi
from gateway.rails.stripe.meter_events import MeterEventSender
from gateway.rails.x402_deposits import X402Deposits
from gateway.ratelimit import Limit, RateLimiter
from gateway.routing import ModelRouter
from gateway.settings import Settings
from gateway.sse_response import remember_connection
from gateway.state import Gateway
from gateway.upstream import Upstreams
from meters.connection import connect
from meters.keeper import Keeper
from meters.ledger import Ledger
from meters.notices import CreditNotices

log = logging.getLogger("tollstream")

Endpoint = Callable[[Request], Awaitable[Response]]
Handler = Callable[[Request, Exception], Awaitable[Response]]


def build_gateway(settings: Settings, redis_url: str, *,
                  rail: PaymentRail | None = None) -> Gateway:
    client = connect(redis_url, cluster=settings.redis_cluster,
                     max_connections=settings.redis_max_connections,
                     pool_timeout=settings.redis_pool_timeout_seconds)
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
        ledger.usage_index = usage.index  # final charges queue their usage records
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
    object for exact delivery accounting (see
    :class:`gateway.sse_response.EventStreamResponse`), admitting at most
    :attr:`max_requests` requests at once (the rest: 503 overloaded), and serving model
    requests without Starlette's router and middleware (:meth:`model_route`)."""

    #: Requests served at once by this process (0: no limit); set by :func:`create_app`.
    max_requests = 0
    in_flight = 0
    #: Served on the event loop `tollstream serve` uses (uvloop where installed), also when
    #: a test or the demo serves it in a thread (gateway.background.serve).
    production_loop = True

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        remember_connection(scope, send)  # uvicorn's own send: before it is wrapped
        if scope["type"] != "http":
            await super().__call__(scope, receive, send)
            return
        if self.max_requests and self.in_flight >= self.max_requests:
            # Refused before it takes a Redis connection, an upstream socket or a file.
            response = render_error(Request(scope), ErrorInfo(
                503, "overloaded", f"the gateway is serving as many requests as it may at "
                f"once ({self.max_requests}); retry shortly"), {"retry-after": "1"})
            await response(scope, receive, send)
            return
        self.in_flight += 1
        try:
            await self._serve_http(scope, receive, send)
        finally:
            self.in_flight -= 1

    async def _serve_http(self, scope: Scope, receive: Receive, send: Send) -> None:
        # Every answer names its request (X-Request-Id); a metered request's reservation,
        # log line and Stripe meter event carry the same id.
        request_id = secrets.token_hex(10)
        scope.setdefault("state", {})["request_id"] = request_id
        header = (b"x-request-id", request_id.encode())

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), header]
            await send(message)

        endpoint = self.model_route(scope)
        if endpoint is None:
            await super().__call__(scope, receive, send_with_id)
        else:
            await self._serve_model(scope, receive, send_with_id, endpoint)

    def model_route(self, scope: Scope) -> Endpoint | None:
        """The endpoint of a model request (``POST`` on a model route) when it can be served
        directly: no middleware was added and no root path is mounted.

        Measured (py-spy, one-token requests): Starlette's router and FastAPI's six
        middleware layers around every request (exception handling, body limit, telemetry,
        exit stack, route matching over every route) were a large part of the gateway's CPU
        per request (benchmarks/RESULTS.md, #13 item 4); a model request needs only the
        error handlers, which :meth:`_serve_model` applies as Starlette's would.
        """
        if scope["method"] != "POST" or self.user_middleware or scope.get("root_path"):
            return None
        return routes.MODEL_ROUTES.get(scope["path"])

    async def _serve_model(self, scope: Scope, receive: Receive, send: Send,
                           endpoint: Endpoint) -> None:
        """Serve ``endpoint`` with the application's exception handlers: what Starlette's
        exception middleware and its server-error middleware do, for one route."""
        scope["app"] = self
        request = Request(scope, receive, send)
        started = False

        async def tracked(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            response = await endpoint(request)
            await response(scope, receive, tracked)
        except Exception as exc:
            if started:
                raise  # the answer is under way: the server logs it and closes the connection
            try:
                handler = self._handler_for(exc)
                if handler is None:
                    raise
                answer = await handler(request, exc)
            except Exception:
                # Starlette's server-error middleware: a plain 500, the exception to the log.
                await PlainTextResponse("Internal Server Error", status_code=500)(
                    scope, receive, send)
                raise
            await answer(scope, receive, send)

    def _handler_for(self, exc: Exception) -> Handler | None:
        for cls in type(exc).__mro__:
            handler = self.exception_handlers.get(cls)
            if handler is not None:
                return cast(Handler, handler)
        return None


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
    app.max_requests = request_limit(settings)
    app.include_router(routes.router)
    app.include_router(unmetered_routes.router)
    app.include_router(status.router)
    app.include_router(admin.router)
    app.include_router(info_router())
    error_answers.install(app)
    return app


#: File descriptors a gateway process keeps aside from its streams: the listening socket,
#: the event loop's, log files, Lua and tokenizer files, the upstreams' DNS and TLS.
FD_RESERVE = 64


def request_limit(settings: Settings) -> int:
    """How many requests one process serves at once: ``max_concurrent_requests``, or (0)
    what its open-file limit allows: each stream holds its client's socket and an upstream
    socket, and the Redis pool holds up to ``redis_max_connections``."""
    if settings.max_concurrent_requests:
        return settings.max_concurrent_requests
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return 0
    limit = max(1, (soft - FD_RESERVE - settings.redis_max_connections) // 2)
    log.info("at most %d concurrent requests in this process (open-file limit %d)", limit,
             soft)
    return limit


#: The environment variable through which ``tollstream serve --workers N`` tells its spawned
#: workers how to build the app: JSON ``{"config", "redis_url", "log_level"}``.
WORKER_ENV = "TOLLSTREAM_WORKER"


def worker_app() -> FastAPI:
    """The app factory a worker of ``tollstream serve --workers N`` calls (uvicorn imports
    ``gateway.app:worker_app`` in each spawned worker): the parent's settings, read again
    from the same file and environment, against the parent's Redis (the embedded one it
    runs, or the configured one). Everything process-wide, the ledger's owner id included,
    is built here, in the worker."""
    spec = json.loads(os.environ[WORKER_ENV])
    settings = Settings.load(spec["config"])
    configure_logs(settings.log_format, spec["log_level"])
    app = create_app(settings, spec["redis_url"])
    freeze_startup_heap()
    return app


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
