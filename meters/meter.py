"""The metering policy: one :class:`StreamMeter` per request.

A stream never spends outside a hold. It opens with a hold for its prompt plus a *lease* of
``lease_tokens`` output tokens, hands tokens out of that lease without touching Redis, and when
the lease is used up makes one Redis call that charges what was delivered and holds the next
lease. When the balance cannot pay for one more token the meter either

* **cuts** (:attr:`Policy.CUT`): :meth:`StreamMeter.acquire` grants fewer tokens than asked and
  the relay ends the stream at exactly the last paid token; or
* **pauses** (:attr:`Policy.PAUSE`): the relay tells the client to pay more, then
  :meth:`StreamMeter.wait_for` waits (woken by the credit, :mod:`meters.notices`) until the
  lease can be renewed or ``pause_timeout`` runs out, and the stream is cut.

At the end :meth:`StreamMeter.close` charges the request's final total (see the billing rule in
README.md) and returns the rest of the hold. Charges are passed to Redis as the reservation's
*cumulative* target, so a call that was cancelled after Redis ran it cannot charge twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import secrets
import time
from dataclasses import dataclass

from meters.errors import InsufficientFunds, LedgerUnavailable
from meters.ledger import Ledger
from meters.notices import CreditNotices
from meters.rates import Prompt, Rate

#: Lease calls a grant may take when the heartbeat keeps lapsing during them.
MAX_RECONFIRM = 3


class Policy(enum.Enum):
    CUT = "cut"
    PAUSE = "pause"


class Outcome(enum.Enum):
    """How a stream ended; decides what is billed (README, "Billing rule")."""

    COMPLETED = "completed"          # upstream finished; its reported usage is billed if given
    CUT = "cut"                      # allowance ran out; delivered tokens are billed
    DISCONNECTED = "disconnected"    # client went away; delivered tokens are billed
    UPSTREAM_ERROR = "upstream_error"  # upstream failed; delivered tokens are billed
    LEDGER_ERROR = "ledger_error"    # Redis failed mid-stream; delivered tokens are billed


@dataclass(frozen=True, slots=True)
class Bill:
    """What one request was charged, in tokens and atomic units.

    ``balance`` is the account's spendable balance right after the final charge.
    """

    input_tokens: int
    output_tokens: int
    delivered_tokens: int
    charged: int
    shortfall: int
    outcome: Outcome
    balance: int = 0


class StreamMeter:
    """Meters one request's output tokens against an account's balance."""

    def __init__(self, ledger: Ledger, account_id: str, rate: Rate, *, lease_tokens: int,
                 policy: Policy = Policy.CUT, pause_timeout: float = 60.0,
                 max_output: int | None = None, poll_interval: float = 0.25,
                 notices: CreditNotices | None = None, rid: str | None = None) -> None:
        self.ledger = ledger
        self.account_id = account_id
        self.rate = rate
        self.lease_tokens = lease_tokens
        self.policy = policy
        self.pause_timeout = pause_timeout
        self.max_output = max_output
        self.poll_interval = poll_interval
        self.notices = notices
        #: The reservation's id (the request's id, when the gateway gives one): unique.
        self.rid = rid or secrets.token_hex(10)
        self.prompt = Prompt()
        self.granted = 0          # output tokens set aside for delivery
        self.delivered = 0        # output tokens handed to the client
        self.covered = 0          # output tokens the hold pays for
        self.held_total = 0       # atomic units held for this request so far (cumulative)
        self.committed = 0        # atomic units charged so far (cumulative)
        self.balance_seen = 0     # the account's spendable balance after the last Redis call
        self.epoch = -1           # the ledger's liveness epoch when the hold was last confirmed
        self.opened = False

    # -- opening ------------------------------------------------------------------------------
    @property
    def input_tokens(self) -> int:
        """Prompt tokens metered, all price classes."""
        return self.prompt.total

    async def open(self, input_tokens: int) -> None:
        """Hold the prompt's price plus the first lease; 402 if not even one token is payable."""
        self.prompt = Prompt(input_tokens)
        epoch = self.ledger.epoch
        want = self.rate.charge(self.prompt, self._lease_size())
        minimum = self.rate.charge(self.prompt, 1)
        result = await self.ledger.lease(self.account_id, self.rid, charged_target=0,
                                         want=want, minimum=minimum)
        self.balance_seen = result.balance
        if not result.ok:
            raise InsufficientFunds(
                f"the balance ({result.balance}) cannot pay for this request's prompt "
                f"({input_tokens} tokens) and one output token ({minimum} atomic units)",
                needed=minimum, available=result.balance)
        self.opened = True
        self.epoch = epoch
        self._add_hold(result.taken)

    def _lease_size(self) -> int:
        if self.max_output is None:
            return self.lease_tokens
        return max(1, min(self.lease_tokens, self.max_output - self.covered))

    def _add_hold(self, taken: int) -> None:
        self.held_total += taken
        base = self.rate.charge(self.prompt, 0)
        self.covered = self.rate.affordable_output(self.prompt, 0, self.held_total - base)

    def reprice_input(self, prompt: Prompt) -> bool:
        """Meter the prompt as ``prompt`` (the upstream's own count) from now on.

        Only before any output token was granted: the hold then pays for the reported prompt
        first, and how many output tokens it covers is recomputed, up or down; the next grant
        renews the lease if it no longer covers one. Returns whether anything changed.
        """
        if not self.opened or self.granted or prompt == self.prompt:
            return False
        self.prompt = prompt
        self._add_hold(0)
        return True

    # -- the hot path -------------------------------------------------------------------------
    def _hold_stands(self) -> bool:
        """Whether the hold behind the current lease is known to stand: confirmed in the
        ledger's current liveness epoch, and the heartbeat not lapsed since. Otherwise our
        holds may have been swept, and nothing is handed out before a lease call proves the
        reservation still stands."""
        return self.ledger.is_alive() and self.ledger.epoch == self.epoch

    def take(self, n: int) -> int:
        """Grant up to ``n`` tokens from the current lease, without I/O.

        Granted tokens are set aside for delivery; they are billed only once the relay reports
        them delivered (:meth:`delivered_tokens`).
        """
        if not self._hold_stands():
            return 0
        granted = max(min(n, self.covered - self.granted), 0)
        self.granted += granted
        return granted

    def take_all(self, n: int) -> bool:
        """Grant all ``n`` tokens from the current lease, or none, without I/O (the relay's
        fast lane, which leaves anything the lease does not cover to :meth:`acquire`)."""
        if self.covered - self.granted < n or not self._hold_stands():
            return False
        self.granted += n
        return True

    def delivered_tokens(self, n: int) -> None:
        """Record ``n`` granted tokens as handed to the client."""
        self.delivered += n

    async def acquire(self, n: int) -> int:
        """Grant up to ``n`` tokens, renewing the lease if needed (one Redis call).

        Returns fewer than ``n`` only when the allowance is exhausted: under :attr:`Policy.CUT`
        the caller delivers exactly the granted tokens and ends the stream; under
        :attr:`Policy.PAUSE` it tells the client to pay and calls :meth:`wait_for`.
        """
        granted = self.take(n)
        if granted == n:
            return n
        return granted + await self._renew_and_take(n - granted)

    async def _renew_and_take(self, n: int) -> int:
        """One lease call, then the grant it allows. If the heartbeat lapsed (and was proved
        again) while the call was in flight, the hold it confirmed belongs to an older epoch
        and :meth:`take` grants nothing: that is no exhausted allowance, so confirm again
        (bounded; a process that cannot stay alive fails closed)."""
        for _ in range(MAX_RECONFIRM):
            await self.renew(n)
            if self._hold_stands():
                return self.take(n)
        raise LedgerUnavailable("the ledger could not confirm this stream's hold: the "
                                "process keeps missing its heartbeat")

    async def wait_for(self, n: int, *, until: float) -> int:
        """Pause: wait until money enters the account (a voucher, a deposit) and the lease can
        be renewed, or until ``until`` (a ``time.monotonic()`` deadline). Returns the tokens
        granted meanwhile (fewer than ``n`` when only part was paid); 0 at the deadline, or
        before it when a credit arrived but other streams on the account took all of it.

        That last return is for the caller to ask for money again, for what it needs now:
        streams sharing an account (an MPP channel) are each woken by a credit and race for
        it, and a stream that lost the race would otherwise wait in silence until its
        deadline while the payer, paid up for what was asked, sends nothing more.

        With :attr:`notices` a credit in any process wakes the wait at once (Redis pub/sub);
        without, or if a message was lost, the balance is re-checked periodically."""
        watch = (self.notices.watch(self.account_id) if self.notices is not None
                 else contextlib.nullcontext(None))
        with watch as event:  # registered before the check: a credit in between is seen
            credited = False
            while True:
                granted = await self._renew_and_take(n)
                left = until - time.monotonic()
                if granted or left <= 0 or credited:
                    return granted
                if self.notices is not None and event is not None:
                    credited = await self.notices.wait(event, left)
                else:
                    await asyncio.sleep(min(self.poll_interval, left))

    async def renew(self, need: int = 1) -> None:
        """Charge what was delivered and hold the next lease (one Redis call)."""
        if not self.ledger.is_alive():
            # The heartbeat is late: prove liveness before any new grant.
            await self.ledger.heartbeat()
        epoch = self.ledger.epoch
        target = self.rate.charge(self.prompt, self.delivered)
        lease = max(self._lease_size(), need)
        want = self.rate.charge(self.prompt, self.covered + lease) - self.held_total
        minimum = self.rate.charge(self.prompt, self.covered + 1) - self.held_total
        result = await self.ledger.lease(self.account_id, self.rid, charged_target=target,
                                         want=max(want, 0), minimum=max(minimum, 0))
        self.committed = result.charged
        self.balance_seen = result.balance
        # The lease call found the reservation standing (a swept one raises): confirmed.
        self.epoch = epoch
        if result.ok:
            self._add_hold(result.taken)

    # -- closing ------------------------------------------------------------------------------
    def final_charge(self, outcome: Outcome, *, reported_input: Prompt | int | None,
                     reported_output: int | None) -> tuple[int, int, int]:
        """(input tokens, output tokens, atomic units) billed for ``outcome``.

        Only a completed stream is billed from the upstream's reported usage; any other ending
        bills the tokens actually delivered (plus the prompt as reported, else as counted).
        """
        if isinstance(reported_input, int):
            reported_input = Prompt(reported_input)
        prompt = reported_input if reported_input is not None else self.prompt
        if outcome is Outcome.COMPLETED and reported_output is not None:
            billed_out = reported_output
        else:
            billed_out = self.delivered
        return prompt.total, billed_out, self.rate.charge(prompt, billed_out)

    async def close(self, outcome: Outcome, *, reported_input: Prompt | int | None = None,
                    reported_output: int | None = None) -> Bill:
        """Charge the final total and release the rest of the hold."""
        billed_in, billed_out, total = self.final_charge(
            outcome, reported_input=reported_input, reported_output=reported_output)
        if not self.opened:
            return Bill(billed_in, 0, 0, 0, 0, outcome, self.balance_seen)
        result = await self.ledger.settle(self.account_id, self.rid, charged_target=total,
                                          tokens=billed_in + billed_out)
        self.opened = False
        self.balance_seen = result.balance
        return Bill(input_tokens=billed_in, output_tokens=billed_out,
                    delivered_tokens=self.delivered, charged=result.charged,
                    shortfall=result.shortfall, outcome=outcome, balance=result.balance)

    async def refund_all(self) -> None:
        """Return the whole hold: the request failed before anything was delivered."""
        if self.opened:
            await self.ledger.settle(self.account_id, self.rid, charged_target=0)
            self.opened = False


__all__ = ["Bill", "InsufficientFunds", "LedgerUnavailable", "Outcome", "Policy", "StreamMeter"]
