"""``tollstream accounts``: the operator's accounts from the command line, through a running
gateway's admin API (``--gateway`` / ``TOLLSTREAM_GATEWAY_URL``, ``--admin-token`` /
``TOLLSTREAM_ADMIN_TOKEN``).

Amounts: digits alone are atomic units (``2500000``); a decimal point makes them asset units
(``2.50``), converted exactly with the account's decimals, never through a float. Tables for
people, ``--json`` for scripts. Every failure (an unreachable gateway, a refused token, a bad
amount, an unknown account) is one line on stderr and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import Any

import httpx
import orjson

from meters.errors import InvalidAmount
from meters.money import parse_decimal

DEFAULT_GATEWAY = "http://127.0.0.1:8402"
COLUMNS = ("account_id", "label", "balance_decimal", "held", "spent", "credited", "asset")


class CommandError(Exception):
    """What went wrong, for the operator."""


def add_parser(sub: Any) -> None:
    accounts = sub.add_parser(
        "accounts", help="create, credit, show, list accounts and rotate their keys "
                         "(through a running gateway's admin API)",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        epilog="Environment: TOLLSTREAM_GATEWAY_URL (--gateway), TOLLSTREAM_ADMIN_TOKEN "
               "(--admin-token). Amounts: digits are atomic units, a decimal point means "
               "asset units (2.50 USDC = 2500000).")
    accounts.add_argument("--gateway", default=os.environ.get("TOLLSTREAM_GATEWAY_URL",
                                                              DEFAULT_GATEWAY))
    accounts.add_argument("--admin-token", default=None,
                          help="the admin token (default: $TOLLSTREAM_ADMIN_TOKEN)")
    accounts.add_argument("--json", action="store_true", help="print JSON, for scripts")
    actions = accounts.add_subparsers(dest="action", required=True)
    create = actions.add_parser("create", help="a new account and its first API key")
    create.add_argument("--balance", default="0", help="atomic units, or 2.50 asset units")
    create.add_argument("--label", default="")
    create.add_argument("--stripe-customer", default=None,
                        help="report its usage to this Stripe customer (cus_...)")
    credit = actions.add_parser("credit", help="add to an account's balance")
    credit.add_argument("account_id")
    credit.add_argument("--amount", required=True, help="atomic units, or 2.50 asset units")
    credit.add_argument("--idempotency-key", default=None,
                        help="credit once per key (a retry credits nothing more)")
    show = actions.add_parser("show", help="one account")
    show.add_argument("account_id")
    listing = actions.add_parser("list", help="accounts, a page at a time")
    listing.add_argument("--kind", default="", choices=["", "acct", "x402", "mpp", "fiat"])
    listing.add_argument("--payer", default="", help="only accounts of this payer address")
    listing.add_argument("--limit", type=int, default=50)
    listing.add_argument("--cursor", default="0")
    listing.add_argument("--all", action="store_true", help="every page")
    rotate = actions.add_parser("rotate-key", help="revoke every key, issue a new one")
    rotate.add_argument("account_id")
    accounts.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    token = args.admin_token or os.environ.get("TOLLSTREAM_ADMIN_TOKEN", "")
    try:
        if not token:
            raise CommandError("no admin token: pass --admin-token or set "
                               "TOLLSTREAM_ADMIN_TOKEN")
        with httpx.Client(base_url=args.gateway.rstrip("/"), timeout=15,
                          headers={"authorization": f"Bearer {token}"}) as client:
            result = _action(client, args)
    except CommandError as exc:
        print(f"tollstream accounts: {exc}", file=sys.stderr)
        return 2
    _print(result, as_json=args.json)
    return 0


def _action(client: httpx.Client, args: argparse.Namespace) -> Any:
    if args.action == "create":
        body: dict[str, Any] = {"label": args.label,
                                "balance": str(_amount(args.balance, _decimals(client)))}
        if args.stripe_customer:
            body["stripe_customer"] = args.stripe_customer
        return _call(client, "POST", "/admin/accounts", body)
    if args.action == "credit":
        account = _call(client, "GET", f"/admin/accounts/{args.account_id}")
        body = {"amount": str(_amount(args.amount, int(account["decimals"])))}
        if args.idempotency_key:
            body["idempotency_key"] = args.idempotency_key
        return _call(client, "POST", f"/admin/accounts/{args.account_id}/credit", body)
    if args.action == "show":
        return _call(client, "GET", f"/admin/accounts/{args.account_id}")
    if args.action == "rotate-key":
        return _call(client, "POST", f"/admin/accounts/{args.account_id}/rotate-key", {})
    rows: list[dict[str, Any]] = []
    cursor: str | None = args.cursor
    while cursor is not None:
        page = _call(client, "GET", "/admin/accounts", params={
            "cursor": cursor, "limit": str(args.limit), "kind": args.kind,
            "payer": args.payer})
        rows += page["data"]
        cursor = page["next_cursor"] if args.all else None
        if not args.all:
            return {"data": rows, "next_cursor": page["next_cursor"]}
    return {"data": rows, "next_cursor": None}


def _decimals(client: httpx.Client) -> int:
    return int(_call(client, "GET", "/admin/accounts", params={"limit": "1"})["decimals"])


def _amount(text: str, decimals: int) -> int:
    try:
        if "." in text:
            return parse_decimal(text, decimals, field="amount")
        return parse_decimal(text, 0, field="amount")
    except InvalidAmount as exc:
        raise CommandError(f"{exc.message} (digits: atomic units; 2.50: asset units with "
                           f"{decimals} decimals)") from exc


def _call(client: httpx.Client, method: str, path: str, body: dict[str, Any] | None = None,
          params: dict[str, str] | None = None) -> Any:
    try:
        response = client.request(method, path, json=body, params=params)
    except httpx.HTTPError as exc:
        raise CommandError(f"the gateway at {client.base_url} is unreachable "
                           f"({type(exc).__name__})") from exc
    try:
        data = response.json()
    except ValueError as exc:
        raise CommandError(f"the gateway answered {response.status_code} without JSON: is "
                           f"{client.base_url} a tollstream gateway?") from exc
    if response.status_code >= 400:
        error = data.get("error", data) if isinstance(data, dict) else {}
        raise CommandError(f"{response.status_code} {error.get('code', '')}: "
                           f"{error.get('message', response.text[:200])}")
    return data


def _print(result: Any, *, as_json: bool) -> None:
    if as_json:
        print(orjson.dumps(result, option=orjson.OPT_INDENT_2).decode())
        return
    rows: Sequence[dict[str, Any]] = result.get("data", [result])
    if rows and "api_key" in rows[0] and "balance" not in rows[0]:  # rotate-key
        print(f"account {rows[0]['account_id']}: new API key {rows[0]['api_key']} "
              "(shown once; every earlier key is revoked)")
        return
    table = [list(COLUMNS)] + [[str(row.get(c, "")) for c in COLUMNS] for row in rows]
    widths = [max(len(r[i]) for r in table) for i in range(len(COLUMNS))]
    for line in table:
        print("  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True))
              .rstrip())
    for row in rows:
        if "api_key" in row:
            print(f"API key: {row['api_key']} (shown once)")
    if result.get("next_cursor"):
        print(f"more: --cursor {result['next_cursor']}")
