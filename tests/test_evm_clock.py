"""The dev chain follows the wall clock, and settlement does not trust a stale head.

An idle chain is made without waiting: ``evm_setTime`` (anvil's JSON-RPC method, which the
eth-tester backend implements too) moves the chain's clock ten minutes past its head without
mining: the state of a chain nobody sent a transaction to for ten minutes. The settler is given
that clock (its ``clock`` parameter), so "now" means the chain's now throughout.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest

from gateway.chain.devchain import DevChain, start_chain
from gateway.rails.evm import EvmNetwork, EvmSettler
from tests.chain_fixtures import make_auth, send_as

IDLE = 600  # seconds the chain "idled"


def rpc(chain: DevChain, method: str, *params: Any) -> Any:
    body = httpx.post(chain.rpc_url, json={"jsonrpc": "2.0", "id": 1, "method": method,
                                           "params": list(params)}, timeout=10).json()
    assert "error" not in body, body
    return body["result"]


def head_timestamp(chain: DevChain) -> int:
    return int(rpc(chain, "eth_getBlockByNumber", "latest", False)["timestamp"], 16)


def idle(chain: DevChain) -> Callable[[], float]:
    """Put the chain's clock IDLE seconds past its head, mining nothing; returns that clock."""
    rpc(chain, "evm_setTime", int(time.time()) + IDLE)
    return lambda: time.time() + IDLE


@pytest.fixture(params=[None, 1.0], ids=["automine-only", "mixed-mining"])
def fresh_chain(request: pytest.FixtureRequest) -> Iterator[DevChain]:
    """A fresh chain of the session's backend: only transactions mine blocks (a plain anvil),
    or the dev chain's default, automine plus an empty block every second."""
    with start_chain(wallets=1, block_time=request.param) as running:
        yield running


async def test_recent_authorization_settles_on_an_idle_chain(fresh_chain: DevChain) -> None:
    """The bug: simulating against the last block (ten minutes old here) said an authorization
    with validAfter = now - 60 was "not yet valid". Settlement simulates in the pending block,
    and the dev chain mines at its clock's time, so it settles whatever the mining mode."""
    clock = idle(fresh_chain)
    if fresh_chain.block_time is None:  # reading the head mines nothing: check the premise
        assert int(clock()) - head_timestamp(fresh_chain) >= IDLE - 5
    network = EvmNetwork(network=fresh_chain.network, chain_id=fresh_chain.chain_id,
                         rpc_url=fresh_chain.rpc_url, asset=fresh_chain.token,
                         token_name=fresh_chain.token_name,
                         token_version=fresh_chain.token_version,
                         relayer_key=fresh_chain.relayer_key, receipt_timeout=30.0)
    settler = EvmSettler(clock=clock)
    before = int(clock())
    try:
        auth = make_auth(network, fresh_chain.wallets[0].private_key, value=5_000, clock=clock)
        await settler.verify(auth, pay_to=auth.to, amount=5_000, network=network)
        result = await settler.settle(auth, network)
    finally:
        await settler.aclose()
    assert result.amount == 5_000 and result.block_number is not None
    mined = rpc(fresh_chain, "eth_getBlockByNumber", hex(result.block_number), False)
    assert int(mined["timestamp"], 16) >= before - 1  # on the clock, not the old head


def test_dev_chain_head_follows_the_wall_clock() -> None:
    """With the default mining (anvil --block-time 1 --mixed-mining; eth-tester's lazy
    equivalent) the head catches up with the clock with no transaction sent, and a
    transaction is still mined at once, not at the next interval."""
    with start_chain(wallets=0) as running:
        assert running.block_time == 1.0
        clock = idle(running)
        deadline = time.monotonic() + 10
        while head_timestamp(running) < int(clock()) - 2:
            assert time.monotonic() < deadline, "the head did not catch up with the clock"
            time.sleep(0.1)  # polling interval while waiting for the next interval block
        for _ in range(3):  # interval mining alone would leave each one pending up to 1 s
            sent = send_as(running, running.relayer_key,
                           {"to": running.relayer_address, "value": 1}, gas=21_000,
                           wait=False)
            receipt = rpc(running, "eth_getTransactionReceipt",
                          sent["transactionHash"].to_0x_hex())
            assert receipt is not None and int(receipt["status"], 16) == 1


def test_idle_chain_mines_a_transaction_at_its_clock(fresh_chain: DevChain) -> None:
    """A block mined after an idle spell carries the clock's time, not its predecessor's (py-evm
    stamps the pending block when the previous one is mined: ten minutes ago here)."""
    clock = idle(fresh_chain)
    before = int(clock())
    receipt = send_as(fresh_chain, fresh_chain.relayer_key,
                      {"to": fresh_chain.relayer_address, "value": 1}, gas=21_000)
    mined = rpc(fresh_chain, "eth_getBlockByNumber", hex(receipt["blockNumber"]), False)
    assert int(mined["timestamp"], 16) >= before - 1
