"""The gateway's process-wide state, built once at start-up from :class:`Settings`."""

from __future__ import annotations

import hmac
from dataclasses import dataclass, field

import redis.asyncio as aioredis
from starlette.requests import Request

from gateway.errors import GatewayError, Unauthorized
from gateway.idempotency import RequestIdempotency
from gateway.metrics import Metrics
from gateway.rails import PaymentRail
from gateway.rails.stripe.meter_events import MeterEventSender
from gateway.ratelimit import RateLimiter
from gateway.routing import Model, ModelRouter
from gateway.settings import Settings
from gateway.upstream import Upstreams
from meters.errors import InsufficientFunds
from meters.keeper import Keeper
from meters.ledger import Ledger
from meters.money import Asset
from meters.notices import CreditNotices
from meters.rates import Rate

__all__ = ["Gateway", "Model", "bearer"]


@dataclass(slots=True)
class Gateway:
    """Everything a request handler needs."""

    settings: Settings
    redis: aioredis.Redis
    ledger: Ledger
    keeper: Keeper
    upstreams: Upstreams
    metrics: Metrics
    router: ModelRouter
    limiter: RateLimiter
    #: Wakes paused streams when money enters their account (any process).
    notices: CreditNotices
    #: ``Idempotency-Key`` records of model requests.
    idempotency: RequestIdempotency
    rail: PaymentRail = field(default_factory=PaymentRail)
    #: Sends usage to Stripe billing meters (``[stripe] meter_event_name``), if on.
    usage: MeterEventSender | None = None

    @property
    def asset(self) -> Asset:
        return self.settings.asset_obj()

    async def check_admin(self, request: Request) -> None:
        """Admit the operator's bearer token; wrong tokens count as failed authentication."""
        token = self.settings.admin_token
        if token is None:
            raise Unauthorized("the admin API is disabled: set TOLLSTREAM_ADMIN_TOKEN",
                               code="admin_disabled")
        self.limiter.check(request, "auth")
        given = bearer(request) or ""
        if not hmac.compare_digest(given.encode(), token.get_secret_value().encode()):
            await self.limiter.spend(request, "auth")
            raise Unauthorized("missing or wrong admin token in Authorization: Bearer",
                               code="invalid_admin_token", param="authorization")

    async def authenticate(self, request: Request, *, needed: int = 0,
                           rate: Rate | None = None) -> str:
        """The account a model request is billed to.

        Without a payment rail a missing or unknown key is a 401. With one, it is the rail's
        402 challenge: an agent with a wallet and no key yet is meant to pay, not to fail.
        Failures are rate limited per client (:mod:`gateway.ratelimit`), checked before the
        key is looked at.
        """
        key = bearer(request) or request.headers.get("x-api-key")
        if key:
            self.limiter.check(request, "auth")
            account_id = await self.ledger.authenticate(key)
            if account_id is not None:
                return account_id
            await self.limiter.spend(request, "auth")
            code, message = "invalid_api_key", "the API key is not valid"
        else:
            code = "missing_api_key"
            message = "no API key: send Authorization: Bearer <key> (or x-api-key)"
        if self.rail.name == "none":
            raise Unauthorized(message, code=code, param="authorization")
        if not key:
            await self.challenged(request)
        raise self.rail.challenge(request, needed=needed, reason=message, code=code, rate=rate)

    async def challenged(self, request: Request) -> None:
        """Count one 402 challenge against this client (429 past its limit)."""
        self.limiter.check(request, "challenge")
        await self.limiter.spend(request, "challenge")

    def insufficient(self, request: Request, exc: InsufficientFunds, *, needed: int,
                     rate: Rate | None = None) -> GatewayError:
        """Translate a refused hold into the rail's 402 (asking for at least ``needed``)."""
        err = self.rail.challenge(request, needed=max(needed, exc.needed), reason=exc.message,
                                  code=exc.code, rate=rate)
        for target in (err.extra, err.body if err.body is not None else {}):
            target.setdefault("balance", str(exc.available))
            target.setdefault("needed", str(exc.needed))
        return err



def bearer(request: Request) -> str | None:
    value = request.headers.get("authorization", "")
    scheme, _, token = value.partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    return None
