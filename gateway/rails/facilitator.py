"""x402 settlement, local or through a facilitator (specs/x402/x402-specification-v2.md §7).

One protocol, two implementations, chosen by configuration:

* :class:`LocalSettlement` -- verify and settle ourselves with :class:`EvmSettler` (our relayer
  pays gas);
* :class:`RemoteFacilitator` -- delegate to an x402 facilitator over HTTP
  (``POST /verify``, ``POST /settle``, ``GET /supported``).

:func:`create_facilitator_app` (:mod:`gateway.rails.facilitator_server`) serves the facilitator
API on top of :class:`LocalSettlement`, so tollstream can be its own (self-hosted)
facilitator, and tests get a real remote one.

Both raise :class:`PaymentRejected` (``code`` = x402 reason), :class:`ServiceUnavailable`
(chain RPC or facilitator unreachable) or :class:`UpstreamError` (garbage answer).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any, Protocol

import httpx
import orjson
from fastapi import FastAPI
from pydantic import Field, ValidationError

from gateway.errors import (
    PaymentRejected,
    ServiceUnavailable,
    UpstreamError,
)
from gateway.rails.evm import EvmNetwork, EvmSettler, SettlementResult
from gateway.rails.x402 import (
    SCHEME_EXACT,
    AnyPaymentPayload,
    PaymentRequirements,
    SettlementResponse,
    _Wire,
    as_v2,
    caip2,
    match_requirements,
    to_authorization,
)

_TX_HASH = re.compile(r"^0x[0-9a-fA-F]{64}$")


def _transaction_of(body: bytes) -> dict[str, str]:
    """``{"transaction": hash}`` if an error body names a well-formed one, else ``{}``."""
    try:
        data = orjson.loads(body)
    except ValueError:
        return {}
    tx = data.get("transaction") if isinstance(data, dict) else None
    return {"transaction": tx} if isinstance(tx, str) and _TX_HASH.match(tx) else {}


class Settlement(Protocol):
    """How the gateway turns a decoded x402 payment into money (local or remote)."""

    async def verify(self, payload: AnyPaymentPayload,
                     requirements: PaymentRequirements) -> str:
        """Check the payment pays ``requirements``; return the payer address."""
        ...

    async def settle(self, payload: AnyPaymentPayload,
                     requirements: PaymentRequirements) -> SettlementResult:
        """Verify, then move the money on-chain; return the settled transfer."""
        ...


class VerifyResult(_Wire):
    """Facilitator ``/verify`` answer (``VerifyResponse``)."""

    is_valid: bool
    invalid_reason: str | None = None
    invalid_message: str | None = None
    payer: str | None = None


class SupportedKind(_Wire):
    x402_version: int
    scheme: str
    network: str
    extra: dict[str, Any] | None = None


class SupportedResult(_Wire):
    """Facilitator ``/supported`` answer."""

    kinds: list[SupportedKind]
    extensions: list[str] = Field(default_factory=list)
    signers: dict[str, list[str]] = Field(default_factory=dict)


SettleResult = SettlementResponse
"""Facilitator ``/settle`` answer (same schema as ``PAYMENT-RESPONSE``)."""


# --------------------------------------------------------------------------- local


class LocalSettlement:
    """:class:`Settlement` done in-process with :class:`EvmSettler` on configured networks."""

    def __init__(self, settler: EvmSettler, networks: Sequence[EvmNetwork]) -> None:
        self.settler = settler
        self.networks = {n.network: n for n in networks}

    def network_for(self, requirements: PaymentRequirements) -> EvmNetwork:
        """The configured network ``requirements`` are for (checks scheme, network, asset)."""
        if requirements.scheme != SCHEME_EXACT:
            raise PaymentRejected(f"scheme {requirements.scheme!r} is not supported",
                                  code="unsupported_scheme")
        network = self.networks.get(requirements.network)
        if network is None:
            raise PaymentRejected(f"network {requirements.network!r} is not supported",
                                  code="invalid_network")
        if network.asset.lower() != requirements.asset.lower():
            raise PaymentRejected("asset is not this network's token",
                                  code="invalid_payment_requirements")
        return network

    async def verify(self, payload: AnyPaymentPayload,
                     requirements: PaymentRequirements) -> str:
        network = self.network_for(requirements)
        match_requirements(payload, [requirements])
        auth = to_authorization(payload)
        await self.settler.verify(auth, pay_to=requirements.pay_to, amount=requirements.amount,
                                  network=network)
        return auth.payer

    async def settle(self, payload: AnyPaymentPayload,
                     requirements: PaymentRequirements) -> SettlementResult:
        # Re-verify: a caller may settle without a prior verify, and state may have changed.
        await self.verify(payload, requirements)
        return await self.settler.settle(to_authorization(payload),
                                         self.network_for(requirements))


# --------------------------------------------------------------------------- remote


class RemoteFacilitator:
    """:class:`Settlement` through an x402 facilitator's HTTP API."""

    def __init__(self, url: str, timeout: float = 30.0, *,
                 headers: dict[str, str] | None = None,
                 client: httpx.AsyncClient | None = None) -> None:
        self.url = url.rstrip("/")
        self._own_client = client is None
        self._client = client or httpx.AsyncClient(timeout=timeout, headers=headers)

    async def aclose(self) -> None:
        if self._own_client:
            await self._client.aclose()

    async def _call(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        try:
            response = await self._client.request(method, f"{self.url}{path}", json=body)
        except httpx.TimeoutException as exc:
            raise ServiceUnavailable(f"facilitator {path} timed out") from exc
        except httpx.TransportError as exc:
            raise ServiceUnavailable(f"facilitator unreachable: {exc}") from exc
        except httpx.HTTPError as exc:  # undecodable body (bad gzip), redirect loops
            raise UpstreamError(f"facilitator {path} answered garbage: {exc!r}") from exc
        if response.status_code in (502, 503, 504):
            # It, or a proxy in front of it, is down or overloaded: retry later. A /settle
            # whose outcome is unknown this way must be reconciled on-chain before a retry;
            # a facilitator that sent a transaction may name it (tollstream's does).
            raise ServiceUnavailable(
                f"facilitator {path} unavailable (HTTP {response.status_code})",
                extra=_transaction_of(response.content))
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
    def _body(payload: AnyPaymentPayload, requirements: PaymentRequirements) -> dict[str, Any]:
        v2 = as_v2(payload, requirements)
        return {"x402Version": 2,
                "paymentPayload": v2.model_dump(mode="json", by_alias=True, exclude_none=True),
                "paymentRequirements": requirements.model_dump(mode="json", by_alias=True,
                                                               exclude_none=True)}

    async def verify_result(self, payload: AnyPaymentPayload,
                            requirements: PaymentRequirements) -> VerifyResult:
        """Raw ``/verify`` answer (does not raise on ``isValid: false``)."""
        data = await self._call("POST", "/verify", self._body(payload, requirements))
        try:
            return VerifyResult.model_validate(data)
        except ValidationError as exc:
            raise UpstreamError("facilitator /verify answered an unexpected shape") from exc

    async def verify(self, payload: AnyPaymentPayload,
                     requirements: PaymentRequirements) -> str:
        result = await self.verify_result(payload, requirements)
        if not result.is_valid:
            raise PaymentRejected(result.invalid_message or "facilitator rejected the payment",
                                  code=result.invalid_reason or "invalid_payload")
        payer = to_authorization(payload).payer
        if result.payer is not None and result.payer.lower() != payer.lower():
            raise UpstreamError("facilitator /verify reported a different payer")
        return payer

    async def settle_result(self, payload: AnyPaymentPayload,
                            requirements: PaymentRequirements) -> SettleResult:
        """Raw ``/settle`` answer (does not raise on ``success: false``)."""
        data = await self._call("POST", "/settle", self._body(payload, requirements))
        try:
            return SettlementResponse.model_validate(data)
        except ValidationError as exc:
            raise UpstreamError("facilitator /settle answered an unexpected shape") from exc

    async def settle(self, payload: AnyPaymentPayload,
                     requirements: PaymentRequirements) -> SettlementResult:
        result = await self.settle_result(payload, requirements)
        if not result.success:
            raise PaymentRejected("facilitator could not settle the payment",
                                  code=result.error_reason or "unexpected_settle_error")
        # Success claims money moved: anything inconsistent is an UpstreamError carrying the
        # transaction (when it looks like one), so the caller reconciles on-chain, never
        # credits on the facilitator's word alone.
        if not _TX_HASH.match(result.transaction):
            raise UpstreamError("facilitator /settle reported success without a transaction "
                                f"hash ({result.transaction[:80]!r})")
        extra = {"transaction": result.transaction}
        payer = to_authorization(payload).payer
        if result.payer is not None and result.payer.lower() != payer.lower():
            raise UpstreamError("facilitator /settle reported a different payer", extra=extra)
        if result.network and caip2(result.network) != requirements.network:
            raise UpstreamError(f"facilitator /settle reported network {result.network!r}, "
                                f"not {requirements.network!r}", extra=extra)
        # The facilitator does not report the block; exact means the amount is the required one.
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


# --------------------------------------------------------------------------- server


def create_facilitator_app(settler: EvmSettler, networks: Sequence[EvmNetwork]) -> FastAPI:
    """The facilitator API (``/verify``, ``/settle``, ``/supported``) on ``networks``; see
    :mod:`gateway.rails.facilitator_server` (imported here, where it was first defined)."""
    from gateway.rails.facilitator_server import create_app

    return create_app(settler, networks)


__all__ = [
    "LocalSettlement",
    "RemoteFacilitator",
    "SettleResult",
    "Settlement",
    "SupportedKind",
    "SupportedResult",
    "VerifyResult",
    "create_facilitator_app",
]
