"""x402 ``upto`` on EVM: the wire format of a Permit2 authorization for a maximum, and its
verification and settlement (specs/x402/schemes/upto/scheme_upto.md, scheme_upto_evm.md).

The payer signs Permit2's ``PermitWitnessTransferFrom`` for at most ``permitted.amount``, with
the ``x402UptoPermit2Proxy`` as spender and a witness binding the recipient (``to``), the one
facilitator allowed to settle it (``facilitator``) and a start time (``validAfter``). The
resource server meters the request and settles once, for the actual amount, by calling the
proxy's ``settle(permit, amount, owner, witness, signature)`` from the facilitator's address.
An amount of zero sends no transaction ("Zero Settlement"): the authorization expires unused.

Field names are the official ``x402`` SDK's (2.25): ``payload.signature`` and
``payload.permit2Authorization.{from, permitted{token, amount}, spender, nonce, deadline,
witness{to, facilitator, validAfter}}``, amounts and times as decimal strings. Reason codes
are the SDK's (``invalid_permit2_*``, ``permit2_*``, ``upto_*``), so a client sees the same
code from tollstream as from the SDK's facilitator.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, Literal

from eth_account import Account
from eth_account.messages import encode_typed_data
from eth_utils import to_checksum_address
from hexbytes import HexBytes
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from pydantic.alias_generators import to_camel

from gateway.chain.permit2 import (
    PERMIT2_ADDRESS,
    PERMIT2_VIEW_ABI,
    UPTO_PROXY_ADDRESS,
    UPTO_PROXY_SETTLE_ABI,
    nonce_position,
)
from gateway.errors import PaymentRejected
from gateway.rails.eip3009 import EvmNetwork
from gateway.rails.evm import SettlementResult, submit
from gateway.rails.evm_rpc import ChainRpc
from gateway.rails.x402 import (
    Address,
    AssetExtra,
    HexBytesStr,
    PaymentRequirements,
    ResourceInfo,
    Uint,
    field_error,
)

SCHEME_UPTO = "upto"
#: Verification refuses an authorization expiring within this many seconds (the SDK's
#: Permit2 deadline buffer): settling it could revert on-chain.
DEADLINE_BUFFER = 6

# Reason codes (the SDK's constants of the same meaning).
ERR_SPENDER = "invalid_permit2_spender"
ERR_RECIPIENT = "invalid_permit2_recipient_mismatch"
ERR_DEADLINE = "permit2_deadline_expired"
ERR_NOT_YET_VALID = "permit2_not_yet_valid"
ERR_AMOUNT_MISMATCH = "permit2_amount_mismatch"
ERR_TOKEN_MISMATCH = "permit2_token_mismatch"
ERR_SIGNATURE = "invalid_permit2_signature"
ERR_ALLOWANCE = "permit2_allowance_required"
ERR_BALANCE = "permit2_insufficient_balance"
ERR_NONCE_USED = "permit2_invalid_nonce"
ERR_SETTLEMENT_EXCEEDS = "invalid_upto_evm_payload_settlement_exceeds_amount"
ERR_FACILITATOR = "upto_facilitator_mismatch"
ERR_SCHEME = "invalid_upto_evm_scheme"
ERR_NETWORK = "invalid_upto_evm_network_mismatch"
ERR_TRANSACTION = "invalid_upto_evm_transaction_failed"

# Revert strings of the proxy and Permit2 (ours and the reference ones) -> reason codes.
_REVERTS = (
    ("AmountExceedsPermitted", "upto_amount_exceeds_permitted"),
    ("UnauthorizedFacilitator", "upto_unauthorized_facilitator"),
    ("InvalidDestination", "permit2_invalid_destination"),
    ("InvalidOwner", "permit2_invalid_owner"),
    ("PaymentTooEarly", "permit2_payment_too_early"),
    ("SignatureExpired", ERR_SIGNATURE),
    ("InvalidSignature", ERR_SIGNATURE),
    ("InvalidSigner", ERR_SIGNATURE),
    ("InvalidNonce", ERR_NONCE_USED),
    ("InvalidAmount", "permit2_invalid_amount"),
    ("allowance", ERR_ALLOWANCE),
    ("balance", ERR_BALANCE),
)

ERC20_ABI: list[dict[str, Any]] = [
    {"type": "function", "name": "allowance", "stateMutability": "view",
     "inputs": [{"name": "owner", "type": "address"}, {"name": "spender", "type": "address"}],
     "outputs": [{"name": "", "type": "uint256"}]},
    {"type": "function", "name": "balanceOf", "stateMutability": "view",
     "inputs": [{"name": "account", "type": "address"}],
     "outputs": [{"name": "", "type": "uint256"}]}]
_TRANSFER_TOPIC = "0x" + bytes(HexBytes(
    "0xddf252ad1be2c89b69c2b068fc378daa952ba7f163c4a11628f55a4df523b3ef")).hex()


class _Wire(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, frozen=True,
                              serialize_by_alias=True, extra="ignore")


class TokenPermissions(_Wire):
    token: Address
    amount: Uint


class UptoWitness(_Wire):
    to: Address
    facilitator: Address
    valid_after: Uint


class UptoAuthorization(_Wire):
    """``permit2Authorization``: what the payer signed."""

    from_: Address = Field(alias="from")
    permitted: TokenPermissions
    spender: Address
    nonce: Uint
    deadline: Uint
    witness: UptoWitness


class UptoEvmPayload(_Wire):
    signature: HexBytesStr
    permit2_authorization: UptoAuthorization


class UptoPaymentPayload(_Wire):
    """A v2 ``PAYMENT-SIGNATURE`` paying with ``upto`` (the scheme has no v1 form)."""

    x402_version: Literal[2] = 2
    resource: ResourceInfo | None = None
    accepted: PaymentRequirements
    payload: UptoEvmPayload
    extensions: dict[str, Any] | None = None

    @property
    def payer(self) -> str:
        return to_checksum_address(self.payload.permit2_authorization.from_)


def parse_upto_payload(data: Any, *, where: str = "PAYMENT-SIGNATURE") -> UptoPaymentPayload:
    """Validate a decoded ``upto`` payment; :class:`InvalidPayment` naming the field."""
    try:
        return UptoPaymentPayload.model_validate(data)
    except ValidationError as exc:
        raise field_error(exc, where) from exc


def upto_requirements(network: EvmNetwork, *, amount: int, pay_to: str, facilitator: str,
                      max_timeout_seconds: int) -> PaymentRequirements:
    """v2 requirements authorizing at most ``amount`` (``extra.facilitatorAddress``: who may
    settle; the client binds it into the witness)."""
    return PaymentRequirements(
        scheme=SCHEME_UPTO, network=network.network, amount=amount, asset=network.asset,
        pay_to=pay_to, max_timeout_seconds=max_timeout_seconds,
        extra=AssetExtra.model_validate({
            "name": network.token_name, "version": network.token_version,
            "facilitatorAddress": facilitator, "assetTransferMethod": "permit2"}))


def typed_data(auth: UptoAuthorization, chain_id: int) -> dict[str, Any]:
    """The EIP-712 document the payer signs: Permit2's domain has no version."""
    return {
        "types": {
            "EIP712Domain": [{"name": "name", "type": "string"},
                             {"name": "chainId", "type": "uint256"},
                             {"name": "verifyingContract", "type": "address"}],
            "PermitWitnessTransferFrom": [
                {"name": "permitted", "type": "TokenPermissions"},
                {"name": "spender", "type": "address"}, {"name": "nonce", "type": "uint256"},
                {"name": "deadline", "type": "uint256"}, {"name": "witness", "type": "Witness"}],
            "TokenPermissions": [{"name": "token", "type": "address"},
                                 {"name": "amount", "type": "uint256"}],
            "Witness": [{"name": "to", "type": "address"},
                        {"name": "facilitator", "type": "address"},
                        {"name": "validAfter", "type": "uint256"}]},
        "primaryType": "PermitWitnessTransferFrom",
        "domain": {"name": "Permit2", "chainId": chain_id, "verifyingContract": PERMIT2_ADDRESS},
        "message": {
            "permitted": {"token": to_checksum_address(auth.permitted.token),
                          "amount": auth.permitted.amount},
            "spender": to_checksum_address(auth.spender), "nonce": auth.nonce,
            "deadline": auth.deadline,
            "witness": {"to": to_checksum_address(auth.witness.to),
                        "facilitator": to_checksum_address(auth.witness.facilitator),
                        "validAfter": auth.witness.valid_after}}}


def recover_payer(payload: UptoEvmPayload, chain_id: int) -> str | None:
    """The address that signed the authorization, or None for an unusable signature."""
    signature = HexBytes(payload.signature)
    if len(signature) != 65:
        return None
    try:
        message = encode_typed_data(full_message=typed_data(payload.permit2_authorization,
                                                            chain_id))
        return str(Account.recover_message(message, signature=signature))
    except (ValueError, TypeError):  # a signature off the curve, or with a bad v
        return None


def _revert_code(message: str, default: str = ERR_TRANSACTION) -> str:
    for needle, code in _REVERTS:
        if needle.lower() in message.lower():
            return code
    return default


class UptoEvm:
    """Verifies and settles ``upto`` authorizations with our relayer as the facilitator (the
    local facilitator; a remote one does the same behind its HTTP API)."""

    def __init__(self, rpc: ChainRpc, *, clock: Callable[[], float] = time.time,
                 poll_interval: float = 0.05) -> None:
        self.rpc = rpc
        self._clock = clock
        self._poll = poll_interval

    def _contract(self, network: EvmNetwork, address: str, abi: list[dict[str, Any]]) -> Any:
        return self.rpc.web3(network).eth.contract(address=to_checksum_address(address),
                                                   abi=abi)

    async def nonce_used(self, network: EvmNetwork, owner: str, nonce: int) -> bool:
        """Whether Permit2 has spent (or the owner invalidated) ``nonce``."""
        word, bit = nonce_position(nonce)
        fn = self._contract(network, PERMIT2_ADDRESS, PERMIT2_VIEW_ABI).functions.nonceBitmap(
            to_checksum_address(owner), word)
        bitmap = await self.rpc.quantity(network, fn.call, "nonceBitmap")
        return bool(bitmap >> bit & 1)

    async def verify(self, payload: UptoPaymentPayload, requirements: PaymentRequirements,
                     network: EvmNetwork, *, facilitator: str) -> None:
        """The scheme's verification (scheme_upto_evm.md, "Phase 3"), in the SDK's order;
        :class:`PaymentRejected` with the first failure's code. ``requirements.amount`` is
        the maximum here."""
        auth = payload.payload.permit2_authorization
        if payload.accepted.scheme != SCHEME_UPTO or requirements.scheme != SCHEME_UPTO:
            raise PaymentRejected("the scheme is not upto", code=ERR_SCHEME)
        if payload.accepted.network != requirements.network:
            raise PaymentRejected("the network is not the one offered", code=ERR_NETWORK)
        if auth.spender.lower() != UPTO_PROXY_ADDRESS.lower():
            raise PaymentRejected("permit2Authorization.spender is not the x402 upto proxy",
                                  code=ERR_SPENDER)
        if auth.witness.to.lower() != requirements.pay_to.lower():
            raise PaymentRejected("witness.to is not the payTo address", code=ERR_RECIPIENT)
        if auth.witness.facilitator.lower() != facilitator.lower():
            raise PaymentRejected("witness.facilitator is not this gateway's facilitator",
                                  code=ERR_FACILITATOR)
        now = int(self._clock())
        if auth.deadline <= now + DEADLINE_BUFFER:
            raise PaymentRejected("the authorization's deadline has passed or is too near",
                                  code=ERR_DEADLINE)
        if auth.witness.valid_after > now:
            raise PaymentRejected("the authorization is not valid yet (witness.validAfter)",
                                  code=ERR_NOT_YET_VALID)
        if auth.permitted.amount != requirements.amount:
            raise PaymentRejected(f"permitted.amount {auth.permitted.amount} != required "
                                  f"{requirements.amount}", code=ERR_AMOUNT_MISMATCH)
        if auth.permitted.token.lower() != requirements.asset.lower():
            raise PaymentRejected("permitted.token is not the asset", code=ERR_TOKEN_MISMATCH)
        if recover_payer(payload.payload, network.chain_id) != to_checksum_address(auth.from_):
            raise PaymentRejected("the signature does not recover permit2Authorization.from",
                                  code=ERR_SIGNATURE)
        token = self._contract(network, network.asset, ERC20_ABI).functions
        owner = to_checksum_address(auth.from_)
        allowance = await self.rpc.quantity(
            network, token.allowance(owner, to_checksum_address(PERMIT2_ADDRESS)).call,
            "allowance")
        if allowance < auth.permitted.amount:
            raise PaymentRejected("the payer has not approved Permit2 for this amount (a "
                                  "one-time approve(Permit2) is required)", code=ERR_ALLOWANCE)
        if await self.rpc.quantity(network, token.balanceOf(owner).call,
                                   "balanceOf") < auth.permitted.amount:
            raise PaymentRejected("the payer's balance is below the authorized maximum",
                                  code=ERR_BALANCE)
        if await self.nonce_used(network, owner, auth.nonce):
            raise PaymentRejected("this authorization's nonce was used", code=ERR_NONCE_USED)

    def _settle_call(self, payload: UptoPaymentPayload, amount: int,
                     network: EvmNetwork) -> Any:
        auth = payload.payload.permit2_authorization
        permit = ((to_checksum_address(auth.permitted.token), auth.permitted.amount),
                  auth.nonce, auth.deadline)
        witness = (to_checksum_address(auth.witness.to),
                   to_checksum_address(auth.witness.facilitator), auth.witness.valid_after)
        return self._contract(network, UPTO_PROXY_ADDRESS,
                              UPTO_PROXY_SETTLE_ABI).functions.settle(
            permit, amount, to_checksum_address(auth.from_), witness,
            HexBytes(payload.payload.signature))

    async def settle(self, payload: UptoPaymentPayload, amount: int,
                     network: EvmNetwork) -> SettlementResult:
        """Transfer ``amount`` (at most the authorized maximum) to the witness's recipient;
        zero sends nothing. Raises like :meth:`gateway.rails.evm.EvmSettler.settle`:
        :class:`PaymentRejected` (refused: nothing moved), :class:`SettlementNotSubmitted`
        (not broadcast), ServiceUnavailable/UpstreamError with ``extra["transaction"]``
        (broadcast, outcome unknown: ask :meth:`nonce_used`)."""
        auth = payload.payload.permit2_authorization
        payer = to_checksum_address(auth.from_)
        if amount > auth.permitted.amount:
            raise PaymentRejected(f"settling {amount} exceeds the authorized "
                                  f"{auth.permitted.amount}", code=ERR_SETTLEMENT_EXCEEDS)
        if amount == 0:
            return SettlementResult(tx_hash="", payer=payer, amount=0, block_number=None,
                                    network=network.network)
        sent, receipt = await submit(self.rpc, self._settle_call(payload, amount, network),
                                     network, code_of=_revert_code, refused=ERR_TRANSACTION,
                                     poll=self._poll)
        if receipt.get("status") != 1 or not _has_transfer(receipt, network.asset, payer,
                                                           auth.witness.to, amount):
            raise PaymentRejected(f"settlement transaction {sent} did not transfer {amount}",
                                  code=ERR_TRANSACTION, extra={"transaction": sent})
        return SettlementResult(tx_hash=sent, payer=payer, amount=amount,
                                block_number=receipt["blockNumber"], network=network.network)


def _has_transfer(receipt: Any, token: str, payer: str, to: str, amount: int) -> bool:
    """Whether the receipt holds the token's ``Transfer(payer, to, amount)``."""
    want = ["0x" + "00" * 12 + payer.lower()[2:], "0x" + "00" * 12 + to.lower()[2:]]
    for entry in receipt.get("logs", ()):
        topics = ["0x" + bytes(HexBytes(t)).hex() for t in entry.get("topics", ())]
        if (str(entry.get("address", "")).lower() == token.lower() and len(topics) == 3
                and topics[0] == _TRANSFER_TOPIC and topics[1:] == want
                and int.from_bytes(bytes(HexBytes(entry.get("data", b""))), "big") == amount):
            return True
    return False


__all__ = [
    "PERMIT2_ADDRESS",
    "SCHEME_UPTO",
    "UPTO_PROXY_ADDRESS",
    "UptoAuthorization",
    "UptoEvm",
    "UptoPaymentPayload",
    "parse_upto_payload",
    "recover_payer",
    "typed_data",
    "upto_requirements",
]
