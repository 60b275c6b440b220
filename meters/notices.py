"""Wake-ups when money enters an account: Redis pub/sub, so a paused stream resumes as soon as
a voucher or a deposit lands, in whatever process it landed.

The Lua scripts that add money (``credit.lua``, ``voucher.lua``) publish the account id on one
channel, ``Ledger.credit_channel``, in the same atomic step. Each gateway process keeps one
subscription (one Redis connection) and wakes the streams of that process that wait on the
account. Credits are rare next to tokens (one per payment or voucher), so one channel for all
accounts costs every process little and needs no per-account subscribe / unsubscribe. On a
Redis Cluster it stays plain PUBLISH / SUBSCRIBE: a message published on any node (by a script
running on the account's node) reaches the subscribers on every node.

A message can be lost (the subscription reconnecting, a process that credited through another
path). Waiters therefore also re-check on their own every ``recheck_seconds``: a lost message
delays a resume by at most that long, never loses money or tokens (the lease call decides).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterator
from typing import cast

from redis.asyncio.cluster import RedisCluster
from redis.exceptions import RedisError

from meters.connection import as_text, is_cluster
from meters.ledger import Ledger

log = logging.getLogger("tollstream.notices")

#: How often a waiter re-checks when no message came (covers lost messages).
RECHECK_SECONDS = 2.0


class CreditNotices:
    """One process's subscription to credit announcements, and the streams waiting on them."""

    def __init__(self, ledger: Ledger, *, recheck_seconds: float = RECHECK_SECONDS) -> None:
        self.ledger = ledger
        self.channel = ledger.credit_channel
        self.recheck_seconds = recheck_seconds
        self._waiters: dict[str, set[asyncio.Event]] = {}
        self._task: asyncio.Task[None] | None = None
        self._subscribed = asyncio.Event()
        self.received = 0

    async def start(self) -> None:
        """Subscribe in the background; returns once subscribed (or after a short wait, when
        Redis is unreachable: waiters then fall back to their re-checks)."""
        if self._task is None:
            self._task = asyncio.create_task(self._listen(), name="tollstream-notices")
        # asyncio.timeout, not wait_for, here and below: on Python 3.11 wait_for can
        # swallow the caller's cancellation (meters/connection.py).
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(2.0):
                await self._subscribed.wait()

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    @contextlib.contextmanager
    def watch(self, account_id: str) -> Iterator[asyncio.Event]:
        """An event set whenever ``account_id`` is credited while the block runs. Register
        *before* checking the balance, so a credit between the check and the wait is seen."""
        event = asyncio.Event()
        self._waiters.setdefault(account_id, set()).add(event)
        try:
            yield event
        finally:
            waiters = self._waiters.get(account_id)
            if waiters is not None:
                waiters.discard(event)
                if not waiters:
                    del self._waiters[account_id]

    async def wait(self, event: asyncio.Event, timeout: float) -> bool:
        """Wait for ``event`` at most ``timeout`` (and at most one re-check period); whether
        it was set. Clears it for the next wait."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(max(0.0, min(timeout, self.recheck_seconds))):
                await event.wait()
        fired = event.is_set()
        event.clear()
        return fired

    def _wake(self, account_id: str) -> None:
        for event in self._waiters.get(account_id, ()):
            event.set()

    async def _listen(self) -> None:
        backoff = 0.1
        while True:
            pubsub = self.ledger.redis.pubsub(ignore_subscribe_messages=True)
            try:
                if is_cluster(self.ledger.redis):
                    # On a cluster the subscription goes to the node of the channel's slot
                    # (PUBLISH reaches every node, a script's too): the client must know the
                    # slots first (it raises KeyError otherwise).
                    await cast(RedisCluster, self.ledger.redis).initialize()
                await pubsub.subscribe(self.channel)
                self._subscribed.set()
                backoff = 0.1
                while True:
                    message = await pubsub.get_message(timeout=1.0)
                    if message is not None and message.get("type") == "message":
                        self.received += 1
                        self._wake(as_text(message["data"]))
            except (RedisError, OSError) as exc:
                # Waiters keep re-checking on their own meanwhile; resubscribe with backoff.
                log.warning("credit notices unavailable (%s); retrying", type(exc).__name__)
                self._subscribed.clear()
                # Every waiter re-checks now: a credit may have been missed.
                for waiters in self._waiters.values():
                    for event in waiters:
                        event.set()
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 2.0)
            finally:
                with contextlib.suppress(RedisError, OSError):
                    await pubsub.aclose()
