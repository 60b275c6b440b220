"""The MPP rail the routes talk to: a ``Payment`` challenge per enabled intent in every 402, and
credentials checked against their challenge, then handed to their intent.

Checks every credential goes through, in order (specs/mpp/draft-httpauth-payment-00.md, and
"Common Verification" of the evm session draft): strict decoding (``malformed-credential``),
method (``method-unsupported``, 400), the challenge's ``id`` is the HMAC of its echoed
parameters under one of our secrets and its realm is ours (``invalid-challenge``), it has not
expired (``payment-expired``), then the intent's own checks. Challenge ids of a ``charge`` are
single use: burned in Redis (``SET NX``) before anything is paid, so two requests carrying the
same credential settle once. Errors are RFC 9457 problem details with fresh challenges; a
``Payment-Receipt`` only ever goes with a success.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Iterable
from typing import Any

import orjson
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from starlette.requests import Request
from starlette.responses import Response

from gateway.rails.base import Offer, Paid, PaymentRail, render
from gateway.rails.mpp.charge import EvmCharge
from gateway.rails.mpp.scheme import (
    INVALID_CHALLENGE,
    MALFORMED_CREDENTIAL,
    METHOD_UNSUPPORTED,
    PAYMENT_EXPIRED,
    WWW_AUTHENTICATE,
    ChallengeEcho,
    ChallengeSigner,
    Credential,
    Problem,
    b64url_decode,
    credential_value,
    order_challenges,
    parse_accept_payment,
    parse_credential,
    parse_timestamp,
)
from gateway.rails.mpp.session import EvmSession, SessionResult
from gateway.rails.mpp.session_stream import SessionStream
from gateway.rails.mpp.settler import ChannelSettler
from gateway.rails.stripe.charge import StripeCharge
from meters.connection import redis_errors
from meters.ledger import Ledger
from meters.rates import Rate

log = logging.getLogger("tollstream.mpp")


class MppRail(PaymentRail):
    """The ``Payment`` scheme, method ``evm``: the ``charge`` intent (and, with it, ``session``
    once the session is enabled)."""

    name = "mpp"
    method = "evm"

    def __init__(self, *, realm: str, signer: ChallengeSigner, ledger: Ledger,
                 charge: EvmCharge | None, min_output_tokens: int = 256,
                 owns_engine: bool = True, session: EvmSession | None = None,
                 settler: ChannelSettler | None = None,
                 stripe: StripeCharge | None = None) -> None:
        self.owns_engine = owns_engine
        self.session = session
        self.settler = settler
        self.realm = realm
        self.signer = signer
        self.ledger = ledger
        self.charge = charge
        self.stripe = stripe
        #: The methods credentials may use: evm (charge, session), stripe (charge).
        self.methods = {m for m, on in (("evm", charge or session), ("stripe", stripe)) if on}
        self.min_output_tokens = min_output_tokens

    def metrics(self) -> Iterable[Metric]:
        """Vouchers taken by result, and what open channels spent beyond their settlement."""
        if self.session is None:
            return
        vouchers = CounterMetricFamily("tollstream_mpp_vouchers", "Session vouchers by "
                                       "result (accepted, replayed, rejected)",
                                       labels=["result"])
        for result in ("accepted", "replayed", "rejected"):
            vouchers.add_metric([result], self.session.vouchers[result])
        yield vouchers
        if self.settler is not None:
            yield GaugeMetricFamily("tollstream_mpp_unsettled_atomic_units", "Spent on open "
                                    "channels beyond what the chain settled (last pass)",
                                    value=self.settler.unsettled)

    async def aclose(self) -> None:
        if self.settler is not None:
            await self.settler.stop()
        if self.session is not None:
            await self.session.escrow.aclose()
        if self.charge is not None and self.owns_engine:
            await self.charge.engine.aclose()
        if self.stripe is not None:
            if self.stripe.holds is not None:
                await self.stripe.holds.stop()
            await self.stripe.api.aclose()

    async def start(self) -> None:
        if self.charge is not None and self.owns_engine:
            await self.charge.engine.start()
        if self.settler is not None:
            await self.settler.start()
        if self.stripe is not None and self.stripe.holds is not None:
            await self.stripe.holds.start()

    # -- the 402 --------------------------------------------------------------------------------
    def offer(self, request: Request, *, needed: int, reason: str, code: str,
              rate: Rate | None = None) -> Offer | None:
        challenges = []
        if self.session is not None:
            challenges.append(self.signer.issue(realm=self.realm, method=self.method,
                                                intent=self.session.intent,
                                                request=self.session.request(rate)))
        if self.charge is not None:
            challenges.append(self.signer.issue(realm=self.realm, method=self.method,
                                                intent=self.charge.intent,
                                                request=self.charge.request(needed)))
        if self.stripe is not None:
            challenges.append(self.signer.issue(realm=self.realm, method=self.stripe.method,
                                                intent=self.stripe.intent,
                                                request=self.stripe.request(needed)))
        if not challenges:
            return None
        ranked = order_challenges(challenges,
                                  parse_accept_payment(request.headers.get("accept-payment")))
        return Offer(headers=[(WWW_AUTHENTICATE, c.header()) for c in ranked],
                     payment_scheme=True)

    async def status(self) -> dict[str, str]:
        found: dict[str, str] = {}
        if self.session is not None:
            found["MPP channels open"] = str(len(await self.session.channels.open_ids()))
        if self.settler is not None:
            found["MPP spent, not yet settled on-chain (last pass)"] = str(
                self.settler.unsettled)
        if self.stripe is not None and self.stripe.holds is not None:
            found["Stripe holds open"] = str(len(await self.stripe.holds.holds.open_ids()))
        return found

    async def close_balance(self, account_id: str) -> dict[str, Any] | None:
        if self.stripe is None or self.stripe.holds is None:
            return None
        return await self.stripe.holds.close_account(account_id)

    async def top_up_hint(self, account_id: str, request: Request) -> dict[str, Any]:
        return {"method": "mpp", "header": WWW_AUTHENTICATE,
                "how": "pay a fresh Payment challenge (any 402 from this gateway carries one)"}

    # -- credentials ----------------------------------------------------------------------------
    def claims(self, request: Request) -> bool:
        return credential_value(request.headers) is not None

    async def authenticate(self, request: Request, *, needed: int, rate: Rate | None = None
                           ) -> Paid | None:
        token = credential_value(request.headers)
        if token is None:
            return None
        try:
            result = await self._authenticate(token, request)
        except Problem as exc:
            raise self._answer(request, exc, needed=needed, rate=rate) from exc
        if isinstance(result, Paid):
            return result
        # A session credential: the stream pauses for vouchers instead of being cut.
        assert self.session is not None
        return Paid(result.account_id, result.headers,
                    SessionStream(self.session, result.channel_id, result.challenge_id))

    async def manage(self, request: Request) -> Response | None:
        """A session action that needs no model call (``close``, or any action on ``HEAD``):
        answered here, before the request body is read. None for everything else."""
        token = credential_value(request.headers)
        if token is None or self.session is None:
            return None
        try:
            credential = parse_credential(token)
        except Problem:
            return None  # the model route answers it, with its fresh challenges
        if credential.challenge.intent != "session" or (
                request.method != "HEAD" and credential.payload.get("action") != "close"):
            return None
        try:
            checked, echo = self._checked(token)
            result = await self.session.handle(checked, echo)
        except Problem as exc:
            raise self._answer(request, exc, needed=0, rate=None) from exc
        receipt = result.headers.get("Payment-Receipt", "")
        body = b"" if request.method == "HEAD" else orjson.dumps(
            orjson.loads(b64url_decode(receipt)) if receipt else {})
        return Response(body, media_type="application/json", headers=result.headers)

    def _answer(self, request: Request, exc: Problem, *, needed: int, rate: Rate | None
                ) -> Problem:
        """A problem as the response: 402s with fresh challenges, others without."""
        if exc.status != 402:  # only 402s carry challenges
            exc.body = {**exc.problem(), "code": exc.code, "message": exc.message}
            exc.media_type = "application/problem+json"
            return exc
        offer = self.offer(request, needed=needed, reason=exc.message, code=exc.code,
                           rate=rate)
        rendered = render(exc, [offer] if offer else [], needed=needed, problem=exc.problem())
        assert isinstance(rendered, Problem)
        return rendered

    async def _authenticate(self, token: str, request: Request) -> Paid | SessionResult:
        credential, echo = self._checked(token)
        if echo.method == "stripe" and echo.intent == "charge" and self.stripe is not None:
            payload = self.stripe.check(credential, echo)
            return await self.stripe.pay(payload, echo,
                                         account_id=await self._key_account(request))
        if echo.method != "evm":
            raise Problem(INVALID_CHALLENGE, f"intent {echo.intent!r} of {echo.method!r} is "
                          "not offered here")
        if echo.intent == "charge" and self.charge is not None:
            payment = self.charge.check(credential, echo)
            await self.burn(echo.id)
            return await self.charge.pay(payment, echo)
        if echo.intent == "session" and self.session is not None:
            # Session challenges are not burned: every voucher of a channel echoes one, and
            # vouchers are replay-safe by themselves (cumulative, idempotent below the
            # accepted amount); the HMAC and expiry still bind them to this gateway.
            return await self.session.handle(credential, echo)
        raise Problem(INVALID_CHALLENGE, f"intent {echo.intent!r} is not offered here")

    async def _key_account(self, request: Request) -> str | None:
        """The account of an API key sent beside the credential (``Authorization: Bearer``,
        the credential in ``Payment-Authorization``): a payment then tops it up."""
        value = request.headers.get("authorization", "")
        scheme, _, key = value.partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            return None
        return await self.ledger.authenticate(key.strip())

    def _checked(self, token: str) -> tuple[Credential, ChallengeEcho]:
        """A credential whose challenge this gateway issued, unchanged and unexpired."""
        credential = parse_credential(token)
        echo = credential.challenge
        if echo.method not in self.methods:
            raise Problem(METHOD_UNSUPPORTED, f"payment method {echo.method!r} is not "
                          f"accepted here (only {', '.join(sorted(self.methods))})",
                          status=400)
        if echo.realm != self.realm or not self.signer.verify(echo):
            raise Problem(INVALID_CHALLENGE, "the challenge was not issued by this gateway, "
                          "or its parameters were changed")
        if echo.expires is not None:
            try:
                expired = parse_timestamp(echo.expires) <= dt.datetime.now(dt.UTC)
            except ValueError as exc:
                raise Problem(MALFORMED_CREDENTIAL, "challenge.expires is not an RFC 3339 "
                              "timestamp", param="challenge.expires") from exc
            if expired:
                raise Problem(PAYMENT_EXPIRED, "the challenge expired: pay a fresh one")
        try:
            echo.request_object()
        except ValueError as exc:
            raise Problem(MALFORMED_CREDENTIAL, "challenge.request is not base64url of a "
                          "JSON object", param="challenge.request") from exc
        return credential, echo

    async def burn(self, challenge_id: str) -> None:
        """Use a challenge id up, atomically; ``invalid-challenge`` if it already was."""
        key = f"{self.ledger.prefix}mpp:used:{challenge_id}"
        with redis_errors():
            fresh = await self.ledger.redis.set(
                key, "1", nx=True, ex=self.signer.ttl_seconds + 3600)
        if not fresh:
            raise Problem(INVALID_CHALLENGE, "this challenge was already used: pay a fresh one")
