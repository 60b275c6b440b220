"""What an x402 deposit adds to an agent's first request, on the local chain.

For each of N fresh payers: time a one-token request that pays its deposit (402, sign,
verify, settle on-chain, credit, then stream), then the same request with the issued key.
The difference is what verify + settle + credit add. Everything runs on 127.0.0.1 (Valkey,
the dev chain, the simulator and the gateway in this process's threads).

    python -m benchmarks.x402_latency [--payers 10] [--backend anvil|eth-tester]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from eth_account import Account

from gateway.agent import Wallet, paying_client
from gateway.app import create_app
from gateway.background import serve
from gateway.chain.devchain import start_chain
from gateway.embedded import start_valkey
from gateway.settings import Settings
from gateway.simulator import SimConfig
from gateway.simulator import create_app as create_sim

PAY_TO = "0x000000000000000000000000000000000000dEaD"
BODY = {"model": "gpt-6-luna", "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 1, "stream": True}


def timed(client: Any, url: str) -> float:
    """Seconds for one one-token stream (``client``: an httpx-like client)."""
    started = time.perf_counter()
    with client.stream("POST", f"{url}/v1/chat/completions", json=BODY) as response:
        if response.status_code != 200:
            raise RuntimeError(f"HTTP {response.status_code}: {response.read()[:300]!r}")
        for _ in response.iter_lines():
            pass
    return time.perf_counter() - started


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.x402_latency")
    parser.add_argument("--payers", type=int, default=10)
    parser.add_argument("--backend", choices=["auto", "anvil", "eth-tester"], default="auto")
    args = parser.parse_args(argv)
    valkey = start_valkey(Path(tempfile.mkdtemp(prefix="tollstream-x402-")))
    try:
        with start_chain(wallets=args.payers, backend=args.backend) as chain, \
                serve(create_sim(SimConfig(api_key="k"))) as sim:
            raw = Settings.load(None, env={}).model_dump(mode="python")
            raw["upstreams"]["sim"].update(base_url=f"{sim}/v1", api_key="k")
            raw["x402"] = {"enabled": True, "pay_to": PAY_TO, "deposit": "0.01",
                           "networks": {"local": {
                               "network": chain.network, "chain_id": chain.chain_id,
                               "rpc_url": chain.rpc_url, "asset": chain.token,
                               "token_name": chain.token_name,
                               "token_version": chain.token_version,
                               "relayer_key": chain.relayer_key}}}
            with serve(create_app(Settings.from_mapping(raw), valkey.connection_url)) as url:
                first, then = [], []
                for wallet in chain.wallets:
                    payer = Wallet(Account.from_key(wallet.private_key), spend_cap=10**6,
                                   allowed=[(chain.network, chain.token)])
                    with paying_client(payer, timeout=60) as client:
                        first.append(timed(client, url))
                        then.append(timed(client, url))
                    assert len(payer.payments) == 1
    finally:
        valkey.stop()
    added = [a - b for a, b in zip(first, then, strict=True)]
    print(f"chain backend {chain.backend}, {args.payers} payers")
    print(f"first request (pays the deposit): median {statistics.median(first) * 1000:.0f} ms, "
          f"max {max(first) * 1000:.0f} ms")
    print(f"next request (API key):           median {statistics.median(then) * 1000:.0f} ms")
    print(f"added by the deposit:             median {statistics.median(added) * 1000:.0f} ms, "
          f"max {max(added) * 1000:.0f} ms (target < 1000 ms): "
          f"{'PASS' if max(added) < 1.0 else 'MISS'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
