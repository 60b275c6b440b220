"""MPP session channels on EVM: channel state and id, vouchers, deposit authorizations.

The off-chain half of draft-evm-session-00: the channel record the escrow keeps ("Channel
State"), the channel id and the EIP-3009 nonces derived from a channel's parameters ("Channel
State", "Front-Running Protection"), and the EIP-712 ``Voucher`` a payer signs ("Voucher Signing
Format"). No I/O here; :mod:`gateway.rails.mpp.escrow` reads and moves channels on-chain.

Signature checks are :func:`gateway.rails.eip3009.recover_vrs`, the same low-s / v / r,s rules
the escrow enforces, so what :func:`recover_voucher_signer` accepts is what the contract's
``settle`` accepts from an EOA signer. Errors are the gateway's: ill-shaped input is
:class:`~gateway.errors.InvalidPayment` naming the field; a well-shaped voucher whose signature
does not hold is :class:`~gateway.errors.PaymentRejected` whose ``code`` is the spec's problem
type ("Error Responses"): ``invalid-signature`` or ``signer-mismatch``.

Money is ``int`` base units; byte strings are 0x-prefixed lowercase hex ("Encoding
Conventions"), addresses are returned checksummed and compared by value.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from eth_abi import encode
from eth_account import Account
from eth_account.messages import encode_typed_data
from eth_utils import keccak, to_checksum_address
from hexbytes import HexBytes

from gateway.errors import InvalidPayment, PaymentRejected
from gateway.rails.eip3009 import (
    ADDRESS,
    EIP712_DOMAIN_TYPE,
    HEX32,
    RECEIVE_WITH_AUTHORIZATION,
    Eip3009Authorization,
    EvmNetwork,
    recover_vrs,
    sign_authorization,
)

UINT128_MAX = 2**128 - 1  # amounts are uint128 on-chain ("Overflow Protection")
ZERO_ADDRESS = "0x" + "00" * 20
#: The voucher's EIP-712 domain ("Domain Separator"); chainId and the escrow complete it.
VOUCHER_DOMAIN_NAME = "EVM Payment Channel"
VOUCHER_DOMAIN_VERSION = "1"
VOUCHER_TYPE = [
    {"name": "channelId", "type": "bytes32"},
    {"name": "cumulativeAmount", "type": "uint128"},
]
SIGNATURE_LENGTH = 65  # r || s || v; the escrow accepts no other length from an EOA

# Problem types of draft-evm-session-00 ("Error Responses"), the ``code`` of our errors.
ERR_INVALID_SIGNATURE = "invalid-signature"
ERR_SIGNER_MISMATCH = "signer-mismatch"
ERR_AMOUNT_EXCEEDS_DEPOSIT = "amount-exceeds-deposit"
ERR_CHANNEL_NOT_FOUND = "channel-not-found"
ERR_CHANNEL_FINALIZED = "channel-finalized"
ERR_INSUFFICIENT_BALANCE = "insufficient-balance"
ERR_TRANSACTION_REVERTED = "transaction-reverted"
ERR_VERIFICATION_FAILED = "verification-failed"  # draft-httpauth-payment-00's problem type


def _address(value: Any, param: str) -> str:
    if not isinstance(value, str) or not ADDRESS.match(value):
        raise InvalidPayment(f"{param} is not an address", param=param)
    return to_checksum_address(value)


def _bytes32(value: Any, param: str) -> bytes:
    if not isinstance(value, str) or not HEX32.match(value):
        raise InvalidPayment(f"{param} is not 32 bytes of hex", param=param)
    return bytes.fromhex(value[2:])


def _uint128(value: Any, param: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= UINT128_MAX:
        raise InvalidPayment(f"{param} is not a uint128 (0 .. 2^128 - 1)", param=param)
    return value


def _hex(data: bytes) -> str:
    return "0x" + data.hex()


@dataclass(frozen=True)
class Channel:
    """A channel's on-chain record (the escrow's ``getChannel``), spec field for field.

    A channel that was never opened reads as all zero: :attr:`exists` is false.
    ``close_requested_at`` is a Unix time (0: no close requested); ``finalized`` is sticky.
    """

    channel_id: str
    payer: str
    payee: str
    token: str
    authorized_signer: str
    deposit: int
    settled: int
    close_requested_at: int
    finalized: bool

    @classmethod
    def from_record(cls, channel_id: str, record: Any) -> Channel:
        """From the 8-tuple ``getChannel`` returns (web3 decodes the struct to a tuple)."""
        payer, payee, token, signer, deposit, settled, requested, finalized = record
        return cls(channel_id=channel_id.lower(), payer=to_checksum_address(payer),
                   payee=to_checksum_address(payee), token=to_checksum_address(token),
                   authorized_signer=to_checksum_address(signer), deposit=int(deposit),
                   settled=int(settled), close_requested_at=int(requested),
                   finalized=bool(finalized))

    @property
    def exists(self) -> bool:
        return int(self.payer, 16) != 0

    @property
    def voucher_signer(self) -> str:
        """Who must sign vouchers: ``authorized_signer``, or the payer when that is zero."""
        return self.payer if int(self.authorized_signer, 16) == 0 else self.authorized_signer

    @property
    def available(self) -> int:
        """Deposit not yet settled to the payee."""
        return self.deposit - self.settled


def compute_channel_id(*, payer: str, payee: str, token: str, salt: str,
                       authorized_signer: str = ZERO_ADDRESS, escrow: str,
                       chain_id: int) -> str:
    """``keccak256(abi.encode(payer, payee, token, salt, authorizedSigner, escrow, chainId))``
    ("Channel State"): the id the escrow gives the channel. For a relayed open, ``payer`` is
    the EIP-3009 ``from``, not the relayer."""
    return _hex(keccak(encode(
        ["address", "address", "address", "bytes32", "address", "address", "uint256"],
        [_address(payer, "payer"), _address(payee, "payee"), _address(token, "token"),
         _bytes32(salt, "salt"), _address(authorized_signer, "authorizedSigner"),
         _address(escrow, "escrowContract"), chain_id])))


def open_nonce(*, from_: str, payee: str, token: str, salt: str,
               authorized_signer: str = ZERO_ADDRESS) -> str:
    """The EIP-3009 nonce of an ``openWithAuthorization`` deposit:
    ``keccak256(abi.encode(from, payee, token, salt, authorizedSigner))`` ("Front-Running
    Protection"). An omitted authorizedSigner is the zero address, not ``from``."""
    return _hex(keccak(encode(
        ["address", "address", "address", "bytes32", "address"],
        [_address(from_, "authorization.from"), _address(payee, "payee"),
         _address(token, "token"), _bytes32(salt, "salt"),
         _address(authorized_signer, "authorizedSigner")])))


def top_up_nonce(*, channel_id: str, additional_deposit: int, from_: str,
                 top_up_salt: str) -> str:
    """The EIP-3009 nonce of a ``topUpWithAuthorization`` deposit:
    ``keccak256(abi.encode(channelId, additionalDeposit, from, topUpSalt))``."""
    return _hex(keccak(encode(
        ["bytes32", "uint128", "address", "bytes32"],
        [_bytes32(channel_id, "channelId"), _uint128(additional_deposit, "additionalDeposit"),
         _address(from_, "authorization.from"), _bytes32(top_up_salt, "salt")])))


@dataclass(frozen=True)
class Voucher:
    """A signed cumulative voucher (a credential's ``channelId``, ``cumulativeAmount``,
    ``signature``). Construction checks shapes and raises :class:`InvalidPayment`; the
    signature is any 0x-hex byte string up to 65 bytes (what the escrow's ``bytes`` argument
    takes; only exactly 65 can be valid)."""

    channel_id: str
    cumulative_amount: int
    signature: str

    def __post_init__(self) -> None:
        _bytes32(self.channel_id, "channelId")
        _uint128(self.cumulative_amount, "cumulativeAmount")
        signature = self.signature
        if not isinstance(signature, str) or not signature.startswith("0x") \
                or len(signature) % 2 or len(signature) > 2 + 2 * SIGNATURE_LENGTH:
            raise InvalidPayment("signature is not at most 65 bytes of hex", param="signature")
        try:
            bytes.fromhex(signature[2:])
        except ValueError:
            raise InvalidPayment("signature is not hex", param="signature") from None

    @property
    def signature_bytes(self) -> bytes:
        return bytes.fromhex(self.signature[2:])


def voucher_typed_data(channel_id: str, cumulative_amount: int, *, chain_id: int,
                       escrow: str) -> dict[str, Any]:
    """The EIP-712 document a voucher signs (as eth_account expects it): domain
    ``{"EVM Payment Channel", "1", chainId, escrow}``, ``Voucher(bytes32 channelId,uint128
    cumulativeAmount)``."""
    return {
        "types": {"EIP712Domain": EIP712_DOMAIN_TYPE, "Voucher": VOUCHER_TYPE},
        "primaryType": "Voucher",
        "domain": {"name": VOUCHER_DOMAIN_NAME, "version": VOUCHER_DOMAIN_VERSION,
                   "chainId": chain_id, "verifyingContract": _address(escrow, "escrowContract")},
        "message": {"channelId": HexBytes(_bytes32(channel_id, "channelId")),
                    "cumulativeAmount": _uint128(cumulative_amount, "cumulativeAmount")},
    }


def voucher_digest(channel_id: str, cumulative_amount: int, *, chain_id: int,
                   escrow: str) -> str:
    """``keccak256(0x1901 || domainSeparator || structHash)``: what the signer signs and the
    escrow's ``getVoucherDigest`` returns."""
    message = encode_typed_data(full_message=voucher_typed_data(
        channel_id, cumulative_amount, chain_id=chain_id, escrow=escrow))
    return _hex(keccak(b"\x19" + message.version + message.header + message.body))


def sign_voucher(private_key: str, *, channel_id: str, cumulative_amount: int, chain_id: int,
                 escrow: str) -> Voucher:
    """Sign a voucher for ``cumulative_amount`` (the running total, not a delta) with a local
    key (agents and tests): 65 bytes r || s || v, v 27 or 28, low s."""
    signed = Account.from_key(private_key).sign_message(encode_typed_data(
        full_message=voucher_typed_data(channel_id, cumulative_amount, chain_id=chain_id,
                                        escrow=escrow)))
    return Voucher(channel_id=channel_id.lower(), cumulative_amount=cumulative_amount,
                   signature=_hex(bytes(signed.signature)))


def recover_voucher_signer(voucher: Voucher, *, chain_id: int, escrow: str) -> str:
    """Checksummed address whose key signed ``voucher`` for the escrow ``escrow`` on
    ``chain_id``.

    Raises :class:`PaymentRejected` (``invalid-signature``) for what the escrow refuses from
    an EOA: a length other than 65 bytes (no EIP-2098 compact form), v other than 27/28 (no
    0/1), r or s zero or not below the curve order, high s, or no recoverable key. The caller
    compares the address with the channel's signer (:func:`verify_voucher`).
    """
    raw = voucher.signature_bytes
    if len(raw) != SIGNATURE_LENGTH:
        raise PaymentRejected(f"voucher signature is {len(raw)} bytes, not 65",
                              code=ERR_INVALID_SIGNATURE)
    message = encode_typed_data(full_message=voucher_typed_data(
        voucher.channel_id, voucher.cumulative_amount, chain_id=chain_id, escrow=escrow))
    return recover_vrs(message, raw[64], raw[:32], raw[32:64], code=ERR_INVALID_SIGNATURE)


def verify_voucher(voucher: Voucher, channel: Channel, *, chain_id: int, escrow: str) -> None:
    """Check that the channel's signer (an EOA) signed ``voucher`` for this channel
    ("Voucher Verification", steps 3-5). Amount checks are the caller's.

    Raises :class:`PaymentRejected`: ``invalid-signature`` (see
    :func:`recover_voucher_signer`), ``signer-mismatch`` when someone else signed, or when the
    voucher names another channel. A contract-wallet signer (ERC-1271) needs the chain:
    :meth:`gateway.rails.mpp.escrow.EscrowClient.verify_voucher`.
    """
    if voucher.channel_id.lower() != channel.channel_id.lower():
        raise PaymentRejected("voucher is for another channel", code=ERR_SIGNER_MISMATCH)
    signer = recover_voucher_signer(voucher, chain_id=chain_id, escrow=escrow)
    if signer != to_checksum_address(channel.voucher_signer):
        raise PaymentRejected(f"voucher signed by {signer}, not the channel's signer",
                              code=ERR_SIGNER_MISMATCH)


def sign_open_authorization(private_key: str, network: EvmNetwork, *, escrow: str, payee: str,
                            deposit: int, salt: str, authorized_signer: str = ZERO_ADDRESS,
                            valid_after: int, valid_before: int) -> Eip3009Authorization:
    """The payer's EIP-3009 ``ReceiveWithAuthorization`` of ``deposit`` to the escrow for an
    ``openWithAuthorization`` (``feePayer: true``), its nonce derived from the channel's
    parameters. ``network`` names the token (its EIP-712 domain)."""
    payer = Account.from_key(private_key).address
    return sign_authorization(
        private_key, network, to=escrow, value=_uint128(deposit, "deposit"),
        valid_after=valid_after, valid_before=valid_before,
        nonce=open_nonce(from_=payer, payee=payee, token=network.asset, salt=salt,
                         authorized_signer=authorized_signer),
        primary_type=RECEIVE_WITH_AUTHORIZATION)


def sign_top_up_authorization(private_key: str, network: EvmNetwork, *, escrow: str,
                              channel_id: str, additional_deposit: int, top_up_salt: str,
                              valid_after: int, valid_before: int) -> Eip3009Authorization:
    """The funder's EIP-3009 ``ReceiveWithAuthorization`` for a ``topUpWithAuthorization``."""
    funder = Account.from_key(private_key).address
    return sign_authorization(
        private_key, network, to=escrow,
        value=_uint128(additional_deposit, "additionalDeposit"),
        valid_after=valid_after, valid_before=valid_before,
        nonce=top_up_nonce(channel_id=channel_id, additional_deposit=additional_deposit,
                           from_=funder, top_up_salt=top_up_salt),
        primary_type=RECEIVE_WITH_AUTHORIZATION)


__all__ = [
    "ERR_AMOUNT_EXCEEDS_DEPOSIT",
    "ERR_CHANNEL_FINALIZED",
    "ERR_CHANNEL_NOT_FOUND",
    "ERR_INSUFFICIENT_BALANCE",
    "ERR_INVALID_SIGNATURE",
    "ERR_SIGNER_MISMATCH",
    "ERR_TRANSACTION_REVERTED",
    "ERR_VERIFICATION_FAILED",
    "UINT128_MAX",
    "VOUCHER_DOMAIN_NAME",
    "VOUCHER_DOMAIN_VERSION",
    "ZERO_ADDRESS",
    "Channel",
    "Voucher",
    "compute_channel_id",
    "open_nonce",
    "recover_voucher_signer",
    "sign_open_authorization",
    "sign_top_up_authorization",
    "sign_voucher",
    "top_up_nonce",
    "verify_voucher",
    "voucher_digest",
    "voucher_typed_data",
]
