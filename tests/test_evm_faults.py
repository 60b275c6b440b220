"""Fault injection into EIP-3009 settlement on a real dev chain.

Faults come from two places: real chain behaviour (a third party relays the payer's
authorization first, the payer moves the money away, another process takes the relayer's
nonce, a relayer with no gas money) triggered at a precise moment by a hook in
:class:`~tests.chain_fixtures.RpcProxy`, or answers the proxy alters (a receipt without the
Transfer log, no receipt at all, a node that stops answering, garbage). Nothing mocks the
settler or the chain.
"""

from __future__ import annotations

import dataclasses
import secrets
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import pytest
import pytest_asyncio
from eth_abi import encode
from eth_account import Account

from gateway.chain.devchain import DevChain, start_chain
from gateway.errors import PaymentRejected, ServiceUnavailable, UpstreamError
from gateway.rails.eip3009 import TRANSFER_TOPIC, has_transfer_log
from gateway.rails.evm import (
    ERR_INSUFFICIENT_BALANCE,
    ERR_NONCE_USED,
    ERR_TRANSACTION_STATE,
    ERR_TRANSFER_EVENT_MISMATCH,
    ERR_VALID_BEFORE,
    EvmNetwork,
    EvmSettler,
    SettlementNotSubmitted,
)
from tests.chain_fixtures import *  # noqa: F403  (session fixtures: chain, evm_network, settler)
from tests.chain_fixtures import (
    PAY_TO,
    Forward,
    Hook,
    Raw,
    RpcProxy,
    make_auth,
    new_account,
    relay_authorization,
    rpc_error,
    rpc_result,
    send_as,
    via,
)

pytestmark = pytest.mark.timeout(60)

SINK = Account.from_key("0x" + "51" * 32).address  # where a drained payer's money goes


@pytest.fixture(scope="module")
def front_runner(chain: DevChain) -> str:
    """A third party with gas money, relaying authorizations it has seen."""
    return str(new_account(chain, eth=10**18).key.to_0x_hex())


@pytest_asyncio.fixture
async def fresh_settler() -> AsyncIterator[EvmSettler]:
    settler = EvmSettler(poll_interval=0.02)
    yield settler
    await settler.aclose()


def once(action: Callable[[], None]) -> Hook:
    """A hook that runs ``action`` on the chain before forwarding the first request only."""
    done: list[bool] = []

    def hook(req: dict[str, Any], forward: Forward) -> dict[str, Any]:
        if not done:
            done.append(True)
            action()
        return forward(req)
    return hook


def new_payer(chain: DevChain, tokens: int) -> str:
    return str(new_account(chain, tokens=tokens).key.to_0x_hex())


# --------------------------------------------------------------------------- after verify


@pytest.mark.parametrize("stage", ["eth_estimateGas", "eth_sendRawTransaction"],
                         ids=["before-simulation", "before-mining"])
@pytest.mark.parametrize("fault", ["balance-moved", "used-by-someone-else"])
async def test_settlement_fails_after_verification_passed(
        fault: str, stage: str, chain: DevChain, evm_network: EvmNetwork,
        settler: EvmSettler, fresh_settler: EvmSettler, rpc_proxy: RpcProxy,
        front_runner: str) -> None:
    """Verification passes; then, just before the simulation or just before our transaction
    reaches the chain, the payer's balance moves away or a third party relays the same
    authorization. Settlement fails with the matching code and the merchant gets nothing
    from us (only the front-runner's own transfer, once). Caught by the simulation, no
    transaction is sent; caught on-chain, the reverted transaction is reported."""
    network = via(rpc_proxy, evm_network)
    key = new_payer(chain, 7_000)
    auth = make_auth(network, key, value=7_000)
    await fresh_settler.verify(auth, pay_to=PAY_TO, amount=7_000, network=network)
    merchant = await settler.balance_of(PAY_TO, evm_network)

    def act() -> None:
        if fault == "balance-moved":
            drain = make_auth(network, key, to=SINK, value=7_000)
            assert relay_authorization(chain, drain, front_runner)["status"] == 1
        else:
            assert relay_authorization(chain, auth, front_runner)["status"] == 1
    rpc_proxy.hooks[stage] = once(act)

    with pytest.raises(PaymentRejected) as info:
        await fresh_settler.settle(auth, network)
    expected = ERR_INSUFFICIENT_BALANCE if fault == "balance-moved" else ERR_NONCE_USED
    assert info.value.code == expected and info.value.status == 402
    moved = 7_000 if fault == "used-by-someone-else" else 0  # the front-runner's transfer
    assert await settler.balance_of(PAY_TO, evm_network) == merchant + moved
    if stage == "eth_estimateGas":
        assert "transaction" not in info.value.extra
        assert "eth_sendRawTransaction" not in rpc_proxy.seen  # no gas spent
    else:
        status = await settler.transaction_status(info.value.extra["transaction"], evm_network)
        assert status.state == "reverted"


# --------------------------------------------------------------------------- refused


async def test_relayer_without_gas_money_is_not_submitted(
        chain: DevChain, evm_network: EvmNetwork, settler: EvmSettler) -> None:
    """A real refusal: the relayer cannot pay gas (anvil refuses eth_sendRawTransaction,
    eth-tester already the simulation). Nothing was sent; the authorization stays usable."""
    broke = dataclasses.replace(evm_network, relayer_key=Account.create().key.to_0x_hex())
    key = new_payer(chain, 3_000)
    auth = make_auth(evm_network, key, value=3_000)
    with pytest.raises(SettlementNotSubmitted) as info:
        await settler.settle(auth, broke)
    assert info.value.status == 503 and "insufficient funds" in info.value.message.lower()
    assert not await settler.authorization_used(auth.from_, auth.nonce, evm_network)
    assert (await settler.settle(auth, evm_network)).amount == 3_000  # still good


async def test_refused_send_raw_transaction(chain: DevChain, evm_network: EvmNetwork,
                                            settler: EvmSettler, fresh_settler: EvmSettler,
                                            rpc_proxy: RpcProxy) -> None:
    """The node answers eth_sendRawTransaction with a JSON-RPC error: not submitted (503),
    never a raw web3 exception; the same authorization then settles."""
    rpc_proxy.hooks["eth_sendRawTransaction"] = lambda req, fwd: rpc_error(
        req, -32000, "exceeds block gas limit")
    auth = make_auth(evm_network, new_payer(chain, 2_000), value=2_000)
    with pytest.raises(SettlementNotSubmitted, match="exceeds block gas limit") as info:
        await fresh_settler.settle(auth, via(rpc_proxy, evm_network))
    assert "transaction" not in info.value.extra
    assert not await settler.authorization_used(auth.from_, auth.nonce, evm_network)
    assert (await settler.settle(auth, evm_network)).amount == 2_000


async def test_nonce_taken_by_another_process_is_retried(
        chain: DevChain, evm_network: EvmNetwork, settler: EvmSettler,
        fresh_settler: EvmSettler, rpc_proxy: RpcProxy) -> None:
    """Another process on the same relayer key sends at the nonce we just allocated (a real
    transaction, mined first): the node refuses ours "nonce too low"; we take the next."""
    def compete() -> None:  # the pending nonce is still the one our transaction carries
        receipt = send_as(chain, chain.relayer_key, {"to": chain.relayer_address, "value": 1},
                          gas=21_000)
        assert receipt["status"] == 1
    rpc_proxy.hooks["eth_sendRawTransaction"] = once(compete)
    auth = make_auth(evm_network, new_payer(chain, 2_500), value=2_500)
    result = await fresh_settler.settle(auth, via(rpc_proxy, evm_network))
    assert result.amount == 2_500
    assert rpc_proxy.seen.count("eth_sendRawTransaction") == 2
    assert (await settler.transaction_status(result.tx_hash, evm_network)).state == "success"


async def test_nonce_conflict_that_persists_gives_up(chain: DevChain, evm_network: EvmNetwork,
                                                     settler: EvmSettler,
                                                     fresh_settler: EvmSettler,
                                                     rpc_proxy: RpcProxy) -> None:
    rpc_proxy.hooks["eth_sendRawTransaction"] = lambda req, fwd: rpc_error(
        req, -32000, "nonce too low")
    auth = make_auth(evm_network, new_payer(chain, 1_500), value=1_500)
    with pytest.raises(SettlementNotSubmitted, match="nonce too low"):
        await fresh_settler.settle(auth, via(rpc_proxy, evm_network))
    assert rpc_proxy.seen.count("eth_sendRawTransaction") == 3
    assert not await settler.authorization_used(auth.from_, auth.nonce, evm_network)


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


# --------------------------------------------------------------------------- more refusals


async def test_node_refusing_a_reverting_transaction(chain: DevChain, evm_network: EvmNetwork,
                                                     settler: EvmSettler,
                                                     fresh_settler: EvmSettler,
                                                     rpc_proxy: RpcProxy) -> None:
    """Some nodes execute a transaction before taking it and refuse one that reverts: that is
    the payer's rejection (with the revert's code), and nothing was sent."""
    reason = "FiatTokenV2: authorization is used or canceled"
    rpc_proxy.hooks["eth_sendRawTransaction"] = lambda req, fwd: {
        "jsonrpc": "2.0", "id": req["id"], "error": {
            "code": 3, "message": f"execution reverted: {reason}",
            "data": "0x08c379a0" + encode(["string"], [reason]).hex()}}
    auth = make_auth(evm_network, new_payer(chain, 650), value=650)
    with pytest.raises(PaymentRejected) as info:
        await fresh_settler.settle(auth, via(rpc_proxy, evm_network))
    assert info.value.code == ERR_NONCE_USED and "transaction" not in info.value.extra
    assert not await settler.authorization_used(auth.from_, auth.nonce, evm_network)


@pytest.mark.parametrize("method", ["eth_getTransactionCount", "eth_gasPrice"])
async def test_failure_preparing_the_transaction_is_not_submitted(
        method: str, chain: DevChain, evm_network: EvmNetwork, fresh_settler: EvmSettler,
        rpc_proxy: RpcProxy) -> None:
    rpc_proxy.hooks[method] = lambda req, fwd: Raw(500, b"down", "text/plain")
    auth = make_auth(evm_network, chain.wallets[0].private_key, value=640)
    with pytest.raises(SettlementNotSubmitted) as info:
        await fresh_settler.settle(auth, via(rpc_proxy, evm_network))
    assert isinstance(info.value.__cause__, ServiceUnavailable)
    assert "eth_sendRawTransaction" not in rpc_proxy.seen


async def test_mined_revert_without_a_known_cause(chain: DevChain, evm_network: EvmNetwork,
                                                  settler: EvmSettler,
                                                  fresh_settler: EvmSettler,
                                                  rpc_proxy: RpcProxy) -> None:
    """A node that underestimates gas: our transaction is mined and runs out of gas. Not the
    nonce, not the balance, not the window: invalid_transaction_state, naming the transaction;
    the authorization stays usable."""
    def low_estimate(req: dict[str, Any], forward: Forward) -> dict[str, Any]:
        answer = forward(req)
        answer["result"] = hex(28_000)  # above the intrinsic cost, far below what it needs
        return answer
    rpc_proxy.hooks["eth_estimateGas"] = low_estimate
    auth = make_auth(evm_network, new_payer(chain, 630), value=630)
    with pytest.raises(PaymentRejected) as info:
        await fresh_settler.settle(auth, via(rpc_proxy, evm_network))
    assert info.value.code == ERR_TRANSACTION_STATE
    status = await settler.transaction_status(info.value.extra["transaction"], evm_network)
    assert status.state == "reverted"
    assert not await settler.authorization_used(auth.from_, auth.nonce, evm_network)


async def test_authorization_expiring_before_mining() -> None:
    """The chain's clock passes validBefore between the simulation and the block (a slow
    inclusion): the mined revert is explained as expired. Own chain: its clock jumps."""
    with start_chain(wallets=1, block_time=None) as own, RpcProxy(own.rpc_url) as proxy:
        jump: list[int] = [0]
        network = EvmNetwork(network=own.network, chain_id=own.chain_id, rpc_url=proxy.url,
                             asset=own.token, token_name=own.token_name,
                             token_version=own.token_version, relayer_key=own.relayer_key)
        auth = make_auth(network, own.wallets[0].private_key, value=620,
                         valid_before=int(time.time()) + 60)

        def late(req: dict[str, Any], forward: Forward) -> dict[str, Any]:
            jump[0] = 120
            body = httpx.post(own.rpc_url, json={"jsonrpc": "2.0", "id": 1, "method":
                                                 "evm_setTime", "params": [
                                                     int(time.time()) + jump[0]]}).json()
            assert "error" not in body, body
            return forward(req)
        proxy.hooks["eth_sendRawTransaction"] = late
        settler = EvmSettler(clock=lambda: time.time() + jump[0])
        try:
            with pytest.raises(PaymentRejected) as info:
                await settler.settle(auth, network)
        finally:
            await settler.aclose()
        assert info.value.code == ERR_VALID_BEFORE and "transaction" in info.value.extra
        assert not proxy.errors


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
