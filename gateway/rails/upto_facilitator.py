"""The ``upto`` scheme in tollstream's facilitator app: a
:class:`~gateway.rails.facilitator.SchemeSettlement` for Permit2 authorizations, served next to
``exact`` (``create_facilitator_app(..., schemes=[UptoFacilitator(...)])``).

Phase-dependent amounts (scheme_upto.md, "Core Properties" 5): at ``/verify`` the
requirements' ``amount`` is the maximum the payer authorized; at ``/settle`` it is what to
settle, at most that maximum. ``/supported`` announces each network with
``extra.facilitatorAddress`` (our relayer: the one address the payer's witness may name).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from pydantic import ValidationError

from gateway.errors import InvalidPayment, PaymentRejected
from gateway.rails.eip3009 import EvmNetwork
from gateway.rails.evm import SettlementResult
from gateway.rails.evm_rpc import ChainRpc
from gateway.rails.facilitator import SupportedKind
from gateway.rails.upto import (
    ERR_NETWORK,
    SCHEME_UPTO,
    UptoEvm,
    UptoPaymentPayload,
    parse_upto_payload,
)
from gateway.rails.x402 import PaymentRequirements


class UptoFacilitator:
    """Verifies and settles ``upto`` payments on ``networks`` from our relayer (v2 only: the
    scheme has no v1 form)."""

    scheme = SCHEME_UPTO

    def __init__(self, rpc: ChainRpc, networks: Sequence[EvmNetwork]) -> None:
        self.evm = UptoEvm(rpc)
        self.networks = {n.network: n for n in networks}

    def kinds(self) -> list[SupportedKind]:
        return [SupportedKind(x402_version=2, scheme=self.scheme, network=n.network,
                              extra={"facilitatorAddress": n.relayer_address})
                for n in self.networks.values()]

    def signers(self) -> list[str]:
        return sorted({n.relayer_address for n in self.networks.values()})

    def parse(self, payload: Any, requirements: Any, *, version: int
              ) -> tuple[UptoPaymentPayload, PaymentRequirements]:
        if version != 2:
            raise PaymentRejected("the upto scheme exists in x402 v2 only",
                                  code="invalid_x402_version")
        parsed = parse_upto_payload(payload, where="paymentPayload")
        try:
            required = PaymentRequirements.model_validate(requirements)
        except ValidationError as exc:
            raise InvalidPayment("paymentRequirements is malformed",
                                 param="paymentRequirements",
                                 code="invalid_payment_requirements") from exc
        return parsed, required

    def _network(self, requirements: PaymentRequirements) -> EvmNetwork:
        network = self.networks.get(requirements.network)
        if network is None:
            raise PaymentRejected(f"network {requirements.network!r} is not supported",
                                  code=ERR_NETWORK)
        if network.asset.lower() != requirements.asset.lower():
            raise PaymentRejected("asset is not this network's token",
                                  code="invalid_payment_requirements")
        return network

    async def verify(self, payload: UptoPaymentPayload,
                     requirements: PaymentRequirements) -> str:
        network = self._network(requirements)
        await self.evm.verify(payload, requirements, network,
                              facilitator=network.relayer_address)
        return payload.payer

    async def settle(self, payload: UptoPaymentPayload,
                     requirements: PaymentRequirements) -> SettlementResult:
        network = self._network(requirements)
        # Everything verify checks but the amount (the maximum then, the charge now), then
        # settle: the proxy refuses anything above the maximum, and so do we, first.
        maximum = requirements.model_copy(
            update={"amount": payload.payload.permit2_authorization.permitted.amount})
        if requirements.amount:
            await self.evm.verify(payload, maximum, network,
                                  facilitator=network.relayer_address)
        return await self.evm.settle(payload, requirements.amount, network)


__all__ = ["UptoFacilitator"]
