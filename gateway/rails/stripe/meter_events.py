"""Usage to Stripe billing meters, off the hot path: every finished request of an account that
has a Stripe customer is reported as one meter event (``event_name``, the customer, ``value``
= the tokens billed, ``identifier`` = the request's reservation id).

The record is queued by the request's final charge itself (``settle.lua``, in the same atomic
step: one record per settled request, none for a replayed settle), on a Redis list that
survives restarts. One sender at a time in the whole deployment (a Redis lock renewed while it
works) moves a record to a ``processing`` list, sends it, and drops it once Stripe took it;
when Stripe is down the record waits and is sent later. After a crash the next sender first
resends what was left in ``processing``: Stripe keeps one event per identifier (a repeat is
refused as ``resource_already_exists``, which counts as delivered), so none is lost and none
is counted twice.
"""

from __future__ import annotations

import logging
import secrets
from typing import Any

import orjson

from gateway.errors import GatewayError
from gateway.rails.stripe.client import StripeApi, StripeRefused
from meters.errors import MeterError
from meters.ledger import Ledger, as_text, redis_errors
from meters.periodic import Periodic

log = logging.getLogger("tollstream.stripe.meter")

#: Records sent per pass at most (a pass holds the lock; others wait).
BATCH = 200


class MeterEventSender:
    """Sends queued usage records as Stripe meter events (see the module docstring)."""

    def __init__(self, *, api: StripeApi, ledger: Ledger, event_name: str,
                 interval: float = 2.0) -> None:
        self.api = api
        self.redis = ledger.redis
        self.event_name = event_name
        self.interval = interval
        self.queue = f"{ledger.prefix}stripe:usage"
        self.processing = f"{self.queue}:processing"
        self.lock = f"{self.queue}:sender"
        self.me = secrets.token_hex(8)
        #: A dead sender's lock lapses after this: another process takes over (two senders
        #: for a moment are harmless, Stripe dedupes by identifier).
        self.lock_ms = int(max(5.0, 3 * interval) * 1000)
        self.sent = 0
        self.passes = 0  # passes this process made as the sender
        self._loop = Periodic("stripe-meter-events", interval, self.send_pending,
                              outages=(GatewayError, MeterError), log=log)

    async def start(self) -> None:
        await self._loop.start()

    async def stop(self) -> None:
        await self._loop.stop()

    async def send_pending(self) -> int:
        """One pass, if this process holds the sender lock; returns the events delivered."""
        with redis_errors():
            if not await self.redis.set(self.lock, self.me, nx=True, px=self.lock_ms):
                if await self.redis.get(self.lock) != self.me.encode():
                    return 0
                await self.redis.pexpire(self.lock, self.lock_ms)
            # Left by a sender that died mid-send: resend first (Stripe dedupes).
            retry: list[str | bytes] = await self.redis.lrange(self.processing, 0, -1)
        delivered = 0
        for raw in retry:
            if not await self._send(raw):
                return delivered
            delivered += 1
        for _ in range(BATCH):
            with redis_errors():
                moved: str | bytes | None = await self.redis.lmove(
                    self.queue, self.processing, "LEFT", "RIGHT")
            if moved is None:
                break
            if not await self._send(moved):
                break
            delivered += 1
        self.sent += delivered
        self.passes += 1
        return delivered

    async def _send(self, raw: str | bytes) -> bool:
        """Deliver one record; False when Stripe is unavailable (it stays in processing)."""
        record: dict[str, Any] = orjson.loads(raw)
        try:
            await self.api.meter_event(self.event_name, str(record["customer"]),
                                       int(record["value"]),
                                       identifier=str(record["identifier"]),
                                       timestamp=int(record["timestamp"]))
        except StripeRefused as exc:
            if exc.code != "resource_already_exists":  # a repeat: it was delivered before
                # Stripe will never take this one (an unknown customer, say): log, drop.
                log.error("meter event %s refused by Stripe (%s); dropped",
                          record["identifier"], exc.code)
        except GatewayError:
            return False  # Stripe down: it waits in processing
        with redis_errors():
            await self.redis.lrem(self.processing, 1, as_text(raw))
        return True
