"""What x402 ``upto`` adds to a stream's first token and to its end, against ``exact`` deposits,
on the local chain.

For each of N fresh payers, in turn (so both see the same machine): a 20-token stream paid by
an ``exact`` deposit (402, sign, verify, settle on-chain and credit *before* the first token),
one paid by an ``upto`` authorization (402, sign, verify and open the hold before the first
token; settle on-chain for the 20 tokens *after* the last one), and one with an API key (no
payment: the baseline). Each is timed from its first request (the 402 included) to its first
token, and from its last token to the end of the stream. Everything runs on 127.0.0.1 (Valkey,
the dev chain, the simulator and the gateway in this process's threads).

    python -m benchmarks.upto_latency [--payers 10] [--backend anvil|eth-tester]
"""

from __future__ import annotations

import argparse
import base64
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
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
CHAT = "/v1/chat/completions"
BODY = {"model": "gpt-6-luna", "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 20, "stream": True}


def timed(client: Any, url: str, headers: dict[str, str] | None = None,
          started: float | None = None) -> tuple[float, float]:
    """(seconds to the first token, seconds from the last token to the end) of one stream."""
    started = time.perf_counter() if started is None else started
    first = last = 0.0
    with client.stream("POST", f"{url}{CHAT}", json=BODY, headers=headers or {}) as response:
        if response.status_code != 200:
            raise RuntimeError(f"HTTP {response.status_code}: {response.read()[:300]!r}")
        for line in response.iter_lines():
            if line.startswith("data: {") and '"content"' in line:
                last = time.perf_counter()
                first = first or last
    return first - started, time.perf_counter() - last


def upto_stream(http: httpx.Client, url: str, key: str) -> tuple[float, float]:
    """One stream paid with ``upto``: the 402, the official SDK's signature, the stream."""
    from x402.mechanisms.evm.upto.client import UptoEvmScheme
    from x402.schemas import PaymentRequirements

    started = time.perf_counter()
    challenge = http.post(f"{url}{CHAT}", json=BODY)
    required = json.loads(base64.b64decode(challenge.headers["PAYMENT-REQUIRED"]))
    offer = next(req for req in required["accepts"] if req["scheme"] == "upto")
    inner = UptoEvmScheme(Account.from_key(key)).create_payment_payload(
        PaymentRequirements.model_validate(offer))
    header = base64.b64encode(json.dumps({"x402Version": 2, "accepted": offer,
                                          "payload": inner}).encode()).decode()
    return timed(http, url, {"PAYMENT-SIGNATURE": header}, started)


def ms(values: list[float]) -> str:
    return f"{statistics.median(values) * 1000:.1f} / {max(values) * 1000:.1f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.upto_latency")
    parser.add_argument("--payers", type=int, default=10)
    parser.add_argument("--backend", choices=["auto", "anvil", "eth-tester"], default="auto")
    args = parser.parse_args(argv)
    valkey = start_valkey(Path(tempfile.mkdtemp(prefix="tollstream-upto-")))
    results: dict[str, list[tuple[float, float]]] = {"exact": [], "upto": [], "key": []}
    try:
        with start_chain(wallets=2 * args.payers, backend=args.backend) as chain, \
                serve(create_sim(SimConfig(api_key="k"))) as sim:
            raw = Settings.load(None, env={}).model_dump(mode="python")
            raw["upstreams"]["sim"].update(base_url=f"{sim}/v1", api_key="k")
            raw["x402"] = {"enabled": True, "pay_to": PAY_TO, "deposit": "0.01",
                           "upto": {"enabled": True, "max": "0.01"},
                           "networks": {"local": {
                               "network": chain.network, "chain_id": chain.chain_id,
                               "rpc_url": chain.rpc_url, "asset": chain.token,
                               "token_name": chain.token_name,
                               "token_version": chain.token_version,
                               "relayer_key": chain.relayer_key}}}
            with serve(create_app(Settings.from_mapping(raw), valkey.connection_url)) as url, \
                    httpx.Client(timeout=60) as http:
                for index in range(args.payers):
                    exact_payer, upto_payer = chain.wallets[2 * index: 2 * index + 2]
                    payer = Wallet(Account.from_key(exact_payer.private_key), spend_cap=10**6,
                                   allowed=[(chain.network, chain.token)])
                    with paying_client(payer, timeout=60) as client:
                        results["exact"].append(timed(client, url))
                        results["key"].append(timed(client, url))  # its key from now on
                    results["upto"].append(upto_stream(http, url, upto_payer.private_key))
    finally:
        valkey.stop()
    print(f"chain backend {chain.backend}, {args.payers} payers, 20-token streams; "
          "median / max in ms")
    print("| paid by | to the first token | last token to the end |")
    print("|---|---|---|")
    for name in ("key", "exact", "upto"):
        firsts = [first for first, _ in results[name]]
        tails = [tail for _, tail in results[name]]
        print(f"| {name} | {ms(firsts)} | {ms(tails)} |")
    for name in ("exact", "upto"):
        ttft = statistics.median(f for f, _ in results[name]) - statistics.median(
            f for f, _ in results["key"])
        tail = statistics.median(t for _, t in results[name]) - statistics.median(
            t for _, t in results["key"])
        print(f"{name} adds {ttft * 1000:.1f} ms to the first token and {tail * 1000:.1f} ms "
              "to the end (medians, over the keyed stream)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
