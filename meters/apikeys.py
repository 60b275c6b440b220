"""API keys: how an agent names its account.

Keys are stored as their SHA-256 (``key:<hash>`` names the account), so a leaked Redis dump
reveals no usable key and a lookup compares no secret byte by byte. An operator's keys never
expire; the keys payments answer with are bounded per account and expire unused
(:meth:`ApiKeys.issue_payment_key`). A process may trust a key it looked up for
``key_cache_seconds``.
"""

from __future__ import annotations

import hashlib
import secrets
import time
from typing import Any, cast

import redis.asyncio as aioredis

from meters.connection import as_text, redis_errors
from meters.errors import AccountNotFound
from meters.keyspace import Keyspace
from meters.scripts import LuaScript


def hash_key(api_key: str) -> str:
    """API keys are stored as their SHA-256: a leaked Redis dump reveals no usable key."""
    return hashlib.sha256(api_key.encode("utf-8")).hexdigest()


#: Payment-issued API keys live per account, and how long one lives unused (the x402
#: settings ``api_keys_kept`` / ``api_key_idle_seconds`` default to these).
PAYMENT_KEYS_KEPT = 5
PAYMENT_KEY_IDLE_SECONDS = 30 * 86400


def new_key() -> tuple[str, str]:
    """A new API key and its hash."""
    api_key = "tsk_" + secrets.token_urlsafe(32)
    return api_key, hash_key(api_key)


class ApiKeys(Keyspace):
    """Issuing, rotating and looking up API keys."""

    def __init__(self, client: aioredis.Redis, *, key_cache_seconds: float = 0.0,
                 **kwargs: Any) -> None:
        super().__init__(client, **kwargs)
        #: How long this process trusts a key it looked up (0: never cache). A key revoked by
        #: another process keeps working here for at most this long.
        self.key_cache_seconds = key_cache_seconds
        self._key_cache: dict[str, tuple[str, float]] = {}
        self._issue_payment_key: LuaScript = LuaScript(client, _ISSUE_PAYMENT_KEY)
        self._authenticate: LuaScript = LuaScript(client, _AUTHENTICATE)

    async def issue_key(self, account_id: str, *, revoke_others: bool = False) -> str:
        """Issue one more API key for an existing account; earlier keys stay valid unless
        ``revoke_others``. The key never expires (an operator's key; payments use
        :meth:`issue_payment_key`)."""
        api_key, key_hash = new_key()
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
        api_key, key_hash = new_key()
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


# The short scripts about keys live here, not in meters/lua. Each touches the keys of one
# account: one slot on a cluster.

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
