"""The x402 facilitator API served by tollstream (specs/x402/x402-specification-v2.md §7).

``POST /verify``, ``POST /settle`` and ``GET /supported`` on top of
:class:`~gateway.rails.facilitator.LocalSettlement`: tollstream can be its own (self-hosted)
facilitator, and tests get a real remote one for
:class:`~gateway.rails.facilitator_client.RemoteFacilitator`.

It answers as a facilitator built from the x402 SDK (``x402Facilitator``) does, so the SDK's
``HTTPFacilitatorClient`` (which raises on anything but HTTP 200) works against it:

* any request that is a JSON object gets 200: ``isValid: false`` / ``success: false`` with
  the x402 reason when the payment is invalid, including a malformed payload
  (``invalid_payload``), malformed requirements (``invalid_payment_requirements``), an unknown
  ``x402Version`` (``invalid_x402_version``), a scheme nobody serves (``unsupported_scheme``),
  a payment for another network than its requirements (``network_mismatch``), requirements
  without the token's EIP-712 domain (``missing_eip712_domain``);
* ``x402Version`` 1 and 2 both (v1: the payload's ``scheme``/``network`` at the top,
  ``maxAmountRequired``, a v1 network name, or a CAIP-2 id for chains v1 has no name for);
* a settlement sent but not confirmed in time answers ``success: false``, ``errorReason:
  settlement_pending`` with the transaction; the same request again reconciles with that
  transaction (never sends a second one);
* only a body that is not a JSON object answers 400, an unreachable chain 503, garbage from
  the chain 502.

Each request goes to the :class:`~gateway.rails.facilitator.SchemeSettlement` registered for
its scheme (``exact`` by default; another scheme plugs in with ``schemes=``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import orjson
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from gateway.errors import (
    GatewayError,
    InvalidPayment,
    PaymentRejected,
    ServiceUnavailable,
    UpstreamError,
)
from gateway.rails.evm import EvmNetwork, EvmSettler
from gateway.rails.facilitator import (
    SETTLEMENT_PENDING,
    LocalSettlement,
    SchemeSettlement,
)


def _payer_of(payload: Any) -> str | None:
    inner = payload.get("payload") if isinstance(payload, dict) else None
    # exact: an EIP-3009 authorization; upto: a Permit2 authorization.
    signed = inner.get("authorization", inner.get("permit2Authorization")) \
        if isinstance(inner, dict) else None
    payer = signed.get("from") if isinstance(signed, dict) else None
    return payer if isinstance(payer, str) else None


def _scheme_of(payload: Any, requirements: Any, version: int) -> Any:
    """The scheme a request is for: the requirements' (what is asked), else the payment's."""
    if isinstance(requirements, dict) and "scheme" in requirements:
        return requirements["scheme"]
    if version == 2 and isinstance(payload, dict) and isinstance(payload.get("accepted"), dict):
        return payload["accepted"].get("scheme")
    return payload.get("scheme") if isinstance(payload, dict) else None


def _reason(exc: GatewayError) -> str:
    return "invalid_payload" if exc.code == InvalidPayment.code else exc.code


def create_app(settler: EvmSettler, networks: Sequence[EvmNetwork], *,
               schemes: Sequence[SchemeSettlement] = ()) -> FastAPI:
    """A FastAPI app serving ``/verify``, ``/settle`` and ``/supported`` on ``networks``
    (see the module docstring for its answers); ``schemes`` are served next to ``exact``."""
    local = LocalSettlement(settler, networks, schemes=schemes)
    app = FastAPI(title="tollstream x402 facilitator", docs_url=None, redoc_url=None)

    async def handle(request: Request, action: Literal["verify", "settle"]) -> JSONResponse:
        try:
            data = orjson.loads(await request.body())  # see RemoteFacilitator._call
        except ValueError:
            data = None
        if not isinstance(data, dict):
            return failure(action, "invalid_payload", "body is not a JSON object", None, "",
                           status=400)
        payload, requirements = data.get("paymentPayload"), data.get("paymentRequirements")
        payer = _payer_of(payload)
        network = ""
        if isinstance(requirements, dict) and isinstance(requirements.get("network"), str):
            network = requirements["network"]
        version = data.get("x402Version")
        if version not in (1, 2) or isinstance(version, bool):
            return failure(action, "invalid_x402_version",
                           f"x402Version {str(version)[:20]} is not supported", payer, network)
        assert isinstance(version, int)
        try:
            handler = local.scheme(_scheme_of(payload, requirements, version))
            parsed, required = handler.parse(payload, requirements, version=version)
            if action == "verify":
                payer = await handler.verify(parsed, required)
                return JSONResponse({"isValid": True, "payer": payer})
            result = await handler.settle(parsed, required)
        except (InvalidPayment, PaymentRejected) as exc:
            return failure(action, _reason(exc), exc.message, payer, network,
                           transaction=str(exc.extra.get("transaction", "")))
        except ServiceUnavailable as exc:
            if action == "settle" and exc.extra.get("transaction"):
                # Sent, outcome not known yet: the SDK's settlement_pending (retry the same
                # request to reconcile with this transaction).
                return failure(action, SETTLEMENT_PENDING, exc.message, payer, network,
                               transaction=str(exc.extra["transaction"]))
            return error(exc)
        except UpstreamError as exc:
            return error(exc)
        # A v1 request gets the network as it named it (its v1 name).
        return JSONResponse({"success": True, "payer": result.payer,
                             "transaction": result.tx_hash,
                             "network": network or result.network,
                             "amount": str(result.amount)})

    def failure(action: str, reason: str, message: str, payer: str | None, network: str, *,
                transaction: str = "", status: int = 200) -> JSONResponse:
        if action == "verify":
            body: dict[str, Any] = {"isValid": False, "invalidReason": reason,
                                    "invalidMessage": message}
        else:
            body = {"success": False, "errorReason": reason, "errorMessage": message,
                    "transaction": transaction, "network": network}
        if payer is not None:
            body["payer"] = payer
        return JSONResponse(body, status_code=status)

    def error(exc: GatewayError) -> JSONResponse:
        # extra carries the transaction hash when one was sent and its outcome is unknown.
        return JSONResponse({**exc.extra, "error": exc.code, "message": exc.message},
                            status_code=exc.status)

    @app.post("/verify")
    async def verify(request: Request) -> JSONResponse:
        return await handle(request, "verify")

    @app.post("/settle")
    async def settle(request: Request) -> JSONResponse:
        return await handle(request, "settle")

    @app.get("/supported")
    async def supported() -> JSONResponse:
        kinds = [kind.model_dump(mode="json", by_alias=True, exclude_none=True)
                 for handler in local.schemes.values() for kind in handler.kinds()]
        signers = sorted({s for handler in local.schemes.values() for s in handler.signers()})
        return JSONResponse({"kinds": kinds, "extensions": [],
                             "signers": {"eip155:*": signers}})

    return app


__all__ = ["create_app"]
