"""Fault injection into x402 deposits (:class:`X402Deposits`), built from ``Settings`` on a real
Valkey and the dev chain: recovery at start-up of claims left unfinished, and settlement
failing after the claim (chain faults from :class:`~tests.chain_fixtures.RpcProxy`). The
remote facilitator client's faults are in test_evm_remote_facilitator.py.

Two of them were strict xfails of bugs in x402_deposits.py, fixed since.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import json
import secrets
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
import pytest_asyncio
from starlette.requests import Request

from gateway.chain.devchain import DevChain
from gateway.errors import PaymentRejected, ServiceUnavailable
from gateway.rail_settings import X402Settings
from gateway.rails.evm import (
    ERR_INSUFFICIENT_BALANCE,
    Eip3009Authorization,
    EvmNetwork,
    EvmSettler,
    SettlementNotSubmitted,
)
from gateway.rails.facilitator import LocalSettlement
from gateway.rails.x402_deposits import X402Deposits, payer_account_id
from gateway.rails.x402_recovery import settle_bound
from gateway.settings import Settings
from meters.connection import connect
from meters.deposits import Deposit
from meters.errors import AccountNotFound
from meters.ledger import Ledger
from tests.chain_fixtures import *  # noqa: F403  (session fixtures: chain, evm_network, settler)
from tests.chain_fixtures import (
    PAY_TO,
    RpcProxy,
    cancel_authorization,
    make_auth,
    mint,
    new_account,
    new_payer,
    payment,
    relay_authorization,
    rpc_error,
    rpc_result,
)

pytestmark = pytest.mark.timeout(60)

DEPOSIT = 200  # atomic units ("0.0002")


def rail_settings(chain: DevChain, rpc_url: str) -> Settings:
    return Settings.from_mapping({
        "key_prefix": f"xf{secrets.token_hex(4)}:",
        "x402": {"enabled": True, "pay_to": PAY_TO, "deposit": "0.0002",
                 "networks": {"local": {
                     "network": chain.network, "chain_id": chain.chain_id, "rpc_url": rpc_url,
                     "asset": chain.token, "token_name": chain.token_name,
                     "token_version": chain.token_version,
                     "relayer_key": chain.relayer_key}}}})


@pytest_asyncio.fixture
async def ledger_for(redis_url: str) -> AsyncIterator[Callable[[Settings], Ledger]]:
    ledgers: list[Ledger] = []

    def make(settings: Settings) -> Ledger:
        ledgers.append(Ledger(connect(redis_url), prefix=settings.key_prefix))
        return ledgers[-1]
    yield make
    for ledger in ledgers:
        await ledger.redis.aclose()


def http_request() -> Request:
    """The request a deposit arrives with (pay() only reads its URL for the challenge)."""
    return Request({"type": "http", "method": "POST", "path": "/v1/chat/completions",
                    "raw_path": b"/v1/chat/completions", "query_string": b"", "root_path": "",
                    "headers": [(b"host", b"127.0.0.1:8402")], "scheme": "http",
                    "server": ("127.0.0.1", 8402)})


def short_timeouts(rail: X402Deposits, **timeouts: float) -> None:
    """Settings cannot set the RPC/receipt timeouts (see the report); rebuild the rail's
    networks and local settlement with ``timeouts`` so a fault fails within the test."""
    rail.networks = {k: dataclasses.replace(n, **timeouts) for k, n in rail.networks.items()}
    rail.settlement = LocalSettlement(rail.settler, list(rail.networks.values()))
    rail.recovery.networks, rail.recovery.settlement = rail.networks, rail.settlement


async def claim(rail: X402Deposits, network: EvmNetwork, auth: Eip3009Authorization) -> str:
    """What a process does before settling (verify passed, claim written), then dies."""
    req = rail.accepts(0)[0]
    paid = payment(auth, req)
    deposit = Deposit(key=f"{network.network}:{network.asset.lower()}:"
                          f"{auth.payer.lower()}:{auth.nonce}",
                      account_id=payer_account_id(network.network, network.asset, auth.payer),
                      amount=req.amount, payer=auth.payer, network=network.network,
                      asset=network.asset,
                      payload=paid.model_dump_json(by_alias=True, exclude_none=True),
                      requirements=req.model_dump_json(by_alias=True))
    claimed, _ = await rail.deposits.begin(deposit)
    assert claimed
    return deposit.key


async def credited(ledger: Ledger, network: EvmNetwork, payer: str) -> int:
    try:
        account = await ledger.get_account(payer_account_id(network.network, network.asset,
                                                            payer))
    except AccountNotFound:
        return 0
    return account.credited


async def test_recovery_settles_a_still_valid_unused_claim(
        chain: DevChain, evm_network: EvmNetwork, settler: EvmSettler,
        ledger_for: Callable[[Settings], Ledger]) -> None:
    settings = rail_settings(chain, chain.rpc_url)
    ledger = ledger_for(settings)
    key = new_payer(chain, DEPOSIT)
    auth = make_auth(evm_network, key, value=DEPOSIT)
    dead = X402Deposits(settings, ledger)
    await claim(dead, evm_network, auth)
    await dead.aclose()  # died before settling
    restarted = X402Deposits(settings, ledger)
    try:
        # A claim younger than the longest a request may take to settle is left alone: its
        # request may still be on it.
        assert await restarted.recover(min_age=3600) == 0
        assert not await settler.authorization_used(auth.from_, auth.nonce, evm_network)
        assert await restarted.recover() == 1
        assert await restarted.recover() == 0
        assert await restarted.deposits.unfinished() == []
    finally:
        await restarted.aclose()
    assert await credited(ledger, evm_network, auth.payer) == DEPOSIT
    assert await settler.balance_of(auth.payer, evm_network) == 0
    assert await settler.authorization_used(auth.from_, auth.nonce, evm_network)


async def test_recovery_abandons_an_expired_unused_claim(
        chain: DevChain, evm_network: EvmNetwork, settler: EvmSettler,
        ledger_for: Callable[[Settings], Ledger]) -> None:
    settings = rail_settings(chain, chain.rpc_url)
    ledger = ledger_for(settings)
    key = new_payer(chain, DEPOSIT)
    now = int(time.time())
    auth = make_auth(evm_network, key, value=DEPOSIT, valid_after=now - 600,
                     valid_before=now - 1)
    rail = X402Deposits(settings, ledger)
    try:
        deposit_key = await claim(rail, evm_network, auth)
        assert await rail.recover() == 0
        assert await rail.deposits.get(deposit_key) is None
        assert await rail.deposits.unfinished() == []
    finally:
        await rail.aclose()
    assert await credited(ledger, evm_network, auth.payer) == 0
    assert await settler.balance_of(auth.payer, evm_network) == DEPOSIT
    assert not await settler.authorization_used(auth.from_, auth.nonce, evm_network)


async def test_settlement_failing_after_the_claim_abandons_it(
        chain: DevChain, evm_network: EvmNetwork, settler: EvmSettler, rpc_proxy: RpcProxy,
        ledger_for: Callable[[Settings], Ledger]) -> None:
    """Verified and claimed, then the payer's balance moves away before the simulation: 402
    with the code and a failed PAYMENT-RESPONSE, nothing credited, the claim released; once
    the wallet is funded again the same payment goes through, credited once."""
    settings = rail_settings(chain, rpc_proxy.url)
    ledger = ledger_for(settings)
    front_runner = str(new_account(chain, eth=10**17).key.to_0x_hex())
    key = new_payer(chain, DEPOSIT)
    auth = make_auth(evm_network, key, value=DEPOSIT)
    drained: list[bool] = []

    def drain_first(req: dict[str, Any], forward: Any) -> dict[str, Any]:
        if not drained:
            drained.append(True)
            away = make_auth(evm_network, key, to=new_account(chain).address, value=DEPOSIT)
            assert relay_authorization(chain, away, front_runner)["status"] == 1
        return dict(forward(req))
    rpc_proxy.hooks["eth_estimateGas"] = drain_first
    rail = X402Deposits(settings, ledger)
    try:
        paid = payment(auth, rail.accepts(0)[0])
        with pytest.raises(PaymentRejected) as info:
            await rail.pay(http_request(), paid, 0)
        assert info.value.code == ERR_INSUFFICIENT_BALANCE and info.value.status == 402
        response = json.loads(base64.b64decode(info.value.headers["PAYMENT-RESPONSE"]))
        assert response["success"] is False
        assert response["errorReason"] == ERR_INSUFFICIENT_BALANCE
        assert await rail.deposits.unfinished() == []
        assert await credited(ledger, evm_network, auth.payer) == 0
        mint(chain, auth.payer, DEPOSIT)
        result, _ = await rail.pay(http_request(), paid, 0)
        assert result.amount == DEPOSIT
    finally:
        await rail.aclose()
    assert await credited(ledger, evm_network, auth.payer) == DEPOSIT
    assert await settler.authorization_used(auth.from_, auth.nonce, evm_network)


async def test_unknown_outcome_keeps_the_claim_for_recovery(
        chain: DevChain, evm_network: EvmNetwork, settler: EvmSettler, rpc_proxy: RpcProxy,
        ledger_for: Callable[[Settings], Ledger]) -> None:
    """No receipt in time: 503 naming the transaction, the claim stays open (the transfer may
    land), and the next start's recovery asks the chain and credits it once."""
    settings = rail_settings(chain, rpc_proxy.url)
    ledger = ledger_for(settings)
    rpc_proxy.hooks["eth_getTransactionReceipt"] = lambda req, fwd: rpc_result(req, None)
    key = new_payer(chain, DEPOSIT)
    auth = make_auth(evm_network, key, value=DEPOSIT)
    rail = X402Deposits(settings, ledger)
    short_timeouts(rail, receipt_timeout=1.0)
    try:
        with pytest.raises(ServiceUnavailable) as info:
            await rail.pay(http_request(), payment(auth, rail.accepts(0)[0]), 0)
        tx = info.value.extra["transaction"]
        assert [r.deposit.payer for r in await rail.deposits.unfinished()] == [auth.payer]
        assert await credited(ledger, evm_network, auth.payer) == 0
    finally:
        await rail.aclose()
    assert (await settler.transaction_status(tx, evm_network)).state == "success"
    restarted = X402Deposits(settings.model_copy(update={"x402": rail_settings(
        chain, chain.rpc_url).x402}), ledger)
    try:
        assert await restarted.recover() == 1
    finally:
        await restarted.aclose()
    assert await credited(ledger, evm_network, auth.payer) == DEPOSIT


async def test_unknown_outcome_is_credited_by_the_running_rail(
        chain: DevChain, evm_network: EvmNetwork, settler: EvmSettler, rpc_proxy: RpcProxy,
        ledger_for: Callable[[Settings], Ledger]) -> None:
    """No receipt in time: 503 naming the transaction. The same payment sent again is told
    its settlement is pending (503 ``settlement_pending``, the transaction named), not that
    it was used. The running rail's periodic recovery leaves the claim alone while a request
    could still be on it, then credits it, without a restart; sent again after that, the
    payment is refused as used."""
    settings = rail_settings(chain, rpc_proxy.url)
    ledger = ledger_for(settings)
    rpc_proxy.hooks["eth_getTransactionReceipt"] = lambda req, fwd: rpc_result(req, None)
    key = new_payer(chain, DEPOSIT)
    auth = make_auth(evm_network, key, value=DEPOSIT)
    rail = X402Deposits(settings, ledger)
    short_timeouts(rail, receipt_timeout=1.0)
    rail.recovery.interval, rail.recovery.min_age = 0.1, 3600.0
    paid = payment(auth, rail.accepts(0)[0])
    try:
        await rail.start()  # recovery passes every 0.1 s from here on
        with pytest.raises(ServiceUnavailable) as info:
            await rail.pay(http_request(), paid, 0)
        tx = info.value.extra["transaction"]
        with pytest.raises(ServiceUnavailable) as again:
            await rail.pay(http_request(), paid, 0)
        assert again.value.code == "settlement_pending"
        assert again.value.extra == {"transaction": tx}
        assert await rail.recovery.recover(min_age=3600) == 0
        assert await credited(ledger, evm_network, auth.payer) == 0
        rail.recovery.min_age = 0.0  # the claim is now "older than any request"
        deadline = time.monotonic() + 20
        while await credited(ledger, evm_network, auth.payer) == 0:
            assert time.monotonic() < deadline, "the running rail never credited it"
            await asyncio.sleep(0.05)
        assert await rail.deposits.unfinished() == []
        with pytest.raises(PaymentRejected) as used:
            await rail.pay(http_request(), paid, 0)
        assert used.value.code == "invalid_exact_evm_nonce_already_used"
    finally:
        await rail.aclose()
    assert await credited(ledger, evm_network, auth.payer) == DEPOSIT
    assert (await settler.transaction_status(tx, evm_network)).state == "success"


async def test_one_process_at_a_time_settles_an_old_claim(
        chain: DevChain, evm_network: EvmNetwork, rpc_proxy: RpcProxy,
        ledger_for: Callable[[Settings], Ledger]) -> None:
    """Recovery runs in every process: a claim left settling is settled by the first process
    to take it up, and the others leave it (one transaction, not one per process)."""
    settings = rail_settings(chain, rpc_proxy.url)
    ledger = ledger_for(settings)
    key = new_payer(chain, DEPOSIT)
    auth = make_auth(evm_network, key, value=DEPOSIT)
    dead = X402Deposits(settings, ledger)
    await claim(dead, evm_network, auth)
    await dead.aclose()  # died before settling
    workers = [X402Deposits(settings, ledger) for _ in range(3)]
    rpc_proxy.seen.clear()
    try:
        done = await asyncio.gather(*(worker.recover() for worker in workers))
    finally:
        for worker in workers:
            await worker.aclose()
    assert sorted(done) == [0, 0, 1]
    assert rpc_proxy.seen.count("eth_sendRawTransaction") == 1
    assert await credited(ledger, evm_network, auth.payer) == DEPOSIT


def test_recovery_waits_past_the_longest_settlement() -> None:
    """A settling claim is taken up by recovery only past the longest a request can spend
    settling it: local, receipt wait plus ten RPC calls; remote, every /settle call and the
    pauses between them; a minute on top."""
    local = rail_settings_for_bound("local")
    assert settle_bound(local) == 120 + 10 * 10 + 60
    remote = rail_settings_for_bound("remote")
    assert settle_bound(remote) == 30 * (3 + 2) + 2 * 3 + 60


def rail_settings_for_bound(mode: str) -> X402Settings:
    return X402Settings.model_validate({
        "enabled": True, "mode": mode, "pay_to": PAY_TO,
        "facilitator_url": "https://facilitator.example/" if mode == "remote" else None,
        "networks": {"local": {"preset": "local", "asset": PAY_TO,
                               "relayer_key": "0x" + "1" * 64}}})


async def test_refused_settlement_releases_the_claim(
        chain: DevChain, evm_network: EvmNetwork, settler: EvmSettler, rpc_proxy: RpcProxy,
        ledger_for: Callable[[Settings], Ledger]) -> None:
    settings = rail_settings(chain, rpc_proxy.url)
    ledger = ledger_for(settings)
    rpc_proxy.hooks["eth_sendRawTransaction"] = lambda req, fwd: rpc_error(
        req, -32003, "insufficient funds for gas * price + value")
    key = new_payer(chain, DEPOSIT)
    auth = make_auth(evm_network, key, value=DEPOSIT)
    rail = X402Deposits(settings, ledger)
    try:
        paid = payment(auth, rail.accepts(0)[0])
        with pytest.raises(SettlementNotSubmitted):
            await rail.pay(http_request(), paid, 0)
        assert not await settler.authorization_used(auth.from_, auth.nonce, evm_network)
        assert await rail.deposits.unfinished() == []  # the claim was released
        del rpc_proxy.hooks["eth_sendRawTransaction"]  # the relayer is funded again
        result, _ = await rail.pay(http_request(), paid, 0)
        assert result.amount == DEPOSIT
    finally:
        await rail.aclose()
    assert await credited(ledger, evm_network, auth.payer) == DEPOSIT


async def test_recovery_does_not_credit_a_cancelled_authorization(
        chain: DevChain, evm_network: EvmNetwork, settler: EvmSettler,
        ledger_for: Callable[[Settings], Ledger]) -> None:
    settings = rail_settings(chain, chain.rpc_url)
    ledger = ledger_for(settings)
    key = new_payer(chain, DEPOSIT)
    auth = make_auth(evm_network, key, value=DEPOSIT)
    rail = X402Deposits(settings, ledger)
    try:
        await claim(rail, evm_network, auth)  # the process dies after claiming...
        receipt = cancel_authorization(chain, evm_network, key, auth.nonce, chain.relayer_key)
        assert receipt["status"] == 1  # ...and the payer cancels before anyone settles
        assert await settler.authorization_used(auth.from_, auth.nonce, evm_network)
        assert await settler.balance_of(auth.payer, evm_network) == DEPOSIT  # nothing moved
        assert await rail.recover() == 0  # not credited: nothing moved
    finally:
        await rail.aclose()
    assert await credited(ledger, evm_network, auth.payer) == 0
