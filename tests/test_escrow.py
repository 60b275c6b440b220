"""The MPP session escrow on the real dev chain: opening, deposits, settlement, cooperative close.

Balances are checked exactly, for the payer, the payee and the escrow, around every money move.
Events are checked field by field. The forced close (time travel) is in test_escrow_forced.py,
voucher and amount rejections in test_escrow_vouchers.py, checks by hash in
test_escrow_outcomes.py.
"""

from __future__ import annotations

import pytest
from eth_account.signers.local import LocalAccount
from web3.logs import DISCARD

from gateway.chain.devchain import ESCROW_GRACE_PERIOD, DevChain
from gateway.rails.mpp.channel import ZERO_ADDRESS, Voucher, compute_channel_id
from gateway.rails.mpp.escrow import EscrowClient, EscrowError
from tests.chain_fixtures import *  # noqa: F403  (session fixtures: chain, ...)
from tests.chain_fixtures import new_account
from tests.escrow_fixtures import *  # noqa: F403  (escrow_client, payee)
from tests.escrow_fixtures import (
    balance,
    escrow_contract,
    new_salt,
    open_channel,
    top_up_auth,
    voucher,
    w3,
)


async def test_escrow_deployed_with_the_spec_grace_period(chain: DevChain,
                                                          escrow_client: EscrowClient) -> None:
    assert await escrow_client.close_grace_period() == ESCROW_GRACE_PERIOD == 900
    assert escrow_contract(chain).functions.MIN_CLOSE_GRACE_PERIOD().call() == 600
    assert chain.escrow_grace_period == 900


async def test_payer_funded_open(chain: DevChain, escrow_client: EscrowClient,
                                 payee: LocalAccount) -> None:
    """``open`` (feePayer false): the payer approves and opens, paying its own gas; the channel
    id is the one computed off-chain and by the contract's computeChannelId."""
    payer = new_account(chain, tokens=5_000, eth=10**17)
    salt = new_salt()
    escrow_before = balance(chain, chain.escrow)
    outcome = await escrow_client.open(payer.key.to_0x_hex(), payee=payee.address,
                                       deposit=4_000, salt=salt)
    channel_id = compute_channel_id(payer=payer.address, payee=payee.address,
                                    token=chain.token, salt=salt, escrow=chain.escrow,
                                    chain_id=chain.chain_id)
    assert escrow_contract(chain).functions.computeChannelId(
        payer.address, payee.address, chain.token, bytes.fromhex(salt[2:]), ZERO_ADDRESS
    ).call() == bytes.fromhex(channel_id[2:])
    assert outcome.event == "ChannelOpened"
    assert dict(outcome.args) == {"channelId": channel_id, "payer": payer.address,
                                  "payee": payee.address, "token": chain.token,
                                  "authorizedSigner": ZERO_ADDRESS, "deposit": 4_000}
    channel = await escrow_client.get_channel(channel_id)
    assert (channel.exists, channel.payer, channel.payee, channel.token, channel.deposit,
            channel.settled, channel.close_requested_at, channel.finalized) == (
        True, payer.address, payee.address, chain.token, 4_000, 0, 0, False)
    assert channel.voucher_signer == payer.address
    assert balance(chain, payer.address) == 1_000
    assert balance(chain, chain.escrow) == escrow_before + 4_000


async def test_open_with_authorization_relayer_pays_gas(
        chain: DevChain, escrow_client: EscrowClient, payee: LocalAccount) -> None:
    """``openWithAuthorization`` (feePayer true): the payer holds no ETH and sends nothing;
    the relayer submits and pays; the deposit moves by ReceiveWithAuthorization."""
    delegate = new_account(chain)
    relayer_eth = w3(chain).eth.get_balance(chain.relayer_address)
    escrow_before = balance(chain, chain.escrow)
    opened = await open_channel(escrow_client, chain, payee.address, deposit=7_000,
                                funding=10_000, authorized_signer=delegate.address)
    assert w3(chain).eth.get_balance(opened.payer) == 0
    assert w3(chain).eth.get_balance(chain.relayer_address) < relayer_eth
    assert dict(opened.outcome.args) == {
        "channelId": opened.channel_id, "payer": opened.payer, "payee": payee.address,
        "token": chain.token, "authorizedSigner": delegate.address, "deposit": 7_000}
    channel = await escrow_client.get_channel(opened.channel_id)
    assert channel.deposit == 7_000 and channel.voucher_signer == delegate.address
    assert balance(chain, opened.payer) == 3_000
    assert balance(chain, chain.escrow) == escrow_before + 7_000


async def test_settle_pays_the_delta_and_rejects_replays(
        chain: DevChain, escrow_client: EscrowClient, payee: LocalAccount) -> None:
    opened = await open_channel(escrow_client, chain, payee.address, deposit=10_000)
    escrow_before = balance(chain, chain.escrow)
    first = await escrow_client.settle(payee.key.to_0x_hex(), voucher(
        escrow_client, opened.payer_key, opened.channel_id, 2_500))
    assert first.event == "Settled"
    assert dict(first.args) == {"channelId": opened.channel_id, "payer": opened.payer,
                                "payee": payee.address, "cumulativeAmount": 2_500,
                                "deltaPaid": 2_500, "newSettled": 2_500}
    second = await escrow_client.settle(payee.key.to_0x_hex(), voucher(
        escrow_client, opened.payer_key, opened.channel_id, 6_000))
    assert (second.args["deltaPaid"], second.args["newSettled"]) == (3_500, 6_000)
    assert balance(chain, payee.address) >= 6_000
    assert balance(chain, chain.escrow) == escrow_before - 6_000
    channel = await escrow_client.get_channel(opened.channel_id)
    assert (channel.deposit, channel.settled, channel.available) == (10_000, 6_000, 4_000)
    # Rollback prevention: an older or the same voucher moves nothing.
    for amount in (2_500, 6_000):
        with pytest.raises(EscrowError) as info:
            await escrow_client.settle(payee.key.to_0x_hex(), voucher(
                escrow_client, opened.payer_key, opened.channel_id, amount))
        assert info.value.error == "AmountNotIncreasing"
        assert info.value.code == "transaction-reverted" and info.value.status == 409
    assert (await escrow_client.get_channel(opened.channel_id)).settled == 6_000


async def test_cooperative_close_pays_exactly_the_voucher(
        chain: DevChain, escrow_client: EscrowClient, payee: LocalAccount) -> None:
    """close(7000) after settle(2500) on a 10000 deposit: the payee gets 4500 more (7000 in
    all), the payer gets 3000 back, the escrow keeps nothing of the channel."""
    opened = await open_channel(escrow_client, chain, payee.address, deposit=10_000,
                                funding=12_000)
    await escrow_client.settle(payee.key.to_0x_hex(), voucher(
        escrow_client, opened.payer_key, opened.channel_id, 2_500))
    before = {who: balance(chain, who) for who in (opened.payer, payee.address, chain.escrow)}
    outcome = await escrow_client.close(payee.key.to_0x_hex(), voucher(
        escrow_client, opened.payer_key, opened.channel_id, 7_000))
    assert balance(chain, payee.address) == before[payee.address] + 4_500
    assert balance(chain, opened.payer) == before[opened.payer] + 3_000 == 5_000
    assert balance(chain, chain.escrow) == before[chain.escrow] - 7_500
    assert outcome.event == "ChannelClosed"
    assert dict(outcome.args) == {"channelId": opened.channel_id, "payer": opened.payer,
                                  "payee": payee.address, "settledToPayee": 7_000,
                                  "refundedToPayer": 3_000}
    settled = escrow_contract(chain).events.Settled().process_receipt(
        w3(chain).eth.get_transaction_receipt(outcome.tx_hash), errors=DISCARD)
    assert [(e["args"]["deltaPaid"], e["args"]["newSettled"]) for e in settled] == [
        (4_500, 7_000)]
    channel = await escrow_client.get_channel(opened.channel_id)
    assert (channel.finalized, channel.settled, channel.deposit) == (True, 7_000, 10_000)
    # Finalized for good: no second close, settle, top-up, request or withdraw.
    with pytest.raises(EscrowError) as info:
        await escrow_client.close(payee.key.to_0x_hex(), voucher(
            escrow_client, opened.payer_key, opened.channel_id, 9_000))
    assert (info.value.error, info.value.code, info.value.status) == (
        "ChannelFinalized", "channel-finalized", 410)


async def test_close_forfeit_needs_no_signature(
        chain: DevChain, escrow_client: EscrowClient, payee: LocalAccount) -> None:
    """close at or below the settled amount forfeits the rest: no signature needed, nothing
    more to the payee, everything unsettled back to the payer."""
    opened = await open_channel(escrow_client, chain, payee.address, deposit=5_000)
    await escrow_client.settle(payee.key.to_0x_hex(), voucher(
        escrow_client, opened.payer_key, opened.channel_id, 1_000))
    payee_before = balance(chain, payee.address)
    outcome = await escrow_client.close(payee.key.to_0x_hex(), Voucher(
        channel_id=opened.channel_id, cumulative_amount=0, signature="0x"))
    assert (outcome.args["settledToPayee"], outcome.args["refundedToPayer"]) == (1_000, 4_000)
    assert balance(chain, payee.address) == payee_before
    assert balance(chain, opened.payer) == 4_000


async def test_close_without_settling_first(
        chain: DevChain, escrow_client: EscrowClient, payee: LocalAccount) -> None:
    opened = await open_channel(escrow_client, chain, payee.address, deposit=5_000)
    payee_before, escrow_before = balance(chain, payee.address), balance(chain, chain.escrow)
    outcome = await escrow_client.close(payee.key.to_0x_hex(), voucher(
        escrow_client, opened.payer_key, opened.channel_id, 5_000))
    assert (outcome.args["settledToPayee"], outcome.args["refundedToPayer"]) == (5_000, 0)
    assert balance(chain, payee.address) == payee_before + 5_000
    assert balance(chain, opened.payer) == 0
    assert balance(chain, chain.escrow) == escrow_before - 5_000


async def test_top_up_by_the_payer(chain: DevChain, escrow_client: EscrowClient,
                                   payee: LocalAccount) -> None:
    payer = new_account(chain, tokens=9_000, eth=10**17)
    salt = new_salt()
    opened = await escrow_client.open(payer.key.to_0x_hex(), payee=payee.address,
                                      deposit=3_000, salt=salt)
    channel_id = opened.args["channelId"]
    escrow_before = balance(chain, chain.escrow)
    outcome = await escrow_client.top_up(payer.key.to_0x_hex(), channel_id, 4_000)
    assert dict(outcome.args) == {"channelId": channel_id, "payer": payer.address,
                                  "payee": payee.address, "additionalDeposit": 4_000,
                                  "newDeposit": 7_000}
    assert (await escrow_client.get_channel(channel_id)).deposit == 7_000
    assert balance(chain, payer.address) == 2_000
    assert balance(chain, chain.escrow) == escrow_before + 4_000
    # A voucher up to the new deposit settles.
    settled = await escrow_client.settle(payee.key.to_0x_hex(), voucher(
        escrow_client, payer.key.to_0x_hex(), channel_id, 6_500))
    assert settled.args["deltaPaid"] == 6_500
    # Only the payer may top up this way.
    stranger = new_account(chain, tokens=1_000, eth=10**17)
    with pytest.raises(EscrowError) as info:
        await escrow_client.top_up(stranger.key.to_0x_hex(), channel_id, 1_000)
    assert info.value.error == "NotPayer"


async def test_top_up_with_authorization(chain: DevChain, escrow_client: EscrowClient,
                                         payee: LocalAccount) -> None:
    """The relayer submits; the payer (no ETH) and a third party (no ETH) may fund; the
    refund on close still goes to the payer."""
    opened = await open_channel(escrow_client, chain, payee.address, deposit=2_000,
                                funding=5_000)
    auth, salt = top_up_auth(escrow_client, opened.payer_key, opened.channel_id, 3_000)
    outcome = await escrow_client.top_up_with_authorization(
        auth, channel_id=opened.channel_id, top_up_salt=salt)
    assert dict(outcome.args) == {"channelId": opened.channel_id, "payer": opened.payer,
                                  "payee": payee.address, "additionalDeposit": 3_000,
                                  "newDeposit": 5_000}
    friend = new_account(chain, tokens=1_500)
    auth, salt = top_up_auth(escrow_client, friend.key.to_0x_hex(), opened.channel_id, 1_500)
    outcome = await escrow_client.top_up_with_authorization(
        auth, channel_id=opened.channel_id, top_up_salt=salt)
    assert outcome.args["newDeposit"] == 6_500 and outcome.args["payer"] == opened.payer
    assert balance(chain, friend.address) == 0 and balance(chain, opened.payer) == 0
    closed = await escrow_client.close(payee.key.to_0x_hex(), voucher(
        escrow_client, opened.payer_key, opened.channel_id, 500))
    assert closed.args["refundedToPayer"] == 6_000
    assert balance(chain, opened.payer) == 6_000 and balance(chain, friend.address) == 0


async def test_zero_deposits_and_unknown_channels(
        chain: DevChain, escrow_client: EscrowClient, payee: LocalAccount) -> None:
    payer = new_account(chain, tokens=1_000, eth=10**17)
    with pytest.raises(EscrowError) as info:
        await escrow_client.open(payer.key.to_0x_hex(), payee=payee.address, deposit=0,
                                 salt=new_salt())
    assert info.value.error == "ZeroDeposit" and not info.value.mined
    with pytest.raises(EscrowError) as info:
        await escrow_client.open(payer.key.to_0x_hex(), payee=ZERO_ADDRESS, deposit=10,
                                 salt=new_salt())
    assert info.value.error == "InvalidPayee"
    missing = new_salt()
    assert not (await escrow_client.get_channel(missing)).exists
    with pytest.raises(EscrowError) as info:
        await escrow_client.settle(payee.key.to_0x_hex(), voucher(
            escrow_client, payer.key.to_0x_hex(), missing, 1))
    assert (info.value.error, info.value.code, info.value.status) == (
        "ChannelNotFound", "channel-not-found", 410)
    for call in (escrow_client.request_close, escrow_client.withdraw):
        with pytest.raises(EscrowError, match="ChannelNotFound"):
            await call(payer.key.to_0x_hex(), missing)
    opened = await escrow_client.open(payer.key.to_0x_hex(), payee=payee.address,
                                      deposit=600, salt=new_salt())
    with pytest.raises(EscrowError, match="ZeroDeposit"):
        await escrow_client.top_up(payer.key.to_0x_hex(), opened.args["channelId"], 0)


async def test_access_control(chain: DevChain, escrow_client: EscrowClient,
                              payee: LocalAccount) -> None:
    """Payee-only settle/close, payer-only requestClose/withdraw."""
    opened = await open_channel(escrow_client, chain, payee.address, deposit=1_000)
    someone = new_account(chain, eth=10**17)  # neither payer nor payee, with gas money
    signed = voucher(escrow_client, opened.payer_key, opened.channel_id, 100)
    for call in (escrow_client.settle, escrow_client.close):
        with pytest.raises(EscrowError) as info:
            await call(someone.key.to_0x_hex(), signed)
        assert info.value.error == "NotPayee"
    for action in (escrow_client.request_close, escrow_client.withdraw):
        with pytest.raises(EscrowError) as info:
            await action(payee.key.to_0x_hex(), opened.channel_id)
        assert info.value.error == "NotPayer"
    # withdraw by the payer without a close request: CloseNotReady (payer needs gas here).
    payer_with_gas = new_account(chain, tokens=1_000, eth=10**17)
    own = await escrow_client.open(payer_with_gas.key.to_0x_hex(), payee=payee.address,
                                   deposit=1_000, salt=new_salt())
    with pytest.raises(EscrowError) as info:
        await escrow_client.withdraw(payer_with_gas.key.to_0x_hex(), own.args["channelId"])
    assert info.value.error == "CloseNotReady"
