"""Which model a requested name is: exact models first, then pattern routes, priced from the
configuration or from the shipped price table.

Resolution, for a name asked for on one endpoint (dialect):

1. ``[models."<name>"]``: that exact model;
2. the first ``[[routes]]`` entry of the endpoint's dialect whose ``match`` (shell-style:
   ``claude-*``, ``gpt-6*``, ``*``) covers the name; its price is its own if it sets one, else
   the price table's entry for the name (``gateway/prices.toml``, then ``[prices]`` from the
   configuration; dated or bracketed variants such as ``claude-opus-5-5-20260915`` or
   ``claude-opus-5-5[1m]`` fall back to the base name's entry);
3. nothing: 404, or, when a route of another dialect covers the name, a 400 naming the
   endpoint to use.

A route without a price for the name refuses it (404 ``model_not_priced``): nothing is served
unpriced.
"""

from __future__ import annotations

import fnmatch
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import resources
from typing import Any

from gateway.dialects import Dialect, get_dialect
from gateway.errors import BadRequest, NotFound, PaymentRequired
from gateway.model_settings import ModelSettings, PriceSettings, RouteSettings
from gateway.settings import Settings
from meters.money import Asset, account_currency
from meters.rates import Rate
from meters.tokens import Tokenizer, get_tokenizer

_VARIANT = re.compile(r"(?:-\d{8}|\[[^\]]*\])$")
#: Resolved names kept per process (a name is resolved once, then looked up).
CACHE_SIZE = 10_000


@dataclass(frozen=True, slots=True)
class Model:
    """A model resolved for a request: its rate, tokenizer and dialect objects."""

    name: str
    upstream: str
    upstream_model: str
    dialect: Dialect
    rate: Rate
    tokenizer: Tokenizer
    max_output_tokens: int

    @classmethod
    def build(cls, name: str, cfg: ModelSettings | RouteSettings, rate: Rate) -> Model:
        return cls(name=name, upstream=cfg.upstream, upstream_model=cfg.upstream_model or name,
                   dialect=get_dialect(cfg.dialect), rate=rate,
                   tokenizer=get_tokenizer(cfg.tokenizer),
                   max_output_tokens=cfg.max_output_tokens)


def price_table(overrides: Mapping[str, PriceSettings] | None = None
                ) -> tuple[str, dict[str, PriceSettings]]:
    """The shipped price table (its date, its entries), with ``overrides`` on top."""
    text = resources.files("gateway").joinpath("prices.toml").read_text(encoding="utf-8")
    data: dict[str, Any] = tomllib.loads(text)
    table = {name: PriceSettings.model_validate(entry)
             for name, entry in data.get("models", {}).items()}
    table.update(overrides or {})
    return str(data.get("checked", "")), table


class ModelRouter:
    """Resolves requested model names; one per process."""

    def __init__(self, settings: Settings) -> None:
        self.asset: Asset = settings.asset_obj()
        self.exact = {name: Model.build(name, cfg, settings.rate(name))
                      for name, cfg in settings.models.items()}
        self.routes = list(settings.routes)
        self.prices_checked, self.prices = price_table(settings.prices)
        # Every price in the table must parse, or the gateway refuses to start.
        self._rates = {name: price.rate(self.asset, f"prices.{name}")
                       for name, price in self.prices.items()}
        self._cache: dict[tuple[str, str], Model] = {}
        #: A fiat currency balances may be held in, and how asset prices convert to it.
        self.fiat = settings.stripe.currency if settings.stripe.enabled else None
        self._conversion = settings.fiat_conversion() if self.fiat else (1, 1)
        self._fiat_rates: dict[Rate, Rate] = {}

    def rate_for(self, model: Model, account_id: str) -> Rate:
        """``model``'s rate in what ``account_id`` holds: the gateway's asset, or the fiat
        currency, its prices converted and rounded up to a whole minor unit per million
        tokens (:meth:`~meters.rates.Rate.converted`)."""
        currency = account_currency(account_id)
        if currency is None:
            return model.rate
        if currency != self.fiat:
            raise PaymentRequired(f"this account holds {currency}, which this gateway does "
                                  "not take", code="currency_not_accepted")
        return self.fiat_rate(model)

    def fiat_rate(self, model: Model) -> Rate:
        """``model``'s rate in the fiat currency (see :meth:`rate_for`)."""
        rate = self._fiat_rates.get(model.rate)
        if rate is None:
            rate = self._fiat_rates[model.rate] = model.rate.converted(*self._conversion)
        return rate

    def _table_rate(self, name: str) -> Rate | None:
        while True:
            rate = self._rates.get(name)
            if rate is not None:
                return rate
            base = _VARIANT.sub("", name)
            if base == name:
                return None
            name = base

    def resolve(self, name: str, dialect: Dialect) -> Model:
        """The model ``name`` asked for on ``dialect``'s endpoint; 404/400 otherwise."""
        model = self.exact.get(name)
        if model is not None:
            if model.dialect.name != dialect.name:
                raise _wrong_endpoint(name, model.dialect.name, dialect.name)
            return model
        key = (name, dialect.name)
        cached = self._cache.get(key)
        if cached is not None:
            return cached
        other: str | None = None
        for route in self.routes:
            if not fnmatch.fnmatchcase(name, route.match):
                continue
            if route.dialect != dialect.name:
                other = other or route.dialect
                continue
            price = route.price()
            rate = (price.rate(self.asset, route.match) if price is not None
                    else self._table_rate(name))
            if rate is None:
                raise NotFound(f"the model {name!r} has no price on this gateway (route "
                               f"{route.match!r} bills from the price table, which lacks it)",
                               code="model_not_priced", param="model")
            model = Model.build(name, route, rate)
            if len(self._cache) >= CACHE_SIZE:
                self._cache.clear()
            self._cache[key] = model
            return model
        if other is not None:
            raise _wrong_endpoint(name, other, dialect.name)
        raise NotFound(f"the model {name!r} does not exist on this gateway; "
                       "GET /v1/models lists the models you can use",
                       code="model_not_found", param="model")

    def listing(self) -> list[tuple[Model, str | None]]:
        """Every model a client can name: the exact ones, then each priced table entry a
        route covers (first route wins), then the patterns of routes with a price of their
        own. Pairs of (model, the pattern it was listed for, None for exact models)."""
        out: list[tuple[Model, str | None]] = [(m, None) for m in self.exact.values()]
        seen = {(m.name, m.dialect.name) for m in self.exact.values()}
        for route in self.routes:
            price = route.price()
            if price is not None:
                out.append((Model.build(route.match, route,
                                        price.rate(self.asset, route.match)), route.match))
                continue
            for name in sorted(self._rates):
                if fnmatch.fnmatchcase(name, route.match) and (name, route.dialect) not in seen:
                    seen.add((name, route.dialect))
                    out.append((Model.build(name, route, self._rates[name]), route.match))
        return out


def _wrong_endpoint(name: str, has: str, asked: str) -> BadRequest:
    return BadRequest(f"the model {name!r} speaks {has}, not {asked}: use its own endpoint",
                      code="wrong_endpoint", param="model")
