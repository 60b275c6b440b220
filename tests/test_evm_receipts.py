"""Fault injection into what settlement reads back from the chain: receipts, transaction
status, and a node's broken answers. Faults are answers :class:`~tests.chain_fixtures.RpcProxy`
alters in front of the real dev chain (or real transactions that revert or wait in a
mempool); nothing mocks the settler or the chain.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from typing import Any

import pytest
from eth_account import Account

from gateway.chain.devchain import DevChain
from gateway.errors import PaymentRejected, ServiceUnavailable, UpstreamError
from gateway.rails.eip3009 import TRANSFER_TOPIC, has_transfer_log
from gateway.rails.evm import (
    ERR_TRANSFER_EVENT_MISMATCH,
    EvmNetwork,
    EvmSettler,
    SettlementNotSubmitted,
)
from tests.chain_fixtures import *  # noqa: F403  (chain, evm_network, settler, rpc_proxy, ...)
from tests.chain_fixtures import (
    PAY_TO,
    Forward,
    Hook,
    Raw,
    RpcProxy,
    make_auth,
    new_account,
    new_payer,
    relay_authorization,
    rpc_error,
    rpc_result,
    send_as,
    via,
)

pytestmark = pytest.mark.timeout(60)

SINK = Account.from_key("0x" + "51" * 32).address


# --------------------------------------------------------------------------- receipts


def _rewrite_receipt(change: Callable[[dict[str, Any]], None]) -> Hook:
    def hook(req: dict[str, Any], forward: Forward) -> dict[str, Any]:
        answer = forward(req)
        if answer.get("result"):
            change(answer["result"])
        return answer
    return hook


def _transfers(receipt: dict[str, Any]) -> list[dict[str, Any]]:
    return [log for log in receipt["logs"] if log["topics"][0] == TRANSFER_TOPIC]


def _no_logs(receipt: dict[str, Any]) -> None:
    receipt["logs"] = []


def _other_value(receipt: dict[str, Any]) -> None:
    for log in _transfers(receipt):
        log["data"] = "0x" + (int(log["data"], 16) + 1).to_bytes(32, "big").hex()


def _other_emitter(receipt: dict[str, Any]) -> None:
    for log in _transfers(receipt):
        log["address"] = PAY_TO.lower()


def _other_recipient(receipt: dict[str, Any]) -> None:
    for log in _transfers(receipt):
        log["topics"][2] = "0x" + "00" * 12 + SINK.lower()[2:]


@pytest.mark.parametrize("change", [_no_logs, _other_value, _other_emitter, _other_recipient],
                         ids=["no-logs", "other-value", "other-token", "other-recipient"])
async def test_receipt_without_the_transfer_log(
        change: Callable[[dict[str, Any]], None], chain: DevChain, evm_network: EvmNetwork,
        settler: EvmSettler, fresh_settler: EvmSettler, rpc_proxy: RpcProxy) -> None:
    """Status 1 but no Transfer(from, to, value) from the token: not a settlement we trust."""
    rpc_proxy.hooks["eth_getTransactionReceipt"] = _rewrite_receipt(change)
    auth = make_auth(evm_network, new_payer(chain, 1_000), value=1_000)
    with pytest.raises(PaymentRejected) as info:
        await fresh_settler.settle(auth, via(rpc_proxy, evm_network))
    assert info.value.code == ERR_TRANSFER_EVENT_MISMATCH
    status = await settler.transaction_status(info.value.extra["transaction"], evm_network)
    assert status.state == "success"  # the real receipt had it: the node lied


async def test_receipt_with_garbage_logs(chain: DevChain, evm_network: EvmNetwork,
                                         fresh_settler: EvmSettler,
                                         rpc_proxy: RpcProxy) -> None:
    """Logs web3 cannot even parse: an upstream error that names the sent transaction."""
    rpc_proxy.hooks["eth_getTransactionReceipt"] = _rewrite_receipt(
        lambda r: r.update(logs=[{"address": "zz", "topics": ["0xzz"], "data": 5}]))
    auth = make_auth(evm_network, new_payer(chain, 900), value=900)
    with pytest.raises(UpstreamError) as info:
        await fresh_settler.settle(auth, via(rpc_proxy, evm_network))
    assert info.value.extra["transaction"].startswith("0x")


async def test_receipt_timeout_names_the_transaction(
        chain: DevChain, evm_network: EvmNetwork, settler: EvmSettler,
        fresh_settler: EvmSettler, rpc_proxy: RpcProxy) -> None:
    """No receipt within receipt_timeout: 503 carrying the hash, and the hash is what the
    caller reconciles with (here the transfer did land)."""
    rpc_proxy.hooks["eth_getTransactionReceipt"] = lambda req, fwd: rpc_result(req, None)
    auth = make_auth(evm_network, new_payer(chain, 800), value=800)
    with pytest.raises(ServiceUnavailable) as info:
        await fresh_settler.settle(auth, via(rpc_proxy, evm_network, receipt_timeout=1.0))
    tx = info.value.extra["transaction"]
    assert (await settler.transaction_status(tx, evm_network)).state == "success"
    assert await settler.authorization_used(auth.from_, auth.nonce, evm_network)


@pytest.mark.parametrize("stalled", ["eth_getTransactionReceipt", "eth_sendRawTransaction"])
async def test_node_stops_answering_after_broadcast(
        stalled: str, chain: DevChain, evm_network: EvmNetwork, settler: EvmSettler,
        fresh_settler: EvmSettler, rpc_proxy: RpcProxy) -> None:
    """The node takes the transaction, then stops answering (before or after acknowledging
    it): the RPC timeout is a 503 that still names the transaction (it used not to)."""
    def hook(req: dict[str, Any], forward: Forward) -> dict[str, Any]:
        answer = forward(req)
        rpc_proxy.stall(10)
        return answer
    rpc_proxy.hooks[stalled] = hook
    auth = make_auth(evm_network, new_payer(chain, 700), value=700)
    with pytest.raises(ServiceUnavailable) as info:
        await fresh_settler.settle(auth, via(rpc_proxy, evm_network, rpc_timeout=2.0))
    tx = info.value.extra["transaction"]
    assert (await settler.transaction_status(tx, evm_network)).state == "success"


# --------------------------------------------------------------------------- status


async def test_transaction_status_states(chain: DevChain, evm_network: EvmNetwork,
                                         settler: EvmSettler, fresh_settler: EvmSettler,
                                         rpc_proxy: RpcProxy, front_runner: str) -> None:
    key = new_payer(chain, 600)
    auth = make_auth(evm_network, key, value=600)
    ok = await settler.settle(auth, evm_network)
    success = await settler.transaction_status(ok.tx_hash, evm_network)
    assert success.state == "success" and success.block_number == ok.block_number
    assert success.confirmations >= 1
    # A replay with a fixed gas limit is mined and reverts.
    replay = relay_authorization(chain, auth, front_runner)
    assert replay["status"] == 0
    reverted = await settler.transaction_status(replay["transactionHash"].to_0x_hex(),
                                                evm_network)
    assert reverted.state == "reverted" and reverted.block_number == replay["blockNumber"]
    for unknown in ("0x" + secrets.token_hex(32), "0x1234", "not a hash"):
        assert (await settler.transaction_status(unknown, evm_network)).state == "unknown"
    # Known to the node, not mined yet (the proxy hides the receipt and the block).
    rpc_proxy.hooks["eth_getTransactionReceipt"] = lambda req, fwd: rpc_result(req, None)

    def unmined(req: dict[str, Any], forward: Forward) -> dict[str, Any]:
        answer = forward(req)
        answer["result"].update(blockHash=None, blockNumber=None, transactionIndex=None)
        return answer
    rpc_proxy.hooks["eth_getTransactionByHash"] = unmined
    pending = await fresh_settler.transaction_status(ok.tx_hash, via(rpc_proxy, evm_network))
    assert pending.state == "pending"


async def test_transaction_status_pending_for_real(chain: DevChain, evm_network: EvmNetwork,
                                                   settler: EvmSettler) -> None:
    """A transaction the node holds but cannot mine (its sender skipped a nonce)."""
    if chain.backend != "anvil":
        pytest.skip("eth-tester has no mempool: every transaction is mined or refused")
    sender = new_account(chain, eth=10**17)
    queued = send_as(chain, sender.key.to_0x_hex(), {"to": PAY_TO, "value": 1, "nonce": 1},
                     gas=21_000, wait=False)
    status = await settler.transaction_status(queued["transactionHash"].to_0x_hex(),
                                              evm_network)
    assert status.state == "pending" and status.block_number is None


# --------------------------------------------------------------------------- garbage


def _stall(proxy: RpcProxy) -> Hook:
    def hook(req: dict[str, Any], forward: Forward) -> Raw:
        proxy.stall(10)
        return Raw(504)
    return hook


FAULTS: list[tuple[str, Callable[[RpcProxy], Hook], type[Exception]]] = [
    ("http-500", lambda p: lambda req, fwd: Raw(500, b"oops", "text/plain"), ServiceUnavailable),
    ("http-429", lambda p: lambda req, fwd: Raw(429, b"slow down", "text/plain"),
     ServiceUnavailable),
    ("stalled", _stall, ServiceUnavailable),
    ("html", lambda p: lambda req, fwd: Raw(200, b"<html>", "text/html"), UpstreamError),
    ("bad-json", lambda p: lambda req, fwd: Raw(200, b"{not json"), UpstreamError),
    ("no-result", lambda p: lambda req, fwd: {"jsonrpc": "2.0", "id": req["id"]},
     UpstreamError),
    ("not-hex", lambda p: lambda req, fwd: rpc_result(req, "0xzz"), UpstreamError),
    ("object", lambda p: lambda req, fwd: rpc_result(req, {"a": 1}), UpstreamError),
    ("rpc-error", lambda p: lambda req, fwd: rpc_error(req, -32000, "boom"), UpstreamError),
]


@pytest.mark.parametrize(("name", "make_hook", "expected"), FAULTS,
                         ids=[f[0] for f in FAULTS])
async def test_rpc_faults_become_gateway_errors(
        name: str, make_hook: Callable[[RpcProxy], Hook], expected: type[Exception],
        chain: DevChain, evm_network: EvmNetwork, fresh_settler: EvmSettler,
        rpc_proxy: RpcProxy) -> None:
    """Every eth_call answer a broken node may give is a 503 or a 502, never a web3/JSON
    exception (JSON decode errors, BadResponseFormat, non-hex results escaped before); the
    same fault at the simulation means nothing was submitted."""
    network = via(rpc_proxy, evm_network, rpc_timeout=2.0)
    auth = make_auth(network, chain.wallets[0].private_key, value=500)
    rpc_proxy.hooks["eth_call"] = make_hook(rpc_proxy)
    with pytest.raises(expected) as info:
        await fresh_settler.verify(auth, pay_to=PAY_TO, amount=500, network=network)
    assert type(info.value) is expected, repr(info.value)
    with pytest.raises(expected):
        await fresh_settler.balance_of(PAY_TO, network)
    del rpc_proxy.hooks["eth_call"]
    rpc_proxy.hooks["eth_estimateGas"] = make_hook(rpc_proxy)
    with pytest.raises(SettlementNotSubmitted) as submitted:
        await fresh_settler.settle(auth, network)
    assert isinstance(submitted.value.__cause__, expected)


def test_transfer_log_check_skips_malformed_logs(evm_network: EvmNetwork) -> None:
    """has_transfer_log over whatever a faulty node put in a receipt: no exception; a
    malformed entry is just not the Transfer log."""
    auth = make_auth(evm_network, "0x" + "22" * 32, value=77)
    good = {"address": evm_network.asset, "data": (77).to_bytes(32, "big"),
            "topics": [TRANSFER_TOPIC, "0x" + "00" * 12 + auth.from_.lower()[2:],
                       "0x" + "00" * 12 + auth.to.lower()[2:]]}
    junk: list[Any] = [None, 5, "log", {}, {"address": "zz", "topics": ["0xzz"]},
                       {"address": evm_network.asset, "topics": None, "data": "0x"},
                       {**good, "data": object()}]
    assert has_transfer_log({"logs": [*junk, good]}, auth, evm_network)
    assert not has_transfer_log({"logs": junk}, auth, evm_network)
    assert not has_transfer_log({"logs": "not a list"}, auth, evm_network)
    assert not has_transfer_log({}, auth, evm_network)
