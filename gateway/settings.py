"""The one settings object, read once at start-up.

Sources, later ones winning: a TOML file (``--config`` or ``TOLLSTREAM_CONFIG``; without one,
the built-in ``gateway/defaults.toml``, the simulated model behind three models), then
``TOLLSTREAM_*`` environment variables. Nested keys use ``__``: ``TOLLSTREAM_ADMIN_TOKEN``,
``TOLLSTREAM_UPSTREAMS__OPENAI__API_KEY``. An upstream may also name the variable holding its
key (``api_key_env = "OPENAI_API_KEY"``), the way operators already keep vendor keys. Secrets
are ``SecretStr``: they print as ``**********``.

A configuration error refuses start-up with a message naming the key (:class:`SettingsError`).
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from importlib import resources
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)

from gateway.model_settings import (
    ModelSettings,
    PriceSettings,
    RouteSettings,
    UpstreamSettings,
)
from gateway.rail_settings import (
    MppSettings,
    StripeSettings,
    X402Settings,
)
from meters.errors import InvalidAmount
from meters.money import Asset, account_currency, parse_decimal
from meters.rates import Rate
from meters.tokens import ENCODINGS

ENV_PREFIX = "TOLLSTREAM_"
#: Shortest admin token accepted at start-up.
MIN_ADMIN_TOKEN = 16

class SettingsError(Exception):
    """The configuration is unusable; the message names the offending key."""


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class RateLimitSettings(_Frozen):
    """Per-client limits on failed authentication and on 402 challenges (token buckets)."""

    enabled: bool = True
    auth_failures_burst: int = Field(default=30, ge=1)
    auth_failures_per_second: float = Field(default=0.5, gt=0)
    challenges_burst: int = Field(default=120, ge=1)
    challenges_per_second: float = Field(default=2.0, gt=0)
    #: Behind a reverse proxy, the header it sets to the client's address
    #: (e.g. "x-forwarded-for"; its first address is used). Unset: the peer address.
    client_header: str | None = None


class AssetSettings(_Frozen):
    symbol: str = "USDC"
    decimals: int = Field(default=6, ge=0, le=18)


class Settings(_Frozen):
    """Everything the gateway reads at start-up."""

    host: str = "127.0.0.1"
    port: int = Field(default=8402, ge=0, le=65535)
    redis_url: str | None = None
    #: ``redis_url`` names a node of a Redis / Valkey Cluster (any one: the client learns the
    #: others). Every key a ledger script touches for one account shares the account's hash
    #: tag, so each script runs on one node; see README "Deploying".
    redis_cluster: bool = False
    data_dir: Path = Path(".tollstream")
    #: ``text`` for people at a terminal, ``json`` (one object per line) for a log pipeline.
    log_format: Literal["text", "json"] = "text"
    #: The embedded Valkey's port when no ``redis_url`` is set (None: a free one).
    embedded_redis_port: int | None = Field(default=None, ge=1, le=65535)
    key_prefix: str = "ts:"
    #: Redis connections per gateway process (per worker), at most. A stream uses one only
    #: for the moment of a Redis call (open, one lease per lease_tokens tokens, close), so a
    #: few dozen serve thousands of streams. A call that finds them all busy waits up to
    #: redis_pool_timeout_seconds for one, then fails closed (503 ledger_unavailable).
    redis_max_connections: int = Field(default=64, ge=2, le=10_000)
    #: Long enough to ride out a saturated event loop (a burst of a thousand streams opening
    #: at once on a busy machine waited past 2 s and got 503s); an unreachable Redis still
    #: fails closed within the socket timeouts (1 s to connect, 3 s to answer).
    redis_pool_timeout_seconds: float = Field(default=10.0, gt=0, le=60)
    #: Requests one gateway process (worker) serves at once; past it a request is answered
    #: 503 overloaded at once, before it takes a Redis or upstream connection. 0: derived
    #: from the open-file limit at start-up (two descriptors per stream, the Redis pool and
    #: a reserve aside), so the process never runs out of file descriptors mid-request.
    max_concurrent_requests: int = Field(default=0, ge=0)
    #: Bearer token of the admin API (off when unset). At least MIN_ADMIN_TOKEN characters:
    #: an empty or short token would open the operator API to anyone who guesses it.
    admin_token: SecretStr | None = None
    lease_tokens: int = Field(default=64, ge=1, le=100_000)
    reservation_ttl_seconds: float = Field(default=15.0, gt=0.5)
    #: Seconds a process trusts an API key lookup (0: look up every request). A key revoked
    #: through another process keeps working here for at most this long.
    key_cache_seconds: float = Field(default=2.0, ge=0)
    #: When a stream's allowance runs out: "cut" it at the last paid token, or "pause" it
    #: (an SSE comment asks for a top-up) for up to pause_timeout_seconds, then cut.
    exhausted_policy: Literal["cut", "pause"] = "cut"
    pause_timeout_seconds: float = Field(default=60.0, ge=0)
    max_body_bytes: int = Field(default=4 * 1024 * 1024, ge=1024)
    asset: AssetSettings = AssetSettings()
    upstreams: dict[str, UpstreamSettings] = {}
    models: dict[str, ModelSettings] = {}
    #: Pattern routes, tried in order after the exact models (a last ``match = "*"`` is the
    #: default route; without one, unknown names are 404).
    routes: list[RouteSettings] = []
    #: Entries added to (or replacing) the shipped price table, by model name.
    prices: dict[str, PriceSettings] = {}
    rate_limit: RateLimitSettings = RateLimitSettings()
    x402: X402Settings = X402Settings()
    mpp: MppSettings = MppSettings()
    stripe: StripeSettings = StripeSettings()

    @field_validator("admin_token")
    @classmethod
    def _check_admin_token(cls, value: SecretStr | None) -> SecretStr | None:
        if value is None:
            return None
        token = value.get_secret_value()
        if token.strip() != token or len(token) < MIN_ADMIN_TOKEN:
            raise ValueError(f"admin_token (TOLLSTREAM_ADMIN_TOKEN) must be at least "
                             f"{MIN_ADMIN_TOKEN} characters without surrounding blanks; "
                             "generate one with `python3 -c 'import secrets; "
                             "print(secrets.token_urlsafe(24))'`, or leave it unset to keep "
                             "the admin API off")
        return value

    @field_validator("key_prefix")
    @classmethod
    def _check_key_prefix(cls, value: str) -> str:
        if "{" in value or "}" in value:
            raise ValueError("key_prefix must not contain '{' or '}': the ledger's keys put "
                             "a hash tag after it (Redis Cluster hashes the first {...})")
        return value

    @model_validator(mode="after")
    def _check_cluster(self) -> Settings:
        if self.redis_cluster and not self.redis_url:
            raise ValueError("redis_cluster = true needs redis_url (a node of the cluster); "
                             "the embedded Valkey is a single server")
        return self

    @model_validator(mode="after")
    def _check_models(self) -> Settings:
        entries: list[tuple[str, ModelSettings | RouteSettings]] = [
            *((f"models.{name}", model) for name, model in self.models.items()),
            *((f"routes.{i}", route) for i, route in enumerate(self.routes))]
        for where, entry in entries:
            if entry.upstream not in self.upstreams:
                raise ValueError(f"{where}.upstream names unknown upstream "
                                 f"{entry.upstream!r}")
            if entry.tokenizer not in ENCODINGS:
                raise ValueError(f"{where}.tokenizer must be one of {ENCODINGS}")
        for name, model in self.models.items():
            model.rate(self.asset_obj(), f"models.{name}")  # a bad price refuses start-up
        for i, route in enumerate(self.routes):
            if route.input_per_mtok is not None and route.output_per_mtok is None:
                raise ValueError(f"routes.{i}.output_per_mtok is required with input_per_mtok")
            price = route.price()
            if price is not None:
                price.rate(self.asset_obj(), f"routes.{i}")
        for name, price in self.prices.items():
            price.rate(self.asset_obj(), f"prices.{name}")
        if self.mpp.enabled:
            for key in ("deposit", "suggested_deposit", "min_deposit", "min_voucher_delta",
                        "settle_threshold"):
                try:
                    self.asset_obj().parse(getattr(self.mpp, key), field=f"mpp.{key}")
                except InvalidAmount as exc:
                    raise ValueError(exc.message) from exc
        if self.x402.enabled:
            try:
                self.asset_obj().parse(self.x402.deposit, field="x402.deposit")
            except InvalidAmount as exc:
                raise ValueError(exc.message) from exc
        if self.stripe.enabled:
            if self.stripe.charge and not self.mpp.enabled:
                raise ValueError("stripe needs [mpp] enabled (its realm and challenge "
                                 "secrets sign the stripe challenges)")
            fiat = self.fiat_asset()
            assert fiat is not None
            try:
                fiat.parse(self.stripe.credit, field="stripe.credit")
                parse_decimal(self.stripe.per_asset_unit, 6, field="stripe.per_asset_unit")
            except InvalidAmount as exc:
                raise ValueError(exc.message) from exc
        return self

    def asset_obj(self) -> Asset:
        return Asset(symbol=self.asset.symbol, decimals=self.asset.decimals)

    def fiat_asset(self) -> Asset | None:
        """The fiat currency balances may be held in (``[stripe]``), if enabled."""
        if not self.stripe.enabled:
            return None
        return Asset(symbol=self.stripe.currency.upper(), decimals=self.stripe.decimals)

    def asset_of(self, account_id: str) -> Asset:
        """The asset an account's amounts are in: a fiat currency or the gateway's asset."""
        currency = account_currency(account_id)
        if currency is not None and self.stripe.enabled and currency == self.stripe.currency:
            return Asset(symbol=currency.upper(), decimals=self.stripe.decimals)
        return self.asset_obj()

    def fiat_conversion(self) -> tuple[int, int]:
        """(numerator, denominator) turning the asset's atomic units into the fiat
        currency's minor units: ``per_asset_unit`` (6 decimals) scaled between the two."""
        per = parse_decimal(self.stripe.per_asset_unit, 6, field="stripe.per_asset_unit")
        return per * 10**self.stripe.decimals, 10**(6 + self.asset.decimals)

    def rate(self, model: str) -> Rate:
        """The rate of the exactly named model ``model``."""
        return self.models[model].rate(self.asset_obj(), f"models.{model}")

    @classmethod
    def load(cls, path: str | Path | None = None,
             env: Mapping[str, str] | None = None) -> Settings:
        """Read the TOML file (if any) and the environment; raise :class:`SettingsError`."""
        env = os.environ if env is None else env
        path = path or env.get(ENV_PREFIX + "CONFIG")
        if not path:
            source = resources.files("gateway").joinpath("defaults.toml")
            data = tomllib.loads(source.read_text(encoding="utf-8"))
        else:
            try:
                data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
            except OSError as exc:
                raise SettingsError(f"cannot read config file {path}: {exc.strerror}") from exc
            except tomllib.TOMLDecodeError as exc:
                raise SettingsError(f"config file {path} is not valid TOML: {exc}") from exc
        _overlay_env(data, env)
        return cls.from_mapping(data)

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> Settings:
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            first = exc.errors()[0]
            key = ".".join(str(p) for p in first["loc"])
            msg = first["msg"].removeprefix("Value error, ")
            raise SettingsError(f"invalid configuration at {key or 'top level'}: {msg}") from exc


def _overlay_env(data: dict[str, Any], env: Mapping[str, str]) -> None:
    for name, value in env.items():
        if not name.startswith(ENV_PREFIX) or name == ENV_PREFIX + "CONFIG":
            continue
        path = name[len(ENV_PREFIX):].lower().split("__")
        if path[0] not in Settings.model_fields:
            # Not a setting: a variable a setting names (TOLLSTREAM_MPP_SECRET,
            # TOLLSTREAM_STRIPE_SECRET_KEY, TOLLSTREAM_RELAYER_KEY, ...).
            continue
        node = data
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise SettingsError(f"environment variable {name} conflicts with a scalar key")
            node = child
        node[path[-1]] = value
