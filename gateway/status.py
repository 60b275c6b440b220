"""The operator's status page, ``/admin/``: live streams, tokens and revenue per model over
the last minutes (a chart), the latest cuts, pauses and failures, what awaits settlement on
each rail, and the ledger's health. Server-rendered HTML and an inline SVG chart: no script,
no build step; it refreshes itself every 10 s.

Behind the admin token like the rest of ``/admin``: a script sends ``Authorization: Bearer``;
a browser signs in once with a form that sets an HttpOnly, SameSite=Strict cookie holding an
HMAC of the token (never the token itself). Wrong tokens count against the client's rate limit.
"""

from __future__ import annotations

import hashlib
import hmac
import html
import time
from typing import Any
from urllib.parse import parse_qs

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from gateway.errors import GatewayError, TooManyRequests
from gateway.state import Gateway, bearer
from gateway.summary import version
from meters.errors import MeterError

router = APIRouter()
COOKIE = "tollstream_admin"
STYLE = """body{font:15px/1.45 system-ui,sans-serif;margin:2rem auto;max-width:70rem;
color:#1d2330;padding:0 1rem}h1{font-size:1.4rem}h2{font-size:1.05rem;margin-top:1.6rem}
table{border-collapse:collapse;width:100%}td,th{padding:.3rem .6rem;border-bottom:1px solid
#dde;text-align:left}th{background:#f3f4f8}.num{text-align:right;font-variant-numeric:
tabular-nums}.ok{color:#176d2c}.bad{color:#a3161b}.tiles{display:flex;gap:1rem;flex-wrap:wrap}
.tile{border:1px solid #dde;border-radius:.5rem;padding:.7rem 1rem;min-width:10rem}.tile b{
display:block;font-size:1.5rem}"""


def _signature(gw: Gateway) -> str | None:
    token = gw.settings.admin_token
    if token is None:
        return None
    return hmac.new(token.get_secret_value().encode(), b"tollstream status page",
                    hashlib.sha256).hexdigest()


def _signed_in(gw: Gateway, request: Request) -> bool:
    expected = _signature(gw)
    if expected is None:
        return False
    given = request.cookies.get(COOKIE, "")
    key = bearer(request) or ""
    token = gw.settings.admin_token
    assert token is not None
    return hmac.compare_digest(given, expected) or hmac.compare_digest(
        key.encode(), token.get_secret_value().encode())


def _page(title: str, body: str, *, refresh: bool = False, status: int = 200) -> HTMLResponse:
    meta = '<meta http-equiv="refresh" content="10">' if refresh else ""
    return HTMLResponse(f"<!doctype html><html lang=en><head><meta charset=utf-8>{meta}"
                        f'<meta name=viewport content="width=device-width">'
                        f"<title>{title}</title><style>{STYLE}</style></head><body>{body}"
                        "</body></html>", status_code=status,
                        headers={"Cache-Control": "no-store"})


def _login(message: str = "", status: int = 401) -> HTMLResponse:
    note = f'<p class="bad">{html.escape(message)}</p>' if message else ""
    return _page("tollstream: sign in", f"<h1>tollstream operator</h1>{note}"
                 '<form method="post" action="/admin/login"><label>Admin token '
                 '<input type="password" name="token" autocomplete="current-password" '
                 'autofocus></label> <button type="submit">Sign in</button></form>',
                 status=status)


@router.post("/admin/login", include_in_schema=False)
async def login(request: Request) -> Response:
    gw: Gateway = request.app.state.gateway
    expected = _signature(gw)
    if expected is None:
        return _login("the admin API is off: set TOLLSTREAM_ADMIN_TOKEN", status=403)
    try:
        gw.limiter.check(request, "auth")
    except TooManyRequests as exc:
        return _login(exc.message, status=429)
    body = await request.body()
    token = parse_qs(body.decode("utf-8", "replace")[:4096]).get("token", [""])[0]
    secret = gw.settings.admin_token
    assert secret is not None
    if not hmac.compare_digest(token.encode(), secret.get_secret_value().encode()):
        try:
            await gw.limiter.spend(request, "auth")
        except TooManyRequests as exc:
            return _login(exc.message, status=429)
        return _login("wrong admin token")
    response = RedirectResponse("/admin/", status_code=303)
    response.set_cookie(COOKIE, expected, httponly=True, samesite="strict", path="/admin")
    return response


@router.get("/admin/", include_in_schema=False)
async def status_page(request: Request) -> Response:
    gw: Gateway = request.app.state.gateway
    if gw.settings.admin_token is None:
        return _login("the admin API is off: set TOLLSTREAM_ADMIN_TOKEN", status=403)
    if not _signed_in(gw, request):
        return _login()
    return _page("tollstream status", await _body(gw), refresh=True)


async def _body(gw: Gateway) -> str:
    asset = gw.asset
    activity = gw.metrics.activity
    series = activity.series()
    tokens = sum(t for _, models in series for t, _ in models.values())
    revenue = sum(r for _, models in series for _, r in models.values())
    live = int(gw.metrics.active_streams._value.get())
    health = await _health(gw)
    tiles = "".join(f'<div class="tile">{label}<b>{value}</b></div>' for label, value in (
        ("live streams", live), (f"tokens, last {activity.MINUTES} min", tokens),
        (f"revenue, last {activity.MINUTES} min", f"{asset.format(revenue)} {asset.symbol}"),
        ("ledger", health["redis"])))
    per_model: dict[str, list[int]] = {}
    for _, models in series:
        for model, (t, r) in models.items():
            totals = per_model.setdefault(model, [0, 0])
            totals[0] += t
            totals[1] += r
    rows = "".join(f"<tr><td>{html.escape(m)}</td><td class=num>{t}</td><td class=num>"
                   f"{asset.format(r)}</td></tr>" for m, (t, r) in sorted(per_model.items()))
    model_table = (f"<table><tr><th>model</th><th class=num>tokens</th><th class=num>revenue "
                   f"({asset.symbol})</th></tr>{rows or '<tr><td colspan=3>no requests yet'}"
                   "</td></tr></table>")
    now = time.time()
    recent = "".join(f"<tr><td>{int(now - e['at'])} s ago</td><td>{html.escape(e['kind'])}"
                     f"</td><td>{html.escape(e['model'])}</td></tr>"
                     for e in reversed(activity.recent))
    events = (f"<table><tr><th>when</th><th>what</th><th>model</th></tr>"
              f"{recent or '<tr><td colspan=3>none</td></tr>'}</table>")
    waiting = await _rails(gw)
    settlement = "".join(f"<tr><td>{html.escape(k)}</td><td class=num>{html.escape(v)}</td>"
                         "</tr>" for k, v in waiting.items())
    health_rows = "".join(f"<tr><td>{k}</td><td>{v}</td></tr>" for k, v in health.items())
    return (f"<h1>tollstream {version()}: status</h1><div class=tiles>{tiles}</div>"
            f"<h2>Tokens per minute, last {activity.MINUTES} minutes</h2>{_chart(series)}"
            f"<h2>Per model</h2>{model_table}<h2>Cuts, pauses and failures</h2>{events}"
            f"<h2>Awaiting settlement</h2><table>{settlement or '<tr><td>nothing: no payment rail'}"
            f"</td></tr></table><h2>Ledger health</h2><table>{health_rows}</table>")


def _chart(series: list[tuple[int, dict[str, list[int]]]]) -> str:
    """Bars of tokens per minute, inline SVG."""
    totals = [sum(t for t, _ in models.values()) for _, models in series]
    peak = max(totals) or 1
    width, height, gap = 640, 160, 4
    bar = (width - gap * len(totals)) / len(totals)
    bars = "".join(
        f'<rect x="{i * (bar + gap):.1f}" y="{height - max(2, v * height / peak):.1f}" '
        f'width="{bar:.1f}" height="{max(2, v * height / peak):.1f}" fill="#3b6fd8">'
        f"<title>{v} tokens</title></rect>" for i, v in enumerate(totals))
    return (f'<svg role="img" aria-label="tokens per minute" viewBox="0 0 {width} '
            f'{height + 18}" width="100%" height="{height + 18}">{bars}<text x="0" '
            f'y="{height + 15}" font-size="12">-{len(totals)} min</text><text x="{width}" '
            f'y="{height + 15}" font-size="12" text-anchor="end">now (peak {peak})</text></svg>')


async def _rails(gw: Gateway) -> dict[str, str]:
    try:
        return await gw.rail.status()
    except (GatewayError, MeterError) as exc:
        return {"unavailable": exc.code}


async def _health(gw: Gateway) -> dict[str, Any]:
    started = time.monotonic()
    reachable = await gw.ledger.ping()
    latency = (time.monotonic() - started) * 1000
    ok, bad = '<span class="ok">ok</span>', '<span class="bad">unreachable</span>'
    return {"redis": (f"{ok} ({latency:.1f} ms)" if reachable else bad),
            "heartbeat": ok if gw.ledger.is_alive() else '<span class="bad">lapsed</span>',
            "holds returned from dead processes": str(gw.keeper.swept_reservations),
            "final charges waiting for Redis": str(len(gw.keeper.pending))}
