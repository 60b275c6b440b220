"""x402 settlement, local or through a facilitator (specs/x402/x402-specification-v2.md §7).

One protocol, two implementations, chosen by configuration:

* :class:`LocalSettlement` -- verify and settle ourselves with :class:`EvmSettler` (our relayer
  pays gas);
* :class:`RemoteFacilitator` -- delegate to an x402 facilitator over HTTP
  (``POST /verify``, ``POST /settle``, ``GET /supported``).

:func:`create_facilitator_app` serves the facilitator API on top of :class:`LocalSettlement`,
so tollstream can be its own (self-hosted) facilitator, and tests get a real remote one.

Both raise :class:`PaymentRejected` (``code`` = x402 reason), :class:`ServiceUnavailable`
(chain RPC or facilitator unreachable) or :class:`UpstreamError` (garbage answer).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import Field, ValidationError

from gateway.errors import (
    GatewayError,
    InvalidPayment,
    PaymentRejected,
    ServiceUnavailable,
    UpstreamError,
)
from gateway.rails.evm import EvmNetwork, EvmSettler, SettlementResult
from gateway.rails.x402 import (
    SCHEME_EXACT,
    AnyPaymentPayload,
    PaymentPayload,
    PaymentRequirements,
    SettlementResponse,
    _Wire,
    as_v2,
    match_requirements,
    parse_payment_payload,
    to_authorization,
)


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
        if response.status_code == 503:
            raise ServiceUnavailable(f"facilitator {path} unavailable (503)")
        # Some facilitators answer an invalid payment with 400 + a proper body; accept that
        # body if it parses (checked by the caller), anything else is garbage.
        if response.status_code not in (200, 400):
            raise UpstreamError(f"facilitator {path} answered HTTP {response.status_code}")
        try:
            return response.json()
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
        if not result.transaction:
            raise UpstreamError("facilitator /settle reported success without a transaction")
        payer = to_authorization(payload).payer
        if result.payer is not None and result.payer.lower() != payer.lower():
            raise UpstreamError("facilitator /settle reported a different payer")
        # The facilitator does not report the block; exact means the amount is the required one.
        return SettlementResult(tx_hash=result.transaction, payer=payer,
                                amount=requirements.amount, block_number=None,
                                network=result.network or requirements.network)

    async def supported(self) -> SupportedResult:
        """``GET /supported``."""
        data = await self._call("GET", "/supported")
        try:
            return SupportedResult.model_validate(data)
        except ValidationError as exc:
            raise UpstreamError("facilitator /supported answered an unexpected shape") from exc


# --------------------------------------------------------------------------- server


def _parse_request(data: Any) -> tuple[PaymentPayload, PaymentRequirements]:
    if not isinstance(data, dict):
        raise InvalidPayment("request body is not a JSON object")
    if data.get("x402Version") != 2:
        raise InvalidPayment("only x402Version 2 is supported", param="x402Version",
                             code="invalid_x402_version")
    payload = parse_payment_payload(data.get("paymentPayload"), version=2,
                                    where="paymentPayload")
    try:
        requirements = PaymentRequirements.model_validate(data.get("paymentRequirements"))
    except ValidationError as exc:
        raise InvalidPayment("paymentRequirements is malformed",
                             param="paymentRequirements",
                             code="invalid_payment_requirements") from exc
    assert isinstance(payload, PaymentPayload)  # version=2 guarantees it
    return payload, requirements


def _payer_of(data: Any) -> str | None:
    try:
        payer = data["paymentPayload"]["payload"]["authorization"]["from"]
    except (KeyError, TypeError):
        return None
    return payer if isinstance(payer, str) else None


def create_facilitator_app(settler: EvmSettler, networks: Sequence[EvmNetwork]) -> FastAPI:
    """A FastAPI app serving ``/verify``, ``/settle`` and ``/supported`` on ``networks``.

    Invalid payments answer 200 with ``isValid: false`` / ``success: false`` and the x402
    reason (what the x402 SDK's facilitator client expects); malformed requests answer 400;
    an unreachable chain answers 503.
    """
    local = LocalSettlement(settler, networks)
    app = FastAPI(title="tollstream x402 facilitator", docs_url=None, redoc_url=None)

    def error(exc: GatewayError) -> JSONResponse:
        return JSONResponse({"error": exc.code, "message": exc.message}, status_code=exc.status)

    @app.post("/verify")
    async def verify(request: Request) -> JSONResponse:
        try:
            data = await request.json()
        except ValueError:
            return JSONResponse({"isValid": False, "invalidReason": "invalid_payload",
                                 "invalidMessage": "body is not JSON"}, status_code=400)
        try:
            payload, requirements = _parse_request(data)
            payer = await local.verify(payload, requirements)
        except InvalidPayment as exc:
            return JSONResponse({"isValid": False,
                                 "invalidReason": exc.code if exc.code != "invalid_payment"
                                 else "invalid_payload",
                                 "invalidMessage": exc.message, "payer": _payer_of(data)},
                                status_code=400)
        except PaymentRejected as exc:
            return JSONResponse({"isValid": False, "invalidReason": exc.code,
                                 "invalidMessage": exc.message, "payer": _payer_of(data)})
        except (ServiceUnavailable, UpstreamError) as exc:
            return error(exc)
        return JSONResponse({"isValid": True, "payer": payer})

    @app.post("/settle")
    async def settle(request: Request) -> JSONResponse:
        try:
            data = await request.json()
        except ValueError:
            return JSONResponse({"success": False, "errorReason": "invalid_payload",
                                 "transaction": "", "network": ""}, status_code=400)
        network = ""
        if isinstance(data, dict) and isinstance(data.get("paymentRequirements"), dict):
            network = str(data["paymentRequirements"].get("network", ""))
        try:
            payload, requirements = _parse_request(data)
            result = await local.settle(payload, requirements)
        except InvalidPayment as exc:
            return JSONResponse({"success": False,
                                 "errorReason": exc.code if exc.code != "invalid_payment"
                                 else "invalid_payload",
                                 "errorMessage": exc.message, "payer": _payer_of(data),
                                 "transaction": "", "network": network}, status_code=400)
        except PaymentRejected as exc:
            body: dict[str, Any] = {"success": False, "errorReason": exc.code,
                                    "errorMessage": exc.message, "payer": _payer_of(data),
                                    "transaction": exc.extra.get("transaction", ""),
                                    "network": network}
            return JSONResponse(body)
        except (ServiceUnavailable, UpstreamError) as exc:
            return error(exc)
        return JSONResponse({"success": True, "payer": result.payer,
                             "transaction": result.tx_hash, "network": result.network,
                             "amount": str(result.amount)})

    @app.get("/supported")
    async def supported() -> JSONResponse:
        kinds = [{"x402Version": 2, "scheme": SCHEME_EXACT, "network": n.network}
                 for n in networks]
        signers = sorted({n.relayer_address for n in networks})
        return JSONResponse({"kinds": kinds, "extensions": [],
                             "signers": {"eip155:*": signers}})

    return app


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
