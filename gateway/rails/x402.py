"""x402 wire formats, v2 and v1, for the ``exact`` scheme on EVM.

Headers (specs/x402/transports-v2/http.md, transports-v1/http.md):

======================  ===========  =====================================================
header                  version      content (standard base64, padded, of camelCase JSON)
======================  ===========  =====================================================
``PAYMENT-REQUIRED``    v2           :class:`PaymentRequired` (server -> client, on 402)
``PAYMENT-SIGNATURE``   v2           :class:`PaymentPayload` (client -> server)
``PAYMENT-RESPONSE``    v2           :class:`SettlementResponse` (server -> client)
``X-PAYMENT``           v1           :class:`PaymentPayloadV1`
``X-PAYMENT-RESPONSE``  v1           :class:`SettlementResponse`
(402 JSON body)         v1           :class:`PaymentRequiredV1`
======================  ===========  =====================================================

Field names and casing were checked against the official ``x402`` SDK's models (2.25.0):
``x402Version``, ``accepts``, ``accepted``, ``payTo``, ``maxTimeoutSeconds``, ``amount`` (v2) /
``maxAmountRequired`` (v1), ``extra.name``/``extra.version``, ``payload.signature``,
``payload.authorization.{from,to,value,validAfter,validBefore,nonce}`` (all strings),
``success``/``errorReason``/``payer``/``transaction``/``network``/``amount``.

Decoding is strict: anything that is not the documented shape is :class:`InvalidPayment`
(HTTP 400) with a message naming the offending field.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from typing import Annotated, Any, Literal, TypeAlias

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    ValidationError,
)
from pydantic.alias_generators import to_camel

from gateway.errors import InvalidPayment, PaymentRejected
from gateway.rails.evm import Eip3009Authorization

PAYMENT_REQUIRED_HEADER = "PAYMENT-REQUIRED"
PAYMENT_SIGNATURE_HEADER = "PAYMENT-SIGNATURE"
PAYMENT_RESPONSE_HEADER = "PAYMENT-RESPONSE"
X_PAYMENT_HEADER = "X-PAYMENT"
X_PAYMENT_RESPONSE_HEADER = "X-PAYMENT-RESPONSE"
MAX_HEADER_BYTES = 8 * 1024
SCHEME_EXACT = "exact"

# v1 names of EVM networks (v1 has no CAIP-2). Chains without a v1 name are v2-only.
V1_NETWORKS: dict[str, int] = {
    "base": 8453,
    "base-sepolia": 84532,
    "ethereum": 1,
    "polygon": 137,
    "polygon-amoy": 80002,
    "avalanche": 43114,
    "avalanche-fuji": 43113,
}

_UINT256_MAX = 2**256 - 1
_DIGITS = re.compile(r"^[0-9]{1,78}$")
_ADDRESS = re.compile(r"^0x[0-9a-fA-F]{40}$")
_HEX32 = re.compile(r"^0x[0-9a-fA-F]{64}$")
_HEX = re.compile(r"^0x(?:[0-9a-fA-F]{2})+$")
CAIP2 = re.compile(r"^[-a-z0-9]{3,8}:[-_a-zA-Z0-9]{1,32}$")


def _uint(value: Any) -> int:
    # Amounts travel as decimal strings (JSON numbers lose precision past 2**53).
    if isinstance(value, str) and _DIGITS.fullmatch(value):
        number = int(value)
    elif isinstance(value, int) and not isinstance(value, bool):
        number = value
    else:
        raise ValueError("must be a string of decimal digits")
    if not 0 <= number <= _UINT256_MAX:
        raise ValueError("out of uint256 range")
    return number


def _pattern(regex: re.Pattern[str], what: str) -> BeforeValidator:
    def check(value: Any) -> str:
        # fullmatch: "$" alone lets a trailing newline through, which the EVM helpers
        # (to_checksum_address, HexBytes) then refuse with a ValueError.
        if not isinstance(value, str) or not regex.fullmatch(value):
            raise ValueError(f"must be {what}")
        return value
    return BeforeValidator(check)


Uint = Annotated[int, BeforeValidator(_uint), PlainSerializer(str, return_type=str)]
"""An atomic amount or timestamp: ``int`` in Python, a decimal string on the wire."""
Address = Annotated[str, _pattern(_ADDRESS, "a 0x-prefixed 20-byte hex address")]
Bytes32 = Annotated[str, _pattern(_HEX32, "0x-prefixed 32 bytes of hex")]
HexBytesStr = Annotated[str, _pattern(_HEX, "0x-prefixed hex bytes")]


class _Wire(BaseModel):
    """camelCase on the wire, snake_case in Python; immutable once decoded."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, frozen=True,
                              serialize_by_alias=True, extra="ignore")


class ResourceInfo(_Wire):
    """The protected resource (v2 ``resource``)."""

    url: str
    description: str | None = None
    mime_type: str | None = None


class AssetExtra(_Wire):
    """``extra`` for exact/EVM: the token's EIP-712 domain name and version."""

    model_config = ConfigDict(extra="allow")
    name: str
    version: str


class PaymentRequirements(_Wire):
    """v2 ``PaymentRequirements`` (one entry of ``accepts``; echoed as ``accepted``)."""

    scheme: str
    network: Annotated[str, _pattern(CAIP2, "a CAIP-2 network id")]
    amount: Uint
    asset: Address
    pay_to: Address
    max_timeout_seconds: int = Field(gt=0)
    extra: AssetExtra


class PaymentRequirementsV1(_Wire):
    """v1 requirements (in the 402 JSON body); ``maxAmountRequired`` and the resource inline."""

    scheme: str
    network: str
    max_amount_required: Uint
    resource: str
    description: str = ""
    mime_type: str = ""
    pay_to: Address
    max_timeout_seconds: int = Field(gt=0)
    asset: Address
    output_schema: dict[str, Any] | None = None
    extra: AssetExtra


class PaymentRequired(_Wire):
    """v2 402 challenge, sent base64-encoded in ``PAYMENT-REQUIRED``."""

    x402_version: Literal[2] = 2
    error: str | None = None
    resource: ResourceInfo
    accepts: list[PaymentRequirements]
    extensions: dict[str, Any] | None = None


class PaymentRequiredV1(_Wire):
    """v1 402 challenge, sent as the JSON response body."""

    x402_version: Literal[1] = 1
    error: str | None = None
    accepts: list[PaymentRequirementsV1]


class Authorization(_Wire):
    """EIP-3009 authorization parameters as they travel (``from`` is a Python keyword)."""

    from_: Address = Field(alias="from")
    to: Address
    value: Uint
    valid_after: Uint
    valid_before: Uint
    nonce: Bytes32


class ExactEvmPayload(_Wire):
    """The ``payload`` of an exact/EVM payment."""

    signature: HexBytesStr
    authorization: Authorization


class PaymentPayload(_Wire):
    """v2 payment, sent base64-encoded in ``PAYMENT-SIGNATURE``."""

    x402_version: Literal[2] = 2
    resource: ResourceInfo | None = None
    accepted: PaymentRequirements
    payload: ExactEvmPayload
    extensions: dict[str, Any] | None = None


class PaymentPayloadV1(_Wire):
    """v1 payment, sent base64-encoded in ``X-PAYMENT``."""

    x402_version: Literal[1] = 1
    scheme: str
    network: str
    payload: ExactEvmPayload


class SettlementResponse(_Wire):
    """``PAYMENT-RESPONSE`` / ``X-PAYMENT-RESPONSE`` body (and a facilitator's /settle answer)."""

    success: bool
    error_reason: str | None = None
    payer: str | None = None
    transaction: str
    network: str
    amount: str | None = None


AnyPaymentPayload: TypeAlias = PaymentPayload | PaymentPayloadV1


# --------------------------------------------------------------------------- encode


def encode_header(model: BaseModel) -> str:
    """Standard base64 (padded) of the model's camelCase JSON, ``None`` fields omitted."""
    raw = model.model_dump_json(by_alias=True, exclude_none=True)
    return base64.b64encode(raw.encode()).decode("ascii")


def decode_header_json(value: str, *, header: str = PAYMENT_SIGNATURE_HEADER) -> Any:
    """base64 -> JSON value, with :class:`InvalidPayment` naming what failed."""
    if len(value) > MAX_HEADER_BYTES:
        raise InvalidPayment(f"{header} header exceeds {MAX_HEADER_BYTES} bytes", param=header)
    try:
        raw = base64.b64decode(value.strip(), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise InvalidPayment(f"{header} header is not valid base64", param=header) from exc
    try:
        return json.loads(raw)
    except (UnicodeDecodeError, ValueError) as exc:
        raise InvalidPayment(f"{header} header is not base64-encoded JSON", param=header) from exc


def field_error(exc: ValidationError, header: str) -> InvalidPayment:
    """The :class:`InvalidPayment` naming the first field ``exc`` found wrong in ``header``."""
    first = exc.errors(include_url=False)[0]
    loc = ".".join(str(part) for part in first["loc"]) or "(root)"
    if first["type"] == "missing":
        message = f"{header}: missing field {loc}"
    else:
        message = f"{header}: invalid field {loc}: {first['msg']}"
    return InvalidPayment(message, param=loc)


def decode_payment_header(value: str, *, version: int | None = None) -> AnyPaymentPayload:
    """Decode ``PAYMENT-SIGNATURE`` (``version=2``) or ``X-PAYMENT`` (``version=1``).

    ``version=None`` takes the version from the payload's ``x402Version``. Raises
    :class:`InvalidPayment` for: over 8 KB, not base64, not JSON, not an object, wrong or
    missing ``x402Version``, missing/ill-typed fields, bad hex. A well-formed payment for a
    scheme other than ``exact`` raises :class:`PaymentRejected` (``unsupported_scheme``).
    """
    header = X_PAYMENT_HEADER if version == 1 else PAYMENT_SIGNATURE_HEADER
    return parse_payment_payload(decode_header_json(value, header=header), version=version,
                                 where=header)


def parse_payment_payload(data: Any, *, version: int | None = None,
                          where: str = "paymentPayload") -> AnyPaymentPayload:
    """Validate an already-decoded JSON payment (e.g. a facilitator request's
    ``paymentPayload``); same errors as :func:`decode_payment_header`, prefixed ``where``."""
    if not isinstance(data, dict):
        raise InvalidPayment(f"{where}: payload is not a JSON object", param="(root)")
    found = data.get("x402Version")
    if found not in (1, 2) or isinstance(found, bool):
        raise InvalidPayment(f"{where}: missing or unsupported field x402Version",
                             param="x402Version")
    if version is not None and found != version:
        raise InvalidPayment(f"{where}: x402Version must be {version}", param="x402Version")
    if found == 2:
        accepted = data.get("accepted")
        scheme = accepted.get("scheme") if isinstance(accepted, dict) else None
    else:
        scheme = data.get("scheme")
    if isinstance(scheme, str) and scheme != SCHEME_EXACT:
        raise PaymentRejected(f"scheme {scheme!r} is not supported", code="unsupported_scheme")
    model: type[PaymentPayload] | type[PaymentPayloadV1] = (
        PaymentPayload if found == 2 else PaymentPayloadV1)
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise field_error(exc, where) from exc


def as_v2(payload: AnyPaymentPayload, requirements: PaymentRequirements) -> PaymentPayload:
    """A v1 payment restated as v2 for ``requirements`` (v2 payments are returned as is), so
    everything behind the HTTP edge (verification, facilitators) speaks one version."""
    if isinstance(payload, PaymentPayload):
        return payload
    return PaymentPayload(accepted=requirements, payload=payload.payload)


def decode_model(value: str, model: type[_Wire], *, header: str) -> Any:
    """Decode any base64 header into ``model`` (e.g. ``PAYMENT-REQUIRED`` on the client side)."""
    data = decode_header_json(value, header=header)
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise field_error(exc, header) from exc


# --------------------------------------------------------------------------- convert


def to_authorization(payload: AnyPaymentPayload) -> Eip3009Authorization:
    """The EIP-3009 authorization inside a decoded payment.

    Only 65-byte ECDSA signatures are supported (no ERC-1271/6492 smart-wallet signatures):
    a longer one is rejected with ``invalid_exact_evm_payload_signature``.
    """
    inner = payload.payload
    if len(inner.signature) != 2 + 130:
        raise PaymentRejected("only 65-byte EOA signatures are supported",
                              code="invalid_exact_evm_payload_signature")
    auth = inner.authorization
    return Eip3009Authorization(from_=auth.from_, to=auth.to, value=auth.value,
                                valid_after=auth.valid_after, valid_before=auth.valid_before,
                                nonce=auth.nonce.lower(), signature=inner.signature.lower())


__all__ = [
    "MAX_HEADER_BYTES",
    "PAYMENT_REQUIRED_HEADER",
    "PAYMENT_RESPONSE_HEADER",
    "PAYMENT_SIGNATURE_HEADER",
    "SCHEME_EXACT",
    "X_PAYMENT_HEADER",
    "X_PAYMENT_RESPONSE_HEADER",
    "AnyPaymentPayload",
    "AssetExtra",
    "Authorization",
    "ExactEvmPayload",
    "PaymentPayload",
    "PaymentPayloadV1",
    "PaymentRequired",
    "PaymentRequiredV1",
    "PaymentRequirements",
    "PaymentRequirementsV1",
    "ResourceInfo",
    "SettlementResponse",
    "as_v2",
    "decode_header_json",
    "decode_model",
    "decode_payment_header",
    "encode_header",
    "field_error",
    "parse_payment_payload",
    "to_authorization",
]
