"""Transactions by hash (the spec's Transaction Outcome Checks), the front-running defences of
the relayed deposits, channel re-use, and what the token's failures become.

Client-broadcast transactions are sent here with raw web3 as a client would; the gateway's
:class:`EscrowClient` only sees their hashes.
"""

from __future__ import annotations

import dataclasses
import secrets
from typing import Any

import pytest
from eth_account.signers.local import LocalAccount

from gateway.chain.devchain import DevChain
from gateway.errors import PaymentRejected, ServiceUnavailable, UpstreamError
from gateway.rails.mpp.channel import (
    ZERO_ADDRESS,
    compute_channel_id,
    open_nonce,
    sign_open_authorization,
)
from gateway.rails.mpp.escrow import EscrowClient, EscrowError
from tests.chain_fixtures import *  # noqa: F403  (session fixtures: chain, ...)
from tests.chain_fixtures import (
    RpcProxy,
    call_tx,
    full_token,
    new_account,
    rpc_error,
    rpc_result,
    send_as,
)
from tests.escrow_fixtures import *  # noqa: F403  (escrow_client, payee)
from tests.escrow_fixtures import (
    balance,
    deploy_escrow,
    deploy_source,
    escrow_contract,
    mined,
    network_of,
    new_salt,
    open_channel,
    top_up_auth,
    validity,
    voucher,
)


def client_open(chain: DevChain, payer: LocalAccount, payee: str, deposit: int, salt: str,
                escrow: str | None = None) -> dict[str, Any]:
    """What a client does for ``type="hash"``: approve, then open; the open's receipt."""
    escrow = escrow or chain.escrow
    key = payer.key.to_0x_hex()
    approve = full_token(chain).functions.approve(escrow, deposit)
    assert send_as(chain, key, call_tx(approve))["status"] == 1
    fn = escrow_contract(chain, escrow).functions.open(
        payee, chain.token, deposit, bytes.fromhex(salt[2:]), ZERO_ADDRESS)
    return mined(chain, key, fn)


def hash_of(receipt: dict[str, Any]) -> str:
    return "0x" + bytes(receipt["transactionHash"]).hex()


async def test_client_broadcast_open_checked_by_hash(
        chain: DevChain, escrow_client: EscrowClient, payee: LocalAccount) -> None:
    payer = new_account(chain, tokens=10_000, eth=10**18)
    salt = new_salt()
    receipt = client_open(chain, payer, payee.address, 4_000, salt)
    channel_id = compute_channel_id(payer=payer.address, payee=payee.address,
                                    token=chain.token, salt=salt, escrow=chain.escrow,
                                    chain_id=chain.chain_id)
    outcome = await escrow_client.check_open_transaction(hash_of(receipt),
                                                         channel_id=channel_id,
                                                         payee=payee.address)
    assert (outcome.event, outcome.args["deposit"], outcome.args["payer"]) == (
        "ChannelOpened", 4_000, payer.address)
    # Right transaction, wrong claims: another channel, another payee, another token.
    for claims in ({"channel_id": new_salt(), "payee": payee.address},
                   {"channel_id": channel_id, "payee": payer.address},
                   {"channel_id": channel_id, "payee": payee.address, "token": payer.address}):
        with pytest.raises(PaymentRejected) as info:
            await escrow_client.check_open_transaction(hash_of(receipt), **claims)
        assert info.value.code == "verification-failed"
    # A transaction that opened nothing (the approve before it), and no hash at all.
    approve = full_token(chain).functions.approve(chain.escrow, 1)
    other = send_as(chain, payer.key.to_0x_hex(), call_tx(approve))
    bogus: Any
    for bogus in (hash_of(other), "0x1234", 42):
        with pytest.raises(PaymentRejected, match=r"no ChannelOpened|not a transaction hash"):
            await escrow_client.check_open_transaction(bogus, channel_id=channel_id,
                                                       payee=payee.address)
    # The same open on another escrow deployment: the event is not from our contract.
    elsewhere = deploy_escrow(chain)
    foreign = client_open(chain, payer, payee.address, 1_000, salt, escrow=elsewhere)
    assert foreign["status"] == 1
    with pytest.raises(PaymentRejected, match="no ChannelOpened from the escrow"):
        await escrow_client.check_open_transaction(hash_of(foreign), channel_id=channel_id,
                                                   payee=payee.address)
    # Re-opening the same channel reverts on-chain: a definitive failure, with its reason.
    again = client_open(chain, payer, payee.address, 1_000, salt)
    assert again["status"] == 0
    with pytest.raises(EscrowError) as failed:
        await escrow_client.check_open_transaction(hash_of(again), channel_id=channel_id,
                                                   payee=payee.address)
    assert failed.value.mined and failed.value.error == "ChannelAlreadyExists"
    assert (failed.value.code, failed.value.status) == ("transaction-reverted", 409)
    assert failed.value.extra["transaction"] == hash_of(again)


async def test_client_broadcast_top_up_checked_by_hash(
        chain: DevChain, escrow_client: EscrowClient, payee: LocalAccount) -> None:
    payer = new_account(chain, tokens=10_000, eth=10**18)
    salt = new_salt()
    client_open(chain, payer, payee.address, 1_000, salt)
    channel_id = compute_channel_id(payer=payer.address, payee=payee.address,
                                    token=chain.token, salt=salt, escrow=chain.escrow,
                                    chain_id=chain.chain_id)
    key = payer.key.to_0x_hex()
    send_as(chain, key, call_tx(full_token(chain).functions.approve(chain.escrow, 2_500)))
    top_up = escrow_contract(chain).functions.topUp(bytes.fromhex(channel_id[2:]), 2_500)
    receipt = mined(chain, key, top_up)
    outcome = await escrow_client.check_top_up_transaction(
        hash_of(receipt), channel_id=channel_id, additional_deposit=2_500)
    assert outcome.args["newDeposit"] == 3_500
    with pytest.raises(PaymentRejected, match="added 2500, not 3000"):
        await escrow_client.check_top_up_transaction(hash_of(receipt), channel_id=channel_id,
                                                     additional_deposit=3_000)
    # A top-up by someone else than the payer reverts: NotPayer, found by replaying it.
    stranger = new_account(chain, tokens=100, eth=10**18)
    send_as(chain, stranger.key.to_0x_hex(),
            call_tx(full_token(chain).functions.approve(chain.escrow, 100)))
    reverted = mined(chain, stranger.key.to_0x_hex(), escrow_contract(chain).functions.topUp(
        bytes.fromhex(channel_id[2:]), 100))
    with pytest.raises(EscrowError) as info:
        await escrow_client.check_top_up_transaction(hash_of(reverted), channel_id=channel_id,
                                                     additional_deposit=100)
    assert info.value.error == "NotPayer" and info.value.mined


async def test_unmined_hash_waits_a_bounded_time(chain: DevChain) -> None:
    """No receipt is not a revert: the check waits, up to the receipt timeout, then 503."""
    network = dataclasses.replace(network_of(chain), receipt_timeout=0.3)
    client = EscrowClient(network, chain.escrow, poll_interval=0.02)
    try:
        with pytest.raises(ServiceUnavailable, match="no receipt"):
            await client.check_open_transaction("0x" + secrets.token_hex(32),
                                                channel_id=new_salt(), payee=ZERO_ADDRESS)
    finally:
        await client.aclose()


async def test_relayed_open_cannot_be_redirected(
        chain: DevChain, escrow_client: EscrowClient, payee: LocalAccount) -> None:
    """A front-runner who copies the payer's authorization from the mempool can neither change
    the channel (NonceMismatch) nor spend it at the token (only the escrow may receive)."""
    payer_key = new_account(chain, tokens=3_000).key.to_0x_hex()
    thief = new_account(chain, eth=10**18)
    salt = new_salt()
    auth = sign_open_authorization(payer_key, escrow_client.network, escrow=chain.escrow,
                                   payee=payee.address, deposit=3_000, salt=salt, **validity())
    assert auth.nonce == open_nonce(from_=auth.payer, payee=payee.address, token=chain.token,
                                    salt=salt)
    for changes in ({"payee": thief.address}, {"salt": new_salt()},
                    {"authorized_signer": thief.address}):
        with pytest.raises(EscrowError) as info:
            await escrow_client.open_with_authorization(auth, **{
                "payee": payee.address, "salt": salt, **changes})
        assert info.value.error == "NonceMismatch"
    v, r, s = auth.vrs()
    redirected = escrow_contract(chain).functions.openWithAuthorization(
        thief.address, chain.token, 3_000, bytes.fromhex(salt[2:]), ZERO_ADDRESS, auth.payer,
        auth.valid_after, auth.valid_before, bytes.fromhex(auth.nonce[2:]), r + s + bytes([v]))
    assert mined(chain, thief.key.to_0x_hex(), redirected)["status"] == 0
    direct = full_token(chain).functions.receiveWithAuthorization(
        auth.payer, chain.escrow, 3_000, auth.valid_after, auth.valid_before,
        bytes.fromhex(auth.nonce[2:]), v, r, s)
    assert mined(chain, thief.key.to_0x_hex(), direct)["status"] == 0
    assert balance(chain, auth.payer) == 3_000
    opened = await escrow_client.open_with_authorization(auth, payee=payee.address, salt=salt)
    assert opened.args["payee"] == payee.address and balance(chain, auth.payer) == 0
    # The authorization is spent: replaying it opens nothing (the channel exists anyway).
    with pytest.raises(EscrowError, match="ChannelAlreadyExists"):
        await escrow_client.open_with_authorization(auth, payee=payee.address, salt=salt)


async def test_relayed_top_up_cannot_be_redirected(
        chain: DevChain, escrow_client: EscrowClient, payee: LocalAccount) -> None:
    opened = await open_channel(escrow_client, chain, payee.address, deposit=100,
                                funding=1_100)
    other = await open_channel(escrow_client, chain, payee.address, deposit=100)
    auth, salt = top_up_auth(escrow_client, opened.payer_key, opened.channel_id, 1_000)
    for channel_id, top_up_salt in ((other.channel_id, salt), (opened.channel_id, new_salt())):
        with pytest.raises(EscrowError, match="NonceMismatch"):
            await escrow_client.top_up_with_authorization(auth, channel_id=channel_id,
                                                          top_up_salt=top_up_salt)
    await escrow_client.top_up_with_authorization(auth, channel_id=opened.channel_id,
                                                  top_up_salt=salt)
    assert (await escrow_client.get_channel(opened.channel_id)).deposit == 1_100
    with pytest.raises(EscrowError) as info:  # spent
        await escrow_client.top_up_with_authorization(auth, channel_id=opened.channel_id,
                                                      top_up_salt=salt)
    assert "authorization is used" in info.value.error
    assert (info.value.code, info.value.status) == ("insufficient-balance", 402)


async def test_closed_channel_cannot_be_reopened(
        chain: DevChain, escrow_client: EscrowClient, payee: LocalAccount) -> None:
    """Channel Re-Use: the same inputs give the same id and the same voucher digests, so a
    finalized channel stays on record and cannot be opened again; its vouchers are dead."""
    payer = new_account(chain, tokens=4_000, eth=10**18)
    key = payer.key.to_0x_hex()
    salt = new_salt()
    first = await escrow_client.open(key, payee=payee.address, deposit=2_000, salt=salt)
    channel_id = first.args["channelId"]
    old = voucher(escrow_client, key, channel_id, 1_500)
    await escrow_client.close(payee.key.to_0x_hex(), old)
    with pytest.raises(EscrowError, match="ChannelAlreadyExists"):
        await escrow_client.open(key, payee=payee.address, deposit=2_000, salt=salt)
    with pytest.raises(EscrowError, match="ChannelFinalized"):
        await escrow_client.settle(payee.key.to_0x_hex(), old)
    fresh = await escrow_client.open(key, payee=payee.address, deposit=2_000,
                                     salt=new_salt())
    assert fresh.args["channelId"] != channel_id


async def test_token_failures_are_insufficient_balance(
        chain: DevChain, escrow_client: EscrowClient, payee: LocalAccount) -> None:
    """A pull the token refuses (balance, expiry, bad signature) is the spec's
    insufficient-balance, with the token's reason kept in ``error``."""
    poor = new_account(chain, tokens=10).key.to_0x_hex()
    with pytest.raises(EscrowError) as info:
        await open_channel(escrow_client, chain, payee.address, deposit=11, payer_key=poor)
    assert "exceeds balance" in info.value.error
    assert (info.value.code, info.value.status) == ("insufficient-balance", 402)
    salt = new_salt()
    expired = sign_open_authorization(poor, escrow_client.network, escrow=chain.escrow,
                                      payee=payee.address, deposit=5, salt=salt,
                                      valid_after=0, valid_before=1)
    with pytest.raises(EscrowError, match="authorization is expired"):
        await escrow_client.open_with_authorization(expired, payee=payee.address, salt=salt)
    forged = dataclasses.replace(expired, valid_before=2**40)  # signature no longer matches
    with pytest.raises(EscrowError, match="invalid signature"):
        await escrow_client.open_with_authorization(forged, payee=payee.address, salt=salt)


FEE_TOKEN = """
# pragma version 0.4.3
# An ERC-20 that keeps 1 unit of every transferFrom: the escrow must refuse its deposits.
balanceOf: public(HashMap[address, uint256])

@deploy
def __init__(holder: address):
    self.balanceOf[holder] = 10**9

@external
def transferFrom(sender: address, receiver: address, amount: uint256) -> bool:
    self.balanceOf[sender] -= amount
    self.balanceOf[receiver] += amount - 1
    return True

@external
def approve(spender: address, amount: uint256) -> bool:
    return True
"""


async def test_fee_on_transfer_token_refused(
        chain: DevChain, escrow_client: EscrowClient, payee: LocalAccount) -> None:
    payer = new_account(chain, eth=10**18)
    token = deploy_source(chain, FEE_TOKEN, payer.address)
    with pytest.raises(EscrowError) as info:
        await escrow_client.open(payer.key.to_0x_hex(), payee=payee.address, deposit=1_000,
                                 salt=new_salt(), token=token)
    assert info.value.error == "TransferFailed" and info.value.code == "insufficient-balance"


async def test_mined_revert_of_our_own_transaction(
        chain: DevChain, payee: LocalAccount) -> None:
    """A call whose simulation passed but which reverted when mined (a race: here a node that
    answers eth_estimateGas without simulating) is a definitive EscrowError carrying the hash
    and the reason found by replaying it; a receipt the node answers with an error is a 502
    naming the hash (the transaction may have landed)."""
    with RpcProxy(chain.rpc_url) as proxy:
        proxy.hooks["eth_estimateGas"] = lambda req, forward: rpc_result(req, hex(200_000))
        client = EscrowClient(dataclasses.replace(network_of(chain), rpc_url=proxy.url),
                              chain.escrow, poll_interval=0.02)
        try:
            with pytest.raises(EscrowError) as info:
                await client.settle(payee.key.to_0x_hex(), voucher(
                    client, payee.key.to_0x_hex(), new_salt(), 1))
            assert info.value.mined and info.value.error == "ChannelNotFound"
            assert info.value.extra["transaction"].startswith("0x")
            proxy.hooks["eth_getTransactionReceipt"] = lambda req, forward: rpc_error(
                req, -32000, "receipts are down")
            with pytest.raises(UpstreamError) as down:
                await client.request_close(payee.key.to_0x_hex(), new_salt())
            assert down.value.extra["transaction"].startswith("0x")
        finally:
            await client.aclose()
