"""MPP session streams against x402-funded ones, in one run (#10).

Starts Valkey, anvil with the project's token and escrow, the simulator and the gateway
(``tollstream serve``, its own process, so its CPU can be read from /proc), all on loopback,
then measures:

* **pause to resume**: streams on a channel whose vouchers each buy ``--step`` tokens; every
  ``payment-need-voucher`` is answered by the client with the next voucher on a ``HEAD``; the
  figure is the time from sending that voucher (signed beforehand: signing is the agent's time)
  to the next content token of the paused stream (the voucher's own round trip included);
* **CPU per token**: the gateway's CPU time over phases of ``--streams`` concurrent streams of
  ``--tokens`` tokens, alternated: an account funded by an x402 deposit (its API key), a
  session with one voucher covering the whole phase (no pause), and a session paying
  ``--step`` tokens per voucher (a pause every ``--step`` tokens, the vouchers' CPU included).

    python -m benchmarks.session_stream --pauses 300 --rounds 3
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from eth_account import Account

from benchmarks.procs import cpu_seconds, start_process, wait_http
from gateway.agent import Wallet, async_paying_client
from gateway.agent.session import SessionWallet, session_challenge
from gateway.background import free_port
from gateway.chain.devchain import DevChain, start_chain
from gateway.embedded import start_valkey

ADMIN = "bench-admin-token-0123"
SIM_KEY = "bench-sim-key"
CHAT = "/v1/chat/completions"
PAY_TO = "0x000000000000000000000000000000000000dEaD"


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def write_config(path: Path, sim: str, redis_url: str, chain: DevChain) -> None:
    network = (f'network = "{chain.network}"\nchain_id = {chain.chain_id}\n'
               f'rpc_url = "{chain.rpc_url}"\nasset = "{chain.token}"\n'
               f'token_name = "{chain.token_name}"\ntoken_version = "{chain.token_version}"\n'
               f'relayer_key = "{chain.relayer_key}"\n')
    path.write_text(f'''redis_url = "{redis_url}"
admin_token = "{ADMIN}"
lease_tokens = 64
[rate_limit]
enabled = false
[upstreams.sim]
base_url = "{sim}/v1"
api_key = "{SIM_KEY}"
forward_headers = ["x-sim-"]
[models.bench]
upstream = "sim"
input_per_mtok = "0"
output_per_mtok = "1"
[x402]
enabled = true
pay_to = "{PAY_TO}"
deposit = "10.00"
min_output_tokens = 1
[x402.networks.local]
{network}[mpp]
enabled = true
secret = "bench-mpp-secret-0123456789"
charge = false
session = true
escrow = "{chain.escrow}"
min_deposit = "0.0001"
min_voucher_delta = "0"
settle_interval_seconds = 3600
[mpp.network]
{network}''')


@dataclass
class Channel:
    """One open channel of the benchmark's agent, and the vouchers it signed."""

    wallet: SessionWallet
    challenge: Any
    amount: int = 0
    signed: dict[int, str] = field(default_factory=dict)

    def voucher(self, amount: int) -> str:
        if amount not in self.signed:
            self.signed[amount] = self.wallet.voucher(amount, challenge=self.challenge)
        return self.signed[amount]


def _is_token(line: str) -> bool:
    """A chunk carrying generated text (the simulator sends one token per chunk here)."""
    return line.startswith("data: {") and '"content":"' in line and '"content":""' not in line


def body(tokens: int) -> dict[str, Any]:
    return {"model": "bench", "stream": True, "max_tokens": tokens,
            "messages": [{"role": "user", "content": "x"}]}


async def session_stream(client: httpx.AsyncClient, channel: Channel, tokens: int, step: int,
                         resumes: list[float] | None) -> int:
    """One stream paid ``step`` tokens at a time; returns the content tokens received."""
    received = 0
    sent_at: float | None = None
    channel.amount += step  # the first `step` tokens ride on the request itself
    headers = {"authorization": channel.voucher(channel.amount),
               "x-sim-output-tokens": str(tokens)}
    async with client.stream("POST", CHAT, headers=headers, json=body(tokens)) as response:
        assert response.status_code == 200, await response.aread()
        event = ""
        async for line in response.aiter_lines():
            if line.startswith("event: "):
                event = line[7:]
            elif line.startswith("data: ") and event == "payment-need-voucher":
                required = int(json.loads(line[6:])["requiredCumulative"])
                channel.amount = max(required, channel.amount + step)
                credential = channel.voucher(channel.amount)  # signed before the clock
                sent_at = time.perf_counter()
                answer = await client.head(CHAT, headers={"authorization": credential})
                assert answer.status_code == 200, answer.headers
                event = ""
            elif _is_token(line):
                if sent_at is not None and resumes is not None:
                    resumes.append(time.perf_counter() - sent_at)
                sent_at = None
                received += 1
            elif not line:
                event = ""
    return received


async def key_stream(client: httpx.AsyncClient, key: str, tokens: int) -> int:
    received = 0
    headers = {"authorization": f"Bearer {key}", "x-sim-output-tokens": str(tokens)}
    async with client.stream("POST", CHAT, headers=headers, json=body(tokens)) as response:
        assert response.status_code == 200, await response.aread()
        async for line in response.aiter_lines():
            if _is_token(line):
                received += 1
    return received


async def run(url: str, pid: int, chain: DevChain, args: argparse.Namespace
              ) -> dict[str, Any]:
    async with httpx.AsyncClient(base_url=url, timeout=120) as client:
        challenge = session_challenge((await client.post(CHAT, json=body(1))).headers)
        assert challenge is not None
        total = args.tokens * args.streams * (args.rounds + 1) * 3 + args.pauses * args.step * 2

        async def open_channel(index: int = 0) -> Channel:
            wallet = SessionWallet(chain.wallets[index].private_key,
                                   token_name=chain.token_name,
                                   token_version=chain.token_version, spend_cap=10**12,
                                   deposit=total)
            opened = await client.head(CHAT, headers={"authorization": wallet.open(challenge)})
            assert opened.status_code == 200, opened.headers
            return Channel(wallet, challenge)

        # An account funded by one x402 deposit, used by its API key.
        payer = Wallet(Account.from_key(chain.wallets[2].private_key), spend_cap=10**8)
        async with async_paying_client(payer, base_url=url, timeout=120) as paying:
            funded = await paying.post(CHAT, headers={"authorization": "Bearer none"},
                                       json={**body(1), "stream": False})
            assert funded.status_code == 200 and payer.api_key, funded.text
        key = payer.api_key
        # Pause to resume: sequential streams, one pause every `step` tokens.
        paused = await open_channel(0)
        resumes: list[float] = []
        while len(resumes) < args.pauses:
            await session_stream(client, paused, args.step * 50, args.step, resumes)
        # CPU per token, phases alternated.
        whole = await open_channel(1)
        # One channel per paying stream, as one agent per stream would have.
        channels = [await open_channel() for _ in range(args.streams)]
        cpu: dict[str, list[float]] = {"x402 key": [], "session, no pause": [],
                                       f"session, voucher every {args.step}": []}
        for _ in range(args.rounds):
            for name in cpu:
                before = cpu_seconds(pid)
                if name == "x402 key":
                    jobs = [key_stream(client, key, args.tokens) for _ in range(args.streams)]
                elif name == "session, no pause":
                    whole.amount += args.tokens * args.streams
                    jobs = [session_stream(client, whole, args.tokens, args.tokens, None)
                            for _ in range(args.streams)]
                else:
                    jobs = [session_stream(client, channel, args.tokens, args.step, None)
                            for channel in channels]
                tokens = sum(await asyncio.gather(*jobs))
                assert tokens == args.tokens * args.streams, (name, tokens)
                cpu[name].append((cpu_seconds(pid) - before) / tokens * 1000)
    return {"resumes": resumes, "cpu_ms_per_token": cpu}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.session_stream")
    parser.add_argument("--pauses", type=int, default=300)
    parser.add_argument("--step", type=int, default=20, help="tokens one voucher buys")
    parser.add_argument("--streams", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=250)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    python = sys.executable
    work = Path(tempfile.mkdtemp(prefix="tollstream-session-bench-"))
    valkey = start_valkey(work / "valkey")
    processes = []
    try:
        with start_chain(wallets=3) as chain:
            sim_port, gw_port = free_port(), free_port()
            sim = f"http://127.0.0.1:{sim_port}"
            processes.append(start_process([python, "-m", "gateway.cli", "upstream-sim",
                                            "--port", str(sim_port), "--api-key", SIM_KEY]))
            config = work / "gateway.toml"
            write_config(config, sim, str(valkey.connection_url), chain)
            gateway = start_process([python, "-m", "gateway.cli", "serve", "--config",
                                     str(config), "--port", str(gw_port), "--log-level",
                                     "warning"])
            processes.append(gateway)
            url = f"http://127.0.0.1:{gw_port}"
            wait_http(f"{sim}/v1/models")
            wait_http(f"{url}/healthz")
            result = asyncio.run(asyncio.wait_for(run(url, gateway.pid, chain, args), 900))
    finally:
        for process in processes:
            process.stop()
        valkey.stop()
    resumes = result["resumes"]
    print(f"pause to resume (voucher sent -> next token)  n={len(resumes)}  "
          f"p50 {statistics.median(resumes) * 1000:.2f} ms  "
          f"p99 {percentile(resumes, 0.99) * 1000:.2f} ms  max {max(resumes) * 1000:.2f} ms")
    base = statistics.median(result["cpu_ms_per_token"]["x402 key"])
    for name, values in result["cpu_ms_per_token"].items():
        median = statistics.median(values)
        print(f"gateway CPU per token, {name:<26} median {median:.4f} ms  "
              f"({', '.join(f'{v:.4f}' for v in values)})  ratio to x402 {median / base:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
