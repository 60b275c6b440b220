"""The x402 facilitator client: :class:`~gateway.rails.facilitator.Settlement` through a
facilitator's HTTP API (``POST /verify``, ``POST /settle``, ``GET /supported``;
specs/x402/x402-specification-v2.md §7), as the x402 SDK's ``HTTPFacilitatorClient`` talks to
one. :mod:`gateway.rails.facilitator_server` is the other end.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Mapping
from typing import Any, TypeVar

import httpx
import orjson
from pydantic import BaseModel, ValidationError

from gateway.errors import PaymentRejected, ServiceUnavailable, UpstreamError
from gateway.rails.evm import SettlementResult
from gateway.rails.facilitator import (
    SETTLEMENT_PENDING,
    SettleResult,
    SupportedResult,
    VerifyResult,
)
from gateway.rails.upto import UptoPaymentPayload
from gateway.rails.x402 import (
    AnyPaymentPayload,
    PaymentPayloadV1,
    PaymentRequirements,
    ResourceInfo,
    SettlementResponse,
    as_v2,
    to_authorization,
)
from gateway.rails.x402_challenge import caip2, to_v1

Answer = TypeVar("Answer", bound=BaseModel)

_TX_HASH = re.compile(r"^0x[0-9a-fA-F]{64}$")


def _transaction_of(body: bytes) -> dict[str, str]:
    """``{"transaction": hash}`` if an error body names a well-formed one, else ``{}``."""
    try:
        data = orjson.loads(body)
    except ValueError:
        return {}
    tx = data.get("transaction") if isinstance(data, dict) else None
    return {"transaction": tx} if isinstance(tx, str) and _TX_HASH.match(tx) else {}


ENDPOINTS = ("verify", "settle", "supported")
_REDIRECTS = (301, 302, 303, 307, 308)


def _origin(url: httpx.URL) -> tuple[str, str, int | None]:
    return url.scheme, url.host, url.port


class RemoteFacilitator:
    """:class:`Settlement` through an x402 facilitator's HTTP API, as the x402 SDK's
    ``HTTPFacilitatorClient`` talks to one:

    * a payment travels in its own version (``x402Version`` 1 with v1 requirements for a
      v1 payment, 2 for v2). A v1 payment on a chain v1 has no name for cannot be stated in
      v1 and is restated as v2;
    * ``headers`` go to every endpoint, ``endpoint_headers[name]`` (``verify``, ``settle``,
      ``supported``) to one, over them: hosted facilitators authenticate this way. They are
      secrets: sent only to the facilitator's own origin (never after a redirect elsewhere),
      never logged nor put in an error;
    * redirects are followed (at most ``max_redirects``; 303 turns into a GET, the others
      repeat the request);
    * a ``/settle`` answered ``settlement_pending`` (sent, not yet confirmed) is sent again,
      up to ``pending_retries`` times ``pending_delay`` seconds apart, as the SDK's resource
      server does; still pending after that is :class:`ServiceUnavailable` carrying the
      transaction (the deposit stays open and is reconciled on-chain), never a rejection.
    """

    def __init__(self, url: str, timeout: float = 30.0, *,
                 headers: Mapping[str, str] | None = None,
                 endpoint_headers: Mapping[str, Mapping[str, str]] | None = None,
                 pending_retries: int = 3, pending_delay: float = 1.0,
                 max_redirects: int = 5,
                 client: httpx.AsyncClient | None = None) -> None:
        self.url = url.rstrip("/")
        self._origin = _origin(httpx.URL(self.url))
        unknown = set(endpoint_headers or {}) - set(ENDPOINTS)
        if unknown:
            raise ValueError(f"unknown facilitator endpoints {sorted(unknown)}")
        self._headers = {name: {**(headers or {}), **(endpoint_headers or {}).get(name, {})}
                         for name in ENDPOINTS}
        self.pending_retries = pending_retries
        self.pending_delay = pending_delay
        self.max_redirects = max_redirects
        self._own_client = client is None
        self._client = client or httpx.AsyncClient(timeout=timeout, follow_redirects=False)

    def __repr__(self) -> str:  # no headers: they hold secrets
        return f"RemoteFacilitator({self.url!r})"

    async def aclose(self) -> None:
        if self._own_client:
            await self._client.aclose()

    async def _send(self, method: str, path: str, body: dict[str, Any] | None
                    ) -> httpx.Response:
        url = httpx.URL(f"{self.url}{path}")
        secret = self._headers[path.strip("/")]
        for _ in range(self.max_redirects + 1):
            headers = secret if _origin(url) == self._origin else {}
            response = await self._client.request(method, url, json=body, headers=headers)
            if response.status_code not in _REDIRECTS or "location" not in response.headers:
                return response
            url = response.url.join(response.headers["location"])
            if response.status_code == 303:
                method, body = "GET", None
        raise UpstreamError(f"facilitator {path} redirected more than {self.max_redirects} "
                            "times")

    async def _call(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        try:
            response = await self._send(method, path, body)
        except httpx.TimeoutException as exc:
            raise ServiceUnavailable(f"facilitator {path} timed out") from exc
        except httpx.TransportError as exc:
            raise ServiceUnavailable(f"facilitator unreachable: {exc}") from exc
        except httpx.HTTPError as exc:  # undecodable body (bad gzip), a bad Location
            raise UpstreamError(f"facilitator {path} answered garbage: {exc!r}") from exc
        if response.status_code in (502, 503, 504):
            # It, or a proxy in front of it, is down or overloaded: retry later. A /settle
            # whose outcome is unknown this way must be reconciled on-chain before a retry;
            # a facilitator that sent a transaction may name it (tollstream's does).
            raise ServiceUnavailable(
                f"facilitator {path} unavailable (HTTP {response.status_code})",
                extra=_transaction_of(response.content))
        if response.status_code in (401, 403):
            raise ServiceUnavailable(f"facilitator {path} refused our credentials (HTTP "
                                     f"{response.status_code}): check [x402.facilitator] "
                                     "headers")
        # Some facilitators answer an invalid payment with 400 + a proper body; accept that
        # body if it parses (checked by the caller), anything else is garbage.
        if response.status_code not in (200, 400):
            raise UpstreamError(f"facilitator {path} answered HTTP {response.status_code}")
        try:
            # orjson, not json: web3 (py_ecc) raises the recursion limit to 100000, so the
            # stdlib parser overflows the C stack on deeply nested input (a segfault, not a
            # RecursionError); orjson refuses nesting past 1024 with a ValueError.
            return orjson.loads(response.content)
        except ValueError as exc:
            raise UpstreamError(f"facilitator {path} answered non-JSON") from exc

    @staticmethod
    def _body(payload: AnyPaymentPayload | UptoPaymentPayload,
              requirements: PaymentRequirements) -> dict[str, Any]:
        if isinstance(payload, UptoPaymentPayload):  # upto exists in v2 only
            return {"x402Version": 2,
                    "paymentPayload": payload.model_dump(mode="json", by_alias=True,
                                                         exclude_none=True),
                    "paymentRequirements": requirements.model_dump(
                        mode="json", by_alias=True, exclude_none=True)}
        wire: BaseModel = as_v2(payload, requirements)
        sent: BaseModel = requirements
        version = 2
        v1 = to_v1(requirements, ResourceInfo(url="")) \
            if isinstance(payload, PaymentPayloadV1) else None
        if isinstance(payload, PaymentPayloadV1) and v1 is not None:
            # Sent as v1 (a chain v1 has no name for stays v2), the v1 name on both sides (a
            # payer may have written the CAIP-2 id; the signature does not cover it).
            version, sent, wire = 1, v1, payload.model_copy(update={"network": v1.network})
        return {"x402Version": version,
                "paymentPayload": wire.model_dump(mode="json", by_alias=True, exclude_none=True),
                "paymentRequirements": sent.model_dump(mode="json", by_alias=True,
                                                       exclude_none=True)}

    async def verify_result(self, payload: AnyPaymentPayload | UptoPaymentPayload,
                            requirements: PaymentRequirements) -> VerifyResult:
        """Raw ``/verify`` answer (does not raise on ``isValid: false``)."""
        return await self._answer("/verify", payload, requirements, VerifyResult)

    async def verify(self, payload: AnyPaymentPayload | UptoPaymentPayload,
                     requirements: PaymentRequirements) -> str:
        result = await self.verify_result(payload, requirements)
        if not result.is_valid:
            raise PaymentRejected(result.invalid_message or "facilitator rejected the payment",
                                  code=result.invalid_reason or "invalid_payload")
        payer = _payer(payload)
        if result.payer is not None and result.payer.lower() != payer.lower():
            raise UpstreamError("facilitator /verify reported a different payer")
        return payer

    async def settle_result(self, payload: AnyPaymentPayload | UptoPaymentPayload,
                            requirements: PaymentRequirements) -> SettleResult:
        """Raw ``/settle`` answer (does not raise on ``success: false``)."""
        return await self._answer("/settle", payload, requirements, SettlementResponse)

    async def _answer(self, path: str, payload: AnyPaymentPayload | UptoPaymentPayload,
                      requirements: PaymentRequirements, model: type[Answer]) -> Answer:
        data = await self._call("POST", path, self._body(payload, requirements))
        try:
            return model.model_validate(data)
        except ValidationError as exc:
            raise UpstreamError(f"facilitator {path} answered an unexpected shape") from exc

    async def settle(self, payload: AnyPaymentPayload | UptoPaymentPayload,
                     requirements: PaymentRequirements) -> SettlementResult:
        """Settle ``requirements.amount`` (for ``upto``: what to charge, at most the
        authorized maximum; zero moves nothing and has no transaction)."""
        result = await self.settle_result(payload, requirements)
        for _ in range(self.pending_retries):
            if result.success or result.error_reason != SETTLEMENT_PENDING:
                break
            # Sent, not yet confirmed: the same request again lets the facilitator reconcile
            # with its transaction (it must not send a second one).
            await asyncio.sleep(self.pending_delay)
            result = await self.settle_result(payload, requirements)
        if not result.success and result.error_reason == SETTLEMENT_PENDING:
            raise ServiceUnavailable(
                f"facilitator settlement still pending after {self.pending_retries + 1} "
                "attempts", extra={"transaction": result.transaction}
                if _TX_HASH.match(result.transaction) else {})
        if not result.success:
            raise PaymentRejected("facilitator could not settle the payment",
                                  code=result.error_reason or "unexpected_settle_error")
        # Success claims money moved: anything inconsistent is an UpstreamError carrying the
        # transaction (when it looks like one), so the caller reconciles on-chain, never
        # credits on the facilitator's word alone.
        payer = _payer(payload)
        if isinstance(payload, UptoPaymentPayload) and requirements.amount == 0:
            return SettlementResult(tx_hash="", payer=payer, amount=0, block_number=None,
                                    network=requirements.network)
        if not _TX_HASH.match(result.transaction):
            raise UpstreamError("facilitator /settle reported success without a transaction "
                                f"hash ({result.transaction[:80]!r})")
        extra = {"transaction": result.transaction}
        if result.amount is not None and result.amount != str(requirements.amount):
            raise UpstreamError(f"facilitator /settle reported {result.amount[:40]!r}, not "
                                f"the {requirements.amount} asked", extra=extra)
        if result.payer is not None and result.payer.lower() != payer.lower():
            raise UpstreamError("facilitator /settle reported a different payer", extra=extra)
        if result.network and caip2(result.network) != requirements.network:
            raise UpstreamError(f"facilitator /settle reported network {result.network!r}, "
                                f"not {requirements.network!r}", extra=extra)
        # The facilitator does not report the block; the amount is the one asked (exact: the
        # required one; upto: the charge).
        return SettlementResult(tx_hash=result.transaction, payer=payer,
                                amount=requirements.amount, block_number=None,
                                network=requirements.network)

    async def supported(self) -> SupportedResult:
        """``GET /supported``."""
        data = await self._call("GET", "/supported")
        try:
            return SupportedResult.model_validate(data)
        except ValidationError as exc:
            raise UpstreamError("facilitator /supported answered an unexpected shape") from exc


def _payer(payload: AnyPaymentPayload | UptoPaymentPayload) -> str:
    if isinstance(payload, UptoPaymentPayload):
        return payload.payer
    return to_authorization(payload).payer
