"""The ledger: balances, holds and charges in Redis, in integer atomic units.

Every account is a hash ``{prefix}acct:{<id>}`` with ``balance`` (spendable), ``held`` (reserved
by live streams), ``spent``, ``credited`` and ``shortfall``. ``balance + held + spent`` only ever
changes by credits: money moves between the three fields inside Lua scripts (``meters/lua``),
so every debit is atomic and concurrency-safe across streams and processes.

Key layout (one Redis, or a Redis / Valkey Cluster: ``connect(url, cluster=True)``): every key
a script touches for one account carries the account id as its *hash tag* (the part in braces,
``{acct_…}``), so Redis Cluster keeps them in one slot and each script runs on one node,
atomically. A channel's keys carry its account's id (``{mpp_0x…}``), a process' liveness keys
its owner id. What spans accounts (the open deposits, holds and channels, the owners of holds,
the accounts with queued Stripe usage) is kept outside the scripts, as indexes written before
the money moves and read by readers that tolerate stale entries (see each one).

A stream holds money through a *reservation* ``{prefix}res:{<account>}:<rid>`` owned by the
gateway process that opened it and listed in ``{prefix}held:{<account>}:<owner>``. Each process
keeps a heartbeat key ``{prefix}alive:{<owner>}`` alive and lists the accounts it holds money on
in ``{prefix}owner:{<owner>}:accounts``; when a process dies its heartbeat expires and
:meth:`Ledger.sweep` (run by every live process) returns its holds to the balances. Any Redis
failure raises :class:`~meters.errors.LedgerUnavailable`, and the meter stops granting tokens
whose hold it cannot prove is still alive (fail closed).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import re
import secrets
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, cast

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.driver_info import DriverInfo
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.utils import get_lib_version

from meters.connection import CancelSafeConnection
from meters.errors import AccountNotFound, DuplicateCredit, InvalidAmount, LedgerUnavailable
from meters.money import MAX_AMOUNT
from meters.scripts import LuaScript, script


@contextlib.contextmanager
def redis_errors() -> Iterator[None]:
    """Translate any Redis failure into :class:`LedgerUnavailable` (fail closed)."""
    try:
        yield
    except RedisError as exc:
        raise LedgerUnavailable("the ledger (Redis) is unreachable") from exc


#: Named once: without it redis-py reads its package metadata (a file) for every new
#: connection, which fails as an ``OSError`` when the process is out of file descriptors.
_DRIVER = DriverInfo(name="redis-py", lib_version=get_lib_version())

#: Most reservations one call of ``sweep.lua`` returns (Redis runs nothing else meanwhile:
#: about 7-15 µs each, so a call stays near 1-2 ms whatever a crashed process left).
SWEEP_BATCH = 128


def connect(url: str, *, cluster: bool = False, max_connections: int = 64,
            pool_timeout: float = 5.0) -> aioredis.Redis:
    """A client whose pool of at most ``max_connections`` waits up to ``pool_timeout``
    seconds for a free connection (then raises ``ConnectionError``: fail closed) instead of
    opening more, and whose short timeouts make an unreachable Redis fail closed within a
    second or two.

    ``cluster``: ``url`` names any node of a Redis / Valkey Cluster, and the client is
    redis-py's cluster client (it learns the others and routes each command, script and
    key-slot by key). Its type is the single-node client's as far as the ledger is concerned:
    it offers the same commands (the few places that differ check ``is_cluster``)."""
    if cluster:
        return cast(aioredis.Redis, BoundedCluster.from_url(
            url, max_in_flight=max_connections, pool_timeout=pool_timeout,
            # Per node. The cluster client opens one when none is free, up to this, and
            # fails at once past it: BoundedCluster keeps commands below it (waiting, like
            # the single-node pool), the headroom is for pipelines and the pub/sub connection.
            max_connections=max_connections + 16, socket_connect_timeout=1, socket_timeout=3,
            driver_info=_DRIVER))
    pool = aioredis.BlockingConnectionPool.from_url(
        url, max_connections=max_connections, timeout=pool_timeout, socket_connect_timeout=1,
        socket_timeout=3, driver_info=_DRIVER, connection_class=CancelSafeConnection)
    return aioredis.Redis(connection_pool=pool)


class BoundedCluster(RedisCluster):
    """redis-py's asyncio cluster client, bounded like the single-node pool: at most
    ``max_in_flight`` commands at once (so no node's pool is ever exhausted), a command
    waiting up to ``pool_timeout`` seconds for its turn, then ``ConnectionError`` (fail
    closed). redis-py's own cluster pool raises at once when a node's connections are all in
    use, which under a burst of streams would refuse what a short wait serves."""

    def __init__(self, *args: Any, max_in_flight: int = 64, pool_timeout: float = 5.0,
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # redis-py's cluster client takes no connection class (it names its own): every node
        # it has or learns later is built from these kwargs, and none has connected yet.
        if not kwargs.get("ssl"):
            self.connection_kwargs["connection_class"] = CancelSafeConnection
            for node in self.startup_nodes:
                node.connection_class = CancelSafeConnection
        self._in_flight = asyncio.Semaphore(max_in_flight)
        self._pool_timeout = pool_timeout

    async def execute_command(self, *args: Any, **kwargs: Any) -> Any:
        try:
            # Not asyncio.wait_for: on Python 3.11 it can swallow a cancellation
            # (meters/connection.py).
            async with asyncio.timeout(self._pool_timeout):
                await self._in_flight.acquire()
        except TimeoutError as exc:
            raise RedisConnectionError("no free Redis connection within "
                                       f"{self._pool_timeout:g} s") from exc
        try:
            return await super().execute_command(*args, **kwargs)
        finally:
            self._in_flight.release()


def is_cluster(client: aioredis.Redis) -> bool:
    return isinstance(client, RedisCluster)


def check_prefix(prefix: str) -> str:
    """A key prefix must not hold a brace: Redis Cluster hashes a key by its first ``{...}``,
    which must be the account's (or owner's) tag the ledger puts after the prefix."""
    if "{" in prefix or "}" in prefix:
        raise ValueError("key_prefix must not contain '{' or '}' (Redis Cluster hash tags)")
    return prefix


def account_key(prefix: str, account_id: str) -> str:
    """The hash of an account (its id is the hash tag of every key about it)."""
    return f"{prefix}acct:{{{account_id}}}"


def hash_key(api_key: str) -> str:
    """API keys are stored as their SHA-256: a leaked Redis dump reveals no usable key."""
    return hashlib.sha256(api_key.encode("utf-8")).hexdigest()


#: Payment-issued API keys live per account, and how long one lives unused (the x402
#: settings ``api_keys_kept`` / ``api_key_idle_seconds`` default to these).
PAYMENT_KEYS_KEPT = 5
PAYMENT_KEY_IDLE_SECONDS = 30 * 86400

@dataclass(frozen=True, slots=True)
class Account:
    """A snapshot of one account, amounts in atomic units."""

    id: str
    balance: int
    held: int
    spent: int
    credited: int
    shortfall: int
    label: str = ""


@dataclass(frozen=True, slots=True)
class LeaseResult:
    ok: bool
    taken: int
    balance: int
    charged: int


@dataclass(frozen=True, slots=True)
class SettleResult:
    """A final charge: ``charged`` is the reservation's total, ``balance`` the account's
    spendable balance right after it; ``replayed`` when the reservation was already settled
    (nothing moved)."""

    charged: int
    returned: int
    shortfall: int
    balance: int = 0
    replayed: bool = False


class Ledger:
    """Async access to balances and reservations. One instance per process."""

    def __init__(self, client: aioredis.Redis, *, prefix: str = "ts:",
                 owner_ttl_seconds: float = 15.0, key_cache_seconds: float = 0.0) -> None:
        self.redis = client
        #: How long this process trusts a key it looked up (0: never cache). A key revoked by
        #: another process keeps working here for at most this long.
        self.key_cache_seconds = key_cache_seconds
        self._key_cache: dict[str, tuple[str, float]] = {}
        self.prefix = check_prefix(prefix)
        #: The pub/sub channel the scripts that add money announce the account on
        #: (:mod:`meters.notices` wakes the streams paused on it).
        self.credit_channel = f"{prefix}credited"
        #: With Stripe meter events on: the set of accounts whose usage queue
        #: (:meth:`usage_key`) may hold records, which the final charge adds an account to
        #: when it queued one (None: off). See gateway/rails/stripe/meter_events.py.
        self.usage_index: str | None = None
        #: Accounts that have a Stripe customer (listed before the account exists): the meter
        #: events sender's full walk finds every usage queue from it.
        self.customers_index = f"{prefix}stripe:customers"
        self.owner = f"{uuid.uuid4().hex[:12]}"
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
        self._lease: LuaScript = LuaScript(client, script("lease.lua"))
        self._settle: LuaScript = LuaScript(client, script("settle.lua"))
        self._sweep: LuaScript = LuaScript(client, script("sweep.lua"))
        self._credit: LuaScript = LuaScript(client, script("credit.lua"))
        self._issue_payment_key: LuaScript = LuaScript(client, _ISSUE_PAYMENT_KEY)
        self._authenticate: LuaScript = LuaScript(client, _AUTHENTICATE)
        self._beat: LuaScript = LuaScript(client, _BEAT)
        self._declare_dead: LuaScript = LuaScript(client, _DECLARE_DEAD)
        self._index_add: LuaScript = LuaScript(client, _INDEX_ADD)

    # -- keys -------------------------------------------------------------------------------
    # The hash tag (in braces) of every key a script touches for one account is the account
    # id, so all of them share a slot on a cluster. Account ids never hold a brace or ':'.
    def _acct(self, account_id: str) -> str:
        if not _ACCOUNT_ID.fullmatch(account_id):
            # An id with ":" would name another key of the ledger (an account's key set,
            # ``acct:{id}:keys``), which Redis then refuses as the wrong type: not an account.
            raise AccountNotFound(f"no account {account_id[:100]!r}", param="account_id")
        return account_key(self.prefix, account_id)

    def account_key(self, account_id: str) -> str:
        """The Redis key of an account's hash (for tools and tests)."""
        return self._acct(account_id)

    def _res(self, account_id: str, rid: str) -> str:
        return f"{self.prefix}res:{{{account_id}}}:{rid}"

    def _held(self, account_id: str, owner: str) -> str:
        """The reservations ``owner`` holds on the account (owner last: sweep.lua, lease.lua
        and settle.lua derive another owner's set from this one by its suffix)."""
        return f"{self.prefix}held:{{{account_id}}}:{owner}"

    def _fenced(self, account_id: str) -> str:
        return f"{self.prefix}fenced:{{{account_id}}}"

    def usage_key(self, account_id: str) -> str:
        """The account's queue of Stripe usage records (settle.lua pushes to it)."""
        return f"{self.prefix}usage:{{{account_id}}}"

    def alive_key(self, owner: str) -> str:
        return f"{self.prefix}alive:{{{owner}}}"

    def _dead(self, owner: str) -> str:
        return f"{self.prefix}dead:{{{owner}}}"

    def _owner_accounts(self, owner: str) -> str:
        return f"{self.prefix}owner:{{{owner}}}:accounts"

    def _owners(self) -> str:
        return f"{self.prefix}owners"

    def _apikey(self, key_hash: str) -> str:
        return f"{self.prefix}key:{key_hash}"

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
                    if _ACCOUNT_ID.fullmatch(account_id):
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

    async def ping(self) -> bool:
        try:
            return bool(await self.redis.ping())
        except RedisError:
            return False

    # -- accounts ---------------------------------------------------------------------------
    def _keys(self, account_id: str) -> str:
        return f"{self._acct(account_id)}:keys"

    async def create_account(self, balance: int, *, label: str = "",
                             stripe_customer: str | None = None) -> tuple[Account, str]:
        """Create an account with its first API key; returns the account and the key (shown
        once: only its hash is stored). ``stripe_customer``: the Stripe customer its usage
        is reported for (see :attr:`usage_index`)."""
        _check_amount(balance, "balance")
        account_id = "acct_" + secrets.token_hex(8)
        api_key, key_hash = _new_key()
        fields: dict[str, str | int] = {"balance": balance, "held": 0, "spent": 0,
                                        "credited": balance, "shortfall": 0, "label": label}
        if stripe_customer is not None:
            fields["stripe_customer"] = stripe_customer
        with redis_errors():
            if stripe_customer is not None:
                # Listed before it exists: the meter events sender's full walk never misses
                # an account that may queue usage.
                await self.redis.sadd(self.customers_index, account_id)
            # The account and its key set (one slot: a transaction), then the key that finds
            # it (its own slot). A crash between leaves an account nobody holds a key to.
            async with self.redis.pipeline(transaction=True) as pipe:
                pipe.hset(self._acct(account_id), mapping=cast(Any, fields))
                pipe.sadd(self._keys(account_id), key_hash)
                await pipe.execute()
            await self.redis.hset(self._apikey(key_hash), "account", account_id)
        return Account(account_id, balance, 0, 0, balance, 0, label), api_key

    async def ensure_account(self, account_id: str, *, label: str = "") -> bool:
        """Create an empty account under a caller-chosen id unless it exists (payment rails
        key accounts by payer); True if it was created now. Idempotent and race-free."""
        with redis_errors():
            async with self.redis.pipeline(transaction=True) as pipe:
                for field in ("balance", "held", "spent", "credited", "shortfall"):
                    pipe.hsetnx(self._acct(account_id), field, 0)
                pipe.hsetnx(self._acct(account_id), "label", label)
                created, *_ = await pipe.execute()
        return bool(created)

    def _paykeys(self, account_id: str) -> str:
        # Outside ``acct:`` (whose SCAN lists accounts): the keys payments issued, by age.
        return f"{self.prefix}paykeys:{{{account_id}}}"

    async def issue_key(self, account_id: str, *, revoke_others: bool = False) -> str:
        """Issue one more API key for an existing account; earlier keys stay valid unless
        ``revoke_others``. The key never expires (an operator's key; payments use
        :meth:`issue_payment_key`)."""
        api_key, key_hash = _new_key()
        with redis_errors():
            if not await self.redis.exists(self._acct(account_id)):
                raise AccountNotFound(f"no account {account_id}", param="account_id")
            old = await self.redis.smembers(self._keys(account_id)) if revoke_others else ()
            # The new key first (nobody holds it yet), then the account's key sets (one
            # slot), then the revoked keys (each in its own slot on a cluster).
            await self.redis.hset(self._apikey(key_hash), "account", account_id)
            async with self.redis.pipeline(transaction=True) as pipe:
                if revoke_others:
                    pipe.delete(self._keys(account_id), self._paykeys(account_id))
                pipe.sadd(self._keys(account_id), key_hash)
                await pipe.execute()
            for h in old:
                await self.redis.delete(self._apikey(as_text(h)))
        if revoke_others:
            for h in [h for h, (acct, _) in self._key_cache.items() if acct == account_id]:
                del self._key_cache[h]
        return api_key

    async def issue_payment_key(self, account_id: str, *, keep: int = PAYMENT_KEYS_KEPT,
                                idle_seconds: float = PAYMENT_KEY_IDLE_SECONDS) -> str:
        """Issue the API key a payment answers with, keeping the account's key set bounded.

        Keys are stored hashed, so an earlier key cannot be handed out again: every payment
        gets a new one (rotation, not reuse). Keys issued this way

        * are at most ``keep`` live per account: issuing one more revokes the oldest (here at
          once, in this process' key cache too; other processes stop accepting it within
          :attr:`key_cache_seconds`);
        * expire after ``idle_seconds`` without use: each :meth:`authenticate` that reaches
          Redis restarts the clock (a Redis TTL on ``key:<hash>``), so a key in use lives on
          and a forgotten one disappears; a cached lookup never outlives the TTL.

        Keys an operator issued (:meth:`create_account`, :meth:`issue_key`) never expire and
        do not count. Hashes of keys that expired or were revoked are pruned from the
        account's key set here, so it does not grow with them either.
        """
        if keep < 1 or idle_seconds <= 0:
            raise ValueError("keep must be >= 1 and idle_seconds > 0")
        api_key, key_hash = _new_key()
        idle_ms = max(1, int(idle_seconds * 1000))
        acct = self._acct(account_id)
        with redis_errors():
            # Hashes whose key expired or was revoked: found here, each key in its own slot
            # (an expired key never comes back, so the answer cannot go stale), and pruned
            # by the script in the account's slot.
            known = {as_text(h) for h in await self.redis.smembers(self._keys(account_id))}
            issued = cast(list[bytes], await self.redis.zrange(self._paykeys(account_id), 0, -1))
            known |= {as_text(h) for h in issued}
            gone = [h for h in sorted(known) if not await self.redis.exists(self._apikey(h))]
            # The new key before the script counts it: a crash between leaves a key nobody
            # was given (it expires unused).
            async with self.redis.pipeline(transaction=True) as pipe:
                pipe.hset(self._apikey(key_hash), mapping={"account": account_id,
                                                           "idle_ms": idle_ms})
                pipe.pexpire(self._apikey(key_hash), idle_ms)
                await pipe.execute()
            dropped = await self._issue_payment_key(
                keys=[acct, self._keys(account_id), self._paykeys(account_id)],
                args=[key_hash, keep, idle_ms, *gone])
            if dropped == -1:
                await self.redis.delete(self._apikey(key_hash))
                raise AccountNotFound(f"no account {account_id}", param="account_id")
            # The revoked keys go last (a crash before leaves them to their idle TTL).
            for h in cast(list[Any], dropped):
                await self.redis.delete(self._apikey(as_text(h)))
        for h in cast(list[Any], dropped):
            self._key_cache.pop(as_text(h), None)
        return api_key

    async def rotate_key(self, account_id: str) -> str:
        """Revoke every API key of an account and issue a new one."""
        return await self.issue_key(account_id, revoke_others=True)

    async def authenticate(self, api_key: str) -> str | None:
        """The account id an API key belongs to, or None.

        Keys are looked up by their SHA-256, so no secret is ever compared byte by byte: the
        lookup's timing depends on the hash, which an attacker cannot steer toward a real key.
        """
        key_hash = hash_key(api_key)
        if self.key_cache_seconds:
            hit = self._key_cache.get(key_hash)
            if hit is not None and hit[1] > time.monotonic():
                return hit[0]
        # Trust is counted from before the lookup: a cached key never outlives its TTL.
        started = time.monotonic()
        with redis_errors():
            # GET, and for a key that expires (a payment's) restart its idle clock.
            found = await self._authenticate(keys=[self._apikey(key_hash)])
        if not found:
            self._key_cache.pop(key_hash, None)
            return None
        account_id, ttl_ms = as_text(found[0]), int(found[1])
        if self.key_cache_seconds:
            if len(self._key_cache) >= 100_000:  # bound memory; a miss only costs a lookup
                self._key_cache.clear()
            trust = self.key_cache_seconds if ttl_ms < 0 else min(self.key_cache_seconds,
                                                                  ttl_ms / 1000)
            self._key_cache[key_hash] = (account_id, started + trust)
        return account_id

    async def get_account(self, account_id: str) -> Account:
        with redis_errors():
            raw: dict[Any, Any] = await self.redis.hgetall(self._acct(account_id))
        return account_from(account_id, raw)

    async def list_accounts(self, *, cursor: int = 0, limit: int = 50, kind: str = ""
                            ) -> tuple[list[Account], int]:
        """A page of accounts whose id starts with ``kind`` (``acct``, ``x402``, ``mpp``,
        ``fiat``, or ``""`` for all) and the cursor of the next page (0: the last page).
        Redis' SCAN walks the keyspace without blocking it: pages may hold fewer than
        ``limit`` accounts, an account created meanwhile may or may not appear, none appears
        twice on a stable keyspace.

        On a cluster each master is scanned in turn (masters ordered by address): the cursor
        is ``node cursor * CURSOR_NODES + the master's position``, so 0 still means "from the
        start" and a page resumes on the node where the last one stopped. A topology change
        between pages (a master added or removed) may skip or repeat accounts, as a rehash
        may on one node."""
        pattern = f"{self.prefix}acct:{{{kind}*"
        count = max(limit * 4, 100)
        found: list[str] = []
        with redis_errors():
            nodes: list[Any] = [None]
            if is_cluster(self.redis):
                cluster = cast(RedisCluster, self.redis)
                await cluster.initialize()  # the topology is known (a no-op once it is)
                nodes = sorted(cluster.get_primaries(), key=lambda n: (n.host, n.port))
            position, node_cursor = cursor % CURSOR_NODES, cursor // CURSOR_NODES
            while position < len(nodes):
                node = nodes[position]
                if node is None:
                    node_cursor, keys = await self.redis.scan(node_cursor, match=pattern,
                                                              count=count)
                else:
                    # One node's SCAN: the cluster client answers {node name: cursor}.
                    cursors, keys = await cast(RedisCluster, self.redis).scan(
                        node_cursor, match=pattern, count=count, target_nodes=node)
                    node_cursor = int(next(iter(cursors.values()))
                                      if isinstance(cursors, dict) else cursors)
                found += [text[len(self.prefix) + 6:-1] for text in map(as_text, keys)
                          if text.endswith("}")]  # not the accounts' key sets
                if node_cursor == 0:
                    position += 1
                if len(found) >= limit:
                    break
            following = 0 if position >= len(nodes) else node_cursor * CURSOR_NODES + position
            found = [a for a in found if _ACCOUNT_ID.fullmatch(a)]
            # Not a transaction: on a cluster the accounts live on several nodes.
            async with self.redis.pipeline(transaction=False) as pipe:
                for account_id in found:
                    pipe.hgetall(self._acct(account_id))
                rows = await pipe.execute()
        accounts = [account_from(account_id, raw) for account_id, raw in zip(found, rows,
                                                                              strict=True)
                    if raw]
        return sorted(accounts, key=lambda a: a.id), int(following)

    async def credit(self, account_id: str, amount: int, *,
                     idempotency_key: str | None = None, purpose: str = "credit",
                     idempotency_ttl_seconds: int = 30 * 86400) -> tuple[bool, int]:
        """Add ``amount`` to the balance, once per idempotency key.

        Keys are scoped to the account and the ``purpose`` (an operator's credit, a deposit,
        ...): the same key used on another account, or for another purpose, is another credit.
        Returns (credited_now, balance). Raises :class:`DuplicateCredit` (409) if the key was
        used on this account for a different amount.
        """
        _check_amount(amount, "amount")
        if ":" in purpose:
            raise ValueError("purpose must not contain ':'")
        # Tagged by the account (the key follows the tag, so whatever it holds, braces
        # included, the slot is the account's); without a key a name in the same slot that
        # the script never touches.
        idem = (f"{self.prefix}idem:{{{account_id}}}:{purpose}:{idempotency_key}"
                if idempotency_key else f"{self.prefix}idem:{{{account_id}}}")
        with redis_errors():
            status, balance = await self._credit(
                keys=[self._acct(account_id), idem],
                args=[amount, "1" if idempotency_key else "0", idempotency_ttl_seconds,
                      MAX_AMOUNT, self.credit_channel, account_id])
        if status == -1:
            raise AccountNotFound(f"no account {account_id}", param="account_id")
        if status == -3:
            raise InvalidAmount(f"crediting {amount} would take the account past the most an "
                                f"account may be credited in all ({MAX_AMOUNT} atomic units)",
                                param="amount")
        if status == -2:
            raise DuplicateCredit(f"idempotency key {idempotency_key!r} was already used on "
                                  "this account for a different amount",
                                  param="idempotency_key")
        return status == 1, int(balance)

    # -- reservations (the hot path: one call per lease) -----------------------------------
    async def lease(self, account_id: str, rid: str, *, charged_target: int, want: int,
                    minimum: int) -> LeaseResult:
        """Charge the reservation up to ``charged_target`` and hold ``want`` more (at least
        ``minimum``, else nothing)."""
        acct = self._acct(account_id)
        owner = self.owner
        new = rid not in self._rids
        if new:
            # Tracked before the account is indexed, so a prune meanwhile keeps it listed.
            self._rids[rid] = account_id
        # A failure below leaves the reservation tracked (whether the script ran is unknown):
        # the account stays listed until a settle says the reservation is gone.
        await self._index(account_id, owner)
        with redis_errors():
            status, taken, balance, charged = await self._lease(
                keys=[acct, self._res(account_id, rid), self._held(account_id, owner),
                      self._fenced(account_id)],
                args=[rid, owner, account_id, charged_target, want, minimum])
        if new and int(taken) == 0 and status != 1:
            self._rids.pop(rid, None)  # nothing was created: no reservation to list
        if status == -1:
            raise AccountNotFound(f"no account {account_id}", param="account_id")
        if status == -2:
            raise LedgerUnavailable("the stream's reservation was returned while it was still "
                                    "running (this process missed its heartbeat)")
        return LeaseResult(ok=status == 1, taken=int(taken), balance=int(balance),
                           charged=int(charged))

    async def settle(self, account_id: str, rid: str, *, charged_target: int,
                     tokens: int = 0) -> SettleResult:
        """Charge the reservation's final total and return the rest of its hold. With a
        :attr:`usage_index`, an account that has a Stripe customer gets one usage record of
        ``tokens`` queued with the charge (see ``settle.lua``)."""
        with redis_errors():
            status, charged, returned, shortfall, balance, queued = await self._settle(
                keys=[self._acct(account_id), self._res(account_id, rid),
                      self._held(account_id, self.owner), self.usage_key(account_id)],
                args=[rid, charged_target, "1" if self.usage_index else "", tokens,
                      int(time.time())])
            if queued and self.usage_index:
                # After the record (its own slot): a crash between leaves the record to the
                # sender's full walk (gateway/rails/stripe/meter_events.py), never lost.
                await self.redis.sadd(self.usage_index, account_id)
        self._rids.pop(rid, None)  # the reservation is gone: nothing of it to sweep
        if status == -1:
            raise AccountNotFound(f"no account {account_id}", param="account_id")
        return SettleResult(int(charged), int(returned), int(shortfall), int(balance),
                            replayed=status == 0)


# The short scripts about keys and liveness live here, not in meters/lua. Each touches the keys
# of one account, or of one owner: one slot on a cluster.

_ISSUE_PAYMENT_KEY = """
-- KEYS: acct:{<id>}, acct:{<id>}:keys, paykeys:{<id>}   (one slot: the account's)
-- ARGV: new hash, keys kept, idle TTL (ms), then the hashes found expired or revoked
-- Returns -1 (no account) or the hashes of the keys to revoke to stay within the bound (the
-- caller deletes their key:<hash>: each in its own slot on a cluster).
if redis.call('EXISTS', KEYS[1]) == 0 then return -1 end
for i = 4, #ARGV do
  redis.call('SREM', KEYS[2], ARGV[i])
  redis.call('ZREM', KEYS[3], ARGV[i])
end
redis.call('SADD', KEYS[2], ARGV[1])
-- Scored by issue order, a counter of the account's: not a clock (two keys issued in one
-- millisecond, or by processes whose clocks differ, would tie or swap, and the bound would
-- drop a newer key).
redis.call('ZADD', KEYS[3], redis.call('HINCRBY', KEYS[1], 'key_seq', 1), ARGV[1])
local dropped = {}
local over = redis.call('ZCARD', KEYS[3]) - tonumber(ARGV[2])
if over > 0 then
  dropped = redis.call('ZRANGE', KEYS[3], 0, over - 1)
  for _, h in ipairs(dropped) do
    redis.call('SREM', KEYS[2], h)
    redis.call('ZREM', KEYS[3], h)
  end
end
return dropped
"""

_AUTHENTICATE = """
-- KEYS: key:<hash> (a hash: account, and idle_ms for a payment's key).
-- Returns false or {account id, TTL in ms (-1: none)}. A key with a TTL was issued by a
-- payment: its use restarts the idle clock.
local found = redis.call('HMGET', KEYS[1], 'account', 'idle_ms')
if not found[1] then return false end
local ttl = redis.call('PTTL', KEYS[1])
if ttl > 0 and found[2] then
  redis.call('PEXPIRE', KEYS[1], found[2])
  ttl = tonumber(found[2])
end
return {found[1], ttl}
"""

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

#: The account listing's cursor: node cursor * CURSOR_NODES + the master's position.
CURSOR_NODES = 16384

#: Account ids are opaque tokens ("acct_<hex>", "x402_<hex>") that never contain ":", the
#: separator of the ledger's keys.
_ACCOUNT_ID = re.compile(r"[A-Za-z0-9_-]{1,128}")


def account_from(account_id: str, raw: dict[Any, Any]) -> Account:
    """An account from its hash as Redis returned it (``HGETALL``)."""
    if not raw:
        raise AccountNotFound(f"no account {account_id}", param="account_id")
    data = {as_text(k): as_text(v) for k, v in raw.items()}
    return Account(id=account_id, balance=int(data["balance"]), held=int(data["held"]),
                   spent=int(data["spent"]), credited=int(data["credited"]),
                   shortfall=int(data.get("shortfall", 0)), label=data.get("label", ""))


def _new_key() -> tuple[str, str]:
    api_key = "tsk_" + secrets.token_urlsafe(32)
    return api_key, hash_key(api_key)


def _check_amount(amount: int, field: str) -> None:
    if isinstance(amount, bool) or not isinstance(amount, int) or not 0 <= amount <= MAX_AMOUNT:
        raise InvalidAmount(f"{field} must be a whole number of atomic units between 0 and "
                            f"{MAX_AMOUNT}", param=field)


def as_text(value: bytes | str) -> str:
    """Redis replies are bytes; keys and ids are ASCII text."""
    return value.decode() if isinstance(value, bytes) else value
