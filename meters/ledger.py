"""The ledger: balances, holds and charges in Redis, in integer atomic units.

Every account is a hash ``{prefix}acct:{id}`` with ``balance`` (spendable), ``held`` (reserved
by live streams), ``spent``, ``credited`` and ``shortfall``. ``balance + held + spent`` only ever
changes by credits: money moves between the three fields inside Lua scripts (``meters/lua``),
so every debit is atomic and concurrency-safe across streams and processes.

A stream holds money through a *reservation* ``{prefix}res:{rid}`` owned by the gateway process
that opened it. Each process keeps a heartbeat key ``{prefix}alive:{owner}`` alive; when a process
dies its heartbeat expires and :meth:`Ledger.sweep` (run by every live process) returns its holds
to the balances. Any Redis failure raises :class:`~meters.errors.LedgerUnavailable`, and the
meter stops granting tokens whose hold it cannot prove is still alive (fail closed).
"""

from __future__ import annotations

import contextlib
import hashlib
import re
import secrets
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import resources
from typing import Any, cast

import redis.asyncio as aioredis
from redis.commands.core import AsyncScript
from redis.driver_info import DriverInfo
from redis.exceptions import RedisError
from redis.utils import get_lib_version

from meters.errors import AccountNotFound, DuplicateCredit, InvalidAmount, LedgerUnavailable
from meters.money import MAX_AMOUNT


@contextlib.contextmanager
def redis_errors() -> Iterator[None]:
    """Translate any Redis failure into :class:`LedgerUnavailable` (fail closed)."""
    try:
        yield
    except RedisError as exc:
        raise LedgerUnavailable("the ledger (Redis) is unreachable") from exc


def script(name: str) -> str:
    """The source of one of the Lua scripts in ``meters/lua``."""
    return resources.files("meters").joinpath("lua", name).read_text(encoding="utf-8")


#: Named once: without it redis-py reads its package metadata (a file) for every new
#: connection, which fails as an ``OSError`` when the process is out of file descriptors.
_DRIVER = DriverInfo(name="redis-py", lib_version=get_lib_version())

#: Most reservations one call of ``sweep.lua`` returns (Redis runs nothing else meanwhile:
#: about 7-15 µs each, so a call stays near 1-2 ms whatever a crashed process left).
SWEEP_BATCH = 128


def connect(url: str, *, max_connections: int = 64, pool_timeout: float = 5.0
            ) -> aioredis.Redis:
    """A client whose pool of at most ``max_connections`` waits up to ``pool_timeout``
    seconds for a free connection (then raises ``ConnectionError``: fail closed) instead of
    opening more, and whose short timeouts make an unreachable Redis fail closed within a
    second or two."""
    pool = aioredis.BlockingConnectionPool.from_url(
        url, max_connections=max_connections, timeout=pool_timeout, socket_connect_timeout=1,
        socket_timeout=3, driver_info=_DRIVER)
    return aioredis.Redis(connection_pool=pool)


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
        self.prefix = prefix
        #: The pub/sub channel the scripts that add money announce the account on
        #: (:mod:`meters.notices` wakes the streams paused on it).
        self.credit_channel = f"{prefix}credited"
        #: Where the final charge queues usage records for Stripe meter events (None: off).
        self.usage_queue: str | None = None
        self.owner = f"{uuid.uuid4().hex[:12]}"
        self.owner_ttl_ms = int(owner_ttl_seconds * 1000)
        #: Monotonic time until which this process' holds are provably alive in Redis.
        self.alive_until = 0.0
        #: Bumped whenever liveness is proved again after it had lapsed: holds leased in an
        #: earlier epoch may have been swept meanwhile and must be re-checked before use.
        self.epoch = 0
        self._lease: AsyncScript = client.register_script(script("lease.lua"))
        self._settle: AsyncScript = client.register_script(script("settle.lua"))
        self._sweep: AsyncScript = client.register_script(script("sweep.lua"))
        self._credit: AsyncScript = client.register_script(script("credit.lua"))
        self._issue_payment_key: AsyncScript = client.register_script(_ISSUE_PAYMENT_KEY)
        self._authenticate: AsyncScript = client.register_script(_AUTHENTICATE)

    # -- keys -------------------------------------------------------------------------------
    def _acct(self, account_id: str) -> str:
        if not _ACCOUNT_ID.fullmatch(account_id):
            # An id with ":" would name another key of the ledger (an account's key set,
            # ``acct:{id}:keys``), which Redis then refuses as the wrong type: not an account.
            raise AccountNotFound(f"no account {account_id[:100]!r}", param="account_id")
        return f"{self.prefix}acct:{account_id}"

    def _res(self, rid: str) -> str:
        return f"{self.prefix}res:{rid}"

    def _owner_set(self) -> str:
        return f"{self.prefix}owner:{self.owner}"

    # -- liveness ---------------------------------------------------------------------------
    async def heartbeat(self) -> None:
        """Prove this process alive; holds of a process that stops doing this get swept."""
        started = time.monotonic()
        with redis_errors():
            previous = await self.redis.set(f"{self.prefix}alive:{self.owner}", "1",
                                            px=self.owner_ttl_ms, get=True)
        if previous is None:
            # The key had expired (or never existed): another process may have swept our
            # holds meanwhile. Only then must meters re-check them (a late beat whose key
            # was still alive changes nothing).
            self.epoch += 1
        # Leave a margin of a third of the TTL: the sweeper of another process must never see
        # this owner dead while it still hands out tokens from its holds.
        self.alive_until = started + self.owner_ttl_ms / 1000 * 2 / 3

    def is_alive(self) -> bool:
        return time.monotonic() < self.alive_until

    async def sweep(self, *, batch: int = SWEEP_BATCH) -> tuple[int, int]:
        """Return the holds of dead processes; returns (reservations, atomic units) returned.

        A crashed process may have left any number of holds, and a Lua script blocks Redis
        while it runs: each call of ``sweep.lua`` returns at most ``batch`` of them (about
        1-2 ms of Redis time for 128), and this calls it again until nothing is left, so other
        clients' commands run between the batches."""
        count = total = 0
        more = 1
        while more:
            with redis_errors():
                done, amount, more = await self._sweep(keys=[f"{self.prefix}owners"],
                                                       args=[self.prefix, batch])
            count, total = count + int(done), total + int(amount)
        return count, total

    async def ping(self) -> bool:
        try:
            return bool(await self.redis.ping())
        except RedisError:
            return False

    # -- accounts ---------------------------------------------------------------------------
    def _keys(self, account_id: str) -> str:
        return f"{self.prefix}acct:{account_id}:keys"

    async def create_account(self, balance: int, *, label: str = "",
                             stripe_customer: str | None = None) -> tuple[Account, str]:
        """Create an account with its first API key; returns the account and the key (shown
        once: only its hash is stored). ``stripe_customer``: the Stripe customer its usage
        is reported for (see :attr:`usage_queue`)."""
        _check_amount(balance, "balance")
        account_id = "acct_" + secrets.token_hex(8)
        api_key, key_hash = _new_key()
        fields: dict[str, str | int] = {"balance": balance, "held": 0, "spent": 0,
                                        "credited": balance, "shortfall": 0, "label": label}
        if stripe_customer is not None:
            fields["stripe_customer"] = stripe_customer
        with redis_errors():
            async with self.redis.pipeline(transaction=True) as pipe:
                pipe.hset(self._acct(account_id), mapping=cast(Any, fields))
                pipe.set(f"{self.prefix}key:{key_hash}", account_id)
                pipe.sadd(self._keys(account_id), key_hash)
                await pipe.execute()
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
        return f"{self.prefix}paykeys:{account_id}"

    async def issue_key(self, account_id: str, *, revoke_others: bool = False) -> str:
        """Issue one more API key for an existing account; earlier keys stay valid unless
        ``revoke_others``. The key never expires (an operator's key; payments use
        :meth:`issue_payment_key`)."""
        api_key, key_hash = _new_key()
        with redis_errors():
            if not await self.redis.exists(self._acct(account_id)):
                raise AccountNotFound(f"no account {account_id}", param="account_id")
            old = await self.redis.smembers(self._keys(account_id)) if revoke_others else ()
            async with self.redis.pipeline(transaction=True) as pipe:
                for h in old:
                    pipe.delete(f"{self.prefix}key:{as_text(h)}")
                if revoke_others:
                    pipe.delete(self._keys(account_id), self._paykeys(account_id))
                pipe.set(f"{self.prefix}key:{key_hash}", account_id)
                pipe.sadd(self._keys(account_id), key_hash)
                await pipe.execute()
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
        with redis_errors():
            dropped = await self._issue_payment_key(
                keys=[self._acct(account_id), self._keys(account_id),
                      self._paykeys(account_id), f"{self.prefix}key:{key_hash}"],
                args=[key_hash, account_id, max(1, int(idle_seconds * 1000)), keep,
                      self.prefix])
        if dropped == -1:
            raise AccountNotFound(f"no account {account_id}", param="account_id")
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
            found = await self._authenticate(keys=[f"{self.prefix}key:{key_hash}"],
                                             args=[self.prefix])
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
        twice on a stable keyspace."""
        pattern = f"{self.prefix}acct:{kind}*"
        found: list[str] = []
        with redis_errors():
            while True:
                cursor, keys = await self.redis.scan(cursor, match=pattern,
                                                     count=max(limit * 4, 100))
                found += [as_text(k)[len(self.prefix) + 5:] for k in keys
                          if not as_text(k).endswith(":keys")]
                if cursor == 0 or len(found) >= limit:
                    break
            async with self.redis.pipeline(transaction=False) as pipe:
                for account_id in found:
                    pipe.hgetall(self._acct(account_id))
                rows = await pipe.execute()
        accounts = [account_from(account_id, raw) for account_id, raw in zip(found, rows,
                                                                              strict=True)
                    if raw]
        return sorted(accounts, key=lambda a: a.id), int(cursor)

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
        idem = (f"{self.prefix}idem:{purpose}:{account_id}:{idempotency_key}"
                if idempotency_key else f"{self.prefix}idem:none")
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
        with redis_errors():
            status, taken, balance, charged = await self._lease(
                keys=[self._acct(account_id), self._res(rid), self._owner_set(),
                      f"{self.prefix}owners"],
                args=[rid, self.owner, account_id, charged_target, want, minimum])
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
        :attr:`usage_queue`, an account that has a Stripe customer gets one usage record of
        ``tokens`` queued with the charge (see ``settle.lua``)."""
        with redis_errors():
            status, charged, returned, shortfall, balance = await self._settle(
                keys=[self._acct(account_id), self._res(rid), self._owner_set()],
                args=[rid, charged_target, self.usage_queue or "", tokens, int(time.time())])
        if status == -1:
            raise AccountNotFound(f"no account {account_id}", param="account_id")
        return SettleResult(int(charged), int(returned), int(shortfall), int(balance),
                            replayed=status == 0)


# The two key scripts are short and only about keys, so they live here, not in meters/lua.

_ISSUE_PAYMENT_KEY = """
-- KEYS: acct:<id>, acct:<id>:keys, paykeys:<id>, key:<new hash>
-- ARGV: new hash, account id, idle TTL (ms), keys kept, prefix
-- Returns -1 (no account) or the hashes of the keys revoked to stay within the bound.
if redis.call('EXISTS', KEYS[1]) == 0 then return -1 end
local prefix = ARGV[5]
for _, h in ipairs(redis.call('SMEMBERS', KEYS[2])) do
  if redis.call('EXISTS', prefix .. 'key:' .. h) == 0 then  -- expired or revoked
    redis.call('SREM', KEYS[2], h)
    redis.call('ZREM', KEYS[3], h)
  end
end
for _, h in ipairs(redis.call('ZRANGE', KEYS[3], 0, -1)) do
  if redis.call('EXISTS', prefix .. 'key:' .. h) == 0 then redis.call('ZREM', KEYS[3], h) end
end
redis.call('SET', KEYS[4], ARGV[2], 'PX', ARGV[3])
redis.call('SADD', KEYS[2], ARGV[1])
-- Scored by issue order, a counter of the account's: not a clock (two keys issued in one
-- millisecond, or by processes whose clocks differ, would tie or swap, and the bound would
-- drop a newer key).
redis.call('ZADD', KEYS[3], redis.call('HINCRBY', KEYS[1], 'key_seq', 1), ARGV[1])
redis.call('HSET', KEYS[1], 'key_idle_ms', ARGV[3])
local dropped = {}
local over = redis.call('ZCARD', KEYS[3]) - tonumber(ARGV[4])
if over > 0 then
  dropped = redis.call('ZRANGE', KEYS[3], 0, over - 1)
  for _, h in ipairs(dropped) do
    redis.call('DEL', prefix .. 'key:' .. h)
    redis.call('SREM', KEYS[2], h)
    redis.call('ZREM', KEYS[3], h)
  end
end
return dropped
"""

_AUTHENTICATE = """
-- KEYS: key:<hash>; ARGV: prefix. Returns false or {account id, TTL in ms (-1: none)}.
-- A key with a TTL was issued by a payment: its use restarts the idle clock (the account's
-- key_idle_ms, set when it was issued).
local account = redis.call('GET', KEYS[1])
if not account then return false end
local ttl = redis.call('PTTL', KEYS[1])
if ttl > 0 then
  local idle = redis.call('HGET', ARGV[1] .. 'acct:' .. account, 'key_idle_ms')
  if idle then
    redis.call('PEXPIRE', KEYS[1], idle)
    ttl = tonumber(idle)
  end
end
return {account, ttl}
"""

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
