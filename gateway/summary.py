"""What a configuration means, for the operator: the table of models and prices, the rails, the
Redis in use and the admin API, printed by ``tollstream config check`` and when ``serve``
starts. Secrets never appear: settings print masked, a Redis URL without its password."""

from __future__ import annotations

from importlib import metadata
from urllib.parse import urlsplit, urlunsplit

import orjson

from gateway.routing import ModelRouter
from gateway.settings import Settings
from meters.rates import MTOK


def version() -> str:
    try:
        return metadata.version("tollstream")
    except metadata.PackageNotFoundError:  # pragma: no cover - run from a plain checkout
        return "unknown"


def masked_url(url: str) -> str:
    """A Redis URL without its password."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = f"{parts.username or ''}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


def effective(settings: Settings) -> str:
    """The whole configuration as JSON, secrets masked (pydantic prints them as stars)."""
    return orjson.dumps(settings.model_dump(mode="json"),
                        option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS).decode()


def models_table(settings: Settings) -> list[str]:
    """One line per model a client can name: prices per million tokens in asset units and
    per token in atomic units (the exact rational: the charge rounds up once per request)."""
    asset = settings.asset_obj()
    rows = [["model", "route", "dialect", "upstream", f"in/Mtok {asset.symbol}",
             f"out/Mtok {asset.symbol}", "out/token atomic"]]
    for model, pattern in ModelRouter(settings).listing():
        rate = model.rate
        whole, part = divmod(rate.output_per_mtok, MTOK)
        rows.append([model.name, pattern or "(exact)", model.dialect.name, model.upstream,
                     asset.format(rate.input_per_mtok), asset.format(rate.output_per_mtok),
                     f"{rate.output_per_mtok}/{MTOK}" if part else str(whole)])
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
            for row in rows]


def rails(settings: Settings) -> str:
    parts = []
    if settings.x402.enabled:
        parts.append(f"x402 ({', '.join(n.network for n in settings.x402.networks.values())})")
    if settings.mpp.enabled:
        intents = [name for name, on in (("evm charge", settings.mpp.charge),
                                         ("evm session", settings.mpp.session),
                                         ("stripe charge", settings.stripe.enabled
                                          and settings.stripe.charge)) if on]
        parts.append(f"mpp ({', '.join(intents) or 'no intent'})")
    if settings.stripe.enabled and settings.stripe.meter_event_name:
        parts.append(f"stripe usage ({settings.stripe.meter_event_name})")
    return ", ".join(parts) or "none: the operator credits accounts (admin API)"


def startup(settings: Settings, *, address: str, redis_url: str, embedded: bool,
            workers: int = 1, loop: str = "asyncio") -> list[str]:
    """What ``serve`` prints when it starts."""
    kind = "cluster at " if settings.redis_cluster else ""
    where = (f"embedded Valkey at {redis_url}, data in {settings.data_dir}" if embedded
             else f"external {kind}{masked_url(redis_url)}")
    processes = "one worker" if workers == 1 else f"{workers} workers"
    admin = "on (/admin, bearer token)" if settings.admin_token is not None else \
        "off (set TOLLSTREAM_ADMIN_TOKEN)"
    return [f"tollstream {version()} listening on {address} ({processes}, {loop} loop)",
            f"redis:     {where}", f"rails:     {rails(settings)}", f"admin API: {admin}",
            f"policy:    {settings.exhausted_policy} when an allowance runs out; lease "
            f"{settings.lease_tokens} tokens", "models:", *("  " + line for line in
                                                          models_table(settings))]
