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

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, model_validator

from meters.errors import ConfigError
from meters.money import Asset
from meters.rates import Rate
from meters.tokens import ENCODINGS

ENV_PREFIX = "TOLLSTREAM_"

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

    def key(self) -> str | None:
        """The upstream API key: explicit value first, else the named environment variable."""
        if self.api_key is not None:
            return self.api_key.get_secret_value()
        if self.api_key_env:
            return os.environ.get(self.api_key_env)
        return None


class ModelSettings(_Frozen):
    """A model clients may ask for: where it goes, how it is spoken to, what it costs."""

    upstream: str
    dialect: DialectName = "openai_chat"
    input_per_mtok: str = "0"
    output_per_mtok: str
    tokenizer: str = "o200k_base"
    upstream_model: str | None = None
    max_output_tokens: int = Field(default=4096, ge=1)


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
    admin_token: SecretStr | None = None
    lease_tokens: int = Field(default=64, ge=1, le=100_000)
    reservation_ttl_seconds: float = Field(default=15.0, gt=0.5)
    pause_timeout_seconds: float = Field(default=60.0, ge=0)
    max_body_bytes: int = Field(default=4 * 1024 * 1024, ge=1024)
    asset: AssetSettings = AssetSettings()
    upstreams: dict[str, UpstreamSettings] = {}
    models: dict[str, ModelSettings] = {}

    @model_validator(mode="after")
    def _check_models(self) -> Settings:
        for name, model in self.models.items():
            if model.upstream not in self.upstreams:
                raise ValueError(f"models.{name}.upstream names unknown upstream "
                                 f"{model.upstream!r}")
            if model.tokenizer not in ENCODINGS:
                raise ValueError(f"models.{name}.tokenizer must be one of {ENCODINGS}")
            self.rate(name)  # parse now: a bad price refuses start-up
        return self

    def asset_obj(self) -> Asset:
        return Asset(symbol=self.asset.symbol, decimals=self.asset.decimals)

    def rate(self, model: str) -> Rate:
        cfg = self.models[model]
        try:
            return Rate.parse(self.asset_obj(), input_per_mtok=cfg.input_per_mtok,
                              output_per_mtok=cfg.output_per_mtok, where=f"models.{model}")
        except ConfigError as exc:
            raise ValueError(exc.message) from exc

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
