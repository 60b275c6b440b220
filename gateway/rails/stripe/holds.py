"""Pre-authorized Stripe holds (``capture = "manual"``): an SPT authorizes up to the credit, the
account it funds is metered token by token, and the hold is then captured for exactly what was
spent (a partial capture) or, with nothing spent, cancelled. That happens when

* the agent closes it (``POST /v1/balance/close`` with the account's key),
* the account has been idle (nothing spent) for ``hold_idle_seconds``, or
* the authorization nears its expiry (``hold_max_seconds`` after it was made; card
  authorizations lapse after about seven days).

The sweeper of every gateway process looks every ``hold_sweep_seconds``; a Redis lock per hold
keeps two processes off the same one, and :class:`meters.holds.Holds` fixes the amount before
Stripe is called, so a close interrupted by a crash or a Stripe outage is finished later with
the same amount, under the same idempotency key: captured once. This depends on the Stripe
account's Shared Payment Token capabilities allowing ``capture_method=manual``.
"""

from __future__ import annotations

import contextlib
import logging
import time
from typing import Any

from gateway.errors import Conflict, GatewayError, NotFound
from gateway.rails.stripe.client import StripeApi
from meters.connection import redis_errors
from meters.errors import MeterError
from meters.holds import Hold, HoldBusy, Holds
from meters.ledger import Ledger
from meters.periodic import Periodic

log = logging.getLogger("tollstream.stripe.holds")


class HoldKeeper:
    """Closes holds: on request, when idle, before they lapse (see the module docstring)."""

    def __init__(self, *, api: StripeApi, ledger: Ledger, idle_seconds: float,
                 max_seconds: float, interval: float) -> None:
        self.api = api
        self.ledger = ledger
        self.holds = Holds(ledger)
        self.idle_seconds = idle_seconds
        self.max_seconds = max_seconds
        self.interval = interval
        self._loop = Periodic("stripe-holds", interval, self.sweep,
                              outages=(GatewayError, MeterError), log=log)

    async def start(self) -> None:
        await self._loop.start()

    async def stop(self) -> None:
        await self._loop.stop()

    async def close_account(self, account_id: str) -> dict[str, Any]:
        """The agent's close: capture what its account spent, release the rest."""
        hold_id = await self.holds.of_account(account_id)
        if hold_id is None:
            raise NotFound("this account is not funded by a hold: nothing to close",
                           code="no_hold")
        result = await self.close(hold_id)
        if result is None:
            raise Conflict("this hold is closed already", code="hold_closed")
        return result

    async def close(self, hold_id: str) -> dict[str, Any] | None:
        """Capture the hold for what was spent (cancel it if nothing was); None if it is closed
        already. 409 while a stream runs on it."""
        hold = await self.holds.get(hold_id)
        if hold is None:
            return None
        try:
            amount = await self.holds.begin_close(hold_id, hold.account_id)
        except HoldBusy as exc:
            raise Conflict("a stream is still running on this balance: close it when the "
                           "stream has ended", code="hold_busy") from exc
        if amount is None:
            return None
        if amount > 0:
            intent = await self.api.capture(hold_id, amount,
                                            idempotency_key=f"hold_capture_{hold_id}")
            state = "captured"
        else:
            intent = await self.api.cancel(hold_id, idempotency_key=f"hold_cancel_{hold_id}")
            state = "canceled"
        await self.holds.finish(hold_id, hold.account_id, state)
        log.info("hold %s %s: %d of %d", hold_id, state, amount, hold.amount)
        return {"account_id": hold.account_id, "reference": hold_id, "status": state,
                "authorized": str(hold.amount), "captured": str(amount),
                "released": str(hold.amount - amount),
                "stripe_status": intent.get("status")}

    async def sweep(self, now: float | None = None) -> int:
        """One pass over the open holds; returns how many were closed."""
        moment = int(time.time() if now is None else now)
        closed = 0
        for hold_id in await self.holds.open_ids():
            lock = f"{self.ledger.prefix}hold:{hold_id}:sweeping"
            with redis_errors():
                if not await self.ledger.redis.set(lock, "1", nx=True, px=60_000):
                    continue  # another process has it
            try:
                hold = await self.holds.get(hold_id)
                if hold is not None and await self._due(hold, moment):
                    with contextlib.suppress(Conflict):  # a stream runs: next pass
                        closed += await self.close(hold_id) is not None
            finally:
                with redis_errors():
                    await self.ledger.redis.delete(lock)
        return closed

    async def _due(self, hold: Hold, now: int) -> bool:
        if hold.state == "closing" or now >= hold.expires:
            return True  # an interrupted close, or the authorization is about to lapse
        spent = (await self.ledger.get_account(hold.account_id)).spent
        if spent != hold.last_spent:
            await self.holds.seen(hold.hold_id, spent=spent, now=now)
            return False
        return now - hold.quiet_since >= self.idle_seconds
