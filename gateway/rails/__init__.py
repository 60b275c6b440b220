"""Payment rails: how agents pay for an allowance. One module (or package) per rail, side by
side; :mod:`gateway.rails.base` is the seam the routes talk to.

* :class:`PaymentRail` (``base``): no rail, the operator credits accounts;
* ``x402_deposits``: x402 deposits (wire format ``x402``, EIP-3009 ``eip3009``/``evm``,
  facilitators);
* ``mpp``: the Machine Payments Protocol's ``Payment`` scheme, its ``evm`` charge and session;
* :class:`Rails` (``base``): several of them at once, one 402 offering all.
"""

from gateway.rails.base import Offer, Paid, PaymentRail, Rails, StreamPayment, render

__all__ = ["Offer", "Paid", "PaymentRail", "Rails", "StreamPayment", "render"]
