"""MPP session channel ids, nonces and vouchers without a chain: a hand-computed example.

The expected values are built here byte by byte (each ABI word a 32-byte left-padded value,
keccak over their concatenation), independently of the code under test, and pinned as hex so a
change in either shows. The escrow contract is checked against the same functions on the chain
(test_escrow*.py).
"""

from __future__ import annotations

from typing import Any

import pytest
from eth_account import Account
from eth_utils import keccak, to_checksum_address

from gateway.errors import InvalidPayment, PaymentRejected
from gateway.rails.eip3009 import EvmNetwork, recover_signer, typed_data
from gateway.rails.mpp.channel import (
    UINT128_MAX,
    ZERO_ADDRESS,
    Channel,
    Voucher,
    compute_channel_id,
    open_nonce,
    recover_voucher_signer,
    sign_open_authorization,
    sign_top_up_authorization,
    sign_voucher,
    top_up_nonce,
    verify_voucher,
    voucher_digest,
    voucher_typed_data,
)

PAYER = "0x" + "11" * 20
PAYEE = "0x" + "22" * 20
TOKEN = "0x" + "33" * 20
ESCROW = "0x" + "44" * 20
SALT = "0x" + "aa" * 32
CHAIN_ID = 31337
SIGNER_KEY = "0x" + "01" * 32  # address 0x1a642f0E3c3aF545E7AcBD38b07251B3990914F1

CHANNEL_ID = "0x06783e4285d90f0c1aa3ab0948cc80277d1865bb09b1c4af17e856d44cd63331"
DOMAIN_SEPARATOR = "366044c615f92fcd0604418ba32d41ba3975d0f9a7188087faa6815c5efb3d72"
STRUCT_HASH = "3b6968f139b89cf20b9bef08fa3aa79744479c91b32e1f5662056c67c53aed32"
DIGEST = "0xaaf963ef586e6258e5c2f91b36c8d4d2db4d7c64bebc5964e6c9ba166711774d"
SIGNATURE = ("0xa58be088a0958e5d4b76b8a7ecb70cec95741b833e811ca52b618a847ceb707b56815638155c79ba"
             "50ec0efea05901197be5d1bd39be31ccbc9a33c2f347ae7d1c")
OPEN_NONCE = "0xcf072d980a7150c0542df85f7f07b5ecdf28f535f678ea9f0b08ea50df6124e7"


def word(value: int | str | bytes) -> bytes:
    """One ABI word: an int, a 0x address or bytes, left-padded to 32 bytes."""
    if isinstance(value, int):
        return value.to_bytes(32, "big")
    raw = bytes.fromhex(value[2:]) if isinstance(value, str) else value
    return raw.rjust(32, b"\0")


def test_channel_id_hand_computed() -> None:
    expected = keccak(b"".join(word(x) for x in (
        PAYER, PAYEE, TOKEN, SALT, ZERO_ADDRESS, ESCROW, CHAIN_ID)))
    assert "0x" + expected.hex() == CHANNEL_ID
    assert compute_channel_id(payer=PAYER, payee=PAYEE, token=TOKEN, salt=SALT,
                              escrow=ESCROW, chain_id=CHAIN_ID) == CHANNEL_ID
    # Every input is bound: change any one and the id changes.
    base: dict[str, Any] = {"payer": PAYER, "payee": PAYEE, "token": TOKEN, "salt": SALT,
                            "escrow": ESCROW, "chain_id": CHAIN_ID}
    others = [compute_channel_id(**{**base, name: value})
              for name, value in (("payer", PAYEE), ("payee", PAYER), ("token", PAYER),
                                  ("salt", "0x" + "bb" * 32), ("authorized_signer", PAYER),
                                  ("escrow", TOKEN), ("chain_id", 1))]
    assert len({CHANNEL_ID, *others}) == 8
    with pytest.raises(InvalidPayment) as info:
        compute_channel_id(payer="0x12", payee=PAYEE, token=TOKEN, salt=SALT, escrow=ESCROW,
                           chain_id=CHAIN_ID)
    assert info.value.param == "payer"


def test_voucher_typed_data_hand_computed() -> None:
    domain = keccak(
        keccak(b"EIP712Domain(string name,string version,uint256 chainId,"
               b"address verifyingContract)")
        + keccak(b"EVM Payment Channel") + keccak(b"1") + word(CHAIN_ID) + word(ESCROW))
    struct = keccak(keccak(b"Voucher(bytes32 channelId,uint128 cumulativeAmount)")
                    + word(CHANNEL_ID) + word(250_000))
    assert (domain.hex(), struct.hex()) == (DOMAIN_SEPARATOR, STRUCT_HASH)
    assert "0x" + keccak(b"\x19\x01" + domain + struct).hex() == DIGEST
    assert voucher_digest(CHANNEL_ID, 250_000, chain_id=CHAIN_ID, escrow=ESCROW) == DIGEST
    data = voucher_typed_data(CHANNEL_ID, 250_000, chain_id=CHAIN_ID, escrow=ESCROW)
    assert data["primaryType"] == "Voucher"
    assert data["types"]["Voucher"] == [{"name": "channelId", "type": "bytes32"},
                                        {"name": "cumulativeAmount", "type": "uint128"}]
    assert data["domain"] == {"name": "EVM Payment Channel", "version": "1",
                              "chainId": CHAIN_ID,
                              "verifyingContract": "0x4444444444444444444444444444444444444444"}


def test_sign_and_recover_a_voucher() -> None:
    signed = sign_voucher(SIGNER_KEY, channel_id=CHANNEL_ID, cumulative_amount=250_000,
                          chain_id=CHAIN_ID, escrow=ESCROW)
    assert signed == Voucher(CHANNEL_ID, 250_000, SIGNATURE)  # RFC 6979: deterministic
    raw = signed.signature_bytes
    assert len(raw) == 65 and raw[64] in (27, 28)
    signer = Account.from_key(SIGNER_KEY).address
    assert recover_voucher_signer(signed, chain_id=CHAIN_ID, escrow=ESCROW) == signer
    # Another domain or amount recovers someone else (the contract then says InvalidSignature).
    assert recover_voucher_signer(signed, chain_id=1, escrow=ESCROW) != signer
    assert recover_voucher_signer(signed, chain_id=CHAIN_ID, escrow=TOKEN) != signer
    moved = Voucher(CHANNEL_ID, 250_001, SIGNATURE)
    assert recover_voucher_signer(moved, chain_id=CHAIN_ID, escrow=ESCROW) != signer
    for bad in ("0x", SIGNATURE[:-2], "0x" + "00" * 65):
        with pytest.raises(PaymentRejected) as info:
            recover_voucher_signer(Voucher(CHANNEL_ID, 1, bad), chain_id=CHAIN_ID,
                                   escrow=ESCROW)
        assert info.value.code == "invalid-signature"


def test_verify_voucher_against_channel_state() -> None:
    signer = Account.from_key(SIGNER_KEY).address
    record = (PAYER, PAYEE, TOKEN, signer, 500_000, 100_000, 0, False)
    channel = Channel.from_record(CHANNEL_ID.upper().replace("0X", "0x"), record)
    assert channel.channel_id == CHANNEL_ID and channel.exists
    assert (channel.voucher_signer, channel.available) == (signer, 400_000)
    signed = Voucher(CHANNEL_ID, 250_000, SIGNATURE)
    verify_voucher(signed, channel, chain_id=CHAIN_ID, escrow=ESCROW)
    payer_signs = Channel.from_record(CHANNEL_ID, (PAYER, PAYEE, TOKEN, ZERO_ADDRESS,
                                                   1, 0, 0, False))
    assert payer_signs.voucher_signer == to_checksum_address(PAYER)  # authorizedSigner 0
    with pytest.raises(PaymentRejected) as info:
        verify_voucher(signed, payer_signs, chain_id=CHAIN_ID, escrow=ESCROW)
    assert info.value.code == "signer-mismatch"
    elsewhere = Voucher("0x" + "55" * 32, 250_000, SIGNATURE)
    with pytest.raises(PaymentRejected, match="another channel"):
        verify_voucher(elsewhere, channel, chain_id=CHAIN_ID, escrow=ESCROW)
    empty = Channel.from_record(CHANNEL_ID, (ZERO_ADDRESS,) * 4 + (0, 0, 0, False))
    assert not empty.exists


@pytest.mark.parametrize(("fields", "param"), [
    ({"channel_id": "0x1234"}, "channelId"),
    ({"channel_id": 7}, "channelId"),
    ({"cumulative_amount": -1}, "cumulativeAmount"),
    ({"cumulative_amount": UINT128_MAX + 1}, "cumulativeAmount"),
    ({"cumulative_amount": True}, "cumulativeAmount"),
    ({"cumulative_amount": "5"}, "cumulativeAmount"),
    ({"signature": "abcd"}, "signature"),
    ({"signature": "0xabc"}, "signature"),
    ({"signature": "0x" + "zz" * 65}, "signature"),
    ({"signature": "0x" + "00" * 66}, "signature"),
    ({"signature": None}, "signature"),
])
def test_voucher_shapes(fields: dict[str, object], param: str) -> None:
    args: dict[str, object] = {"channel_id": CHANNEL_ID, "cumulative_amount": 1,
                               "signature": SIGNATURE, **fields}
    with pytest.raises(InvalidPayment) as info:
        Voucher(**args)  # type: ignore[arg-type]
    assert info.value.param == param
    assert Voucher(CHANNEL_ID, UINT128_MAX, "0x").cumulative_amount == UINT128_MAX


def test_deposit_nonces_hand_computed() -> None:
    expected = keccak(b"".join(word(x) for x in (PAYER, PAYEE, TOKEN, SALT, ZERO_ADDRESS)))
    assert "0x" + expected.hex() == OPEN_NONCE
    assert open_nonce(from_=PAYER, payee=PAYEE, token=TOKEN, salt=SALT) == OPEN_NONCE
    top_up = keccak(b"".join(word(x) for x in (CHANNEL_ID, 5_000_000, PAYER, SALT)))
    assert top_up_nonce(channel_id=CHANNEL_ID, additional_deposit=5_000_000, from_=PAYER,
                        top_up_salt=SALT) == "0x" + top_up.hex()
    with pytest.raises(InvalidPayment):
        top_up_nonce(channel_id=CHANNEL_ID, additional_deposit=UINT128_MAX + 1, from_=PAYER,
                     top_up_salt=SALT)


def test_deposit_authorizations_are_receive_with_authorization() -> None:
    """The escrow pulls deposits with receiveWithAuthorization: the payer signs that type (a
    TransferWithAuthorization signature would not verify), to the escrow, with the derived
    nonce."""
    network = EvmNetwork(network="eip155:31337", chain_id=CHAIN_ID, rpc_url="http://x",
                         asset=TOKEN, token_name="USD Coin", token_version="2",
                         relayer_key="")
    window = {"valid_after": 0, "valid_before": 2**32}
    auth = sign_open_authorization(SIGNER_KEY, network, escrow=ESCROW, payee=PAYEE,
                                   deposit=10_000_000, salt=SALT, **window)
    payer = Account.from_key(SIGNER_KEY).address
    assert (auth.payer, auth.to.lower(), auth.value) == (payer, ESCROW, 10_000_000)
    assert auth.nonce == open_nonce(from_=payer, payee=PAYEE, token=TOKEN, salt=SALT)
    assert recover_signer(auth, network, primary_type="ReceiveWithAuthorization") == payer
    assert recover_signer(auth, network) != payer
    top_up = sign_top_up_authorization(SIGNER_KEY, network, escrow=ESCROW,
                                       channel_id=CHANNEL_ID, additional_deposit=7,
                                       top_up_salt=SALT, **window)
    assert top_up.nonce == top_up_nonce(channel_id=CHANNEL_ID, additional_deposit=7,
                                        from_=payer, top_up_salt=SALT)
    with pytest.raises(ValueError, match="not an EIP-3009 transfer type"):
        typed_data(auth, network, primary_type="Permit")
