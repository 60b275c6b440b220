"""``Idempotency-Key`` on metered model requests: a retry is answered from the first answer and
never charged again (specs/mpp/draft-evm-session-00.md, "Request Idempotency": "Servers MUST
NOT increment ``spent`` for duplicate idempotent requests"; the same holds for every account).

A key is scoped to the account that pays (two accounts may use the same key) and bound to the
request it came with (route and body, canonical JSON): the same key with another request is a
409 ``idempotency_key_reused``. While the first request runs, a retry gets 409
``idempotency_in_progress`` with ``Retry-After``. Once it ended, a retry gets its recorded
answer (status, media type, body: for a stream, every byte the first request sent, payment
events included), unmetered. A request that ended before anything was charged (refused,
upstream unreachable) leaves no record: its retry runs anew. Records live in Redis for
``ttl_seconds``; an answer larger than ``max_bytes`` is not kept (its retry gets 409
``idempotency_answer_unavailable``: charged once, not answered twice).
"""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import anyio
import orjson
import redis.asyncio as aioredis
from starlette.responses import Response

from gateway.errors import BadRequest, Conflict
from meters.connection import as_text, redis_errors

HEADER = "idempotency-key"
#: Longest key accepted (Stripe's limit).
MAX_KEY_LENGTH = 255


@dataclass(frozen=True, slots=True)
class Record:
    """One request's claim on its key."""

    key: str
    fingerprint: str


class RequestIdempotency:
    """Idempotency records in Redis (see the module docstring)."""

    def __init__(self, redis: aioredis.Redis, prefix: str, *, ttl_seconds: int = 86400,
                 max_bytes: int = 4 * 1024 * 1024) -> None:
        self.redis = redis
        self.prefix = prefix
        self.ttl_seconds = ttl_seconds
        self.max_bytes = max_bytes

    @staticmethod
    def key_of(headers: Any) -> str | None:
        """The request's key, checked; None without one."""
        key = headers.get(HEADER)
        if key is None:
            return None
        if not key or len(key) > MAX_KEY_LENGTH or not key.isprintable():
            raise BadRequest(f"Idempotency-Key must be 1 to {MAX_KEY_LENGTH} printable "
                             "characters", code="invalid_idempotency_key",
                             param="idempotency-key")
        return key

    async def begin(self, account_id: str, key: str, path: str, body: Any
                    ) -> Record | Response:
        """Claim ``key`` for this request, or the recorded answer of the request that
        claimed it first. 409 while that one runs, or if it was another request."""
        digest = hashlib.sha256(key.encode()).hexdigest()
        record = Record(f"{self.prefix}ireq:{account_id}:{digest}", hashlib.sha256(
            path.encode() + b"\n" + orjson.dumps(body, option=orjson.OPT_SORT_KEYS)).hexdigest())
        with redis_errors():
            # The first to set the fingerprint owns the key; no state yet means running.
            if await self.redis.hsetnx(record.key, "fingerprint", record.fingerprint):
                await self.redis.expire(record.key, self.ttl_seconds)
                return record
            stored = await self.redis.hgetall(record.key)
        data = {as_text(k): v for k, v in stored.items()}
        if as_text(data.get("fingerprint", b"")) != record.fingerprint:
            raise Conflict("this Idempotency-Key was used with another request",
                           code="idempotency_key_reused", param="idempotency-key")
        state = as_text(data.get("state", b"running"))
        if state == "running":
            raise Conflict("a request with this Idempotency-Key is still running: retry when "
                           "it has ended", code="idempotency_in_progress",
                           param="idempotency-key", headers={"Retry-After": "1"})
        if state == "too_large":
            raise Conflict("the request with this Idempotency-Key was answered (and charged) "
                           "but its answer was too large to keep", param="idempotency-key",
                           code="idempotency_answer_unavailable")
        return Response(data.get("body", b""), status_code=int(data.get("status", b"200")),
                        media_type=as_text(data.get("media_type", b"application/json")),
                        headers={"Idempotent-Replayed": "true"})

    async def finish(self, record: Record, body: bytes, *, media_type: str,
                     status: int = 200) -> None:
        """Keep the answer for retries (shielded: the request may be being cancelled)."""
        with anyio.CancelScope(shield=True), redis_errors():
            if len(body) > self.max_bytes:
                await self.redis.hset(record.key, "state", "too_large")
            else:
                await self.redis.hset(record.key, mapping={
                    "state": "done", "status": status, "media_type": media_type,
                    "body": body})

    async def abandon(self, record: Record) -> None:
        """Nothing was charged: forget the claim, a retry runs anew."""
        with anyio.CancelScope(shield=True), redis_errors():
            await self.redis.delete(record.key)

    async def recording(self, record: Record, chunks: AsyncIterator[bytes], *,
                        media_type: str) -> AsyncIterator[bytes]:
        """``chunks`` as they go out, kept for retries once the stream ended (however)."""
        sent: list[bytes] = []
        try:
            async for chunk in chunks:
                yield chunk  # raises here when the chunk did not reach the client
                sent.append(chunk)
        finally:
            # Close the inner stream now (it settles the bill), not whenever it is collected.
            aclose = getattr(chunks, "aclose", None)
            if aclose is not None:
                with anyio.CancelScope(shield=True):
                    await aclose()
            await self.finish(record, b"".join(sent), media_type=media_type)
