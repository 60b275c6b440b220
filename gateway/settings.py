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

from meters.errors import ConfigError, InvalidAmount
from meters.money import Asset
from meters.rates import Rate
from meters.tokens import ENCODINGS

ENV_PREFIX = "TOLLSTREAM_"
#: Shortest admin token accepted at start-up.
MIN_ADMIN_TOKEN = 16

DialectName = Literal["openai_chat", "anthropic_messages", "openai_responses"]


class SettingsError(Exception):
    """The configuration is unusable; the message names the offending key."""


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class UpstreamSettings(_Frozen):
    """One model API the gateway forwards to."""

    base_url: str
    api_key: SecretStr | None = None
    api_key_env: str | None = None
    connect_timeout: float = 5.0
    read_timeout: float = 120.0
    #: Client headers passed through to this upstream, by lowercase name prefix (e.g.
    #: ``["openai-beta", "x-sim-"]``). Credentials are never passed through.
    forward_headers: list[str] = []

    def key(self) -> str | None:
        """The upstream API key: explicit value first, else the named environment variable."""
        if self.api_key is not None:
            return self.api_key.get_secret_value()
        if self.api_key_env:
            return os.environ.get(self.api_key_env)
        return None


class PriceSettings(_Frozen):
    """What a model costs, in asset units per million tokens (decimal strings)."""

    input_per_mtok: str = "0"
    output_per_mtok: str
    #: Prompt tokens read from / written to the upstream's cache (unset: the input price).
    cache_read_per_mtok: str | None = None
    cache_write_per_mtok: str | None = None

    def rate(self, asset: Asset, where: str) -> Rate:
        """The parsed rate; ``ValueError`` naming ``where`` on a bad price."""
        try:
            return Rate.parse(asset, input_per_mtok=self.input_per_mtok,
                              output_per_mtok=self.output_per_mtok,
                              cache_read_per_mtok=self.cache_read_per_mtok,
                              cache_write_per_mtok=self.cache_write_per_mtok, where=where)
        except ConfigError as exc:
            raise ValueError(exc.message) from exc


class ModelSettings(PriceSettings):
    """A model clients may ask for by its exact name: where it goes, how it is spoken to,
    what it costs."""

    upstream: str
    dialect: DialectName = "openai_chat"
    tokenizer: str = "o200k_base"
    upstream_model: str | None = None
    max_output_tokens: int = Field(default=4096, ge=1)


class RouteSettings(_Frozen):
    """Model names matching a pattern (``claude-*``, ``*``), for one endpoint's dialect.

    Without prices of its own a route bills each model at its price table entry
    (``gateway/prices.toml`` plus ``[prices]``), and a name the table lacks is refused: nothing
    is ever served unpriced.
    """

    match: str = Field(min_length=1)
    upstream: str
    dialect: DialectName = "openai_chat"
    tokenizer: str = "o200k_base"
    #: Sent upstream instead of the requested name (unset: the requested name).
    upstream_model: str | None = None
    max_output_tokens: int = Field(default=4096, ge=1)
    input_per_mtok: str | None = None
    output_per_mtok: str | None = None
    cache_read_per_mtok: str | None = None
    cache_write_per_mtok: str | None = None

    def price(self) -> PriceSettings | None:
        """The route's own price, if it sets one."""
        if self.output_per_mtok is None:
            return None
        return PriceSettings(input_per_mtok=self.input_per_mtok or "0",
                             output_per_mtok=self.output_per_mtok,
                             cache_read_per_mtok=self.cache_read_per_mtok,
                             cache_write_per_mtok=self.cache_write_per_mtok)


#: Known x402 networks: USDC on Base and Base Sepolia (EIP-712 domain name and version of each
#: deployment), and the local dev chain (its token address comes from `tollstream chain`).
X402_PRESETS: dict[str, dict[str, Any]] = {
    "base": {"network": "eip155:8453", "chain_id": 8453,
             "asset": "0x833589fCD6eDb6E08f4c7C32D4f71b54bdA02913",
             "token_name": "USD Coin", "token_version": "2"},
    "base-sepolia": {"network": "eip155:84532", "chain_id": 84532,
                     "asset": "0x036CbD53842c5426634e7929541eC2318f3dCF7e",
                     "token_name": "USDC", "token_version": "2"},
    "local": {"network": "eip155:31337", "chain_id": 31337, "rpc_url": "http://127.0.0.1:8545",
              "token_name": "USD Coin", "token_version": "2"},
}


class X402NetworkSettings(_Frozen):
    """One chain and token agents may pay deposits on."""

    preset: Literal["base", "base-sepolia", "local"] | None = None
    network: str = ""
    chain_id: int = 0
    rpc_url: str = ""
    asset: str = ""
    token_name: str = ""
    token_version: str = "2"
    confirmations: int = Field(default=1, ge=1)
    #: One RPC call, and the wait for a settlement's receipt, before giving up (503).
    rpc_timeout_seconds: float = Field(default=10.0, gt=0)
    receipt_timeout_seconds: float = Field(default=120.0, gt=0)
    relayer_key: SecretStr | None = None
    relayer_key_env: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _apply_preset(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("preset") in X402_PRESETS:
            return {**X402_PRESETS[data["preset"]], **data}
        return data

    @model_validator(mode="after")
    def _check(self) -> X402NetworkSettings:
        for name in ("network", "rpc_url", "asset", "token_name"):
            if not getattr(self, name):
                raise ValueError(f"{name} is required (or a preset that sets it)")
        if not self.network.startswith("eip155:") or self.chain_id <= 0:
            raise ValueError("network must be CAIP-2 eip155:<chain id> with a chain_id")
        return self

    def relayer(self) -> str | None:
        """The relayer's private key: explicit value first, else the named variable."""
        if self.relayer_key is not None:
            return self.relayer_key.get_secret_value()
        return os.environ.get(self.relayer_key_env) if self.relayer_key_env else None


class X402Settings(_Frozen):
    """The x402 deposit rail (off unless ``enabled``)."""

    enabled: bool = False
    mode: Literal["local", "remote"] = "local"
    facilitator_url: str | None = None
    facilitator_timeout_seconds: float = Field(default=30.0, gt=0)
    pay_to: str = ""
    deposit: str = "1.00"
    min_output_tokens: int = Field(default=256, ge=1)
    max_timeout_seconds: int = Field(default=300, ge=10)
    networks: dict[str, X402NetworkSettings] = {}

    @model_validator(mode="after")
    def _check(self) -> X402Settings:
        if not self.enabled:
            return self
        if not (self.pay_to.startswith("0x") and len(self.pay_to) == 42):
            raise ValueError("pay_to must be the 0x address deposits are paid to")
        if not self.networks:
            raise ValueError("at least one network is required when x402 is enabled")
        if self.mode == "remote" and not self.facilitator_url:
            raise ValueError("facilitator_url is required in remote mode")
        if self.mode == "local":
            for name, net in self.networks.items():
                if not net.relayer():
                    raise ValueError(f"networks.{name} needs relayer_key or relayer_key_env "
                                     "in local mode (the relayer pays the settlement gas)")
        return self


class MppSettings(_Frozen):
    """The Machine Payments Protocol rail: the ``Payment`` HTTP auth scheme, method ``evm``
    (off unless ``enabled``). Its challenges are HMAC-bound with the secrets in ``secret``
    / ``secret_env`` (comma-separated, at least 16 bytes each; the first signs, all verify:
    rotate by prepending a new one)."""

    enabled: bool = False
    realm: str = Field(default="tollstream", min_length=1)
    secret: SecretStr | None = None
    secret_env: str = "TOLLSTREAM_MPP_SECRET"
    challenge_ttl_seconds: int = Field(default=300, ge=10)
    #: Offer the one-time ``charge`` intent (an EIP-3009 payment credited as a balance).
    charge: bool = True
    pay_to: str = ""
    deposit: str = "1.00"
    min_output_tokens: int = Field(default=256, ge=1)
    #: The chain and token (same keys as an [x402.networks.<name>] entry).
    network: X402NetworkSettings | None = None
    #: Offer the ``session`` intent: an escrow channel spent with cumulative vouchers.
    session: bool = False
    escrow: str = ""
    #: The payee (the challenges' ``recipient``): its key settles and closes channels and
    #: pays their gas. Unset: the network's relayer key.
    payee_key_env: str | None = None
    suggested_deposit: str = "1.00"
    min_deposit: str = "0.01"
    min_voucher_delta: str = "0"
    settle_interval_seconds: float = Field(default=30.0, gt=0)
    #: Settle a channel once this much was spent beyond what the chain settled.
    settle_threshold: str = "0.10"

    def payee_key(self) -> str | None:
        if self.payee_key_env:
            return os.environ.get(self.payee_key_env)
        return self.network.relayer() if self.network is not None else None

    def secrets(self) -> list[bytes]:
        """The challenge secrets, newest (signing) first."""
        raw = self.secret.get_secret_value() if self.secret is not None \
            else os.environ.get(self.secret_env, "")
        return [part.strip().encode() for part in raw.split(",") if part.strip()]

    @model_validator(mode="after")
    def _check(self) -> MppSettings:
        if not self.enabled:
            return self
        secrets = self.secrets()
        if not secrets or any(len(s) < 16 for s in secrets):
            raise ValueError(f"secret (or the variable {self.secret_env}) must hold one or "
                             "more comma-separated secrets of at least 16 characters")
        if self.network is None:
            raise ValueError("network is required when mpp is enabled")
        if self.charge:
            if not (self.pay_to.startswith("0x") and len(self.pay_to) == 42):
                raise ValueError("pay_to must be the 0x address charges are paid to")
            if not self.network.relayer():
                raise ValueError("network needs relayer_key or relayer_key_env (the relayer "
                                 "pays the settlement gas)")
        if self.session:
            if not (self.escrow.startswith("0x") and len(self.escrow) == 42):
                raise ValueError("escrow must be the 0x address of the channel escrow")
            if not self.network.relayer():
                raise ValueError("network needs relayer_key or relayer_key_env (it relays "
                                 "openWithAuthorization and pays its gas)")
            if not self.payee_key():
                raise ValueError("payee_key_env names no key (the payee settles channels)")
        return self


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
    data_dir: Path = Path(".tollstream")
    key_prefix: str = "ts:"
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
        return self

    def asset_obj(self) -> Asset:
        return Asset(symbol=self.asset.symbol, decimals=self.asset.decimals)

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
        node = data
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise SettingsError(f"environment variable {name} conflicts with a scalar key")
            node = child
        node[path[-1]] = value
