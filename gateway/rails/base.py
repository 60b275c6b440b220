"""The seam between the routes and the ways agents pay.

A :class:`PaymentRail` answers four questions: does this request carry my credential
(:meth:`~PaymentRail.claims`), settle it (:meth:`~PaymentRail.authenticate`), what do I add to
a 402 (:meth:`~PaymentRail.offer`), and how does a cut stream top up
(:meth:`~PaymentRail.top_up_hint`). The routes only ever talk to one rail: with several
enabled, a :class:`Rails` set stands in for them, merging their offers into one 402 and
routing each credential to the rail that claims it.

One 402 carries every enabled rail's challenge side by side: x402's ``PAYMENT-REQUIRED``
header plus one ``WWW-Authenticate: Payment`` line per MPP method/intent, and one JSON body
that x402 v1 clients (``x402Version``, ``accepts``), the Payment scheme's clients (RFC 9457
problem fields ``type``, ``title``, ``status``, ``detail``) and the model SDKs (``message``,
``code``) all read. With any Payment challenge in it the body is sent as
``application/problem+json`` (draft-httpauth-payment, "Error Response Format"): JSON clients
that do not look at the media type parse it all the same.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from prometheus_client.core import Metric
from starlette.requests import Request
from starlette.responses import Response

from gateway.errors import GatewayError, PaymentRequired
from meters.meter import Bill, StreamMeter
from meters.rates import Rate

PROBLEM_JSON = "application/problem+json"


@dataclass
class Offer:
    """What one rail adds to a 402: header lines and body fields."""

    headers: list[tuple[str, str]] = field(default_factory=list)
    body: dict[str, Any] = field(default_factory=dict)
    #: Whether the offer is a Payment-scheme challenge (problem+json, no-store).
    payment_scheme: bool = False


class StreamPayment(Protocol):
    """How a stream paid by a pre-authorized allowance (an MPP session, an x402 ``upto``
    authorization) asks for more money when it runs out, and how it ends. A session's stream
    pauses (never cuts at once) for up to :attr:`pause_timeout` seconds; one that cannot get
    more (:attr:`pauses` false: an ``upto`` maximum) is cut."""

    pauses: bool
    pause_timeout: float

    async def need(self, meter: StreamMeter, tokens: int) -> list[bytes]:
        """The SSE events asking the client to pay for ``tokens`` more output tokens."""
        ...

    async def receipt(self, meter: StreamMeter, bill: Bill) -> list[bytes]:
        """The SSE events that end a paid stream (after its final charge)."""
        ...

    async def shortfall(self, meter: StreamMeter, needed: int) -> dict[str, Any]:
        """Fields for the 402 of a request the allowance cannot start (``needed`` atomic
        units more are required)."""
        ...


@dataclass(frozen=True, slots=True)
class Paid:
    """A request's payment credential, accepted: the account it spends from, headers for
    the response, and, for a pre-authorized allowance, how its stream pauses and ends."""

    account_id: str
    headers: dict[str, str]
    stream: StreamPayment | None = None
    #: Called once the request's final charge was made, however it ended (an ``upto``
    #: authorization settles then): response headers for a non-streaming answer.
    finish: Callable[[], Awaitable[dict[str, str]]] | None = None


class PaymentRail:
    """No payment rail: the operator funds accounts through the admin API."""

    name = "none"
    #: Output tokens a first payment must cover on top of the prompt.
    min_output_tokens = 1

    async def start(self) -> None:
        """Called once at start-up (e.g. to finish deposits a crashed process left)."""

    async def aclose(self) -> None:
        """Called once at shutdown."""

    def metrics(self) -> Iterable[Metric]:
        """Metrics the rail keeps itself, read at each scrape of ``/metrics``."""
        return ()

    def claims(self, request: Request) -> bool:
        """Whether ``request`` carries a credential of this rail."""
        return False

    async def authenticate(self, request: Request, *, needed: int, rate: Rate | None = None
                           ) -> Paid | None:
        """Settle a payment credential carried by ``request``.

        Returns the account it credited (or that the credential stands for) with headers for
        the response, or None when the request carries no payment. ``needed`` is what the
        request's prompt plus :attr:`min_output_tokens` cost, in atomic units; ``rate`` the
        requested model's prices.
        """
        return None

    def offer(self, request: Request, *, needed: int, reason: str, code: str,
              rate: Rate | None = None) -> Offer | None:
        """This rail's part of a 402 (None: it offers nothing for this request)."""
        return None

    def challenge(self, request: Request, *, needed: int, reason: str,
                  code: str = "payment_required", rate: Rate | None = None) -> GatewayError:
        """The 402 answering a request that must pay first."""
        offer = self.offer(request, needed=needed, reason=reason, code=code, rate=rate)
        if offer is None:
            return PaymentRequired(reason, code=code, extra={"needed": str(needed)})
        return render(PaymentRequired(reason, code=code), [offer], needed=needed)

    async def manage(self, request: Request) -> Response | None:
        """Answer a payment action that needs no model call (MPP's session ``close``, a
        voucher on ``HEAD``) before the body is read; None for every other request."""
        return None

    async def close_balance(self, account_id: str) -> Mapping[str, Any] | None:
        """Close what funds ``account_id`` (a pre-authorized hold: captured for what was
        spent, the rest released); None when no rail funds it that way."""
        return None

    async def status(self) -> dict[str, str]:
        """What awaits settlement on this rail, for the operator's status page."""
        return {}

    async def top_up_hint(self, account_id: str, request: Request) -> Mapping[str, Any]:
        """How to add money, for the machine-readable reason of a cut stream."""
        return {"method": "operator", "how": "ask the operator to credit this account",
                "balance_url": "/v1/balance"}


def render(error: GatewayError, offers: Sequence[Offer], *, needed: int,
           problem: Mapping[str, Any] | None = None) -> GatewayError:
    """``error`` (its status, code and message) carrying every offer: one body, every
    challenge header. ``problem`` overrides the default problem fields."""
    body: dict[str, Any] = {}
    headers: list[tuple[str, str]] = []
    scheme = False
    for offer in offers:
        body.update(offer.body)
        headers += offer.headers
        scheme = scheme or offer.payment_scheme
    if scheme:
        body.update({"type": "https://paymentauth.org/problems/payment-required",
                     "title": "Payment Required", "status": error.status,
                     "detail": error.message, **(problem or {})})
        headers.append(("Cache-Control", "no-store"))
    body.update({"code": error.code, "message": error.message, "needed": str(needed)})
    if error.param:
        body.setdefault("param", error.param)
    body.update(error.extra)
    error.body = body
    error.header_list = [*error.header_list, *headers]
    if scheme:
        error.media_type = PROBLEM_JSON
    return error


class Rails(PaymentRail):
    """Several rails at once (see the module docstring)."""

    def __init__(self, rails: Sequence[PaymentRail]) -> None:
        self.rails = list(rails)
        self.name = "+".join(r.name for r in self.rails) or "none"
        self.min_output_tokens = max((r.min_output_tokens for r in self.rails), default=1)

    async def start(self) -> None:
        for rail in self.rails:
            await rail.start()

    async def aclose(self) -> None:
        for rail in self.rails:
            await rail.aclose()

    def metrics(self) -> Iterable[Metric]:
        for rail in self.rails:
            yield from rail.metrics()

    def claims(self, request: Request) -> bool:
        return any(rail.claims(request) for rail in self.rails)

    async def authenticate(self, request: Request, *, needed: int, rate: Rate | None = None
                           ) -> Paid | None:
        for rail in self.rails:
            if rail.claims(request):
                try:
                    return await rail.authenticate(request, needed=needed, rate=rate)
                except GatewayError as exc:
                    if exc.body is None and not isinstance(exc, PaymentRequired):
                        raise
                    # A rejected payment: answer with every rail's fresh challenge.
                    raise self.rechallenge(request, exc, needed=needed, rate=rate) from exc
        return None

    async def manage(self, request: Request) -> Response | None:
        for rail in self.rails:
            if rail.claims(request):
                try:
                    return await rail.manage(request)
                except GatewayError as exc:
                    if exc.status != 402:
                        raise
                    raise self.rechallenge(request, exc, needed=0, rate=None) from exc
        return None

    async def close_balance(self, account_id: str) -> Mapping[str, Any] | None:
        for rail in self.rails:
            closed = await rail.close_balance(account_id)
            if closed is not None:
                return closed
        return None

    async def status(self) -> dict[str, str]:
        merged: dict[str, str] = {}
        for rail in self.rails:
            merged.update(await rail.status())
        return merged

    def offers(self, request: Request, *, needed: int, reason: str, code: str,
               rate: Rate | None) -> list[Offer]:
        offers = [rail.offer(request, needed=needed, reason=reason, code=code, rate=rate)
                  for rail in self.rails]
        return [offer for offer in offers if offer is not None]

    def offer(self, request: Request, *, needed: int, reason: str, code: str,
              rate: Rate | None = None) -> Offer | None:
        offers = self.offers(request, needed=needed, reason=reason, code=code, rate=rate)
        if not offers:
            return None
        merged = Offer()
        for offer in offers:
            merged.headers += offer.headers
            merged.body.update(offer.body)
            merged.payment_scheme = merged.payment_scheme or offer.payment_scheme
        return merged

    def rechallenge(self, request: Request, exc: GatewayError, *, needed: int,
                    rate: Rate | None) -> GatewayError:
        """``exc`` (a rail's rejection) with every rail's challenge, keeping what the
        rejecting rail said (its problem fields, its own non-challenge headers)."""
        offers = self.offers(request, needed=needed, reason=exc.message, code=exc.code,
                             rate=rate)
        problem = getattr(exc, "problem", None)
        challenge_headers = {name.lower() for offer in offers for name, _ in offer.headers}
        challenge_headers.add("cache-control")
        kept = {k: v for k, v in exc.headers.items() if k.lower() not in challenge_headers}
        exc.headers = kept
        exc.header_list = [(k, v) for k, v in exc.header_list
                           if k.lower() not in challenge_headers]
        if exc.body is not None:
            # The rail's own body (e.g. the x402 v1 fields of its error) stays underneath.
            for offer in offers:
                offer.body = {**exc.body, **offer.body}
        return render(exc, offers, needed=needed,
                      problem=problem() if callable(problem) else None)

    async def top_up_hint(self, account_id: str, request: Request) -> Mapping[str, Any]:
        hints = [await rail.top_up_hint(account_id, request) for rail in self.rails]
        if len(hints) == 1:
            return hints[0]
        return {"method": "any", "options": hints}
