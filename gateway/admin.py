"""Operator API: prepaid accounts and their API keys, guarded by the admin bearer token.

Amounts are strings of digits in the asset's atomic units (``"2500000"`` is 2.5 USDC); JSON
integers are accepted too. Responses give both atomic and decimal forms.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, ConfigDict, Field

from gateway.body import parse, read_json
from gateway.errors import BadRequest
from gateway.state import Gateway
from meters.ledger import Account
from meters.money import parse_atomic


async def require_admin(request: Request) -> None:
    """Runs before the body is read: a caller without the token learns nothing more."""
    gw: Gateway = request.app.state.gateway
    await gw.check_admin(request)


router = APIRouter(prefix="/admin", dependencies=[Depends(require_admin)])


#: The kinds of accounts, by the prefix of their ids ("": every account).
ACCOUNT_KINDS = ("", "acct", "x402", "mpp", "fiat")

#: Admin bodies are small; anything larger is a mistake.
ADMIN_BODY_LIMIT = 64 * 1024


class CreateAccount(BaseModel):
    model_config = ConfigDict(extra="forbid")
    balance: str | int = "0"
    label: str = Field(default="", max_length=200)
    #: The Stripe customer the account's usage is reported for (Stripe meter events).
    stripe_customer: str | None = Field(default=None, pattern=r"^cus_[A-Za-z0-9]{1,64}$")


class CreditAccount(BaseModel):
    model_config = ConfigDict(extra="forbid")
    amount: str | int
    idempotency_key: str | None = Field(default=None, min_length=1, max_length=200)


def account_view(gw: Gateway, account: Account) -> dict[str, Any]:
    asset = gw.settings.asset_of(account.id)  # the gateway's asset, or a fiat currency
    return {"account_id": account.id, "label": account.label, "asset": asset.symbol,
            "decimals": asset.decimals, "balance": str(account.balance),
            "balance_decimal": asset.format(account.balance), "held": str(account.held),
            "spent": str(account.spent), "credited": str(account.credited),
            "shortfall": str(account.shortfall)}


@router.post("/accounts", status_code=201)
async def create_account(request: Request) -> dict[str, Any]:
    gw: Gateway = request.app.state.gateway
    body = parse(CreateAccount, await read_json(request, ADMIN_BODY_LIMIT))
    balance = parse_atomic(body.balance, field="balance")
    account, api_key = await gw.ledger.create_account(balance, label=body.label,
                                                      stripe_customer=body.stripe_customer)
    view = {**account_view(gw, account), "api_key": api_key}
    if body.stripe_customer is not None:
        view["stripe_customer"] = body.stripe_customer
    return view


@router.post("/accounts/{account_id}/credit")
async def credit_account(request: Request, account_id: str) -> dict[str, Any]:
    gw: Gateway = request.app.state.gateway
    body = parse(CreditAccount, await read_json(request, ADMIN_BODY_LIMIT))
    amount = parse_atomic(body.amount, field="amount")
    credited, _ = await gw.ledger.credit(account_id, amount,
                                         idempotency_key=body.idempotency_key,
                                         purpose="admin")
    account = await gw.ledger.get_account(account_id)
    return {**account_view(gw, account), "credited_now": credited}


@router.post("/accounts/{account_id}/rotate-key")
async def rotate_key(request: Request, account_id: str) -> dict[str, Any]:
    gw: Gateway = request.app.state.gateway
    api_key = await gw.ledger.rotate_key(account_id)
    return {"account_id": account_id, "api_key": api_key}


@router.get("/accounts")
async def list_accounts(request: Request, cursor: str = "0", limit: str = "50",
                        kind: str = "", payer: str = "") -> dict[str, Any]:
    """Accounts, a page at a time: ``cursor`` from the previous page's ``next_cursor``
    (``null`` after the last), ``kind`` one of ``acct`` (operator), ``x402``, ``mpp``
    (session channels), ``fiat``; ``payer``: only accounts whose label names this payer
    (an x402 or MPP charge payer's address)."""
    gw: Gateway = request.app.state.gateway
    # A node's SCAN cursor (up to 2^64) times the cluster's node count field (2^14): at most
    # 25 digits.
    if not cursor.isdigit() or len(cursor) > 25:
        raise BadRequest("cursor must be the next_cursor of a previous page",
                         code="invalid_cursor", param="cursor")
    if not limit.isdigit() or not 1 <= int(limit) <= 500:
        raise BadRequest("limit must be a whole number from 1 to 500", param="limit")
    if kind not in ACCOUNT_KINDS:
        raise BadRequest(f"kind must be one of {', '.join(k for k in ACCOUNT_KINDS if k)}",
                         param="kind")
    if payer and (len(payer) > 100 or not payer.isalnum()):
        raise BadRequest("payer must be an address (letters and digits)", param="payer")
    accounts, following = await gw.ledger.list_accounts(
        cursor=int(cursor), limit=int(limit), kind=f"{kind}_" if kind else "")
    if payer:
        accounts = [a for a in accounts if payer.lower() in a.label.lower()]
    return {"object": "list", "data": [account_view(gw, a) for a in accounts],
            "next_cursor": str(following) if following else None,
            "asset": gw.asset.symbol, "decimals": gw.asset.decimals}


@router.get("/accounts/{account_id}")
async def get_account(request: Request, account_id: str) -> dict[str, Any]:
    gw: Gateway = request.app.state.gateway
    return account_view(gw, await gw.ledger.get_account(account_id))
