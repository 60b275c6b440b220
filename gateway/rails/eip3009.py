"""EIP-3009 ``TransferWithAuthorization``: the signed message, its EIP-712 domain, the signature.

The off-chain half of x402's ``exact`` scheme on EVM (specs/x402/schemes/exact/
scheme_exact_evm.md, section 1): what the payer signs and how we check who signed it. No I/O
here; :mod:`gateway.rails.evm` checks the token's state and settles on-chain.

Foreign exceptions (eth_account, eth_keys, eth_utils, hexbytes) never leave this module: input
that is well-shaped but not a usable signature is :class:`PaymentRejected` with
``invalid_exact_evm_payload_signature``; ill-shaped input is :class:`InvalidPayment`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from eth_account import Account
from eth_account.messages import SignableMessage, encode_typed_data
from eth_keys.exceptions import BadSignature
from eth_keys.exceptions import ValidationError as KeyValidationError
from eth_utils import keccak, to_checksum_address
from hexbytes import HexBytes
from pydantic import SecretStr

from gateway.errors import InvalidPayment, PaymentRejected

# x402 error codes (spec section 9 and the SDK's mechanisms/evm/constants.py).
ERR_RECIPIENT_MISMATCH = "invalid_exact_evm_payload_recipient_mismatch"
ERR_VALUE_MISMATCH = "invalid_exact_evm_payload_authorization_value_mismatch"
ERR_VALID_AFTER = "invalid_exact_evm_payload_authorization_valid_after"
ERR_VALID_BEFORE = "invalid_exact_evm_payload_authorization_valid_before"
ERR_SIGNATURE = "invalid_exact_evm_payload_signature"
ERR_NONCE_USED = "invalid_exact_evm_nonce_already_used"
ERR_INSUFFICIENT_BALANCE = "invalid_exact_evm_insufficient_balance"
ERR_SIMULATION_FAILED = "invalid_exact_evm_transaction_simulation_failed"
ERR_TRANSFER_EVENT_MISMATCH = "invalid_exact_evm_transfer_event_mismatch"
ERR_TRANSACTION_STATE = "invalid_transaction_state"

# secp256k1 group order, and half of it: a larger ``s`` is the malleable twin, which FiatToken
# (and the MPP escrow) rejects; r and s must lie in [1, n) for a signature to exist at all.
SECP256K1_N = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141
SECP256K1N_HALF = SECP256K1_N // 2
#: Shapes of the hex strings payment payloads carry: bytes32, a 65-byte signature, an address.
HEX32 = re.compile(r"^0x[0-9a-fA-F]{64}$")
HEX_SIGNATURE = re.compile(r"^0x[0-9a-fA-F]{130}$")
ADDRESS = re.compile(r"^0x[0-9a-fA-F]{40}$")
_UINT256_MAX = 2**256 - 1
TRANSFER_TOPIC = "0x" + keccak(text="Transfer(address,address,uint256)").hex()
AUTHORIZATION_CANCELED_TOPIC = "0x" + keccak(text="AuthorizationCanceled(address,bytes32)").hex()

# Revert strings of Circle's FiatTokenV2 (and our TestUSDC) -> x402 codes.
_REVERT_CODES: tuple[tuple[str, str], ...] = (
    ("invalid signature", ERR_SIGNATURE),
    ("authorization is not yet valid", ERR_VALID_AFTER),
    ("authorization is expired", ERR_VALID_BEFORE),
    ("authorization is used or canceled", ERR_NONCE_USED),
    ("transfer amount exceeds balance", ERR_INSUFFICIENT_BALANCE),
)

# Only what settlement touches, so any EIP-3009 token (real USDC included) works.
EIP3009_ABI: list[dict[str, Any]] = [
    {"type": "function", "name": "balanceOf", "stateMutability": "view",
     "inputs": [{"name": "account", "type": "address"}],
     "outputs": [{"name": "", "type": "uint256"}]},
    {"type": "function", "name": "authorizationState", "stateMutability": "view",
     "inputs": [{"name": "authorizer", "type": "address"}, {"name": "nonce", "type": "bytes32"}],
     "outputs": [{"name": "", "type": "bool"}]},
    {"type": "function", "name": "transferWithAuthorization", "stateMutability": "nonpayable",
     "inputs": [{"name": "from", "type": "address"}, {"name": "to", "type": "address"},
                {"name": "value", "type": "uint256"}, {"name": "validAfter", "type": "uint256"},
                {"name": "validBefore", "type": "uint256"}, {"name": "nonce", "type": "bytes32"},
                {"name": "v", "type": "uint8"}, {"name": "r", "type": "bytes32"},
                {"name": "s", "type": "bytes32"}],
     "outputs": []},
]

EIP712_DOMAIN_TYPE = [
    {"name": "name", "type": "string"},
    {"name": "version", "type": "string"},
    {"name": "chainId", "type": "uint256"},
    {"name": "verifyingContract", "type": "address"},
]
_AUTHORIZATION_FIELDS = [
    {"name": "from", "type": "address"},
    {"name": "to", "type": "address"},
    {"name": "value", "type": "uint256"},
    {"name": "validAfter", "type": "uint256"},
    {"name": "validBefore", "type": "uint256"},
    {"name": "nonce", "type": "bytes32"},
]
#: EIP-3009's two signed transfers: anyone may submit a TransferWithAuthorization (x402's
#: ``exact``); only its ``to`` may submit a ReceiveWithAuthorization (the MPP escrow's deposits).
TRANSFER_WITH_AUTHORIZATION = "TransferWithAuthorization"
RECEIVE_WITH_AUTHORIZATION = "ReceiveWithAuthorization"
_PRIMARY_TYPES = (TRANSFER_WITH_AUTHORIZATION, RECEIVE_WITH_AUTHORIZATION)

# What eth_keys raises for a signature that has the right length but is not one: r or s out of
# [1, n), or r not the x-coordinate of a curve point (about half of all 256-bit values). Neither
# BadSignature nor eth_utils' ValidationError is a ValueError.
_BAD_SIGNATURE: tuple[type[BaseException], ...] = (
    BadSignature, KeyValidationError, ValueError, TypeError)


@dataclass(frozen=True)
class Eip3009Authorization:
    """A signed EIP-3009 ``TransferWithAuthorization`` (from x402's ``payload``).

    ``nonce`` is 0x + 64 hex (bytes32), ``signature`` 0x + 130 hex (65 bytes r||s||v).
    Construction validates shapes and raises :class:`InvalidPayment` naming the field.
    """

    from_: str
    to: str
    value: int
    valid_after: int
    valid_before: int
    nonce: str
    signature: str

    def __post_init__(self) -> None:
        for name in ("from_", "to"):
            value = getattr(self, name)
            if not isinstance(value, str) or not ADDRESS.match(value):
                raise InvalidPayment(f"authorization.{name.rstrip('_')} is not an address",
                                     param=f"authorization.{name.rstrip('_')}")
        for name in ("value", "valid_after", "valid_before"):
            number = getattr(self, name)
            if isinstance(number, bool) or not isinstance(number, int) \
                    or not 0 <= number <= _UINT256_MAX:
                raise InvalidPayment(f"authorization.{name} is not a uint256", param=name)
        if not isinstance(self.nonce, str) or not HEX32.match(self.nonce):
            raise InvalidPayment("authorization.nonce is not 32 bytes of hex",
                                 param="authorization.nonce")
        if not isinstance(self.signature, str) or not HEX_SIGNATURE.match(self.signature):
            raise InvalidPayment("signature is not 65 bytes of hex", param="signature")

    @property
    def payer(self) -> str:
        """Checksummed payer address."""
        return to_checksum_address(self.from_)

    def vrs(self) -> tuple[int, bytes, bytes]:
        """Split the signature; v normalised to 27/28 (some signers emit 0/1)."""
        raw = bytes.fromhex(self.signature[2:])
        v = raw[64]
        if v < 27:
            v += 27
        return v, raw[:32], raw[32:64]


@dataclass(frozen=True)
class EvmNetwork:
    """One EVM chain + EIP-3009 token the gateway accepts, and the relayer that settles on it.

    ``relayer_key`` may be empty where this process never settles (remote facilitator mode);
    a non-empty one must be a private key, checked here so a typo fails at start-up.
    """

    network: str  # CAIP-2, e.g. "eip155:31337"
    chain_id: int
    rpc_url: str
    asset: str  # token contract address
    token_name: str  # EIP-712 domain name (USDC on Base: "USD Coin")
    token_version: str  # EIP-712 domain version ("2")
    relayer_key: SecretStr | str = field(repr=False)
    confirmations: int = 1
    rpc_timeout: float = 10.0
    receipt_timeout: float = 120.0

    def __post_init__(self) -> None:
        if self.relayer_secret():
            try:
                Account.from_key(self.relayer_secret())
            except _BAD_SIGNATURE:
                # No ``from exc``: the foreign message could echo part of the key.
                raise ValueError(f"{self.network}: relayer key is not a private key") from None

    def relayer_secret(self) -> str:
        key = self.relayer_key
        return key.get_secret_value() if isinstance(key, SecretStr) else key

    @property
    def relayer_address(self) -> str:
        """The relayer's address (ValueError when this network has no relayer key)."""
        if not self.relayer_secret():
            raise ValueError(f"{self.network}: no relayer key configured")
        return str(Account.from_key(self.relayer_secret()).address)


def typed_data(auth: Eip3009Authorization, network: EvmNetwork, *,
               primary_type: str = TRANSFER_WITH_AUTHORIZATION) -> dict[str, Any]:
    """The EIP-712 typed-data document the payer signs (as eth_account expects it).

    ``primary_type``: :data:`TRANSFER_WITH_AUTHORIZATION` (x402) or
    :data:`RECEIVE_WITH_AUTHORIZATION` (deposits into the MPP escrow); same fields.
    """
    if primary_type not in _PRIMARY_TYPES:
        raise ValueError(f"not an EIP-3009 transfer type: {primary_type!r}")
    return {
        "types": {"EIP712Domain": EIP712_DOMAIN_TYPE, primary_type: _AUTHORIZATION_FIELDS},
        "primaryType": primary_type,
        "domain": {
            "name": network.token_name,
            "version": network.token_version,
            "chainId": network.chain_id,
            "verifyingContract": to_checksum_address(network.asset),
        },
        "message": {
            "from": to_checksum_address(auth.from_),
            "to": to_checksum_address(auth.to),
            "value": auth.value,
            "validAfter": auth.valid_after,
            "validBefore": auth.valid_before,
            "nonce": HexBytes(auth.nonce),
        },
    }


def recover_vrs(message: SignableMessage, v: int, r: bytes, s: bytes, *, code: str) -> str:
    """Checksummed address whose key signed ``message`` as ``(v, r, s)``, with the checks an
    on-chain verifier that refuses malleable signatures makes (FiatToken, OpenZeppelin's ECDSA,
    the MPP escrow).

    Raises :class:`PaymentRejected` with ``code`` when v is not 27/28, r or s is zero or not
    below the curve order, s is high (the malleable twin), or no public key is recoverable.
    """
    r_int, s_int = int.from_bytes(r, "big"), int.from_bytes(s, "big")
    if v not in (27, 28):
        raise PaymentRejected(f"signature v={v} is not 27 or 28", code=code)
    if not 0 < r_int < SECP256K1_N or not 0 < s_int <= SECP256K1N_HALF:
        raise PaymentRejected("signature r or s is out of range (zero, or s is high)",
                              code=code)
    try:
        return str(Account.recover_message(message, vrs=(v, r, s)))
    except _BAD_SIGNATURE as exc:
        raise PaymentRejected("signature does not recover to any address", code=code) from exc


def recover_signer(auth: Eip3009Authorization, network: EvmNetwork, *,
                   primary_type: str = TRANSFER_WITH_AUTHORIZATION) -> str:
    """Checksummed address that signed ``auth`` for ``network``'s domain.

    Raises :class:`PaymentRejected` (``invalid_exact_evm_payload_signature``) when the 65 bytes
    are not a signature FiatToken would accept: v not 27/28 (or 0/1), r or s zero or not below
    the curve order, high s (malleable), or no public key recoverable from them.
    """
    v, r, s = auth.vrs()
    message = encode_typed_data(full_message=typed_data(auth, network,
                                                        primary_type=primary_type))
    return recover_vrs(message, v, r, s, code=ERR_SIGNATURE)


def sign_authorization(private_key: str, network: EvmNetwork, *, to: str, value: int,
                       valid_after: int, valid_before: int, nonce: str,
                       primary_type: str = TRANSFER_WITH_AUTHORIZATION
                       ) -> Eip3009Authorization:
    """Sign a ``TransferWithAuthorization`` (or, with ``primary_type``, a
    ``ReceiveWithAuthorization``) with a local key (agents and tests)."""
    account = Account.from_key(private_key)
    unsigned = Eip3009Authorization(from_=account.address, to=to, value=value,
                                    valid_after=valid_after, valid_before=valid_before,
                                    nonce=nonce, signature="0x" + "00" * 65)
    signed = account.sign_message(encode_typed_data(full_message=typed_data(
        unsigned, network, primary_type=primary_type)))
    return Eip3009Authorization(from_=account.address, to=to, value=value,
                                valid_after=valid_after, valid_before=valid_before, nonce=nonce,
                                signature="0x" + bytes(signed.signature).hex())


def has_transfer_log(receipt: Mapping[str, Any], auth: Eip3009Authorization,
                      network: EvmNetwork) -> bool:
    """Whether the receipt holds the token's ``Transfer(from, to, value)``; a malformed log
    (whatever a faulty node sent) is simply not that log."""
    token = to_checksum_address(network.asset)
    want = (_topic_address(auth.from_), _topic_address(auth.to))
    logs = receipt.get("logs")
    for log in logs if isinstance(logs, list | tuple) else ():
        try:
            topics = [HexBytes(t).to_0x_hex() for t in log.get("topics", [])]
            if (to_checksum_address(log["address"]) == token and len(topics) == 3
                    and topics[0] == TRANSFER_TOPIC and (topics[1], topics[2]) == want
                    and int.from_bytes(HexBytes(log["data"]), "big") == auth.value):
                return True
        except (ValueError, TypeError, KeyError, AttributeError):
            continue
    return False


def _topic_address(address: str) -> str:
    return "0x" + "00" * 12 + address.lower()[2:]


def revert_code(message: str, default: str = ERR_SIMULATION_FAILED) -> str:
    """Map a token revert string to an x402 code."""
    lowered = message.lower()
    for needle, code in _REVERT_CODES:
        if needle in lowered:
            return code
    return default


__all__ = [
    "ADDRESS",
    "AUTHORIZATION_CANCELED_TOPIC",
    "EIP712_DOMAIN_TYPE",
    "EIP3009_ABI",
    "ERR_INSUFFICIENT_BALANCE",
    "ERR_NONCE_USED",
    "ERR_RECIPIENT_MISMATCH",
    "ERR_SIGNATURE",
    "ERR_SIMULATION_FAILED",
    "ERR_TRANSACTION_STATE",
    "ERR_TRANSFER_EVENT_MISMATCH",
    "ERR_VALID_AFTER",
    "ERR_VALID_BEFORE",
    "ERR_VALUE_MISMATCH",
    "HEX32",
    "HEX_SIGNATURE",
    "RECEIVE_WITH_AUTHORIZATION",
    "SECP256K1N_HALF",
    "SECP256K1_N",
    "TRANSFER_TOPIC",
    "TRANSFER_WITH_AUTHORIZATION",
    "Eip3009Authorization",
    "EvmNetwork",
    "has_transfer_log",
    "recover_signer",
    "recover_vrs",
    "revert_code",
    "sign_authorization",
    "typed_data",
]
