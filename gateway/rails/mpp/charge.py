"""MPP's ``evm`` charge (specs/mpp/draft-evm-charge-00.md): a one-time EIP-3009 payment,
credited to the payer's account as a balance, the simplest MPP path and the one the stock
``pympp`` client pays.

The challenge's ``request`` asks for ``amount`` (the configured deposit, or the request's need
if higher) of ``currency`` to ``recipient`` on ``methodDetails.chainId``; only the
``authorization`` credential type is offered (our token is EIP-3009; Permit2 is not deployed on
the dev chain). A credential's authorization is verified, claimed, settled and credited by the
same code that takes x402 deposits (:meth:`X402Deposits.collect`), so the two rails' payments
are recorded, recovered after a crash and credited alike, to the same account of a payer.
"""

from __future__ import annotations

from typing import Any

from eth_utils import keccak, to_checksum_address
from pydantic import ConfigDict, Field, StrictStr, ValidationError

from gateway.errors import InvalidPayment, PaymentRejected
from gateway.rails.base import Paid
from gateway.rails.evm import EvmNetwork
from gateway.rails.mpp.scheme import (
    MALFORMED_CREDENTIAL,
    PAYMENT_EXPIRED,
    VERIFICATION_FAILED,
    ChallengeEcho,
    Credential,
    Problem,
    _Strict,
    encode_receipt,
)
from gateway.rails.x402 import Authorization, ExactEvmPayload, PaymentPayload
from gateway.rails.x402_challenge import exact_requirements
from gateway.rails.x402_deposits import API_KEY_HEADER, SettlementFailed, X402Deposits
from meters.ledger import Ledger
from meters.money import Asset

#: The canonical Permit2 deployment; the spec makes ``permit2Address`` a required field even
#: when, as here, only ``authorization`` credentials are accepted.
PERMIT2 = "0x000000000022D473030F116dDEE9F6B43aC78BA3"
_EXPIRED_CODES = {"invalid_exact_evm_payload_authorization_valid_before",
                  "invalid_exact_evm_payload_authorization_valid_after"}


class AuthorizationPayload(_Strict):
    """``payload`` of a ``type="authorization"`` charge credential."""

    model_config = ConfigDict(strict=True, frozen=True, extra="ignore", populate_by_name=True)
    type: StrictStr = Field(pattern=r"^authorization$")
    from_: StrictStr = Field(alias="from", pattern=r"^0x[0-9a-fA-F]{40}$")
    to: StrictStr = Field(pattern=r"^0x[0-9a-fA-F]{40}$")
    value: StrictStr = Field(pattern=r"^[0-9]{1,78}$")
    validAfter: StrictStr = Field(pattern=r"^[0-9]{1,78}$")
    validBefore: StrictStr = Field(pattern=r"^[0-9]{1,78}$")
    nonce: StrictStr = Field(pattern=r"^0x[0-9a-fA-F]{64}$")
    signature: StrictStr = Field(pattern=r"^0x[0-9a-fA-F]{130}$")


def challenge_hashes(challenge_id: str, realm: str) -> set[str]:
    """The nonces that bind an authorization to its challenge.

    The spec ("Challenge Binding") says ``keccak256(abi.encodePacked(id, realm))``; the
    reference clients (mppx, and pympp which follows it) hash ``JSON.stringify([id, realm])``.
    Both are accepted so the stock clients can pay: either binds the payment to this one
    challenge, which is single use.
    """
    packed = keccak(challenge_id.encode() + realm.encode())
    stringified = keccak(text=f'["{_json_escape(challenge_id)}","{_json_escape(realm)}"]')
    return {"0x" + packed.hex(), "0x" + stringified.hex()}


def _json_escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace('"', '\\"')


class EvmCharge:
    """The ``evm`` / ``charge`` intent of the MPP rail."""

    method = "evm"
    intent = "charge"

    def __init__(self, *, engine: X402Deposits, network: EvmNetwork, pay_to: str,
                 deposit: int, asset: Asset, ledger: Ledger, max_timeout_seconds: int) -> None:
        self.engine = engine
        self.network = network
        self.pay_to = to_checksum_address(pay_to)
        self.deposit = deposit
        self.asset = asset
        self.ledger = ledger
        self.max_timeout_seconds = max_timeout_seconds

    def request(self, needed: int) -> dict[str, Any]:
        """The challenge's ``request`` object."""
        return {"amount": str(max(self.deposit, needed)),
                "currency": to_checksum_address(self.network.asset),
                "recipient": self.pay_to,
                "description": "tollstream prepaid allowance (credited, billed per token)",
                "methodDetails": {"chainId": self.network.chain_id,
                                  "credentialTypes": ["authorization"],
                                  "permit2Address": PERMIT2,
                                  "decimals": self.asset.decimals}}

    def check(self, credential: Credential, echo: ChallengeEcho) -> PaymentPayload:
        """Everything that can be checked before anything is spent or burned; the payment
        as the deposit engine takes it."""
        try:
            payload = AuthorizationPayload.model_validate(credential.payload)
        except ValidationError as exc:
            where = ".".join(str(p) for p in exc.errors(include_url=False)[0]["loc"])
            raise Problem(MALFORMED_CREDENTIAL, f"payload.{where} is missing or malformed "
                          "(an evm charge takes a type=\"authorization\" payload)",
                          param=f"payload.{where}") from exc
        request = echo.request_object()
        amount = int(request.get("amount", "0"))
        details = request.get("methodDetails") or {}
        if (str(request.get("currency", "")).lower() != self.network.asset.lower()
                or str(request.get("recipient", "")).lower() != self.pay_to.lower()
                or details.get("chainId") != self.network.chain_id):
            raise Problem(VERIFICATION_FAILED, "the challenge is for another token, "
                          "recipient or chain than this gateway takes")
        if payload.to.lower() != self.pay_to.lower():
            raise Problem(VERIFICATION_FAILED, "authorization.to is not the challenge's "
                          "recipient")
        if int(payload.value) != amount:
            raise Problem(VERIFICATION_FAILED, f"authorization.value {payload.value} is not "
                          f"the challenge's amount {amount}")
        if payload.nonce.lower() not in challenge_hashes(echo.id, echo.realm):
            raise Problem(VERIFICATION_FAILED, "authorization.nonce is not bound to this "
                          "challenge (keccak256 of its id and realm)")
        requirements = exact_requirements(self.network, amount=amount, pay_to=self.pay_to,
                                          max_timeout_seconds=self.max_timeout_seconds)
        return PaymentPayload(accepted=requirements, payload=ExactEvmPayload(
            signature=payload.signature, authorization=Authorization.model_validate({
                "from": payload.from_, "to": payload.to, "value": payload.value,
                "validAfter": payload.validAfter, "validBefore": payload.validBefore,
                "nonce": payload.nonce})))

    async def pay(self, payment: PaymentPayload, echo: ChallengeEcho) -> Paid:
        """Settle a checked payment and credit it: the account and the response headers."""
        try:
            result, account_id = await self.engine.collect(payment, payment.accepted,
                                                           label="mpp")
        except SettlementFailed as exc:
            raise Problem(VERIFICATION_FAILED, f"settlement failed: {exc.message}") from exc
        except (InvalidPayment, PaymentRejected) as exc:
            kind = PAYMENT_EXPIRED if exc.code in _EXPIRED_CODES else VERIFICATION_FAILED
            raise Problem(kind, exc.message, fields={"reason": exc.code}) from exc
        # Bounded and expiring like the x402 rail's (Ledger.issue_payment_key).
        api_key = await self.ledger.issue_payment_key(
            account_id, keep=self.engine.api_keys_kept,
            idle_seconds=self.engine.api_key_idle_seconds)
        receipt = encode_receipt({"method": self.method, "intent": self.intent,
                                  "challengeId": echo.id, "reference": result.tx_hash,
                                  "chainId": self.network.chain_id})
        return Paid(account_id, {"Payment-Receipt": receipt, API_KEY_HEADER: api_key,
                                 "Cache-Control": "private"})
