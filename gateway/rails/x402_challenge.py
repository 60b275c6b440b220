"""What an x402 gateway asks for and answers: payment requirements (v2, and v1 where the
payer speaks it), matching a payment to one of them, the 402 challenge, and the settlement
response headers. The payloads and their header codec are :mod:`gateway.rails.x402`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from gateway.errors import PaymentRejected
from gateway.rails.evm import EvmNetwork, SettlementResult
from gateway.rails.x402 import (
    CAIP2,
    PAYMENT_REQUIRED_HEADER,
    PAYMENT_RESPONSE_HEADER,
    SCHEME_EXACT,
    V1_NETWORKS,
    X_PAYMENT_RESPONSE_HEADER,
    AnyPaymentPayload,
    AssetExtra,
    PaymentPayload,
    PaymentRequired,
    PaymentRequiredV1,
    PaymentRequirements,
    PaymentRequirementsV1,
    ResourceInfo,
    SettlementResponse,
    encode_header,
)


def caip2(network: str) -> str:
    """CAIP-2 id of a v2 id (unchanged) or a v1 network name (``base`` -> ``eip155:8453``)."""
    if network in V1_NETWORKS:
        return f"eip155:{V1_NETWORKS[network]}"
    return network


def v1_network_name(network: str) -> str | None:
    """v1 name of a CAIP-2 EVM network, or None when v1 has no name for it."""
    for name, chain_id in V1_NETWORKS.items():
        if network == f"eip155:{chain_id}":
            return name
    return None


def exact_requirements(network: EvmNetwork, *, amount: int, pay_to: str,
                       max_timeout_seconds: int = 300) -> PaymentRequirements:
    """v2 requirements to pay exactly ``amount`` atomic units of ``network``'s token."""
    return PaymentRequirements(
        scheme=SCHEME_EXACT, network=network.network, amount=amount, asset=network.asset,
        pay_to=pay_to, max_timeout_seconds=max_timeout_seconds,
        extra=AssetExtra(name=network.token_name, version=network.token_version))


def to_v1(req: PaymentRequirements, resource: ResourceInfo) -> PaymentRequirementsV1 | None:
    """The v1 form of ``req`` (None if its network has no v1 name)."""
    name = v1_network_name(req.network)
    if name is None:
        return None
    return PaymentRequirementsV1(
        scheme=req.scheme, network=name, max_amount_required=req.amount, resource=resource.url,
        description=resource.description or "", mime_type=resource.mime_type or "",
        pay_to=req.pay_to, max_timeout_seconds=req.max_timeout_seconds, asset=req.asset,
        extra=req.extra)


def from_v1(req: PaymentRequirementsV1) -> PaymentRequirements:
    """The v2 form of v1 requirements (a v1 network name becomes its CAIP-2 id; a CAIP-2 id
    is kept). Raises :class:`PaymentRejected` (``invalid_network``) for a name that is
    neither."""
    network = caip2(req.network)
    if not CAIP2.fullmatch(network):
        raise PaymentRejected(f"network {req.network!r} is not supported",
                              code="invalid_network")
    return PaymentRequirements(
        scheme=req.scheme, network=network, amount=req.max_amount_required, asset=req.asset,
        pay_to=req.pay_to, max_timeout_seconds=req.max_timeout_seconds, extra=req.extra)


def match_requirements(payload: AnyPaymentPayload,
                       offered: Sequence[PaymentRequirements]) -> PaymentRequirements:
    """The offered requirements this payment pays for.

    v2 compares the echoed ``accepted`` (scheme, network, asset, payTo, amount); v1 has only
    scheme and network, so the first offer on that network is used and the amount is checked
    by verification. Raises :class:`PaymentRejected` when nothing matches.
    """
    if isinstance(payload, PaymentPayload):
        acc = payload.accepted
        for req in offered:
            if (req.scheme == acc.scheme and req.network == acc.network
                    and req.asset.lower() == acc.asset.lower()
                    and req.pay_to.lower() == acc.pay_to.lower() and req.amount == acc.amount):
                return req
        networks = {req.network for req in offered}
        code = "invalid_payment_requirements" if acc.network in networks else "invalid_network"
        raise PaymentRejected("accepted does not match any offered payment requirements",
                              code=code)
    network = caip2(payload.network)
    for req in offered:
        if req.scheme == payload.scheme and req.network == network:
            return req
    raise PaymentRejected(f"network {payload.network!r} is not offered", code="invalid_network")


# --------------------------------------------------------------------------- 402 / response


@dataclass(frozen=True)
class PaymentChallenge:
    """A 402 challenge in both versions: put ``header`` in ``PAYMENT-REQUIRED``, ``body`` as the
    JSON response body (v1 clients read it; v2 clients ignore it)."""

    header: str
    body: dict[str, Any]
    v2: PaymentRequired
    v1: PaymentRequiredV1

    @property
    def headers(self) -> dict[str, str]:
        return {PAYMENT_REQUIRED_HEADER: self.header}


V2_ONLY_FIELD = "v2OnlyNetworks"
"""v1 body field listing the offered networks x402 v1 cannot name (pay those with v2)."""


def build_payment_required(*, resource: ResourceInfo, accepts: Sequence[PaymentRequirements],
                           error: str = "PAYMENT-SIGNATURE header is required",
                           extensions: dict[str, Any] | None = None) -> PaymentChallenge:
    """Build the 402 challenge: v2 header value plus v1-compatible JSON body.

    v1 names only some chains (:data:`V1_NETWORKS`): an offer on any other chain (a local
    one, a new L2) has no v1 form. The v1 body then says so instead of leaving ``accepts``
    silently short (or empty): its ``error`` names those networks and tells the client to pay
    with v2, and :data:`V2_ONLY_FIELD` lists them (CAIP-2) for programs.
    """
    v2 = PaymentRequired(error=error, resource=resource, accepts=list(accepts),
                         extensions=extensions)
    v1_accepts = [r for r in (to_v1(req, resource) for req in accepts) if r is not None]
    v2_only = list(dict.fromkeys(req.network for req in accepts
                                 if v1_network_name(req.network) is None))
    v1_error = error
    if v2_only:
        v1_error = (f"{error} (x402 v1 has no network name for {', '.join(v2_only)}: pay "
                    f"there with x402 v2, the {PAYMENT_REQUIRED_HEADER} header's offers)")
    v1 = PaymentRequiredV1(error=v1_error, accepts=v1_accepts)
    body = v1.model_dump(mode="json", by_alias=True, exclude_none=True)
    if v2_only:
        body[V2_ONLY_FIELD] = v2_only
    return PaymentChallenge(header=encode_header(v2), body=body, v2=v2, v1=v1)


def settlement_response(*, success: bool, transaction: str, network: str,
                        payer: str | None = None, error_reason: str | None = None,
                        amount: int | None = None) -> SettlementResponse:
    """A settlement response (encode with :func:`encode_header`)."""
    return SettlementResponse(success=success, transaction=transaction, network=network,
                              payer=payer, error_reason=error_reason,
                              amount=None if amount is None else str(amount))


def settlement_headers(result: SettlementResult, *, version: int) -> dict[str, str]:
    """Response header for a successful settlement: ``PAYMENT-RESPONSE`` (v2) or
    ``X-PAYMENT-RESPONSE`` (v1, with the v1 network name)."""
    network = result.network
    if version == 1:
        network = v1_network_name(network) or network
    body = settlement_response(success=True, transaction=result.tx_hash, network=network,
                               payer=result.payer, amount=result.amount)
    name = PAYMENT_RESPONSE_HEADER if version == 2 else X_PAYMENT_RESPONSE_HEADER
    return {name: encode_header(body)}
