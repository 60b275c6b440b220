"""Errors raised at the HTTP edge, and the one handler that renders them.

Hierarchy::

    GatewayError                  base: ``code``, ``status``, ``message``, ``param``
    ├── BadRequest                400 malformed JSON, missing/invalid fields
    │   └── InvalidPayment        400 a payment header that cannot be decoded at all
    ├── Unauthorized              401 missing or unknown API key / admin token
    ├── PaymentRequired           402 no credential, or the allowance cannot pay
    │   └── PaymentRejected       402 a decodable payment that failed verification or settlement
    ├── NotFound                  404 unknown model, account, route
    ├── Conflict                  409 idempotency conflicts
    ├── PayloadTooLarge           413 request body over the configured limit
    ├── TooManyRequests           429 this client failed authentication or asked for 402s
    │                                 too often (``Retry-After``)
    ├── RateLimited               429 the model API is rate limiting (passed through)
    ├── UpstreamError             502 the model API failed or answered garbage
    └── ServiceUnavailable        503 the ledger (Redis) or a chain RPC is unreachable
        └── Overloaded            503 this process is at its limit of concurrent requests,
                                      or out of file descriptors (``Retry-After``)

:class:`meters.errors.MeterError` carries its own ``code`` and ``status`` and is rendered by the
same handler. Foreign exceptions (aiohttp, redis, web3) are translated where they are caught with
``raise ... from exc``; anything else is a bug and surfaces as a 500.
"""

from __future__ import annotations

from typing import Any


class GatewayError(Exception):
    """Base class: an error with an HTTP status and a machine-readable code."""

    status = 500
    code = "internal_error"

    def __init__(self, message: str, *, code: str | None = None, param: str | None = None,
                 headers: dict[str, str] | None = None, extra: dict[str, Any] | None = None,
                 body: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        self.param = param
        self.headers = headers or {}
        self.extra = extra or {}
        #: A complete response body replacing the dialect's error shape (a payment protocol's
        #: own 402 body, which its clients parse).
        self.body = body
        #: Header lines that may repeat (one ``WWW-Authenticate`` per Payment challenge).
        self.header_list: list[tuple[str, str]] = []
        #: The body's media type when it is not plain JSON (``application/problem+json``).
        self.media_type: str | None = None


class BadRequest(GatewayError):
    status = 400
    code = "invalid_request"


class InvalidPayment(BadRequest):
    code = "invalid_payment"


class Unauthorized(GatewayError):
    status = 401
    code = "invalid_api_key"


class PaymentRequired(GatewayError):
    status = 402
    code = "payment_required"


class PaymentRejected(PaymentRequired):
    code = "payment_rejected"


class NotFound(GatewayError):
    status = 404
    code = "not_found"


class Conflict(GatewayError):
    status = 409
    code = "conflict"


class PayloadTooLarge(GatewayError):
    status = 413
    code = "request_too_large"


class TooManyRequests(GatewayError):
    status = 429
    code = "rate_limited"


class RateLimited(GatewayError):
    status = 429
    code = "upstream_rate_limited"


class UpstreamError(GatewayError):
    status = 502
    code = "upstream_error"


class ServiceUnavailable(GatewayError):
    status = 503
    code = "service_unavailable"


class Overloaded(ServiceUnavailable):
    code = "overloaded"
