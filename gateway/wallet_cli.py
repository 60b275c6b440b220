"""``tollstream wallet``: a loopback proxy that pays the gateway's 402s for an unmodified
agent (Claude Code, Codex), by x402 deposits or one MPP session, never past ``--cap``.

The agent's ``base_url`` points at the proxy; the wallet's private key comes from an
environment variable (``--key-env``), never from the command line. The proxy only listens on
a loopback address: whoever reaches it spends the wallet's money.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any


def add_parser(sub: Any) -> None:
    defaults = argparse.ArgumentDefaultsHelpFormatter
    wallet = sub.add_parser(
        "wallet", help="a loopback proxy that pays the gateway's 402s for an unmodified agent",
        formatter_class=defaults,
        description="Point an agent (Claude Code, Codex) at this proxy: it forwards to the "
                    "gateway, pays its 402s with the wallet's key, never past --cap.")
    wallet.add_argument("--gateway", required=True, help="the tollstream gateway's URL")
    wallet.add_argument("--key-env", default="WALLET_KEY",
                        help="environment variable holding the wallet's private key "
                             "(default WALLET_KEY)")
    wallet.add_argument("--cap", required=True,
                        help="most the wallet may spend, in asset units (e.g. 5.00)")
    wallet.add_argument("--decimals", type=int, default=6,
                        help="decimals of the asset paid (USDC: 6, the default)")
    wallet.add_argument("--allow", action="append", default=[],
                        help="only pay this NETWORK:ASSET (repeatable; default: any the "
                             "gateway asks for on an eip155 chain)")
    wallet.add_argument("--rail", choices=["x402", "mpp"], default="x402",
                        help="pay by x402 deposits, or by one MPP session (escrow channel "
                             "and vouchers, closed when the proxy stops)")
    wallet.add_argument("--deposit", default="1.00",
                        help="MPP: the channel's deposit, in asset units (top-ups add as much)")
    wallet.add_argument("--increment", default="0.01",
                        help="MPP: the least each voucher adds, in asset units")
    wallet.add_argument("--token-name", default="USD Coin",
                        help="MPP: the token's EIP-712 name (signs the deposit's EIP-3009 "
                             "authorization; USDC on Base: 'USD Coin')")
    wallet.add_argument("--token-version", default="2", help="MPP: the token's EIP-712 version")
    wallet.add_argument("--host", default="127.0.0.1", help="loopback address to listen on")
    wallet.add_argument("--port", type=int, default=8403)
    wallet.add_argument("--log-level", default="warning")
    wallet.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Serve the paying proxy until interrupted; 2 on a bad option or key."""
    import uvicorn
    from eth_account import Account

    from gateway.agent.session import SessionWallet
    from gateway.agent.session_client import AsyncSessionTransport, SessionPayer, SessionRefused
    from gateway.agent.wallet_proxy import (
        create_proxy,
        is_loopback,
        printer,
        session_summary,
        summary,
    )
    from gateway.agent.x402 import AsyncPayingTransport, Wallet, httpx
    from meters.errors import InvalidAmount
    from meters.money import parse_decimal

    if not is_loopback(args.host):
        print(f"tollstream wallet: --host must be a loopback address (whoever reaches the "
              f"proxy spends the wallet's money), not {args.host!r}", file=sys.stderr)
        return 2
    key = os.environ.get(args.key_env, "")
    if not key:
        print(f"tollstream wallet: set {args.key_env} to the wallet's private key "
              "(or name another variable with --key-env)", file=sys.stderr)
        return 2
    try:
        account = Account.from_key(key)
    except (ValueError, TypeError):
        print(f"tollstream wallet: {args.key_env} is not a private key (32 bytes of hex)",
              file=sys.stderr)
        return 2
    try:
        cap = parse_decimal(args.cap, args.decimals, field="--cap")
    except InvalidAmount as exc:
        print(f"tollstream wallet: {exc.message}", file=sys.stderr)
        return 2
    allowed = []
    for item in args.allow:
        network, _, asset = item.rpartition(":")
        if not network or not asset.startswith("0x"):
            print(f"tollstream wallet: --allow takes NETWORK:ASSET (eip155:8453:0x...), "
                  f"not {item!r}", file=sys.stderr)
            return 2
        allowed.append((network, asset))

    def emit(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    if args.rail == "mpp":
        try:
            deposit = parse_decimal(args.deposit, args.decimals, field="--deposit")
            increment = parse_decimal(args.increment, args.decimals, field="--increment")
        except InvalidAmount as exc:
            print(f"tollstream wallet: {exc.message}", file=sys.stderr)
            return 2
        if not 0 < deposit <= cap or increment <= 0:
            print("tollstream wallet: --deposit must be above 0 and at most --cap, "
                  "--increment above 0", file=sys.stderr)
            return 2
        payer = SessionPayer(SessionWallet(key, token_name=args.token_name,
                                           token_version=args.token_version, spend_cap=cap,
                                           deposit=deposit), increment=increment)
        session = AsyncSessionTransport(payer)

        async def close() -> None:
            closed = None
            if payer.opened:
                try:
                    closed = await session.close_session()
                except (SessionRefused, httpx.HTTPError) as exc:
                    emit(f"tollstream wallet: closing the session failed: {exc}")
            emit(session_summary(closed, payer, args.decimals))

        app = create_proxy(args.gateway, session, on_shutdown=close)
    else:
        wallet = Wallet(account, spend_cap=cap, allowed=allowed,
                        on_payment=printer(args.decimals, emit))

        async def report() -> None:
            emit(summary(wallet, args.decimals))

        app = create_proxy(args.gateway, AsyncPayingTransport(wallet), on_shutdown=report)
    emit(f"tollstream wallet: {account.address} pays {args.gateway} by {args.rail} up to "
         f"{args.cap}; point the agent at http://{args.host}:{args.port}")
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level,
                loop="asyncio", http="httptools")
    return 0
