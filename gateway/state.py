"""The gateway's process-wide state, built once at start-up from :class:`Settings`."""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import redis.asyncio as aioredis
from starlette.requests import Request

from gateway.dialects import Dialect, get_dialect
from gateway.errors import GatewayError, PaymentRequired, Unauthorized
from gateway.metrics import Metrics
from gateway.settings import ModelSettings, Settings
from gateway.upstream import Upstreams
from meters.errors import InsufficientFunds
from meters.keeper import Keeper
from meters.ledger import Ledger
from meters.money import Asset
from meters.rates import Rate
from meters.tokens import Tokenizer, get_tokenizer


@dataclass(frozen=True, slots=True)
class Model:
    """A configured model, resolved: its rate, tokenizer and dialect objects."""

    name: str
    upstream: str
    upstream_model: str
    dialect: Dialect
    rate: Rate
    tokenizer: Tokenizer
    max_output_tokens: int

    @classmethod
    def build(cls, name: str, cfg: ModelSettings, rate: Rate) -> Model:
        return cls(name=name, upstream=cfg.upstream, upstream_model=cfg.upstream_model or name,
                   dialect=get_dialect(cfg.dialect), rate=rate,
                   tokenizer=get_tokenizer(cfg.tokenizer),
                   max_output_tokens=cfg.max_output_tokens)


class PaymentRail:
    """A way for agents to pay (x402, MPP). The default has none: accounts are admin-made.

    Rails turn "no credential" and "not enough balance" into a 402 challenge, accept payment
    credentials on a request, and say how to top up in a cut's reason.
    """

    name = "none"

    async def authenticate(self, request: Request) -> tuple[str, dict[str, str]] | None:
        """Settle a payment credential carried by ``request``: the account id it credited and
        headers to add to the response; None when the request carries no payment."""
        return None

    def challenge(self, request: Request, *, needed: int, reason: str,
                  code: str = "payment_required") -> GatewayError:
        """The error answering a request that must pay first."""
        return PaymentRequired(reason, code=code, extra={"needed": str(needed)})

    async def top_up_hint(self, account_id: str, request_url: str) -> Mapping[str, Any]:
        return {"how": "ask the operator to credit this account",
                "balance_url": "/v1/balance"}


@dataclass(slots=True)
class Gateway:
    """Everything a request handler needs."""

    settings: Settings
    redis: aioredis.Redis
    ledger: Ledger
    keeper: Keeper
    upstreams: Upstreams
    metrics: Metrics
    models: dict[str, Model]
    rail: PaymentRail = field(default_factory=PaymentRail)
    on_close: list[Callable[[], Awaitable[None]]] = field(default_factory=list)

    @property
    def asset(self) -> Asset:
        return self.settings.asset_obj()

    def check_admin(self, request: Request) -> None:
        token = self.settings.admin_token
        if token is None:
            raise Unauthorized("the admin API is disabled: set TOLLSTREAM_ADMIN_TOKEN",
                               code="admin_disabled")
        given = bearer(request) or ""
        if not hmac.compare_digest(given.encode(), token.get_secret_value().encode()):
            raise Unauthorized("missing or wrong admin token in Authorization: Bearer",
                               code="invalid_admin_token", param="authorization")

    async def authenticate(self, request: Request) -> str:
        """The account a model request is billed to (401 for a bad key)."""
        key = bearer(request) or request.headers.get("x-api-key")
        if not key:
            message = "no API key: send Authorization: Bearer <key> (or x-api-key)"
            if self.rail.name == "none":
                raise Unauthorized(message, code="missing_api_key", param="authorization")
            raise self.rail.challenge(request, needed=0, reason=message, code="missing_api_key")
        account_id = await self.ledger.authenticate(key)
        if account_id is None:
            raise Unauthorized("the API key is not valid", param="authorization")
        return account_id

    def insufficient(self, request: Request, exc: InsufficientFunds) -> GatewayError:
        """Translate a refused hold into the rail's 402."""
        err = self.rail.challenge(request, needed=exc.needed, reason=exc.message,
                                  code=exc.code)
        err.extra.setdefault("balance", str(exc.available))
        err.extra.setdefault("needed", str(exc.needed))
        return err

    async def aclose(self) -> None:
        for hook in reversed(self.on_close):
            await hook()


def bearer(request: Request) -> str | None:
    value = request.headers.get("authorization", "")
    scheme, _, token = value.partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    return None
