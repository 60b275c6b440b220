"""Permit2 and the x402 ``upto`` proxy from Python: addresses, the proxy's ``settle`` ABI, the
EIP-712 digest the payer signs, and Permit2's unordered nonces.

The digest is the one Permit2 (``gateway/chain/Permit2.vy``) checks when the proxy
(``gateway/chain/X402UptoPermit2Proxy.vy``) settles: PermitWitnessTransferFrom(permitted,
spender, nonce, deadline, witness) with the upto witness Witness(address to, address
facilitator, uint256 validAfter), in the domain {name: "Permit2", chainId, verifyingContract}
(no version), as the x402 SDK's upto client signs it (scheme_upto_evm.md, section 1).
"""

from __future__ import annotations

from typing import Any

from eth_abi import encode
from eth_utils import keccak, to_checksum_address
from web3 import Web3

#: Uniswap's canonical Permit2 (the same address on every chain; the dev chain places ours there).
PERMIT2_ADDRESS = "0x000000000022D473030F116dDEE9F6B43aC78BA3"
#: The x402UptoPermit2Proxy (scheme_upto_evm.md, Annex); the spender in the payer's signature.
UPTO_PROXY_ADDRESS = "0x4020A4f3b7b90ccA423B9fabCc0CE57C6C240002"

EIP712_DOMAIN_TYPE = "EIP712Domain(string name,uint256 chainId,address verifyingContract)"
TOKEN_PERMISSIONS_TYPE = "TokenPermissions(address token,uint256 amount)"
WITNESS_TYPE = "Witness(address to,address facilitator,uint256 validAfter)"
#: What the proxy passes as Permit2's ``witnessTypeString``: the primary type's last member,
#: then the referenced types in alphabetical order (EIP-712 encodeType).
WITNESS_TYPE_STRING = "Witness witness)" + TOKEN_PERMISSIONS_TYPE + WITNESS_TYPE
PERMIT_WITNESS_TRANSFER_FROM_TYPE = (
    "PermitWitnessTransferFrom(TokenPermissions permitted,address spender,uint256 nonce,"
    "uint256 deadline," + WITNESS_TYPE_STRING)

_PERMIT2 = "Permit2"

_PERMIT = {"name": "permit", "type": "tuple", "components": [
    {"name": "permitted", "type": "tuple", "components": [
        {"name": "token", "type": "address"}, {"name": "amount", "type": "uint256"}]},
    {"name": "nonce", "type": "uint256"},
    {"name": "deadline", "type": "uint256"}]}

#: The proxy's ``settle`` (the x402 SDK's X402_UPTO_PERMIT2_PROXY_ABI).
UPTO_PROXY_SETTLE_ABI: list[dict[str, Any]] = [{
    "type": "function", "name": "settle", "stateMutability": "nonpayable", "outputs": [],
    "inputs": [
        _PERMIT,
        {"name": "amount", "type": "uint256"},
        {"name": "owner", "type": "address"},
        {"name": "witness", "type": "tuple", "components": [
            {"name": "to", "type": "address"}, {"name": "facilitator", "type": "address"},
            {"name": "validAfter", "type": "uint256"}]},
        {"name": "signature", "type": "bytes"}],
}]

#: Permit2's ``nonceBitmap(owner, wordPos)`` and ``DOMAIN_SEPARATOR()``.
PERMIT2_VIEW_ABI: list[dict[str, Any]] = [
    {"type": "function", "name": "nonceBitmap", "stateMutability": "view",
     "inputs": [{"name": "owner", "type": "address"}, {"name": "wordPos", "type": "uint256"}],
     "outputs": [{"name": "", "type": "uint256"}]},
    {"type": "function", "name": "DOMAIN_SEPARATOR", "stateMutability": "view", "inputs": [],
     "outputs": [{"name": "", "type": "bytes32"}]},
]


def domain_separator(chain_id: int, permit2_address: str = PERMIT2_ADDRESS) -> bytes:
    """Permit2's EIP-712 domain separator on chain ``chain_id``."""
    return keccak(encode(["bytes32", "bytes32", "uint256", "address"], [
        keccak(text=EIP712_DOMAIN_TYPE), keccak(text=_PERMIT2), chain_id,
        to_checksum_address(permit2_address)]))


def witness_hash(to: str, facilitator: str, valid_after: int) -> bytes:
    """The hash of the upto witness, as the proxy passes it to Permit2."""
    return keccak(encode(["bytes32", "address", "address", "uint256"], [
        keccak(text=WITNESS_TYPE), to_checksum_address(to), to_checksum_address(facilitator),
        valid_after]))


def permit2_digest(chain_id: int, permit2_address: str, token: str, amount: int, spender: str,
                   nonce: int, deadline: int, to: str, facilitator: str,
                   valid_after: int) -> bytes:
    """The EIP-712 digest of an upto PermitWitnessTransferFrom: what the payer signs for a
    maximum ``amount`` of ``token``, spendable by ``spender`` (the proxy) once (``nonce``)
    until ``deadline``, to ``to``, settled by ``facilitator`` from ``valid_after``."""
    permissions = keccak(encode(["bytes32", "address", "uint256"], [
        keccak(text=TOKEN_PERMISSIONS_TYPE), to_checksum_address(token), amount]))
    struct_hash = keccak(encode(
        ["bytes32", "bytes32", "address", "uint256", "uint256", "bytes32"],
        [keccak(text=PERMIT_WITNESS_TRANSFER_FROM_TYPE), permissions,
         to_checksum_address(spender), nonce, deadline,
         witness_hash(to, facilitator, valid_after)]))
    return keccak(b"\x19\x01" + domain_separator(chain_id, permit2_address) + struct_hash)


def nonce_position(nonce: int) -> tuple[int, int]:
    """``(wordPos, bitPos)`` of a Permit2 unordered nonce."""
    if not 0 <= nonce < 2**256:
        raise ValueError("a Permit2 nonce is a uint256")
    return nonce >> 8, nonce & 0xFF


def nonce_used(w3: Web3, owner: str, nonce: int, *,
               permit2_address: str = PERMIT2_ADDRESS) -> bool:
    """Whether ``owner`` has spent (or invalidated) Permit2 nonce ``nonce``."""
    word_pos, bit = nonce_position(nonce)
    permit2 = w3.eth.contract(address=to_checksum_address(permit2_address),
                              abi=PERMIT2_VIEW_ABI)
    bitmap = int(permit2.functions.nonceBitmap(to_checksum_address(owner), word_pos).call())
    return bool(bitmap >> bit & 1)


__all__ = ["PERMIT2_ADDRESS", "PERMIT2_VIEW_ABI", "UPTO_PROXY_ADDRESS", "UPTO_PROXY_SETTLE_ABI",
           "WITNESS_TYPE_STRING", "domain_separator", "nonce_position", "nonce_used",
           "permit2_digest", "witness_hash"]
