"""x402 settlement, local or through a facilitator (specs/x402/x402-specification-v2.md §7).

One protocol, two implementations, chosen by configuration:

* :class:`LocalSettlement` -- verify and settle ourselves with :class:`EvmSettler` (our relayer
  pays gas);
* :class:`~gateway.rails.facilitator_client.RemoteFacilitator` -- delegate to an x402
  facilitator over HTTP (``POST /verify``, ``POST /settle``, ``GET /supported``).

This module holds the protocol, the facilitator API's answers and the local implementation;
:func:`create_facilitator_app` (:mod:`gateway.rails.facilitator_server`) serves the facilitator
API on top of :class:`LocalSettlement`, so tollstream can be its own (self-hosted)
facilitator, and tests get a real remote one.

Both raise :class:`PaymentRejected` (``code`` = x402 reason), :class:`ServiceUnavailable`
(chain RPC or facilitator unreachable) or :class:`UpstreamError` (garbage answer).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

from fastapi import FastAPI
from pydantic import Field, ValidationError

from gateway.errors import (
    InvalidPayment,
    PaymentRejected,
    ServiceUnavailable,
)
from gateway.rails.evm import EvmNetwork, EvmSettler, SettlementResult
from gateway.rails.x402 import (
    SCHEME_EXACT,
    AnyPaymentPayload,
    PaymentRequirements,
    PaymentRequirementsV1,
    SettlementResponse,
    _Wire,
    parse_payment_payload,
    to_authorization,
)
from gateway.rails.x402_challenge import caip2, from_v1, match_requirements, v1_network_name

# Reason codes of the x402 SDK's exact/EVM facilitator (x402.mechanisms.evm.constants).
ERR_NETWORK_MISMATCH = "network_mismatch"
ERR_MISSING_EIP712_DOMAIN = "missing_eip712_domain"

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


class SchemeSettlement(Protocol):
    """One payment scheme's verifier and settler: what :class:`LocalSettlement` and the
    facilitator app (:mod:`gateway.rails.facilitator_server`) dispatch to by scheme name.
    A scheme is added by registering one more of these (:meth:`LocalSettlement.register`)."""

    scheme: str

    def kinds(self) -> list[SupportedKind]:
        """What ``GET /supported`` lists for this scheme (one entry per version/network)."""
        ...

    def signers(self) -> list[str]:
        """The facilitator's addresses that send this scheme's settlements."""
        ...

    def parse(self, payload: Any, requirements: Any, *, version: int
              ) -> tuple[Any, PaymentRequirements]:
        """A facilitator request's ``paymentPayload`` and ``paymentRequirements`` (JSON, the
        request's ``x402Version``), validated; requirements in their v2 form. Raises
        :class:`InvalidPayment` / :class:`PaymentRejected` with the x402 reason."""
        ...

    # The payload is the scheme's own model (what its ``parse`` returned).
    async def verify(self, payload: Any, requirements: PaymentRequirements) -> str:
        ...

    async def settle(self, payload: Any, requirements: PaymentRequirements
                     ) -> SettlementResult:
        ...


class ExactEvm:
    """The ``exact`` scheme on EVM (EIP-3009 ``transferWithAuthorization``), settled by
    :class:`EvmSettler` from our relayer on the configured networks; v1 and v2."""

    scheme = SCHEME_EXACT

    def __init__(self, settler: EvmSettler, networks: Sequence[EvmNetwork]) -> None:
        self.settler = settler
        self.networks = {n.network: n for n in networks}
        #: Settlements sent but not confirmed, by network, payer and nonce: their
        #: transaction. In memory (as the x402 SDK's default store): a retry that reaches
        #: another process finds the nonce used instead.
        self._pending: dict[str, str] = {}

    def kinds(self) -> list[SupportedKind]:
        kinds = [SupportedKind(x402_version=2, scheme=self.scheme, network=n)
                 for n in self.networks]
        kinds += [SupportedKind(x402_version=1, scheme=self.scheme, network=name)
                  for name in (v1_network_name(n) for n in self.networks) if name is not None]
        return kinds

    def signers(self) -> list[str]:
        return sorted({n.relayer_address for n in self.networks.values()})

    def network_for(self, requirements: PaymentRequirements) -> EvmNetwork:
        """The configured network ``requirements`` are for (checks scheme, network, asset)."""
        if requirements.scheme != self.scheme:
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

    def parse(self, payload: Any, requirements: Any, *, version: int
              ) -> tuple[AnyPaymentPayload, PaymentRequirements]:
        # The checks the x402 SDK's exact/EVM facilitator makes before the signature, with
        # its reason codes: scheme, network mismatch, the EIP-712 domain in extra.
        if not isinstance(payload, dict):
            raise InvalidPayment("paymentPayload is not a JSON object", param="paymentPayload",
                                 code="invalid_payload")
        if not isinstance(requirements, dict):
            raise InvalidPayment("paymentRequirements is not a JSON object",
                                 param="paymentRequirements",
                                 code="invalid_payment_requirements")
        accepted = payload.get("accepted") if version == 2 else payload
        paid_network = accepted.get("network") if isinstance(accepted, dict) else None
        if isinstance(paid_network, str) and isinstance(requirements.get("network"), str) \
                and caip2(paid_network) != caip2(requirements["network"]):
            raise PaymentRejected("the payment is for another network than the requirements",
                                  code=ERR_NETWORK_MISMATCH)
        extra = requirements.get("extra")
        if not (isinstance(extra, dict) and isinstance(extra.get("name"), str)
                and isinstance(extra.get("version"), str)):
            raise PaymentRejected("paymentRequirements.extra lacks the token's EIP-712 domain "
                                  "(name and version)", code=ERR_MISSING_EIP712_DOMAIN)
        parsed = parse_payment_payload(payload, version=version, where="paymentPayload")
        model: type[PaymentRequirements] | type[PaymentRequirementsV1] = (
            PaymentRequirements if version == 2 else PaymentRequirementsV1)
        try:
            req = model.model_validate(requirements)
        except ValidationError as exc:
            raise InvalidPayment("paymentRequirements is malformed",
                                 param="paymentRequirements",
                                 code="invalid_payment_requirements") from exc
        return parsed, (from_v1(req) if isinstance(req, PaymentRequirementsV1) else req)

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
        network = self.network_for(requirements)
        auth = to_authorization(payload)
        key = f"{network.network}:{auth.payer.lower()}:{auth.nonce}"
        sent = self._pending.get(key)
        if sent is not None:
            return await self._reconcile(key, sent, payload, requirements, network)
        # Re-verify: a caller may settle without a prior verify, and state may have changed.
        await self.verify(payload, requirements)
        try:
            return await self.settler.settle(auth, network)
        except ServiceUnavailable as exc:
            # Sent but not confirmed: remember the transaction, so the same request sent
            # again (the settlement_pending retry) reconciles with it instead of failing on
            # the nonce it used.
            if exc.extra.get("transaction"):
                self._remember(key, str(exc.extra["transaction"]))
            raise

    def _remember(self, key: str, tx_hash: str) -> None:
        if len(self._pending) >= 10_000:  # bound memory: the oldest is forgotten first
            del self._pending[next(iter(self._pending))]
        self._pending[key] = tx_hash

    async def _reconcile(self, key: str, sent: str, payload: AnyPaymentPayload,
                         requirements: PaymentRequirements,
                         network: EvmNetwork) -> SettlementResult:
        """The outcome of the settlement transaction ``sent`` earlier for this payment."""
        match_requirements(payload, [requirements])
        auth = to_authorization(payload)
        status = await self.settler.transaction_status(sent, network)
        if status.state == "success" and await self.settler.authorization_used(
                auth.from_, auth.nonce, network):
            del self._pending[key]
            return SettlementResult(tx_hash=sent, payer=auth.payer, amount=auth.value,
                                    block_number=status.block_number,
                                    network=network.network)
        if status.state in ("success", "reverted"):
            del self._pending[key]
            raise PaymentRejected(f"settlement transaction {sent} did not transfer",
                                  code="transaction_failed", extra={"transaction": sent})
        raise ServiceUnavailable(f"settlement transaction {sent} is not confirmed yet",
                                 extra={"transaction": sent})


class LocalSettlement:
    """:class:`Settlement` done in-process, dispatched by scheme name to a
    :class:`SchemeSettlement` (``exact``: :class:`ExactEvm` on the configured networks)."""

    def __init__(self, settler: EvmSettler, networks: Sequence[EvmNetwork], *,
                 schemes: Sequence[SchemeSettlement] = ()) -> None:
        self.settler = settler
        self.exact = ExactEvm(settler, networks)
        self.networks = self.exact.networks
        self.schemes: dict[str, SchemeSettlement] = {self.exact.scheme: self.exact}
        for handler in schemes:
            self.register(handler)

    def register(self, handler: SchemeSettlement) -> None:
        """Serve ``handler.scheme`` with ``handler`` (replacing any earlier one)."""
        self.schemes[handler.scheme] = handler

    def scheme(self, name: Any) -> SchemeSettlement:
        """The handler of scheme ``name``; :class:`PaymentRejected` ``unsupported_scheme``."""
        handler = self.schemes.get(name) if isinstance(name, str) else None
        if handler is None:
            raise PaymentRejected(f"scheme {str(name)[:40]!r} is not supported",
                                  code="unsupported_scheme")
        return handler

    def network_for(self, requirements: PaymentRequirements) -> EvmNetwork:
        """The configured network of ``exact`` requirements (see :meth:`ExactEvm.network_for`)."""
        return self.exact.network_for(requirements)

    async def verify(self, payload: AnyPaymentPayload,
                     requirements: PaymentRequirements) -> str:
        return await self.scheme(requirements.scheme).verify(payload, requirements)

    async def settle(self, payload: AnyPaymentPayload,
                     requirements: PaymentRequirements) -> SettlementResult:
        return await self.scheme(requirements.scheme).settle(payload, requirements)


# ------------------------------------------------------------ shared

SETTLEMENT_PENDING = "settlement_pending"
"""``/settle`` reason for a transaction sent but not yet confirmed (the x402 SDK's): not a
failure; the same request sent again reconciles with that transaction."""


# --------------------------------------------------------------------------- server


def create_facilitator_app(settler: EvmSettler, networks: Sequence[EvmNetwork], *,
                           schemes: Sequence[SchemeSettlement] = ()) -> FastAPI:
    """The facilitator API (``/verify``, ``/settle``, ``/supported``) on ``networks``; see
    :mod:`gateway.rails.facilitator_server` (imported here, where it was first defined)."""
    from gateway.rails.facilitator_server import create_app

    return create_app(settler, networks, schemes=schemes)


__all__ = [
    "SETTLEMENT_PENDING",
    "ExactEvm",
    "LocalSettlement",
    "SchemeSettlement",
    "SettleResult",
    "Settlement",
    "SupportedKind",
    "SupportedResult",
    "VerifyResult",
    "create_facilitator_app",
]
