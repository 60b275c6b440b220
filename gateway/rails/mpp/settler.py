"""On-chain settlement of MPP session channels ("Settlement Procedure" of
specs/mpp/draft-evm-session-00.md), in the background of every gateway process.

Every ``interval`` seconds, for each open channel: read the channel on-chain (the source of
truth for what was settled, and whether the payer asked for a forced close); then, if the
highest accepted voucher whose amount is at most what was *spent* is above what the chain has
settled by at least ``threshold`` (or a forced close is pending, or the channel is idle), the
payee key submits ``settle`` with it. Settling at most ``spent`` (not the highest voucher,
which may run ahead of delivery) is what lets a cooperative close capture exactly ``spent``.

Settlement survives restarts and never runs twice: nothing is remembered but what the chain
says. ``settle`` is cumulative (a voucher at or below what was settled reverts,
``AmountNotIncreasing``), each pass starts from the chain's ``settled``, and a Redis lock per
channel keeps two processes from submitting the same settlement at once. A channel the payer
withdrew or we closed is finalized in the ledger.
"""

from __future__ import annotations

import logging

from gateway.errors import GatewayError
from gateway.rails.mpp.channel import Voucher
from gateway.rails.mpp.escrow import EscrowClient
from meters.channels import Channels
from meters.connection import redis_errors
from meters.errors import MeterError
from meters.ledger import Ledger
from meters.periodic import Periodic

log = logging.getLogger("tollstream.mpp.settler")


class ChannelSettler:
    """Settles the channels of one escrow with the payee key."""

    def __init__(self, *, escrow: EscrowClient, channels: Channels, ledger: Ledger,
                 payee_key: str, interval: float, threshold: int) -> None:
        self.escrow = escrow
        self.channels = channels
        self.ledger = ledger
        self.payee_key = payee_key
        self.interval = interval
        self.threshold = threshold
        self.settlements = 0
        #: What was spent on open channels beyond what the chain settled, at the last pass.
        self.unsettled = 0
        self._loop = Periodic("mpp-settler", interval, self.settle_all,
                              outages=(GatewayError, MeterError), log=log)

    async def start(self) -> None:
        await self._loop.start()

    async def stop(self) -> None:
        await self._loop.stop()

    async def settle_all(self, *, force: bool = False) -> int:
        """One pass over the open channels; returns how many settlements were submitted."""
        done = 0
        unsettled = 0
        for channel_id in await self.channels.open_ids():
            if await self.settle(channel_id, force=force):
                done += 1
            state = await self.channels.get(channel_id)
            if state is not None and not state.finalized:
                account = await self.ledger.get_account(state.account_id)
                unsettled += max(account.spent - state.settled, 0)
        self.unsettled = unsettled
        return done

    async def settle(self, channel_id: str, *, force: bool = False) -> bool:
        """Settle one channel if it is due; True if a settlement was submitted."""
        lock = f"{self.ledger.prefix}chan:{channel_id}:settling"
        with redis_errors():
            if not await self.ledger.redis.set(lock, "1", nx=True, px=120_000):
                return False  # another process is settling it right now
        try:
            return await self._settle(channel_id, force=force)
        finally:
            with redis_errors():
                await self.ledger.redis.delete(lock)

    async def _settle(self, channel_id: str, *, force: bool) -> bool:
        state = await self.channels.get(channel_id)
        if state is None or state.finalized:
            return False
        chain = await self.escrow.get_channel(channel_id)
        if chain.finalized:
            await self.channels.finalize(channel_id, settled=chain.settled)
            return False
        await self.channels.update(channel_id, settled=chain.settled)
        forced_close = chain.close_requested_at != 0
        if forced_close and not state.close_requested:
            # The payer started a forced close: stop accepting vouchers, settle now, within
            # the grace period.
            await self.channels.update(channel_id, close_requested=1)
        account = await self.ledger.get_account(state.account_id)
        best = await self.channels.best_voucher(channel_id, at_most=account.spent)
        if forced_close and (best is None or best[0] < account.spent):
            # Within the grace period, capture at least what was delivered: the cheapest
            # accepted voucher that covers it (the payer, who forced the close, pays at most
            # one voucher's step beyond what it received).
            best = await self.channels.covering_voucher(channel_id, at_least=account.spent) \
                or best
        if best is None or best[0] <= chain.settled:
            return False
        if not (force or forced_close or best[0] - chain.settled >= self.threshold):
            return False
        amount, signature = best
        outcome = await self.escrow.settle(self.payee_key, Voucher(channel_id, amount,
                                                                   signature))
        await self.channels.update(channel_id, settled=amount)
        self.settlements += 1
        log.info("settled channel %s up to %d (tx %s)", channel_id, amount, outcome.tx_hash)
        return True
