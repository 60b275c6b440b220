"""Per-client rate limits on the answers an attacker farms: failed authentication (key
guessing) and 402 challenges (challenge floods, each one cheap to ask for and not free to
build).

A limit is a token bucket in Redis (one hash per client and kind, refilled continuously, the
arithmetic in one Lua call on Redis' own clock, so every gateway process shares it). Only
failures spend from a bucket: a request that authenticates costs no Redis call here. Once a
bucket is empty the process remembers it until the next token is due and answers 429 with
``Retry-After`` *before* looking at the credential, so an attacker cannot keep guessing past
the limit and read the answer from the status code.

The defaults are far above what a well-behaved agent meets (it fails authentication by mistake
a few times, and gets one 402 per top-up): 30 failures, then one every 2 s; 120 challenges,
then 2 per second.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import redis.asyncio as aioredis
from starlette.requests import Request

from gateway.errors import TooManyRequests
from meters.connection import redis_errors
from meters.scripts import LuaScript

_BUCKET = """
-- A token bucket: KEYS[1] hash {tokens, at_ms}. ARGV[1] capacity, ARGV[2] tokens per second.
-- Spends one token if there is one. Returns {allowed, milliseconds until the next token}.
local now = redis.call('TIME')
local now_ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
local capacity, rate = tonumber(ARGV[1]), tonumber(ARGV[2])
local tokens = tonumber(redis.call('HGET', KEYS[1], 'tokens') or capacity)
local at = tonumber(redis.call('HGET', KEYS[1], 'at_ms') or now_ms)
tokens = math.min(capacity, tokens + math.max(0, now_ms - at) * rate / 1000)
local allowed = 0
if tokens >= 1 then
  tokens = tokens - 1
  allowed = 1
end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'at_ms', now_ms)
redis.call('PEXPIRE', KEYS[1], math.ceil((capacity - tokens) / rate * 1000) + 1000)
local wait = 0
if tokens < 1 then wait = math.ceil((1 - tokens) / rate * 1000) end
return {allowed, wait}
"""


@dataclass(frozen=True, slots=True)
class Limit:
    """``burst`` failures at once, then ``per_second`` on average."""

    burst: int
    per_second: float


class RateLimiter:
    """The limits of one process, shared through Redis with every other process."""

    def __init__(self, redis: aioredis.Redis, *, prefix: str, limits: dict[str, Limit],
                 client_header: str | None = None, enabled: bool = True) -> None:
        self.redis = redis
        self.prefix = prefix
        self.limits = limits
        self.client_header = client_header.lower() if client_header else None
        self.enabled = enabled
        self._script = LuaScript(redis, _BUCKET)
        #: (kind, client) -> monotonic time until which the bucket is known to be empty.
        self._empty: dict[tuple[str, str], float] = {}

    def client(self, request: Request) -> str:
        """Who is asking: the peer address, or the configured header set by a trusted proxy
        (its first address) when the gateway runs behind one."""
        if self.client_header:
            value = request.headers.get(self.client_header, "")
            first = value.split(",")[0].strip()
            if first:
                return first[:100]
        return request.client.host if request.client else "unknown"

    def check(self, request: Request, kind: str) -> None:
        """Raise 429 if this client's ``kind`` bucket is known to be empty (no I/O)."""
        if not self.enabled:
            return
        key = (kind, self.client(request))
        until = self._empty.get(key)
        if until is None:
            return
        wait = until - time.monotonic()
        if wait <= 0:
            del self._empty[key]
            return
        raise self._error(kind, wait)

    async def spend(self, request: Request, kind: str) -> None:
        """Count one failure of ``kind`` against this client; 429 once its bucket is empty."""
        if not self.enabled:
            return
        limit = self.limits[kind]
        client = self.client(request)
        with redis_errors():
            allowed, wait_ms = await self._script(
                keys=[f"{self.prefix}rl:{kind}:{client}"],
                args=[limit.burst, limit.per_second])
        if not allowed:
            wait = int(wait_ms) / 1000
            if len(self._empty) > 100_000:  # bound memory under a flood of addresses
                self._empty.clear()
            self._empty[(kind, client)] = time.monotonic() + wait
            raise self._error(kind, wait)

    @staticmethod
    def _error(kind: str, wait: float) -> TooManyRequests:
        what = "failed authentications" if kind == "auth" else "payment challenges"
        seconds = max(1, math.ceil(wait))
        return TooManyRequests(f"too many {what} from this client; retry in {seconds} s",
                           headers={"Retry-After": str(seconds)}, extra={"retry_after": seconds})
