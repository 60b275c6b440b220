"""The x402 facilitator API served by tollstream (specs/x402/x402-specification-v2.md §7).

``POST /verify``, ``POST /settle`` and ``GET /supported`` on top of
:class:`~gateway.rails.facilitator.LocalSettlement`: tollstream can be its own (self-hosted)
facilitator, and tests get a real remote one for
:class:`~gateway.rails.facilitator.RemoteFacilitator`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import orjson
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import ValidationError

from gateway.errors import (
    GatewayError,
    InvalidPayment,
    PaymentRejected,
    ServiceUnavailable,
    UpstreamError,
)
from gateway.rails.evm import EvmNetwork, EvmSettler
from gateway.rails.facilitator import LocalSettlement
from gateway.rails.x402 import (
    SCHEME_EXACT,
    PaymentPayload,
    PaymentRequirements,
    parse_payment_payload,
)


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


def create_app(settler: EvmSettler, networks: Sequence[EvmNetwork]) -> FastAPI:
    """A FastAPI app serving ``/verify``, ``/settle`` and ``/supported`` on ``networks``.

    Invalid payments answer 200 with ``isValid: false`` / ``success: false`` and the x402
    reason (what the x402 SDK's facilitator client expects); malformed requests answer 400;
    an unreachable chain answers 503.
    """
    local = LocalSettlement(settler, networks)
    app = FastAPI(title="tollstream x402 facilitator", docs_url=None, redoc_url=None)

    def error(exc: GatewayError) -> JSONResponse:
        # extra carries the transaction hash when one was sent and its outcome is unknown.
        return JSONResponse({**exc.extra, "error": exc.code, "message": exc.message},
                            status_code=exc.status)

    @app.post("/verify")
    async def verify(request: Request) -> JSONResponse:
        try:
            data = orjson.loads(await request.body())  # see RemoteFacilitator._call
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
            data = orjson.loads(await request.body())  # see RemoteFacilitator._call
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


__all__ = ["create_app"]
