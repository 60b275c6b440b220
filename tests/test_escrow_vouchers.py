"""Voucher verification on the real escrow, and the Python side agreeing with it case by case.

Every signature below goes both to :func:`verify_voucher` (Python, no chain) and to the escrow's
``settle`` (``eth_call`` from the payee): both accept it or both reject it, and the contract's
rejection is always ``InvalidSignature``. A few are also mined, to show the revert on-chain.
Amount rules (strictly increasing, deposit cap, uint128 bounds) and contract-wallet signers
(ERC-1271) follow.
"""

from __future__ import annotations

import pytest
from eth_abi import encode
from eth_account import Account
from eth_account.signers.local import LocalAccount
from eth_keys import keys
from eth_utils import function_signature_to_4byte_selector
from web3.exceptions import ContractLogicError

from gateway.chain.devchain import DevChain
from gateway.errors import InvalidPayment, PaymentRejected
from gateway.rails.eip3009 import SECP256K1_N
from gateway.rails.mpp.channel import (
    UINT128_MAX,
    Voucher,
    recover_voucher_signer,
    sign_open_authorization,
    verify_voucher,
)
from gateway.rails.mpp.escrow import EscrowClient, EscrowError
from tests.chain_fixtures import *  # noqa: F403  (session fixtures: chain, ...)
from tests.chain_fixtures import mint, new_account
from tests.escrow_fixtures import *  # noqa: F403  (escrow_client, payee)
from tests.escrow_fixtures import (
    deploy_escrow,
    deploy_source,
    escrow_contract,
    mined,
    new_salt,
    open_channel,
    simulate,
    top_up_auth,
    validity,
    voucher,
    w3,
)

SECP256K1_P = 2**256 - 2**32 - 977


def split(signature: str) -> tuple[int, int, int]:
    raw = bytes.fromhex(signature[2:])
    return int.from_bytes(raw[:32], "big"), int.from_bytes(raw[32:64], "big"), raw[64]


def pack(r: int, s: int, v: int) -> str:
    return "0x" + (r.to_bytes(32, "big") + s.to_bytes(32, "big") + bytes([v])).hex()


def not_an_x_coordinate() -> int:
    """The smallest x with no curve point (x^3 + 7 not a square mod p): no key recovers."""
    x = 1
    while pow(x**3 + 7, (SECP256K1_P - 1) // 2, SECP256K1_P) != SECP256K1_P - 1:
        x += 1
    return x


def settle_fn(chain: DevChain, channel_id: str, amount: int, signature: str) -> object:
    return escrow_contract(chain).functions.settle(
        bytes.fromhex(channel_id[2:]), amount, bytes.fromhex(signature[2:]))


def python_accepts(client: EscrowClient, channel: object, channel_id: str, amount: int,
                   signature: str) -> bool:
    try:
        verify_voucher(Voucher(channel_id, amount, signature), channel,  # type: ignore[arg-type]
                       chain_id=client.network.chain_id, escrow=client.escrow)
    except PaymentRejected as exc:
        assert exc.code in ("invalid-signature", "signer-mismatch")
        return False
    return True


async def test_python_and_contract_agree_on_every_signature(
        chain: DevChain, escrow_client: EscrowClient, payee: LocalAccount) -> None:
    opened = await open_channel(escrow_client, chain, payee.address, deposit=5_000)
    other = await open_channel(escrow_client, chain, payee.address, deposit=5_000)
    channel = await escrow_client.get_channel(opened.channel_id)
    stranger = Account.create().key.to_0x_hex()
    amount = 1_234
    good = voucher(escrow_client, opened.payer_key, opened.channel_id, amount).signature
    r, s, v = split(good)
    cases = {
        "valid": good,
        "signed for another channel": voucher(escrow_client, opened.payer_key,
                                              other.channel_id, amount).signature,
        "signed for another chain id": voucher(escrow_client, opened.payer_key,
                                               opened.channel_id, amount, chain_id=1).signature,
        "signed for another escrow": voucher(escrow_client, opened.payer_key, opened.channel_id,
                                             amount, escrow=deploy_escrow(chain)).signature,
        "signed for another amount": voucher(escrow_client, opened.payer_key,
                                             opened.channel_id, amount + 1).signature,
        "signed by a non-authorized key": voucher(escrow_client, stranger, opened.channel_id,
                                                  amount).signature,
        "high s (the malleable twin)": pack(r, SECP256K1_N - s, 55 - v),
        "v as 0/1": pack(r, s, v - 27),
        "v = 29": pack(r, s, 29),
        "r = 0": pack(0, s, v),
        "s = 0": pack(r, 0, v),
        "r = n": pack(SECP256K1_N, s, v),
        "r not on the curve": pack(not_an_x_coordinate(), s, v),
        "all zero": "0x" + "00" * 65,
        "empty": "0x",
        "64-byte compact (EIP-2098)": "0x" + (r.to_bytes(32, "big") + (
            ((v - 27) << 255) | s).to_bytes(32, "big")).hex(),
        "truncated": good[:-2],
    }
    verdicts = {}
    for name, signature in cases.items():
        ours = python_accepts(escrow_client, channel, opened.channel_id, amount, signature)
        theirs = simulate(settle_fn(chain, opened.channel_id, amount, signature), payee.address)
        assert theirs in (None, "InvalidSignature"), (name, theirs)
        assert ours == (theirs is None), f"{name}: python {ours}, contract {theirs!r}"
        verdicts[name] = ours
    assert [name for name, ok in verdicts.items() if ok] == ["valid"]
    # The high-s twin recovers the payer's address with a bare ecrecover: only the low-s rule
    # refuses it, on both sides.
    digest = escrow_contract(chain).functions.getVoucherDigest(
        bytes.fromhex(opened.channel_id[2:]), amount).call()
    twin = keys.Signature(vrs=(55 - v - 27, r, SECP256K1_N - s))
    assert twin.recover_public_key_from_msg_hash(digest).to_checksum_address() == opened.payer
    # Mined, the rejections revert on-chain and move nothing; then the valid one settles.
    for name in ("high s (the malleable twin)", "signed for another chain id",
                 "signed for another escrow", "signed by a non-authorized key"):
        receipt = mined(chain, payee.key.to_0x_hex(),
                        settle_fn(chain, opened.channel_id, amount, cases[name]))
        assert receipt["status"] == 0, name
    assert (await escrow_client.get_channel(opened.channel_id)).settled == 0
    settled = await escrow_client.settle(payee.key.to_0x_hex(),
                                         Voucher(opened.channel_id, amount, good))
    assert settled.args["deltaPaid"] == amount


async def test_authorized_signer_replaces_the_payer(
        chain: DevChain, escrow_client: EscrowClient, payee: LocalAccount) -> None:
    delegate = Account.create()
    opened = await open_channel(escrow_client, chain, payee.address, deposit=3_000,
                                authorized_signer=delegate.address)
    channel = await escrow_client.get_channel(opened.channel_id)
    by_payer = voucher(escrow_client, opened.payer_key, opened.channel_id, 100)
    by_delegate = voucher(escrow_client, delegate.key.to_0x_hex(), opened.channel_id, 100)
    for signed, ok in ((by_payer, False), (by_delegate, True)):
        assert python_accepts(escrow_client, channel, opened.channel_id, 100,
                              signed.signature) is ok
        verdict = simulate(settle_fn(chain, opened.channel_id, 100, signed.signature),
                           payee.address)
        assert verdict == (None if ok else "InvalidSignature")
    assert recover_voucher_signer(by_delegate, chain_id=chain.chain_id,
                                  escrow=chain.escrow) == delegate.address
    with pytest.raises(EscrowError) as info:
        await escrow_client.close(payee.key.to_0x_hex(), by_payer)
    assert (info.value.error, info.value.code, info.value.status) == (
        "InvalidSignature", "invalid-signature", 402)
    await escrow_client.close(payee.key.to_0x_hex(), by_delegate)


async def test_amounts_must_increase_and_stay_within_the_deposit(
        chain: DevChain, escrow_client: EscrowClient, payee: LocalAccount) -> None:
    opened = await open_channel(escrow_client, chain, payee.address, deposit=1_000)
    payee_key = payee.key.to_0x_hex()
    over = voucher(escrow_client, opened.payer_key, opened.channel_id, 1_001)
    for call in (escrow_client.settle, escrow_client.close):
        with pytest.raises(EscrowError) as info:
            await call(payee_key, over)
        assert (info.value.error, info.value.code) == ("AmountExceedsDeposit",
                                                       "amount-exceeds-deposit")
    assert mined(chain, payee_key, settle_fn(chain, opened.channel_id, 1_001,
                                             over.signature))["status"] == 0
    await escrow_client.settle(payee_key, voucher(escrow_client, opened.payer_key,
                                                  opened.channel_id, 600))
    for amount in (600, 599, 0):  # equal, lower, zero: never settles again
        old = voucher(escrow_client, opened.payer_key, opened.channel_id, amount)
        assert simulate(settle_fn(chain, opened.channel_id, amount, old.signature),
                        payee.address) == "AmountNotIncreasing"
        assert mined(chain, payee_key, settle_fn(chain, opened.channel_id, amount,
                                                 old.signature))["status"] == 0
    # Exactly the deposit is fine.
    full = await escrow_client.settle(payee_key, voucher(escrow_client, opened.payer_key,
                                                         opened.channel_id, 1_000))
    assert full.args["deltaPaid"] == 400


async def test_uint128_bounds(chain: DevChain, escrow_client: EscrowClient,
                              payee: LocalAccount) -> None:
    """Amounts are uint128 ("Overflow Protection"): Python refuses 2^128 before signing; the
    contract refuses it in calldata; 2^128 - 1 is a real amount end to end, and a top-up past
    it is DepositOverflow."""
    key = Account.create().key.to_0x_hex()
    for build in (lambda: Voucher("0x" + "11" * 32, UINT128_MAX + 1, "0x"),
                  lambda: voucher(escrow_client, key, "0x" + "11" * 32, UINT128_MAX + 1),
                  lambda: voucher(escrow_client, key, "0x" + "11" * 32, -1),
                  lambda: sign_open_authorization(
                      key, escrow_client.network, escrow=chain.escrow, payee=payee.address,
                      deposit=UINT128_MAX + 1, salt=new_salt(), **validity())):
        with pytest.raises(InvalidPayment):
            build()
    opened = await open_channel(escrow_client, chain, payee.address, deposit=UINT128_MAX,
                                funding=UINT128_MAX + 5)
    selector = function_signature_to_4byte_selector("settle(bytes32,uint128,bytes)")
    signature = voucher(escrow_client, opened.payer_key, opened.channel_id, UINT128_MAX)
    for amount, reverts in ((UINT128_MAX + 1, True), (2**256 - 1, True), (UINT128_MAX, False)):
        data = selector + encode(["bytes32", "uint256", "bytes"], [
            bytes.fromhex(opened.channel_id[2:]), amount, signature.signature_bytes])
        call = {"from": payee.address, "to": chain.escrow, "data": data}
        if reverts:
            with pytest.raises(ContractLogicError):
                w3(chain).eth.call(call)  # type: ignore[arg-type]
        else:
            w3(chain).eth.call(call)  # type: ignore[arg-type]
    auth, salt = top_up_auth(escrow_client, opened.payer_key, opened.channel_id, 1)
    with pytest.raises(EscrowError, match="DepositOverflow"):
        await escrow_client.top_up_with_authorization(auth, channel_id=opened.channel_id,
                                                      top_up_salt=salt)
    payer_gas = new_account(chain, eth=10**18)
    mint(chain, payer_gas.address, 1)
    payer_gas_key = payer_gas.key.to_0x_hex()
    big = await open_channel(escrow_client, chain, payee.address, deposit=UINT128_MAX,
                             payer_key=payer_gas_key, funding=UINT128_MAX)
    with pytest.raises(EscrowError, match="DepositOverflow"):
        await escrow_client.top_up(payer_gas_key, big.channel_id, 1)
    settled = await escrow_client.settle(payee.key.to_0x_hex(), signature)
    assert settled.args["deltaPaid"] == UINT128_MAX


WALLET = """
# pragma version 0.4.3
# A contract wallet (ERC-1271) whose owner's ECDSA signature is its signature.
owner: public(address)

@deploy
def __init__(owner: address):
    self.owner = owner

@view
@external
def isValidSignature(digest: bytes32, signature: Bytes[65]) -> bytes4:
    assert len(signature) == 65, "wallet: bad length"
    v: uint256 = convert(slice(signature, 64, 1), uint256)
    r: uint256 = extract32(signature, 0, output_type=uint256)
    s: uint256 = extract32(signature, 32, output_type=uint256)
    if ecrecover(digest, v, r, s) == self.owner:
        return 0x1626ba7e
    return 0xffffffff
"""


async def test_contract_wallet_signer_erc1271(chain: DevChain, escrow_client: EscrowClient,
                                              payee: LocalAccount) -> None:
    """authorizedSigner may be an ERC-1271 wallet: the escrow asks it. Python alone cannot
    (ECDSA recovers the owner, not the wallet); EscrowClient.verify_voucher asks it too."""
    owner = Account.create()
    wallet = deploy_source(chain, WALLET, owner.address)
    opened = await open_channel(escrow_client, chain, payee.address, deposit=2_000,
                                authorized_signer=wallet)
    channel = await escrow_client.get_channel(opened.channel_id)
    by_owner = voucher(escrow_client, owner.key.to_0x_hex(), opened.channel_id, 700)
    by_payer = voucher(escrow_client, opened.payer_key, opened.channel_id, 700)
    with pytest.raises(PaymentRejected, match="not the channel's signer"):
        verify_voucher(by_owner, channel, chain_id=chain.chain_id, escrow=chain.escrow)
    await escrow_client.verify_voucher(by_owner, channel)
    for refused in (by_payer, Voucher(opened.channel_id, 700, "0x1234")):  # refused, reverts
        with pytest.raises(PaymentRejected) as info:
            await escrow_client.verify_voucher(refused, channel)
        assert info.value.code == "signer-mismatch"
        assert simulate(settle_fn(chain, opened.channel_id, 700, refused.signature),
                        payee.address) == "InvalidSignature"
    other = voucher(escrow_client, owner.key.to_0x_hex(), "0x" + "22" * 32, 700)
    with pytest.raises(PaymentRejected, match="another channel"):
        await escrow_client.verify_voucher(other, channel)
    settled = await escrow_client.settle(payee.key.to_0x_hex(), by_owner)
    assert settled.args["deltaPaid"] == 700
    # An EOA signer: the ECDSA verdict is final, no wallet is asked.
    eoa = await open_channel(escrow_client, chain, payee.address, deposit=10)
    eoa_channel = await escrow_client.get_channel(eoa.channel_id)
    await escrow_client.verify_voucher(voucher(escrow_client, eoa.payer_key, eoa.channel_id,
                                               5), eoa_channel)
    with pytest.raises(PaymentRejected, match="not the channel's signer"):
        await escrow_client.verify_voucher(voucher(escrow_client, owner.key.to_0x_hex(),
                                                   eoa.channel_id, 5), eoa_channel)
