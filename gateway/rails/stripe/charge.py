"""MPP's ``stripe`` charge (specs/mpp/draft-stripe-charge-00.md): an agent pays a challenge with
a Stripe Shared Payment Token (SPT); the gateway confirms a PaymentIntent with it and credits a
balance in the configured fiat currency.

The challenge's ``request``: ``amount`` in the currency's minor units (the configured credit,
or what the request needs if more, its asset price converted and rounded up), ``currency``,
``description``, ``methodDetails.networkId`` (the seller's Business Network profile) and
``methodDetails.paymentMethodTypes``. A credential's ``payload`` is ``{"spt": "spt_...",
"externalId"?}``.

Settlement ("Settlement Procedure"): one PaymentIntent created and confirmed through the SDK
with the SPT as ``shared_payment_granted_token``, ``metadata.challenge_id``, the preview
``Stripe-Version`` and the idempotency key ``mpp_<challengeId>_<spt>``; ``succeeded`` credits
the account once (the credit's idempotency key is the PaymentIntent id) and answers with a
``Payment-Receipt`` (``reference``: the PaymentIntent id) and the account's API key.

A challenge pays once. Its first use records a claim (the SPT, the account to credit); the same
credential again while that claim is pending (a concurrent duplicate, or a retry after Stripe
was unreachable or the gateway crashed) repeats the same idempotent Stripe call and credit, so
it creates no second PaymentIntent and no second credit; once the claim is done, the challenge
is spent (``invalid-challenge``: the key went out with the first answer). Declines and
``requires_action`` are 402s with Stripe's reason and nothing credited; Stripe unreachable or
failing is a 503, nothing credited, and the claim released: the same credential works later.

Accounts: ``fiat_<currency>_<hash of the PaymentIntent>``, or the caller's own fiat account
when the request also carries its API key (``Authorization: Bearer``, the credential then in
``Payment-Authorization``): a top-up. With holds (``capture = "manual"``) the PaymentIntent is
only authorized (``requires_capture``), always funds an account of its own, and
:mod:`gateway.rails.stripe.holds` captures what that account spent when the hold closes.
"""

from __future__ import annotations

import hashlib
import time
from typing import Any, cast

from pydantic import ConfigDict, Field, StrictStr, ValidationError

from gateway.rails.base import Paid
from gateway.rails.mpp.scheme import (
    INVALID_CHALLENGE,
    MALFORMED_CREDENTIAL,
    VERIFICATION_FAILED,
    ChallengeEcho,
    Credential,
    Problem,
    _Strict,
    encode_receipt,
)
from gateway.rails.stripe.client import StripeApi, StripeRefused
from gateway.rails.stripe.holds import HoldKeeper
from gateway.rails.x402_deposits import API_KEY_HEADER
from meters.connection import as_text, redis_errors
from meters.ledger import Ledger
from meters.money import Asset, account_currency, fiat_account, round_up

#: How long a challenge's claim is kept (well past any challenge's expiry).
CLAIM_TTL_SECONDS = 2 * 86400


class SptPayload(_Strict):
    """``payload`` of a stripe charge credential ("Credential Schema")."""

    model_config = ConfigDict(strict=True, frozen=True, extra="forbid")
    spt: StrictStr = Field(pattern=r"^spt_[A-Za-z0-9_]{1,250}$")
    externalId: StrictStr | None = Field(default=None, max_length=255)


class StripeCharge:
    """The ``stripe`` / ``charge`` intent of the MPP rail (see the module docstring)."""

    method = "stripe"
    intent = "charge"

    def __init__(self, *, api: StripeApi, ledger: Ledger, currency: Asset, credit: int,
                 conversion: tuple[int, int], network_id: str,
                 payment_method_types: list[str], holds: HoldKeeper | None = None) -> None:
        self.api = api
        self.ledger = ledger
        self.currency = currency
        self.code = currency.symbol.lower()
        self.credit = credit
        self.conversion = conversion
        self.network_id = network_id
        self.payment_method_types = list(payment_method_types)
        #: With holds (manual capture), each payment funds an account of its own, captured
        #: for what it spent when closed.
        self.holds = holds

    def to_fiat(self, amount: int) -> int:
        """An amount of the gateway's asset in the currency's minor units, rounded up."""
        numerator, denominator = self.conversion
        return round_up(amount * numerator, denominator)

    def request(self, needed: int) -> dict[str, Any]:
        """The challenge's request; ``needed`` is in the gateway's asset."""
        return {"amount": str(max(self.credit, self.to_fiat(needed))), "currency": self.code,
                "description": "tollstream prepaid allowance (billed per token)",
                "methodDetails": {"networkId": self.network_id,
                                  "paymentMethodTypes": self.payment_method_types}}

    def check(self, credential: Credential, echo: ChallengeEcho) -> SptPayload:
        """The SPT of a credential for one of our stripe challenges (checked strictly)."""
        try:
            payload = SptPayload.model_validate(credential.payload)
        except ValidationError as exc:
            first = exc.errors(include_url=False)[0]
            where = ".".join(["payload", *(str(p) for p in first["loc"])])
            raise Problem(MALFORMED_CREDENTIAL, f"{where}: {first['msg']}",
                          param=where) from exc
        request = echo.request_object()
        details = request.get("methodDetails") or {}
        if (request.get("currency") != self.code
                or details.get("networkId") != self.network_id
                or not str(request.get("amount", "")).isdigit()):
            raise Problem(VERIFICATION_FAILED, "the challenge is for another currency or "
                          "seller than this gateway's")
        return payload

    async def pay(self, payload: SptPayload, echo: ChallengeEcho, *,
                  account_id: str | None) -> Paid:
        """Take the payment once (see the module docstring); ``account_id``: the caller's
        own fiat account to top up, if it sent its key."""
        if account_id is not None and (self.holds is not None
                                       or account_currency(account_id) != self.code):
            account_id = None  # a key of another currency, or a hold: an account of its own
        claim = await self._claim(echo.id, payload.spt, account_id)
        request = echo.request_object()
        params: dict[str, Any] = {
            "amount": int(request["amount"]), "currency": self.code, "confirm": True,
            "shared_payment_granted_token": payload.spt,
            "payment_method_types": self.payment_method_types,
            "metadata": {"challenge_id": echo.id}}
        if self.holds is not None:
            params["capture_method"] = "manual"
        try:
            intent = await self.api.create_payment_intent(
                params, idempotency_key=f"mpp_{echo.id}_{payload.spt}")
        except StripeRefused as exc:
            await self._finish(echo.id, claim, "")
            raise Problem(VERIFICATION_FAILED, exc.message,
                          fields={"reason": exc.code, **(
                              {"declineCode": exc.decline_code} if exc.decline_code else {})}
                          ) from exc
        except BaseException:
            await self._release(echo.id)  # nothing happened, or it repeats idempotently
            raise
        funded = "requires_capture" if self.holds is not None else "succeeded"
        if intent["status"] != funded:
            await self._finish(echo.id, claim, intent["id"])
            raise Problem(VERIFICATION_FAILED, f"the PaymentIntent is {intent['status']}: "
                          "the payment method needs the payer's action (3-D Secure); pay a "
                          "fresh challenge with an SPT that needs none",
                          fields={"reason": intent["status"], "reference": intent["id"]})
        account = claim.get("account") or fiat_account(
            self.code, hashlib.sha256(intent["id"].encode()).hexdigest()[:24])
        await self.ledger.ensure_account(account, label=f"stripe {self.code}")
        amount = intent["amount_capturable"] if self.holds is not None \
            else intent["amount_received"]
        await self.ledger.credit(account, amount, idempotency_key=intent["id"],
                                 purpose="stripe")
        if self.holds is not None:
            now = int(time.time())
            await self.holds.holds.open(intent["id"], account_id=account, amount=amount,
                                        expires=now + int(self.holds.max_seconds), now=now)
        api_key = await self.ledger.issue_payment_key(account)  # bounded, expiring
        await self._finish(echo.id, claim, intent["id"])
        fields: dict[str, Any] = {"method": self.method, "intent": self.intent,
                                  "challengeId": echo.id, "reference": intent["id"]}
        if self.holds is not None:
            fields["capture"] = "manual"  # authorized now, captured for what is spent
        if payload.externalId is not None:
            fields["externalId"] = payload.externalId
        return Paid(account, {"Payment-Receipt": encode_receipt(fields),
                              API_KEY_HEADER: api_key, "Cache-Control": "private"})

    # -- the challenge's claim --------------------------------------------------------------
    def _key(self, challenge_id: str) -> str:
        return f"{self.ledger.prefix}stripe:challenge:{challenge_id}"

    async def _claim(self, challenge_id: str, spt: str, account_id: str | None
                     ) -> dict[str, str]:
        key = self._key(challenge_id)
        with redis_errors():
            if await self.ledger.redis.hsetnx(key, "spt", spt):
                mapping = {"state": "pending", "account": account_id or "", "spt": spt}
                await self.ledger.redis.hset(key, mapping=cast(Any, mapping))
                await self.ledger.redis.expire(key, CLAIM_TTL_SECONDS)
                return mapping
            raw = await self.ledger.redis.hgetall(key)
        claim = {as_text(k): as_text(v) for k, v in raw.items()}
        if claim.get("spt") != spt or claim.get("state") == "done":
            raise Problem(INVALID_CHALLENGE, "this challenge was already used: pay a fresh one")
        return claim  # pending: the same payment again, repeated idempotently

    async def _finish(self, challenge_id: str, claim: dict[str, str], reference: str) -> None:
        key = self._key(challenge_id)
        with redis_errors():
            # With the SPT again: a duplicate's outage may have released the claim meanwhile,
            # and a spent challenge must stay spent.
            await self.ledger.redis.hset(key, mapping={"state": "done", "reference": reference,
                                                       "spt": claim.get("spt", "")})
            await self.ledger.redis.expire(key, CLAIM_TTL_SECONDS)

    async def _release(self, challenge_id: str) -> None:
        with redis_errors():
            await self.ledger.redis.delete(self._key(challenge_id))
