"""``tollstream demo``: the whole paid loop on one machine, in one command.

It starts the embedded Redis (a temporary data directory), a local EVM chain with the project's
test USDC token, the simulated model and the gateway (x402 enabled), each on a free loopback
port. An agent on the stock ``openai`` SDK, whose HTTP client pays x402 deposits from a test
wallet (:mod:`gateway.agent`), streams an answer: its first request is answered 402, it pays a
small deposit on-chain, streams until the deposit is spent and the stream is cut at the last
paid token, tops up once, and streams again. Everything printed is real: tokens, the cut's
machine-readable reason, on-chain balances and the ledger's balance.
"""

from __future__ import annotations

import asyncio
import secrets
import sys
import tempfile
from pathlib import Path
from typing import Any

import httpx
import openai
from eth_account import Account

from gateway.agent import Wallet, paying_client
from gateway.app import create_app
from gateway.background import serve
from gateway.chain.devchain import DevChain, start_chain
from gateway.embedded import EmbeddedRedis
from gateway.rails.evm import EvmNetwork, EvmSettler
from gateway.settings import Settings
from gateway.simulator import SimConfig
from gateway.simulator import create_app as create_sim

MODEL = "gpt-6.1-sol"
PAY_TO = "0x000000000000000000000000000000000000dEaD"


def _say(text: str = "") -> None:
    print(text, flush=True)


def run_demo(*, deposit: str = "0.0001", prompt: str = "Tell me a story.") -> int:
    """Run the demo; returns the process exit code."""
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
            raw["x402"] = {"enabled": True, "pay_to": PAY_TO, "deposit": deposit,
                           "min_output_tokens": 16, "networks": {"local": {
                               "network": chain.network, "chain_id": chain.chain_id,
                               "rpc_url": chain.rpc_url, "asset": chain.token,
                               "token_name": chain.token_name,
                               "token_version": chain.token_version,
                               "relayer_key": chain.relayer_key}}}
            settings = Settings.from_mapping(raw)
            with serve(create_app(settings, redis_url)) as url:
                return _agent(url, settings, chain, prompt)
    finally:
        redis.stop()


def _balances(chain: DevChain, address: str) -> tuple[int, int]:
    network = EvmNetwork(network=chain.network, chain_id=chain.chain_id,
                         rpc_url=chain.rpc_url, asset=chain.token, token_name=chain.token_name,
                         token_version=chain.token_version, relayer_key=chain.relayer_key)

    async def read() -> tuple[int, int]:
        settler = EvmSettler()
        try:
            return (await settler.balance_of(address, network),
                    await settler.balance_of(PAY_TO, network))
        finally:
            await settler.aclose()

    return asyncio.run(read())


def _agent(url: str, settings: Settings, chain: DevChain, prompt: str) -> int:
    asset = settings.asset_obj()
    rate = settings.rate(MODEL)
    payer = chain.wallets[0]
    wallet = Wallet(Account.from_key(payer.private_key), spend_cap=10**6,
                    allowed=[(chain.network, chain.token)])
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="no-key-yet", max_retries=0,
                           http_client=paying_client(wallet, timeout=60))
    before, merchant_before = _balances(chain, payer.address)
    _say(f"gateway   {url}  (embedded Redis, simulated model, local chain {chain.backend})")
    _say(f"price     {MODEL}: {asset.format(rate.input_per_mtok)} in / "
         f"{asset.format(rate.output_per_mtok)} out {asset.symbol} per million tokens")
    _say(f"wallet    {payer.address}: {asset.format(before)} {asset.symbol} on-chain")
    for attempt in (1, 2):
        _say(f"\nagent     request {attempt}, openai SDK streaming: {prompt!r}")
        last: Any = None
        stream = client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": prompt}], stream=True,
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
                 f"top up via {reason['top_up']['method']}")
    account = httpx.get(f"{url}/v1/balance", timeout=10,
                        headers={"authorization": f"Bearer {wallet.api_key}"}).json()
    after, merchant_after = _balances(chain, payer.address)
    _say(f"\nledger    account {account['account_id']}: credited {account['credited']}, "
         f"spent {account['spent']}, balance {account['balance']}, held {account['held']} "
         "(atomic units)")
    _say(f"on-chain  wallet {asset.format(before)} -> {asset.format(after)} {asset.symbol}; "
         f"gateway's payTo received {asset.format(merchant_after - merchant_before)}")
    return 0
