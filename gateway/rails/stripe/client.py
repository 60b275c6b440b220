"""The Stripe API as tollstream uses it, through the ``stripe`` SDK (never raw HTTP), with the
SDK's exceptions translated here, once:

* a refusal about the payment itself (a declined card, an SPT that is invalid or spent, an
  idempotency conflict) is :class:`StripeRefused` (the payer can do something about it);
* every other Stripe error (unreachable, timing out, rate limiting, failing with a 5xx, or
  refusing our own credentials) is :class:`~gateway.errors.ServiceUnavailable` (503: nothing
  happened that the same request cannot safely retry, thanks to the idempotency keys every
  call carries).

Shared Payment Tokens need Stripe's preview API version (``PREVIEW_VERSION``, what both MPP
SDKs pin); the SPT goes in as the ``shared_payment_granted_token`` parameter, which the GA SDK
has no typed field for, so parameters are passed as plain dicts.
"""

from __future__ import annotations

from typing import Any

import stripe

from gateway.errors import GatewayError, ServiceUnavailable

PREVIEW_VERSION = "2026-07-29.preview"


class StripeRefused(GatewayError):
    """Stripe refused the payment: ``code`` is Stripe's (``card_declined``, ...)."""

    status = 402
    code = "stripe_refused"

    def __init__(self, message: str, *, code: str, decline_code: str | None = None) -> None:
        super().__init__(message, code=code)
        self.decline_code = decline_code


class StripeApi:
    """One Stripe account's API (an async client on the SDK's httpx transport)."""

    def __init__(self, secret_key: str, *, api_base: str, timeout: float) -> None:
        self.http = stripe.HTTPXClient(timeout=timeout)
        self.client = stripe.StripeClient(secret_key, base_addresses={"api": api_base},
                                          max_network_retries=0, http_client=self.http)

    async def create_payment_intent(self, params: dict[str, Any], *, idempotency_key: str
                                    ) -> dict[str, Any]:
        """Create (and, with ``confirm``, confirm) a PaymentIntent; a replayed idempotent
        call answers the first one's PaymentIntent."""
        # The SPT parameter is not in the GA SDK's types: a plain dict.
        return await self._call(self.client.v1.payment_intents.create_async(
            params,  # type: ignore[arg-type]
            {"idempotency_key": idempotency_key, "stripe_version": PREVIEW_VERSION}))

    async def capture(self, payment_intent: str, amount: int, *, idempotency_key: str
                      ) -> dict[str, Any]:
        return await self._call(self.client.v1.payment_intents.capture_async(
            payment_intent, {"amount_to_capture": amount},
            {"idempotency_key": idempotency_key, "stripe_version": PREVIEW_VERSION}))

    async def cancel(self, payment_intent: str, *, idempotency_key: str) -> dict[str, Any]:
        return await self._call(self.client.v1.payment_intents.cancel_async(
            payment_intent, {}, {"idempotency_key": idempotency_key,
                                 "stripe_version": PREVIEW_VERSION}))

    async def meter_event(self, event_name: str, customer: str, value: int, *,
                          identifier: str, timestamp: int) -> dict[str, Any]:
        return await self._call(self.client.v1.billing.meter_events.create_async(
            {"event_name": event_name, "identifier": identifier, "timestamp": timestamp,
             "payload": {"stripe_customer_id": customer, "value": str(value)}},
            {"idempotency_key": f"meter_{identifier}"}))

    @staticmethod
    async def _call(pending: Any) -> dict[str, Any]:
        try:
            result = await pending
        except stripe.CardError as exc:
            error = exc.error
            raise StripeRefused(f"Stripe declined the payment: {exc.user_message or exc.code}",
                                code=exc.code or "card_declined",
                                decline_code=getattr(error, "decline_code", None)) from exc
        except (stripe.InvalidRequestError, stripe.IdempotencyError) as exc:
            raise StripeRefused(f"Stripe refused the payment: {exc.user_message or exc.code}",
                                code=exc.code or "invalid_request") from exc
        except stripe.StripeError as exc:
            # Unreachable, timing out, rate limiting, failing (5xx), or refusing our own key
            # or permissions: nothing the payer did, nothing that happened twice.
            raise ServiceUnavailable("Stripe is unreachable or failing; nothing was charged "
                                     "or credited: retry later",
                                     code="stripe_unavailable") from exc
        response = getattr(result, "last_response", None)
        body = dict(result.to_dict())
        headers = getattr(response, "headers", None) or {}
        body["_replayed"] = str(headers.get("idempotent-replayed", "")).lower() == "true"
        return body

    async def aclose(self) -> None:
        await self.http.close_async()
