"""Payment rails: how agents pay for an allowance. One module per rail, side by side.

:class:`PaymentRail` is the seam the routes talk to. The base class is the rail-less gateway
(accounts are made and credited by the operator's admin API); :mod:`gateway.rails.x402_deposits`
takes x402 deposits. A rail turns "no credential" and "not enough balance" into its 402
challenge, accepts payment credentials carried by a request, and says how to top up when a
stream is cut.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from starlette.requests import Request

from gateway.errors import GatewayError, PaymentRequired


class PaymentRail:
    """No payment rail: the operator funds accounts through the admin API."""

    name = "none"
    #: Output tokens a first payment must cover on top of the prompt.
    min_output_tokens = 1

    async def start(self) -> None:
        """Called once at start-up (e.g. to finish deposits a crashed process left)."""

    async def aclose(self) -> None:
        """Called once at shutdown."""

    async def authenticate(self, request: Request, *, needed: int
                           ) -> tuple[str, dict[str, str]] | None:
        """Settle a payment credential carried by ``request``.

        Returns the account id it credited and headers for the response, or None when the
        request carries no payment. ``needed`` is what the request's prompt plus
        :attr:`min_output_tokens` cost, in atomic units.
        """
        return None

    def challenge(self, request: Request, *, needed: int, reason: str,
                  code: str = "payment_required") -> GatewayError:
        """The 402 answering a request that must pay first."""
        return PaymentRequired(reason, code=code, extra={"needed": str(needed)})

    async def top_up_hint(self, account_id: str, request: Request) -> Mapping[str, Any]:
        """How to add money, for the machine-readable reason of a cut stream."""
        return {"method": "operator", "how": "ask the operator to credit this account",
                "balance_url": "/v1/balance"}
