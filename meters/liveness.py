"""Which gateway processes are alive, and the sweep that returns a dead one's holds.

A stream holds money through a *reservation* ``res:{<account>}:<rid>`` owned by the gateway
process that opened it and listed in ``held:{<account>}:<owner>``. Each process keeps a
heartbeat key ``alive:{<owner>}`` alive and lists the accounts it holds money on in
``owner:{<owner>}:accounts``; when a process dies its heartbeat expires and
:meth:`Liveness.sweep` (run by every live process) returns its holds to the balances, in
batches (``sweep.lua``, at most :data:`SWEEP_BATCH` holds a call, so no call blocks Redis for
long whatever crashed).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any, cast

import redis.asyncio as aioredis

from meters.connection import as_text, redis_errors
from meters.errors import LedgerUnavailable
from meters.keyspace import ACCOUNT_ID, Keyspace
from meters.scripts import LuaScript, script

#: Most reservations one call of ``sweep.lua`` returns (Redis runs nothing else meanwhile:
#: about 7-15 µs each, so a call stays near 1-2 ms whatever a crashed process left).
SWEEP_BATCH = 128


class Liveness(Keyspace):
    """This process' heartbeat and account index, and the sweep of dead processes' holds."""

    def __init__(self, client: aioredis.Redis, *, owner_ttl_seconds: float = 15.0,
                 **kwargs: Any) -> None:
        super().__init__(client, **kwargs)
        #: Reservations this process opened and has not settled yet, by id: their accounts
        #: stay listed in this owner's account index (``owner:{<owner>}:accounts``).
        self._rids: dict[str, str] = {}
        #: Accounts listed in the current owner's index; the lock orders adds and prunes.
        self._indexed: set[str] = set()
        self._registered = False
        self._index_lock = asyncio.Lock()
        self.owner_ttl_ms = int(owner_ttl_seconds * 1000)
        #: Monotonic time until which this process' holds are provably alive in Redis.
        self.alive_until = 0.0
        #: Bumped whenever liveness is proved again after it had lapsed: holds leased in an
        #: earlier epoch may have been swept meanwhile and must be re-checked before use.
        self.epoch = 0
        self._sweep: LuaScript = LuaScript(client, script("sweep.lua"))
        self._beat: LuaScript = LuaScript(client, _BEAT)
        self._declare_dead: LuaScript = LuaScript(client, _DECLARE_DEAD)
        self._index_add: LuaScript = LuaScript(client, _INDEX_ADD)

    # -- liveness ---------------------------------------------------------------------------
    # An owner id is one *generation* of a process. Once a sweeper declared it dead
    # (``dead:{<owner>}``, written atomically with the check that its heartbeat expired), it
    # never beats again: the process takes a new id. That makes "dead" final, which is what
    # lets the sweep run account by account (one slot each) on a cluster: no hold of a dead
    # generation can be renewed, created or indexed after the sweeper saw it dead (the index
    # refuses it, the accounts it swept fence it: see _INDEX_ADD and lease.lua).
    async def heartbeat(self) -> None:
        """Prove this process alive; holds of a process that stops doing this get swept."""
        started = time.monotonic()
        with redis_errors():
            beat = int(await self._beat(keys=[self.alive_key(self.owner),
                                              self._dead(self.owner)],
                                        args=[self.owner_ttl_ms]))
            if beat == -1:
                # Declared dead while stalled: its holds are (being) swept. A new generation;
                # the meters re-check their holds (lease.lua moves a hold not yet swept to it,
                # refuses a swept one).
                owner = uuid.uuid4().hex[:12]
                beat = int(await self._beat(keys=[self.alive_key(owner), self._dead(owner)],
                                            args=[self.owner_ttl_ms]))
                self.owner = owner
                self._indexed = set()
                self._registered = False
        if beat == 0:
            # The key had expired (or never existed): another process may have swept our
            # holds meanwhile. Only then must meters re-check them (a late beat whose key
            # was still alive changes nothing).
            self.epoch += 1
        # Leave a margin of a third of the TTL: the sweeper of another process must never see
        # this owner dead while it still hands out tokens from its holds.
        self.alive_until = started + self.owner_ttl_ms / 1000 * 2 / 3

    def is_alive(self) -> bool:
        return time.monotonic() < self.alive_until

    async def _index(self, account_id: str, owner: str) -> None:
        """List the account in ``owner``'s index before the first reservation there: a sweeper
        finds a dead owner's holds through it. Refused once the owner was declared dead."""
        if account_id in self._indexed and owner == self.owner:
            return
        async with self._index_lock:
            if account_id in self._indexed and owner == self.owner:
                return
            with redis_errors():
                if not self._registered or owner != self.owner:
                    # In the owners set before anything of this owner's is indexed: a sweeper
                    # walks owners, then their indexes.
                    await self.redis.sadd(self._owners(), owner)
                    if owner == self.owner:
                        self._registered = True
                listed = await self._index_add(keys=[self._dead(owner),
                                                     self._owner_accounts(owner)],
                                               args=[account_id])
            if not listed:
                raise LedgerUnavailable("this process was presumed dead (it missed its "
                                        "heartbeat): its holds were returned")
            if owner == self.owner:
                self._indexed.add(account_id)

    async def prune_index(self) -> int:
        """Take the accounts this process no longer holds money on out of its index (the
        keeper calls it): the index stays as small as the accounts streamed on now. Under the
        index lock, and dropped from the local set before the call, so a new reservation on
        one of them waits and lists it again after this removal, never before it."""
        async with self._index_lock:
            live = set(self._rids.values())
            victims = self._indexed - live
            if not victims:
                return 0
            self._indexed -= victims
            with redis_errors():
                await self.redis.srem(self._owner_accounts(self.owner), *victims)
        return len(victims)

    async def sweep(self, *, batch: int = SWEEP_BATCH) -> tuple[int, int]:
        """Return the holds of dead processes; returns (reservations, atomic units) returned.

        For each owner in the owners set whose heartbeat expired: declare it dead (final: it
        never beats, lists an account or leases under that id again), then, for each account
        in its index, call ``sweep.lua`` on that account (one slot) until the owner's holds
        there are all returned, each call returning at most ``batch`` of them (about 1-2 ms
        of Redis time for 128) so other clients' commands run between the calls. ``SPOP``
        returns each hold to one sweeper only (two processes sweeping the same owner split
        its holds); an account is taken out of the index after its holds, the owner out of
        the set after its index is empty (it cannot grow again once the owner is dead)."""
        count = total = 0
        with redis_errors():
            owners = sorted(as_text(o) for o in await self.redis.smembers(self._owners()))
        for owner in owners:
            if owner == self.owner:
                continue
            with redis_errors():
                if not await self._declare_dead(keys=[self.alive_key(owner),
                                                      self._dead(owner)],
                                                args=[DEAD_TTL_SECONDS]):
                    continue  # alive
            index = self._owner_accounts(owner)
            while True:
                with redis_errors():
                    picked = cast(list[bytes], await self.redis.srandmember(index, 64) or [])
                accounts = [as_text(a) for a in picked]
                if not accounts:
                    break
                for account_id in accounts:
                    if ACCOUNT_ID.fullmatch(account_id):
                        more = 1
                        while more:
                            with redis_errors():
                                done, amount, more = await self._sweep(
                                    keys=[self._acct(account_id),
                                          self._held(account_id, owner),
                                          self._fenced(account_id)],
                                    args=[owner, batch, self._res(account_id, ""),
                                          DEAD_TTL_SECONDS])
                            count, total = count + int(done), total + int(amount)
                    with redis_errors():
                        await self.redis.srem(index, account_id)
            with redis_errors():
                await self.redis.srem(self._owners(), owner)
        return count, total


# The short scripts about liveness live here, not in meters/lua. Each touches the keys of one
# owner: one slot on a cluster.

_BEAT = """
-- KEYS: alive:{<owner>}, dead:{<owner>}; ARGV: TTL (ms).
-- Returns -1 (declared dead by a sweeper: never beats again), 1 (was alive), 0 (had expired,
-- or the first beat: set now).
if redis.call('EXISTS', KEYS[2]) == 1 then return -1 end
if redis.call('SET', KEYS[1], '1', 'PX', ARGV[1], 'GET') then return 1 end
return 0
"""

_DECLARE_DEAD = """
-- KEYS: alive:{<owner>}, dead:{<owner>}; ARGV: how long the certificate is kept (s).
-- Returns 0 if the owner is alive, else 1: it is dead for good (its beats and index
-- additions are refused from now on, atomically with this check).
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('SET', KEYS[2], '1', 'EX', ARGV[1])
return 1
"""

_INDEX_ADD = """
-- KEYS: dead:{<owner>}, owner:{<owner>}:accounts; ARGV: account id.
-- Lists the account in the owner's index unless the owner was declared dead (then 0): a
-- sweeper that found the owner dead walks an index that can no longer grow.
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('SADD', KEYS[2], ARGV[1])
return 1
"""

#: How long a dead owner's certificate and the accounts' fences against it are kept: far
#: longer than any stall a process could wake from (it then takes a new owner id anyway).
DEAD_TTL_SECONDS = 30 * 86400
