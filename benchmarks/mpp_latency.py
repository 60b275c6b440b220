"""What an MPP session costs in time on a local anvil chain: opening a channel (the gateway
relays ``openWithAuthorization`` and waits for its receipt) and accepting a voucher (EIP-712
recovery, one Lua call), each as a ``HEAD`` on a model route from outside the gateway; and
what a voucher adds to a model request: ``--pairs`` one-token streams on the same channel's
account, one carrying a fresh voucher, the other the account's API key, in alternating order.

Starts Valkey, anvil with the project's token and escrow, and a gateway (in this process, on
free loopback ports), then times ``--opens`` channel opens, ``--vouchers`` vouchers and the
``--pairs``.

    python -m benchmarks.mpp_latency --opens 20 --vouchers 500 --pairs 300
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import httpx

from gateway.agent.session import SessionWallet, session_challenge
from gateway.app import create_app
from gateway.background import serve
from gateway.chain.devchain import start_chain
from gateway.embedded import start_valkey
from gateway.settings import Settings
from gateway.simulator import SimConfig
from gateway.simulator import create_app as create_sim
from meters.channels import account_of

ADMIN = "bench-admin-token-0123456789"


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.mpp_latency")
    parser.add_argument("--opens", type=int, default=20)
    parser.add_argument("--vouchers", type=int, default=500)
    parser.add_argument("--pairs", type=int, default=300)
    args = parser.parse_args()
    redis = start_valkey(Path(tempfile.mkdtemp(prefix="tollstream-mpp-")))
    try:
        with start_chain(wallets=2) as chain, serve(create_sim(SimConfig())) as sim:
            network = {"network": chain.network, "chain_id": chain.chain_id,
                       "rpc_url": chain.rpc_url, "asset": chain.token,
                       "token_name": chain.token_name, "token_version": chain.token_version,
                       "relayer_key": chain.relayer_key}
            settings = Settings.from_mapping({
                "key_prefix": "bench-mpp:",
                "upstreams": {"sim": {"base_url": f"{sim}/v1", "api_key": "k"}},
                "models": {"m": {"upstream": "sim", "output_per_mtok": "1"}},
                "rate_limit": {"enabled": False}, "admin_token": ADMIN,
                "mpp": {"enabled": True, "secret": "bench-secret-0123456789",
                        "charge": False, "session": True, "escrow": chain.escrow,
                        "min_deposit": "0.0001", "network": network}})
            with serve(create_app(settings, str(redis.connection_url))) as url, \
                    httpx.Client(base_url=url, timeout=60) as http:
                body = {"model": "m", "messages": [{"role": "user", "content": "x"}]}
                challenge = session_challenge(
                    http.post("/v1/chat/completions", json=body).headers)
                assert challenge is not None
                opens: list[float] = []
                wallet = None
                for _ in range(args.opens):
                    wallet = SessionWallet(chain.wallets[0].private_key,
                                           token_name=chain.token_name,
                                           token_version=chain.token_version,
                                           spend_cap=10**9, deposit=10**6)
                    credential = wallet.open(challenge)
                    started = time.perf_counter()
                    response = http.head("/v1/chat/completions",
                                         headers={"authorization": credential})
                    opens.append(time.perf_counter() - started)
                    assert response.status_code == 200, response.headers
                assert wallet is not None
                vouchers: list[float] = []
                for i in range(1, args.vouchers + 1):
                    credential = wallet.voucher(i * 100)  # signing is the agent's time
                    started = time.perf_counter()
                    response = http.head("/v1/chat/completions",
                                         headers={"authorization": credential})
                    vouchers.append(time.perf_counter() - started)
                    assert response.status_code == 200
                key = http.post(f"/admin/accounts/{account_of(wallet.channel_id or '')}"
                                "/rotate-key", headers={"authorization": f"Bearer {ADMIN}"}
                                ).json()["api_key"]
                stream = {**body, "stream": True, "max_tokens": 1}
                with_voucher: list[float] = []
                with_key: list[float] = []
                amount = args.vouchers * 100
                for i in range(args.pairs):
                    amount += 100
                    sends = [("voucher", wallet.voucher(amount)), ("key", f"Bearer {key}")]
                    for kind, authorization in sends if i % 2 == 0 else sends[::-1]:
                        started = time.perf_counter()
                        response = http.post("/v1/chat/completions", json=stream,
                                             headers={"authorization": authorization})
                        elapsed = time.perf_counter() - started
                        assert response.status_code == 200 and b"[DONE]" in response.content
                        (with_voucher if kind == "voucher" else with_key).append(elapsed)
    finally:
        redis.stop()
    added = [v - k for v, k in zip(with_voucher, with_key, strict=True)]
    for name, values in (("open (relayed, receipt awaited)", opens),
                         ("voucher (HEAD)", vouchers),
                         ("1-token stream, API key", with_key),
                         ("1-token stream, fresh voucher", with_voucher),
                         ("added by the voucher (paired)", added)):
        print(f"{name:<34} n={len(values):<5} median {statistics.median(values) * 1000:7.2f} ms"
              f"  p99 {percentile(values, 0.99) * 1000:7.2f} ms"
              f"  max {max(values) * 1000:7.2f} ms")


if __name__ == "__main__":
    main()
