"""Usage to Stripe billing meters, off the hot path: every finished request of an account that
has a Stripe customer is reported as one meter event (``event_name``, the customer, ``value``
= the tokens billed, ``identifier`` = the request's reservation id).

The record is queued by the request's final charge itself (``settle.lua``, in the same atomic
step: one record per settled request, none for a replayed settle), on the account's own list
``{prefix}usage:{<account>}`` (in the account's slot on a cluster: the script can only write
there), which survives restarts. One sender at a time in the whole deployment (a Redis lock
renewed while it works) moves a record to the account's ``processing`` list, sends it, and
drops it once Stripe took it; when Stripe is down the record waits and is sent later. After a
crash the next sender first resends what was left in ``processing``: Stripe keeps one event per
identifier (a repeat is refused as ``resource_already_exists``, which counts as delivered), so
none is lost and none is counted twice.

Which accounts to look at: the final charge adds the account to ``{prefix}stripe:usage`` (a
set) after it queued a record; the sender takes an account out of it *before* draining its
list (a record queued after that adds it again), and back in when it stops early. A crash
between a record and its index entry, or a sender's between taking an account out and moving
its records, leaves records no index points to: every ``FULL_WALK_PASSES`` passes (the first
pass of every sender included) the sender walks every account that has a Stripe customer
(``{prefix}stripe:customers``, written before the account exists), so such records are late,
never lost.
"""

from __future__ import annotations

import logging
import secrets
from typing import Any

import orjson

from gateway.errors import GatewayError
from gateway.rails.stripe.client import StripeApi, StripeRefused
from meters.connection import as_text, redis_errors
from meters.errors import MeterError
from meters.ledger import Ledger
from meters.periodic import Periodic

log = logging.getLogger("tollstream.stripe.meter")

#: Records sent per pass at most (a pass holds the lock; others wait).
BATCH = 200
#: Every this many passes the sender walks every customer's queue, not only the indexed ones.
FULL_WALK_PASSES = 30


class MeterEventSender:
    """Sends queued usage records as Stripe meter events (see the module docstring)."""

    def __init__(self, *, api: StripeApi, ledger: Ledger, event_name: str,
                 interval: float = 2.0) -> None:
        self.api = api
        self.redis = ledger.redis
        self.ledger = ledger
        self.event_name = event_name
        self.interval = interval
        #: The accounts whose queue may hold records (the ledger's final charge adds them).
        self.index = f"{ledger.prefix}stripe:usage"
        self.lock = f"{self.index}:sender"
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
            full = self.passes % FULL_WALK_PASSES == 0
            members = await self.redis.smembers(
                self.ledger.customers_index if full else self.index)
        delivered = 0
        budget = BATCH
        for account_id in sorted(as_text(m) for m in members):
            sent, complete = await self._drain(account_id, budget, resend=full)
            delivered += sent
            budget -= sent
            if not complete:
                break  # Stripe is down, or this pass' batch is spent: the next pass goes on
        self.sent += delivered
        self.passes += 1
        return delivered

    async def _drain(self, account_id: str, budget: int, *, resend: bool) -> tuple[int, bool]:
        """Send up to ``budget`` of the account's records; (sent, whether its queue was
        emptied). ``resend``: first what a dead sender left in its processing list."""
        queue = self.ledger.usage_key(account_id)
        processing = f"{queue}:processing"
        delivered = 0
        with redis_errors():
            # Out of the index before draining: a record queued from now on adds it again.
            await self.redis.srem(self.index, account_id)
            retry: list[str | bytes] = (await self.redis.lrange(processing, 0, -1)
                                        if resend else [])
        complete = False
        try:
            for raw in retry:
                if not await self._send(processing, raw):
                    return delivered, False
                delivered += 1
            while delivered < budget:
                with redis_errors():
                    moved: str | bytes | None = await self.redis.lmove(
                        queue, processing, "LEFT", "RIGHT")
                if moved is None:
                    complete = True
                    break
                if not await self._send(processing, moved):
                    break
                delivered += 1
            return delivered, complete
        finally:
            if not complete:
                with redis_errors():  # records left: the next pass comes back to it
                    await self.redis.sadd(self.index, account_id)

    async def _send(self, processing: str, raw: str | bytes) -> bool:
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
            await self.redis.lrem(processing, 1, as_text(raw))
        return True
