"""``tollstream demo``: the whole paid loop on one machine, in one command.

It starts the embedded Redis (a temporary data directory), a local EVM chain with the project's
test USDC token, the simulated model and the gateway (x402 enabled), each on a free loopback
port. An agent on the stock ``openai`` SDK, whose HTTP client pays x402 deposits from a test
wallet (:mod:`gateway.agent`), streams an answer: its first request is answered 402, it pays a
small deposit on-chain, streams until the deposit is spent and the stream is cut at the last
paid token, tops up once, and streams again. Everything printed is real: tokens, the cut's
machine-readable reason, on-chain balances and the ledger's balance.

With ``--rail mpp`` the agent pays by an MPP session instead: it opens an escrow channel once,
streams two answers that pause for vouchers (and a top-up) and resume on the next token, then
closes the channel; the escrow pays the gateway exactly what was spent and refunds the rest.

With ``--rail upto`` the agent is the official x402 SDK's client with its ``upto`` scheme: each
request's 402 is answered with a Permit2 authorization for at most the request's price (its
prompt and ``max_tokens``), and the gateway settles on-chain exactly what the answer cost.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import secrets
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import openai
from eth_account import Account

from gateway.agent import Wallet, paying_client
from gateway.agent.session import SessionWallet
from gateway.agent.session_client import SessionPayer, close_session, session_client
from gateway.app import create_app
from gateway.background import serve
from gateway.chain.devchain import DevChain, start_chain
from gateway.dialects import get_dialect
from gateway.embedded import EmbeddedRedis
from gateway.rails.evm import EvmNetwork, EvmSettler
from gateway.settings import Settings
from gateway.simulator import SimConfig
from gateway.simulator import create_app as create_sim
from meters.rates import Rate

MODEL = "gpt-6.1-sol"
PAY_TO = "0x000000000000000000000000000000000000dEaD"


#: The demo's second question: another answer, paid by the top-up.
SECOND_QUESTION = "And how much does crossing it cost?"
#: Seconds to wait between the steps (``--pause``), for people watching.
_PAUSE = [0.0]


def _say(text: str = "") -> None:
    print(text, flush=True)


def _beat() -> None:
    if _PAUSE[0]:
        time.sleep(_PAUSE[0])


def run_demo(*, deposit: str | None = None, prompt: str = "Tell me a story.",
             rail: str = "x402", pause: float = 0.0) -> int:
    """Run the demo (``rail``: ``x402`` deposits, an ``mpp`` session, or ``upto``
    authorizations; ``pause``: seconds between the steps, for people watching); returns the
    process exit code."""
    _PAUSE[0] = pause
    # The demo tells its own story: the gateway's per-request lines would interleave.
    logging.getLogger("tollstream").setLevel(logging.WARNING)
    data_dir = Path(tempfile.mkdtemp(prefix="tollstream-demo-"))
    redis = EmbeddedRedis(data_dir)
    redis_url = redis.start()
    sim_key = secrets.token_urlsafe(16)
    try:
        with start_chain(wallets=1) as chain, serve(create_sim(SimConfig(
                tokens_per_second=60, tokens_per_chunk=2, default_output_tokens=4000,
                api_key=sim_key))) as sim_url:
            raw = Settings.load(None, env={}).model_dump(mode="python")
            raw["data_dir"] = str(data_dir)
            raw["upstreams"]["sim"].update(base_url=f"{sim_url}/v1", api_key=sim_key)
            network = {"network": chain.network, "chain_id": chain.chain_id,
                       "rpc_url": chain.rpc_url, "asset": chain.token,
                       "token_name": chain.token_name, "token_version": chain.token_version,
                       "relayer_key": chain.relayer_key}
            if rail == "mpp":
                raw["mpp"] = {"enabled": True, "secret": secrets.token_urlsafe(24),
                              "charge": False, "session": True, "network": network,
                              "escrow": chain.escrow, "suggested_deposit": deposit or "0.002",
                              "min_deposit": "0.001", "min_voucher_delta": "0.0001",
                              "session_pause_timeout_seconds": 30}
            else:
                raw["x402"] = {"enabled": True, "pay_to": PAY_TO,
                               "deposit": deposit or "0.0001", "min_output_tokens": 16,
                               "networks": {"local": network},
                               "upto": {"enabled": rail == "upto"}}
            settings = Settings.from_mapping(raw)
            app = create_app(settings, redis_url)
            # Priced as the gateway prices it: by its route, from the shipped price table.
            rate = app.state.gateway.router.resolve(MODEL, get_dialect("openai_chat")).rate
            with serve(app) as url:
                if rail == "mpp":
                    return _session_agent(url, settings, rate, chain, prompt)
                if rail == "upto":
                    return _upto_agent(url, settings, rate, chain, prompt)
                return _agent(url, settings, rate, chain, prompt)
    finally:
        redis.stop()


def _balances(chain: DevChain, address: str, merchant: str = PAY_TO) -> tuple[int, int]:
    network = EvmNetwork(network=chain.network, chain_id=chain.chain_id,
                         rpc_url=chain.rpc_url, asset=chain.token, token_name=chain.token_name,
                         token_version=chain.token_version, relayer_key=chain.relayer_key)

    async def read() -> tuple[int, int]:
        settler = EvmSettler()
        try:
            return (await settler.balance_of(address, network),
                    await settler.balance_of(merchant, network))
        finally:
            await settler.aclose()

    return asyncio.run(read())


def _agent(url: str, settings: Settings, rate: Rate, chain: DevChain, prompt: str) -> int:
    asset = settings.asset_obj()
    payer = chain.wallets[0]

    def asked(req: Any) -> None:
        _say(f"402       Payment Required: the gateway asks {asset.format(req.amount)} "
             f"{asset.symbol} on {req.network} to {req.pay_to} (scheme {req.scheme}); the "
             "wallet signs an EIP-3009 authorization (no gas) and retries")
        _beat()

    def paid(payment: dict[str, Any]) -> None:
        _say(f"settled   deposit of {asset.format(int(payment['amount']))} {asset.symbol}: "
             f"transaction {payment.get('transaction')}")

    wallet = Wallet(Account.from_key(payer.private_key), spend_cap=10**6,
                    allowed=[(chain.network, chain.token)], on_required=asked,
                    on_payment=paid)
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="no-key-yet", max_retries=0,
                           http_client=paying_client(wallet, timeout=60))
    before, merchant_before = _balances(chain, payer.address)
    _say(f"gateway   {url}  (embedded Redis, simulated model, local chain {chain.backend})")
    _say(f"price     {MODEL}: {asset.format(rate.input_per_mtok)} in / "
         f"{asset.format(rate.output_per_mtok)} out {asset.symbol} per million tokens")
    _say(f"wallet    {payer.address}: {asset.format(before)} {asset.symbol} on-chain")
    questions = (prompt, SECOND_QUESTION)
    for attempt in (1, 2):
        question = questions[attempt - 1]
        _say(f"\nagent     request {attempt}, openai SDK streaming: {question!r}")
        _beat()
        last: Any = None
        stream = client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": question}], stream=True,
            stream_options={"include_usage": True})
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                sys.stdout.write(chunk.choices[0].delta.content)
                sys.stdout.flush()
            last = chunk if chunk.choices else last
        reason = (last.model_extra or {}).get("tollstream") if last is not None else None
        _say()
        _say(f"paid      {len(wallet.payments)} x402 deposit(s) so far, "
             f"{asset.format(wallet.spent)} {asset.symbol}")
        if reason:
            _say(f"cut       finish_reason={last.choices[0].finish_reason} "
                 f"reason={reason['type']} delivered={reason['delivered_tokens']} tokens, "
                 f"balance left {reason['balance']}, top up via {reason['top_up']['method']}")
            _beat()
    account = httpx.get(f"{url}/v1/balance", timeout=10,
                        headers={"authorization": f"Bearer {wallet.api_key}"}).json()
    after, merchant_after = _balances(chain, payer.address)
    _say(f"\nledger    account {account['account_id']}: credited {account['credited']}, "
         f"spent {account['spent']}, balance {account['balance']}, held {account['held']} "
         "(atomic units)")
    _say(f"on-chain  wallet {asset.format(before)} -> {asset.format(after)} {asset.symbol}; "
         f"gateway's payTo received {asset.format(merchant_after - merchant_before)}")
    return 0


def _session_agent(url: str, settings: Settings, rate: Rate, chain: DevChain,
                   prompt: str) -> int:
    """The MPP story: open a channel once, stream twice through pauses for vouchers (and a
    top-up), close, and show what the chain settled."""
    asset = settings.asset_obj()
    payer = chain.wallets[0]
    payee = str(Account.from_key(chain.relayer_key).address)  # the session's recipient
    per_token = rate.charge(0, 1)
    deposit = asset.parse(settings.mpp.suggested_deposit, field="deposit")

    def observe(kind: str, data: dict[str, Any]) -> None:
        if kind == "open":
            _say(f"open      channel {data['channelId']} with a deposit of "
                 f"{asset.format(data['amount'])} {asset.symbol} (relayed: the wallet pays "
                 "no gas)")
        elif kind == "need":
            _say(f"\n  [paused: payment-need-voucher, required {data['requiredCumulative']}"
                 f"{', top-up first' if data.get('topUpRequired') else ''}]")
        elif kind == "topUp":
            _say(f"  [top-up +{asset.format(data['amount'])} {asset.symbol} on-chain]")
        elif kind == "voucher":
            _say(f"  [voucher signed for {data['amount']} in all: resumed]")

    wallet = SessionWallet(payer.private_key, token_name=chain.token_name,
                           token_version=chain.token_version, spend_cap=10 * deposit,
                           deposit=deposit)
    session = SessionPayer(wallet, increment=40 * per_token, observer=observe)
    http = session_client(session, timeout=60)
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0,
                           http_client=http)
    before, payee_before = _balances(chain, payer.address, payee)
    _say(f"gateway   {url}  (embedded Redis, simulated model, local chain {chain.backend})")
    _say(f"price     {MODEL}: {asset.format(rate.output_per_mtok)} {asset.symbol} out per "
         f"million tokens = {per_token} atomic units per token; vouchers add 40 tokens' "
         "worth at a time")
    _say(f"wallet    {payer.address}: {asset.format(before)} {asset.symbol} on-chain")
    for attempt in (1, 2):
        _say(f"\nagent     request {attempt}, openai SDK streaming through an MPP session: "
             f"{prompt!r}")
        for chunk in client.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": prompt}], stream=True,
                max_tokens=150):
            if chunk.choices and chunk.choices[0].delta.content:
                sys.stdout.write(chunk.choices[0].delta.content)
                sys.stdout.flush()
        _say(f"\nreceipt   spent {session.spent} of {session.accepted} authorized "
             "(atomic units)")
    closed = close_session(http)
    after, payee_after = _balances(chain, payer.address, payee)
    _say(f"\nclose     transaction {closed['txHash']}: the escrow paid the gateway "
         f"{asset.format(closed['spent'])} and refunded {asset.format(closed['refund'])} "
         f"{asset.symbol}")
    _say(f"on-chain  wallet {asset.format(before)} -> {asset.format(after)} {asset.symbol}; "
         f"the gateway (payee) received {asset.format(payee_after - payee_before)}")
    return 0


#: Output tokens each upto request may have: what its authorization covers...
UPTO_MAX_TOKENS = 300
#: ...and how many the simulated model's answers have.
UPTO_ANSWER_TOKENS = 120


def _upto_agent(url: str, settings: Settings, rate: Rate, chain: DevChain,
                prompt: str) -> int:
    """The upto story: two requests, each authorized for at most its price and settled
    on-chain for exactly what it cost, read from the chain."""
    asset = settings.asset_obj()
    payer = chain.wallets[0]
    before, merchant_before = _balances(chain, payer.address)
    _say(f"gateway   {url}  (embedded Redis, simulated model, local chain {chain.backend})")
    _say(f"price     {MODEL}: {asset.format(rate.input_per_mtok)} in / "
         f"{asset.format(rate.output_per_mtok)} out {asset.symbol} per million tokens")
    _say(f"wallet    {payer.address}: {asset.format(before)} {asset.symbol} on-chain "
         "(Permit2 approved once)")
    paid_before, received_before = before, merchant_before
    for attempt, question in enumerate((prompt, SECOND_QUESTION), 1):
        body = {"model": MODEL, "messages": [{"role": "user", "content": question}],
                "stream": True, "max_tokens": UPTO_MAX_TOKENS}
        offer = _upto_offer(httpx.post(f"{url}/v1/chat/completions", json=body, timeout=30))
        _say(f"\n402       Payment Required: upto at most {asset.format(int(offer['amount']))} "
             f"{asset.symbol} (the prompt and {UPTO_MAX_TOKENS} output tokens at the model's "
             "price), settled by the facilitator "
             f"{offer['extra']['facilitatorAddress']}")
        _say(f"agent     request {attempt}, openai SDK over the x402 SDK's httpx client "
             f"(upto): {question!r}")
        _beat()
        usage = asyncio.run(_upto_stream(url, chain, payer.private_key, body))
        _say()
        paid, received = _balances(chain, payer.address)
        cost = rate.charge(usage["prompt_tokens"], usage["completion_tokens"])
        _say(f"settled   {asset.format(paid_before - paid)} {asset.symbol} moved on-chain for "
             f"{usage['prompt_tokens']} prompt + {usage['completion_tokens']} output tokens "
             f"(priced {asset.format(cost)}); the payTo received "
             f"{asset.format(received - received_before)}")
        paid_before, received_before = paid, received
        _beat()
    _say(f"\non-chain  wallet {asset.format(before)} -> {asset.format(paid_before)} "
         f"{asset.symbol}; gateway's payTo received "
         f"{asset.format(received_before - merchant_before)}; no account, no key, no balance "
         "left at the gateway")
    return 0


def _upto_offer(response: httpx.Response) -> dict[str, Any]:
    """The ``upto`` requirement of a 402 (its PAYMENT-REQUIRED header, x402 v2)."""
    required = json.loads(base64.b64decode(response.headers["PAYMENT-REQUIRED"]))
    return next(req for req in required["accepts"] if req["scheme"] == "upto")


async def _upto_stream(url: str, chain: DevChain, key: str, body: dict[str, Any]
                       ) -> dict[str, int]:
    """Stream ``body`` with the stock openai SDK over the official x402 SDK's httpx client,
    which answers the 402 with an upto authorization; print the text, return its usage."""
    from x402 import x402Client
    from x402.http.clients import x402HttpxClient
    from x402.mechanisms.evm.upto.client import UptoEvmScheme

    client = x402Client()
    client.register("eip155:*", UptoEvmScheme(Account.from_key(key)))
    client.set_spend_controls({"allowed_assets": [{"network": chain.network,
                                                   "asset": chain.token}]})
    usage: dict[str, int] = {}
    async with x402HttpxClient(client, timeout=60) as http:
        sdk = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0,
                                 http_client=http)
        stream = await sdk.chat.completions.create(
            model=body["model"], messages=body["messages"], stream=True,
            max_tokens=body["max_tokens"], stream_options={"include_usage": True},
            # The simulated model answers in fewer tokens than the maximum authorized, as a
            # model does that finishes its answer.
            extra_headers={"x-sim-output-tokens": str(UPTO_ANSWER_TOKENS)})
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                sys.stdout.write(chunk.choices[0].delta.content)
                sys.stdout.flush()
            if chunk.usage is not None:
                usage = {"prompt_tokens": chunk.usage.prompt_tokens,
                         "completion_tokens": chunk.usage.completion_tokens}
    return usage
