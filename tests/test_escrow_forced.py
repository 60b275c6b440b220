"""Forced close on the real dev chain: requestClose, the grace period, withdraw; top-ups that
cancel (or do not cancel) a pending close.

These tests move the chain's clock forward (``evm_setTime``, on anvil and on the eth-tester
backend alike), so they run on a chain of their own: the session chain's clock stays on the
wall clock for everyone else. Authorizations here are valid for days, so the jumps do not
expire them.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import pytest
import pytest_asyncio
from eth_account.signers.local import LocalAccount
from web3.logs import DISCARD

from gateway.chain.devchain import ESCROW_GRACE_PERIOD, DevChain, start_chain
from gateway.rails.mpp.escrow import EscrowClient, EscrowError
from tests.chain_fixtures import new_account
from tests.escrow_fixtures import (
    balance,
    chain_now,
    escrow_contract,
    mined,
    network_of,
    new_salt,
    open_channel,
    rpc,
    simulate,
    top_up_auth,
    voucher,
    w3,
)

DAYS = 10 * 86_400


@pytest.fixture(scope="module")
def own_chain() -> Iterator[DevChain]:
    with start_chain(wallets=0) as running:
        yield running


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def client(own_chain: DevChain) -> AsyncIterator[EscrowClient]:
    escrow = EscrowClient(network_of(own_chain), own_chain.escrow, poll_interval=0.02)
    yield escrow
    await escrow.aclose()


@pytest.fixture(scope="module")
def merchant(own_chain: DevChain) -> LocalAccount:
    return new_account(own_chain, eth=10**18)


def travel_to(chain: DevChain, timestamp: int) -> None:
    """Put the chain's clock at ``timestamp``: the next block is mined at it (or just after)."""
    rpc(chain, "evm_setTime", timestamp)
    rpc(chain, "evm_mine")
    assert chain_now(chain) >= timestamp


async def test_withdraw_only_after_the_grace_period(own_chain: DevChain, client: EscrowClient,
                                                    merchant: LocalAccount) -> None:
    payer = new_account(own_chain, eth=10**18)
    payer_key = payer.key.to_0x_hex()
    opened = await open_channel(client, own_chain, merchant.address, deposit=10_000,
                                payer_key=payer_key, funding=10_000, valid_for=DAYS)
    await client.settle(merchant.key.to_0x_hex(), voucher(client, payer_key,
                                                           opened.channel_id, 3_000))
    # No close requested: the payer cannot withdraw at all.
    with pytest.raises(EscrowError, match="CloseNotReady"):
        await client.withdraw(payer_key, opened.channel_id)

    requested = await client.request_close(payer_key, opened.channel_id)
    block_time = w3(own_chain).eth.get_block(requested.block_number)["timestamp"]
    assert requested.event == "CloseRequested"
    assert dict(requested.args) == {"channelId": opened.channel_id, "payer": payer.address,
                                    "payee": merchant.address,
                                    "closeGraceEnd": block_time + ESCROW_GRACE_PERIOD}
    channel = await client.get_channel(opened.channel_id)
    assert channel.close_requested_at == block_time and not channel.finalized
    # Asking again changes nothing: no event, the first request's clock keeps running.
    again = await client.request_close(payer_key, opened.channel_id)
    assert again.event is None
    assert (await client.get_channel(opened.channel_id)).close_requested_at == block_time

    # Too early: refused in simulation, and a transaction sent anyway reverts on-chain.
    with pytest.raises(EscrowError) as info:
        await client.withdraw(payer_key, opened.channel_id)
    assert info.value.error == "CloseNotReady" and not info.value.mined
    fn = escrow_contract(own_chain).functions.withdraw(bytes.fromhex(opened.channel_id[2:]))
    assert mined(own_chain, payer_key, fn)["status"] == 0

    # The payee may still settle during the grace period.
    await client.settle(merchant.key.to_0x_hex(), voucher(client, payer_key,
                                                           opened.channel_id, 4_000))
    travel_to(own_chain, block_time + ESCROW_GRACE_PERIOD - 60)
    assert simulate(fn, payer.address) == "CloseNotReady"
    with pytest.raises(EscrowError, match="CloseNotReady"):
        await client.withdraw(payer_key, opened.channel_id)

    travel_to(own_chain, block_time + ESCROW_GRACE_PERIOD)
    before = {who: balance(own_chain, who)
              for who in (payer.address, merchant.address, own_chain.escrow)}
    withdrawn = await client.withdraw(payer_key, opened.channel_id)
    assert dict(withdrawn.args) == {"channelId": opened.channel_id, "payer": payer.address,
                                    "payee": merchant.address, "settledToPayee": 4_000,
                                    "refundedToPayer": 6_000}
    assert balance(own_chain, payer.address) == before[payer.address] + 6_000
    assert balance(own_chain, merchant.address) == before[merchant.address]
    assert balance(own_chain, own_chain.escrow) == before[own_chain.escrow] - 6_000
    channel = await client.get_channel(opened.channel_id)
    assert channel.finalized and (channel.deposit, channel.settled) == (10_000, 4_000)

    # Finalized: nothing more moves, whoever asks.
    late = voucher(client, payer_key, opened.channel_id, 9_000)
    for call, key in ((client.settle, merchant), (client.close, merchant)):
        with pytest.raises(EscrowError, match="ChannelFinalized"):
            await call(key.key.to_0x_hex(), late)
    for action in (client.withdraw, client.request_close):
        with pytest.raises(EscrowError, match="ChannelFinalized"):
            await action(payer_key, opened.channel_id)
    with pytest.raises(EscrowError, match="ChannelFinalized"):
        await client.top_up(payer_key, opened.channel_id, 1)


async def test_payer_top_up_cancels_a_pending_close(own_chain: DevChain, client: EscrowClient,
                                                    merchant: LocalAccount) -> None:
    payer = new_account(own_chain, tokens=5_000, eth=10**18)
    payer_key = payer.key.to_0x_hex()
    opened = await client.open(payer_key, payee=merchant.address, deposit=2_000,
                               salt=new_salt())
    channel_id = opened.args["channelId"]
    requested = await client.request_close(payer_key, channel_id)
    topped = await client.top_up(payer_key, channel_id, 1_000)
    receipt = w3(own_chain).eth.get_transaction_receipt(topped.tx_hash)
    cancelled = escrow_contract(own_chain).events.CloseRequestCancelled().process_receipt(
        receipt, errors=DISCARD)
    assert [dict(e["args"]) for e in cancelled] == [{
        "channelId": bytes.fromhex(channel_id[2:]), "payer": payer.address,
        "payee": merchant.address}]
    assert (await client.get_channel(channel_id)).close_requested_at == 0
    # The old request no longer counts, however long ago it was.
    travel_to(own_chain, requested.args["closeGraceEnd"] + 60)
    with pytest.raises(EscrowError, match="CloseNotReady"):
        await client.withdraw(payer_key, channel_id)


async def test_only_the_payers_relayed_top_up_cancels_a_close(
        own_chain: DevChain, client: EscrowClient, merchant: LocalAccount) -> None:
    """A top-up by anyone else adds money but leaves the payer's close running: otherwise the
    payee could top up 1 unit before every grace period ends and block the forced close."""
    payer = new_account(own_chain, eth=10**18)
    payer_key = payer.key.to_0x_hex()
    opened = await open_channel(client, own_chain, merchant.address, deposit=2_000,
                                payer_key=payer_key, funding=5_000, valid_for=DAYS)
    requested = await client.request_close(payer_key, opened.channel_id)
    since = (await client.get_channel(opened.channel_id)).close_requested_at
    griefer = new_account(own_chain, tokens=1)
    auth, salt = top_up_auth(client, griefer.key.to_0x_hex(), opened.channel_id, 1,
                             valid_for=DAYS)
    topped = await client.top_up_with_authorization(auth, channel_id=opened.channel_id,
                                                    top_up_salt=salt)
    assert topped.args["newDeposit"] == 2_001
    assert (await client.get_channel(opened.channel_id)).close_requested_at == since
    travel_to(own_chain, requested.args["closeGraceEnd"])
    withdrawn = await client.withdraw(payer_key, opened.channel_id)
    assert withdrawn.args["refundedToPayer"] == 2_001
    assert balance(own_chain, payer.address) == 5_001

    # The payer's own relayed top-up does cancel its close.
    second = await open_channel(client, own_chain, merchant.address, deposit=1_000,
                                payer_key=payer_key, funding=0, valid_for=DAYS)
    await client.request_close(payer_key, second.channel_id)
    auth, salt = top_up_auth(client, payer_key, second.channel_id, 1_000, valid_for=DAYS)
    await client.top_up_with_authorization(auth, channel_id=second.channel_id,
                                           top_up_salt=salt)
    assert (await client.get_channel(second.channel_id)).close_requested_at == 0
