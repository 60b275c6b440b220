"""Settings of what the gateway serves: ``[upstreams.<name>]`` (the model APIs),
``[models.<name>]`` (exact model names, their dialect and price) and ``[[routes]]`` (model
names by pattern). Part of the one settings object (:mod:`gateway.settings`), kept apart as
:mod:`gateway.rail_settings` is for the payment rails."""

from __future__ import annotations

import os
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr

from meters.errors import ConfigError
from meters.money import Asset
from meters.rates import Rate

DialectName = Literal["openai_chat", "anthropic_messages", "openai_responses"]


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class UpstreamSettings(_Frozen):
    """One model API the gateway forwards to."""

    base_url: str
    api_key: SecretStr | None = None
    api_key_env: str | None = None
    connect_timeout: float = 5.0
    #: Seconds the upstream may stay silent: before the answer's head, and while a read of
    #: its body waits (checked every quarter of it, at most every second, by one task per
    #: process); then 502 ``upstream_timeout``, or the stream ends as failed upstream.
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
