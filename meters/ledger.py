"""The ledger: balances, holds and charges in Redis, in integer atomic units.

Every account is a hash ``{prefix}acct:{<id>}`` with ``balance`` (spendable), ``held`` (reserved
by live streams), ``spent``, ``credited`` and ``shortfall``. ``balance + held + spent`` only ever
changes by credits: money moves between the three fields inside Lua scripts (``meters/lua``),
so every debit is atomic and concurrency-safe across streams and processes.

:class:`Ledger` is one object per process, made of parts, each its own module: the key layout
and what the parts share (:mod:`meters.keyspace`), this process' liveness and the sweep of dead
processes' holds (:mod:`meters.liveness`), API keys (:mod:`meters.apikeys`); accounts, credits
and the reservations streams lease from are here. Any Redis failure raises
:class:`~meters.errors.LedgerUnavailable` (:func:`meters.connection.redis_errors`), and the
meter stops granting tokens whose hold it cannot prove is still alive (fail closed).
"""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass
from typing import Any, cast

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import RedisError

from meters.apikeys import ApiKeys, new_key
from meters.connection import as_text, is_cluster, redis_errors
from meters.errors import AccountNotFound, DuplicateCredit, InvalidAmount, LedgerUnavailable
from meters.keyspace import ACCOUNT_ID
from meters.liveness import Liveness
from meters.money import MAX_AMOUNT
from meters.scripts import LuaScript, script


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


class Ledger(Liveness, ApiKeys):
    """Async access to balances and reservations. One instance per process."""

    def __init__(self, client: aioredis.Redis, *, prefix: str = "ts:",
                 owner_ttl_seconds: float = 15.0, key_cache_seconds: float = 0.0) -> None:
        super().__init__(client, prefix=prefix, owner_ttl_seconds=owner_ttl_seconds,
                         key_cache_seconds=key_cache_seconds)
        self._lease: LuaScript = LuaScript(client, script("lease.lua"))
        self._settle: LuaScript = LuaScript(client, script("settle.lua"))
        self._credit: LuaScript = LuaScript(client, script("credit.lua"))

    async def ping(self) -> bool:
        try:
            return bool(await self.redis.ping())
        except RedisError:
            return False

    # -- accounts ---------------------------------------------------------------------------
    async def create_account(self, balance: int, *, label: str = "",
                             stripe_customer: str | None = None) -> tuple[Account, str]:
        """Create an account with its first API key; returns the account and the key (shown
        once: only its hash is stored). ``stripe_customer``: the Stripe customer its usage
        is reported for (see :attr:`usage_index`)."""
        _check_amount(balance, "balance")
        account_id = "acct_" + secrets.token_hex(8)
        api_key, key_hash = new_key()
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
            found = [a for a in found if ACCOUNT_ID.fullmatch(a)]
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


#: The account listing's cursor: node cursor * CURSOR_NODES + the master's position.
CURSOR_NODES = 16384


def account_from(account_id: str, raw: dict[Any, Any]) -> Account:
    """An account from its hash as Redis returned it (``HGETALL``)."""
    if not raw:
        raise AccountNotFound(f"no account {account_id}", param="account_id")
    data = {as_text(k): as_text(v) for k, v in raw.items()}
    return Account(id=account_id, balance=int(data["balance"]), held=int(data["held"]),
                   spent=int(data["spent"]), credited=int(data["credited"]),
                   shortfall=int(data.get("shortfall", 0)), label=data.get("label", ""))



def _check_amount(amount: int, field: str) -> None:
    if isinstance(amount, bool) or not isinstance(amount, int) or not 0 <= amount <= MAX_AMOUNT:
        raise InvalidAmount(f"{field} must be a whole number of atomic units between 0 and "
                            f"{MAX_AMOUNT}", param=field)
