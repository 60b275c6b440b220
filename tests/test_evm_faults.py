"""Fault injection into getting an EIP-3009 settlement onto a real dev chain.

Faults are real chain behaviour (a third party relays the payer's authorization first, the
payer moves the money away, another process takes the relayer's nonce, a relayer with no gas
money, an authorization expiring before its block) fired at a precise moment by a hook in
:class:`~tests.chain_fixtures.RpcProxy`, or answers the proxy alters (a refusal, a low gas
estimate). Nothing mocks the settler or the chain. Receipts and status: test_evm_receipts.py.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import httpx
import pytest
from eth_abi import encode
from eth_account import Account

from gateway.chain.devchain import DevChain, start_chain
from gateway.errors import PaymentRejected, ServiceUnavailable
from gateway.rails.evm import (
    ERR_INSUFFICIENT_BALANCE,
    ERR_NONCE_USED,
    ERR_TRANSACTION_STATE,
    ERR_VALID_BEFORE,
    EvmNetwork,
    EvmSettler,
    SettlementNotSubmitted,
)
from tests.chain_fixtures import *  # noqa: F403  (session fixtures: chain, evm_network, settler)
from tests.chain_fixtures import (
    PAY_TO,
    Forward,
    Raw,
    RpcProxy,
    make_auth,
    new_payer,
    once,
    relay_authorization,
    rpc_error,
    send_as,
    via,
)

pytestmark = pytest.mark.timeout(60)

SINK = Account.from_key("0x" + "51" * 32).address  # where a drained payer's money goes


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
