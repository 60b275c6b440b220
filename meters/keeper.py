"""Background upkeep of one gateway process's standing with the ledger.

Every ``interval`` seconds the keeper

1. renews this process' heartbeat, so its holds stay alive;
2. sweeps the holds of processes whose heartbeat expired (crash safety: a reservation held by
   a dead process comes back to its account), a bounded batch per Redis call
   (:meth:`Ledger.sweep`), so a crash that left 100,000 holds never blocks Redis for long;
3. retries final settlements that failed because Redis was unreachable when a stream ended, so
   delivered tokens are still charged once Redis returns;
4. takes the accounts it no longer holds money on out of its owner index (what a sweeper walks
   when this process dies).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass

from meters.errors import LedgerUnavailable
from meters.ledger import Ledger

log = logging.getLogger("tollstream.keeper")


@dataclass(frozen=True, slots=True)
class PendingSettlement:
    account_id: str
    rid: str
    charged_target: int
    tokens: int = 0


class Keeper:
    """Heartbeat, sweeper and settlement retrier for one process."""

    def __init__(self, ledger: Ledger, *, interval: float | None = None) -> None:
        self.ledger = ledger
        # Three beats per TTL: one missed beat never lets another process sweep us.
        self.interval = interval or ledger.owner_ttl_ms / 1000 / 3
        self.pending: list[PendingSettlement] = []
        self.swept_reservations = 0
        self.swept_amount = 0
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Beat once (so streams can start at once) and run the loop in the background."""
        with contextlib.suppress(LedgerUnavailable):
            await self.tick()
        self._task = asyncio.create_task(self._run(), name="tollstream-keeper")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        with contextlib.suppress(LedgerUnavailable):
            await self.retry_pending()

    def defer(self, account_id: str, rid: str, charged_target: int, tokens: int = 0) -> None:
        """Remember a settlement to retry when Redis is back."""
        self.pending.append(PendingSettlement(account_id, rid, charged_target, tokens))

    async def tick(self) -> None:
        await self.ledger.heartbeat()
        await self.retry_pending()
        # The accounts this process no longer holds money on leave its index (it would
        # otherwise grow with every account the process ever streamed on).
        await self.ledger.prune_index()
        count, amount = await self.ledger.sweep()
        if count:
            self.swept_reservations += count
            self.swept_amount += amount
            log.warning("returned %d reservations (%d atomic units) held by dead processes",
                        count, amount)

    async def retry_pending(self) -> None:
        while self.pending:
            item = self.pending[0]
            await self.ledger.settle(item.account_id, item.rid,
                                     charged_target=item.charged_target, tokens=item.tokens)
            self.pending.pop(0)

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                await self.tick()
            except LedgerUnavailable:
                log.error("ledger unreachable; streams stop granting tokens until it is back")
