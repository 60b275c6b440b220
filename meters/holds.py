"""Pre-authorized holds in the ledger: a payment authorized but not yet captured (Stripe's
``capture_method=manual``) funds an account of its own, which streams spend token by token like
any other; closing the hold captures exactly what the account spent and releases the rest.

Keys: ``{prefix}hold:{id}`` (account, amount authorized, expires, state ``open`` →
``closing`` → ``captured`` | ``canceled``, the amount to capture once closing, and what the
sweeper last saw the account spend and since when), ``{prefix}hold:account:{account}`` (the
hold funding an account), ``{prefix}holds:open``. Closing is two steps around the processor's
call: :meth:`Holds.begin_close` (``hold_close.lua``: refused while a stream holds money,
otherwise the account stops being spendable and the amount is fixed) and
:meth:`Holds.finish`; a close interrupted between them (a crash, the processor down) is
resumed with the same amount, so a hold is captured once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, cast

from meters.ledger import Ledger, as_text, redis_errors, script


@dataclass(frozen=True, slots=True)
class Hold:
    hold_id: str
    account_id: str
    amount: int
    expires: int        # unix time the authorization lapses
    state: str          # open, closing, captured, canceled
    capture: int        # once closing: the amount to capture
    last_spent: int     # the account's spent when the sweeper last looked
    quiet_since: int    # unix time since which it has not changed


class HoldBusy(Exception):
    """A stream still holds money on the hold's account: close it when the stream ended."""


class Holds:
    """Hold records next to the ledger, in the same Redis."""

    def __init__(self, ledger: Ledger, *, kind: str = "hold") -> None:
        """``kind`` names the family of holds (``hold``: Stripe's; ``upto``: x402 ``upto``
        authorizations): each has its own keys and open set, so each keeper closes its own."""
        self.ledger = ledger
        self.redis = ledger.redis
        self.prefix = ledger.prefix
        self.kind = kind
        self._open_set = f"{self.prefix}{kind}s:open"
        self._close = ledger.redis.register_script(script("hold_close.lua"))

    def _key(self, hold_id: str) -> str:
        return f"{self.prefix}{self.kind}:{hold_id}"

    async def open(self, hold_id: str, *, account_id: str, amount: int, expires: int,
                   now: int, **fields: str | int) -> bool:
        """Record an authorized hold funding ``account_id`` (once: a repeat changes nothing
        and answers False). ``fields`` are kept with it (what closing it needs)."""
        with redis_errors():
            if not await self.redis.hsetnx(self._key(hold_id), "account", account_id):
                return False
            await self.redis.hset(self._key(hold_id), mapping=cast(Any, {
                **fields, "amount": amount, "expires": expires, "state": "open",
                "capture": 0, "last_spent": 0, "quiet_since": now}))
            await self.redis.set(f"{self.prefix}{self.kind}:account:{account_id}", hold_id)
            await self.redis.sadd(self._open_set, hold_id)
        return True

    async def field(self, hold_id: str, name: str) -> str | None:
        """One of the ``fields`` :meth:`open` kept."""
        with redis_errors():
            found = await self.redis.hget(self._key(hold_id), name)
        return None if found is None else as_text(found)

    async def get(self, hold_id: str) -> Hold | None:
        with redis_errors():
            raw = await self.redis.hgetall(self._key(hold_id))
        if not raw or b"state" not in raw:
            return None
        data = {as_text(k): as_text(v) for k, v in raw.items()}
        return Hold(hold_id, data["account"], int(data["amount"]), int(data["expires"]),
                    data["state"], int(data["capture"]), int(data["last_spent"]),
                    int(data["quiet_since"]))

    async def of_account(self, account_id: str) -> str | None:
        """The hold funding ``account_id``, if one does."""
        with redis_errors():
            found = await self.redis.get(f"{self.prefix}{self.kind}:account:{account_id}")
        return None if found is None else as_text(found)

    async def open_ids(self) -> list[str]:
        with redis_errors():
            members = await self.redis.smembers(self._open_set)
        return sorted(as_text(m) for m in members)

    async def seen(self, hold_id: str, *, spent: int, now: int) -> None:
        """The account spent ``spent`` so far: what idle time is measured from."""
        with redis_errors():
            await self.redis.hset(self._key(hold_id), mapping=cast(Any, {
                "last_spent": spent, "quiet_since": now}))

    async def begin_close(self, hold_id: str, account_id: str) -> int | None:
        """The amount to capture (what the account spent), fixed now or earlier; None if the
        hold is closed already. Raises :class:`HoldBusy` while a stream runs on it."""
        with redis_errors():
            result = int(await self._close(
                keys=[self._key(hold_id), f"{self.prefix}acct:{account_id}",
                      self._open_set], args=["begin", hold_id, ""]))
        if result == -1:
            raise HoldBusy(hold_id)
        return None if result < 0 else result

    async def freeze(self, hold_id: str, account_id: str) -> bool:
        """Stop the account funding new leases (a running stream finishes its lease, then is
        cut); False if the hold is not open."""
        with redis_errors():
            return bool(await self._close(
                keys=[self._key(hold_id), f"{self.prefix}acct:{account_id}", self._open_set],
                args=["freeze", hold_id, ""]))

    async def finish(self, hold_id: str, account_id: str, state: str) -> None:
        with redis_errors():
            await self._close(keys=[self._key(hold_id), f"{self.prefix}acct:{account_id}",
                                    self._open_set],
                              args=["finish", hold_id, state])
