"""Pre-authorized holds in the ledger: a payment authorized but not yet captured (Stripe's
``capture_method=manual``) funds an account of its own, which streams spend token by token like
any other; closing the hold captures exactly what the account spent and releases the rest.

Keys (``kind`` is ``hold`` or ``upto``): ``{prefix}<kind>:{<account>}`` (the hold record,
beside the account it funds, in its hash tag's slot: its id, account, amount authorized,
expires, state ``open`` → ``closing`` → a final state, the amount to capture once closing, and
what the sweeper last saw the account spend and since when), ``{prefix}<kind>:id:<hold id>``
(the account a hold funds: written once, first, so a hold is opened once) and
``{prefix}<kind>s:open``, the set of open holds. Closing is two steps around the processor's
call: :meth:`Holds.begin_close` (``hold_close.lua``: refused while a stream holds money,
otherwise the account stops being spendable and the amount is fixed) and :meth:`Holds.finish`;
a close interrupted between them (a crash, the processor down) is resumed with the same amount,
so a hold is captured once.

The open set spans accounts (another slot on a cluster), so it is kept outside the scripts:
a hold is listed before its record says ``open`` and unlisted after its record says it is
closed; :meth:`Holds.get` unlists a closed hold it finds still listed (a crash between). The
money is decided in the account's slot (``hold_close.lua``), never by the set.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, cast

from meters.connection import as_text, redis_errors
from meters.ledger import Ledger
from meters.scripts import LuaScript, script


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
        self._close = LuaScript(ledger.redis, script("hold_close.lua"))
        self._accounts: dict[str, str] = {}

    def record_key(self, account_id: str) -> str:
        """The hold record funding ``account_id`` (the account's hash tag: its slot)."""
        return f"{self.prefix}{self.kind}:{{{account_id}}}"

    def _id_key(self, hold_id: str) -> str:
        return f"{self.prefix}{self.kind}:id:{hold_id}"

    async def account_of(self, hold_id: str) -> str | None:
        """The account the hold funds (None: no such hold). Written once: cached."""
        found = self._accounts.get(hold_id)
        if found is None:
            with redis_errors():
                raw = await self.redis.get(self._id_key(hold_id))
            if raw is None:
                return None
            found = as_text(raw)
            if len(self._accounts) >= 100_000:  # bound memory; a miss costs one lookup
                self._accounts.clear()
            self._accounts[hold_id] = found
        return found

    async def open(self, hold_id: str, *, account_id: str, amount: int, expires: int,
                   now: int, **fields: str | int) -> bool:
        """Record an authorized hold funding ``account_id`` (once: a repeat changes nothing
        and answers False). ``fields`` are kept with it (what closing it needs)."""
        with redis_errors():
            if not await self.redis.set(self._id_key(hold_id), account_id, nx=True):
                return False
            await self.redis.sadd(self._open_set, hold_id)
            await self.redis.hset(self.record_key(account_id), mapping=cast(Any, {
                **fields, "hold_id": hold_id, "account": account_id, "amount": amount,
                "expires": expires, "state": "open", "capture": 0, "last_spent": 0,
                "quiet_since": now}))
        return True

    async def keep_until(self, hold_id: str, seconds: int) -> None:
        """Let the hold's id (what refuses a second open) expire after ``seconds``."""
        with redis_errors():
            await self.redis.expire(self._id_key(hold_id), seconds)

    async def field(self, hold_id: str, name: str) -> str | None:
        """One of the ``fields`` :meth:`open` kept."""
        account_id = await self.account_of(hold_id)
        if account_id is None:
            return None
        with redis_errors():
            found = await self.redis.hget(self.record_key(account_id), name)
        return None if found is None else as_text(found)

    async def get(self, hold_id: str) -> Hold | None:
        account_id = await self.account_of(hold_id)
        if account_id is None:
            return None
        with redis_errors():
            raw = await self.redis.hgetall(self.record_key(account_id))
        if not raw or b"state" not in raw:
            return None
        data = {as_text(k): as_text(v) for k, v in raw.items()}
        if data["state"] not in ("open", "closing"):
            with redis_errors():  # closed, still listed (a crash after finish): unlist
                await self.redis.srem(self._open_set, hold_id)
        return Hold(hold_id, data["account"], int(data["amount"]), int(data["expires"]),
                    data["state"], int(data["capture"]), int(data["last_spent"]),
                    int(data["quiet_since"]))

    async def of_account(self, account_id: str) -> str | None:
        """The hold funding ``account_id``, if one does."""
        with redis_errors():
            found = await self.redis.hget(self.record_key(account_id), "hold_id")
        return None if found is None else as_text(found)

    async def open_ids(self) -> list[str]:
        with redis_errors():
            members = await self.redis.smembers(self._open_set)
        return sorted(as_text(m) for m in members)

    async def seen(self, hold_id: str, *, spent: int, now: int) -> None:
        """The account spent ``spent`` so far: what idle time is measured from."""
        account_id = await self.account_of(hold_id)
        if account_id is None:
            return
        with redis_errors():
            await self.redis.hset(self.record_key(account_id), mapping=cast(Any, {
                "last_spent": spent, "quiet_since": now}))

    async def begin_close(self, hold_id: str, account_id: str) -> int | None:
        """The amount to capture (what the account spent), fixed now or earlier; None if the
        hold is closed already. Raises :class:`HoldBusy` while a stream runs on it."""
        with redis_errors():
            result = int(await self._close(
                keys=[self.record_key(account_id), self.ledger.account_key(account_id)],
                args=["begin", hold_id, ""]))
        if result == -1:
            raise HoldBusy(hold_id)
        return None if result < 0 else result

    async def freeze(self, hold_id: str, account_id: str) -> bool:
        """Stop the account funding new leases (a running stream finishes its lease, then is
        cut); False if the hold is not open."""
        with redis_errors():
            return bool(await self._close(
                keys=[self.record_key(account_id), self.ledger.account_key(account_id)],
                args=["freeze", hold_id, ""]))

    async def finish(self, hold_id: str, account_id: str, state: str) -> None:
        with redis_errors():
            await self._close(keys=[self.record_key(account_id),
                                    self.ledger.account_key(account_id)],
                              args=["finish", hold_id, state])
            await self.redis.srem(self._open_set, hold_id)
