"""The model APIs, called through the gateway's own HTTP/1.1 client (:mod:`gateway.http_client`).

First httpx, then aiohttp: httpx's pool walked every connection on each request start and
close and parsed HTTP/1.1 in pure Python; aiohttp's receive path then cost 8-18 us per
streamed chunk (benchmarks/RESULTS.md). The client's exceptions never leave this module:
:class:`UpstreamResponse` raises :class:`UpstreamStreamError`, :meth:`Upstreams.open` raises
the gateway's own errors.
"""

from __future__ import annotations

import asyncio
import ssl
import time
import weakref
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any

import orjson

from gateway.errors import BadRequest, RateLimited, UpstreamError
from gateway.http_client import (
    ClientError,
    Connection,
    InvalidHeader,
    MalformedResponse,
    Pool,
    ReadTimeout,
)
from gateway.settings import Settings

_NEVER_FORWARD = frozenset({"authorization", "x-api-key", "cookie", "payment-signature",
                            "x-payment", "host", "content-length", "transfer-encoding",
                            "connection", "accept-encoding"})

#: Upstream error bodies are read for their message, never more than this.
MAX_ERROR_BODY = 64 * 1024


class UpstreamStreamError(Exception):
    """The upstream's body broke off or could not be read."""


class UpstreamResponse:
    """A response whose body has not been read yet. Closing it before its end closes the
    connection, which is how the model is told to stop generating; closing it after its end
    returns the connection to the pool.

    ``read_timeout``: the longest a read of the body may wait for the upstream (its
    :class:`Upstreams` watches the reads and fails a read that waited longer).
    """

    def __init__(self, connection: Connection, pool: Pool, read_timeout: float) -> None:
        self._conn: Connection | None = connection
        self._pool = pool
        self.status = connection.status
        self.read_timeout = read_timeout
        #: ``time.monotonic()`` when the read under way began waiting; None between reads.
        self.waiting_since: float | None = None
        self.timed_out = False

    async def chunks(self) -> AsyncIterator[bytes]:
        """The body, chunk by chunk as it arrives (everything received so far per chunk)."""
        while True:
            chunk = self.poll()
            if chunk is None:
                return
            if chunk:
                yield chunk
            else:
                await self.wait()

    def poll(self) -> bytes | None:
        """The body that arrived since the last poll: ``b""`` when nothing did (then
        :meth:`wait`), None once it ended. :class:`UpstreamStreamError` if it broke off."""
        conn = self._conn
        if conn is None:
            raise UpstreamStreamError("closed")
        chunk = conn.take()
        if chunk:
            return chunk
        if conn.error is not None:
            name = "TimeoutError" if self.timed_out else type(conn.error).__name__
            raise UpstreamStreamError(name) from conn.error
        return None if conn.complete else b""

    async def wait(self) -> None:
        """Until :meth:`poll` has something to say (data, the end, an error) or the sink
        woke the reader; a wait longer than the read timeout fails the read."""
        conn = self._conn
        if conn is None or conn.ready():
            return
        self.waiting_since = time.monotonic()
        await conn.wait()
        self.waiting_since = None

    def set_sink(self, sink: Callable[[bytes], bool] | None) -> None:
        """Let ``sink`` take body data in the read callback while :meth:`wait` waits with
        nothing buffered (False from it leaves the data to the reader); None to stop."""
        if self._conn is not None:
            self._conn.sink = sink

    def wake(self) -> None:
        """End the :meth:`wait` under way (the sink took data and left the reader work)."""
        if self._conn is not None:
            self._conn.wake()

    def expire(self) -> None:
        """The read under way waited past the read timeout: it fails, the connection closes."""
        self.timed_out = True
        if self._conn is not None:
            self._conn.fail(ReadTimeout("no data within the read timeout"))

    def buffered(self) -> bool:
        """Whether the next read of :meth:`chunks` returns without waiting: data (or the end,
        or an error) has already arrived. Call it only between reads."""
        return self._conn is None or self._conn.ready()

    async def read(self, limit: int) -> bytes:
        """The whole body; :class:`UpstreamStreamError` past ``limit`` bytes."""
        body = bytearray()
        async for chunk in self.chunks():
            body += chunk
            if len(body) > limit:
                raise UpstreamStreamError("the answer is too large")
        return bytes(body)

    def close(self) -> None:
        """Done with the body (idempotent: the connection may serve another request next)."""
        conn, self._conn = self._conn, None
        if conn is not None:
            self._pool.done(conn)


class Upstreams:
    """One connection pool for all upstreams of the process.

    ``ssl_context``: whom TLS upstreams are trusted by (the system's store when None)."""

    def __init__(self, settings: Settings, ssl_context: ssl.SSLContext | None = None) -> None:
        self.settings = settings
        self.pool = Pool(ssl_context)
        #: The responses whose bodies may still be read, for the read-timeout watch.
        self._open: weakref.WeakSet[UpstreamResponse] = weakref.WeakSet()
        self._watch: asyncio.Task[None] | None = None
        timeouts = [u.read_timeout for u in settings.upstreams.values()] or [1.0]
        #: How often the reads are looked at: a read times out within a quarter of the
        #: timeout after it (at most a second after it).
        self.watch_interval = min(1.0, min(timeouts) / 4)

    async def aclose(self) -> None:
        if self._watch is not None:
            self._watch.cancel()
            self._watch = None
        self.pool.close()

    def forwarded(self, upstream: str, headers: Mapping[str, str]) -> dict[str, str]:
        """The client headers this upstream is configured to receive."""
        prefixes = tuple(self.settings.upstreams[upstream].forward_headers)
        if not prefixes:
            return {}
        return {name: value for name, value in headers.items()
                if name.lower().startswith(prefixes) and name.lower() not in _NEVER_FORWARD}

    def url(self, upstream: str, path: str) -> str:
        return self.settings.upstreams[upstream].base_url.rstrip("/") + path

    async def open(self, upstream: str, path: str, body: Mapping[str, Any],
                   headers: Mapping[str, str], *, query: str = "") -> UpstreamResponse:
        """Send a request; return the response with its body not yet read (the caller closes
        it). ``query`` is the client's query string, passed on as sent (Claude Code's
        ``?beta=true``). Errors become :class:`UpstreamError` (502), :class:`BadRequest` (the
        upstream rejected a parameter) or :class:`RateLimited` (429)."""
        cfg = self.settings.upstreams[upstream]
        url = self.url(upstream, path)
        lines = [f"{name}: {value}" for name, value in headers.items()
                 if name.lower() not in ("host", "content-length")]
        try:
            connection = await self.pool.request(
                f"{url}?{query}" if query else url, lines, orjson.dumps(body),
                connect_timeout=cfg.connect_timeout, head_timeout=cfg.read_timeout)
        except TimeoutError as exc:
            raise UpstreamError(f"upstream {upstream!r} timed out",
                                code="upstream_timeout") from exc
        except InvalidHeader as exc:
            raise BadRequest(f"a header cannot be sent to the model API: {exc}",
                             code="invalid_header") from exc
        except MalformedResponse as exc:
            raise UpstreamError(f"upstream {upstream!r} answered malformed HTTP") from exc
        except (ClientError, OSError) as exc:
            raise UpstreamError(f"upstream {upstream!r} is unreachable",
                                code="upstream_unreachable") from exc
        wrapped = UpstreamResponse(connection, self.pool, cfg.read_timeout)
        self._open.add(wrapped)
        if self._watch is None:
            self._watch = asyncio.get_running_loop().create_task(self._watch_reads())
        if wrapped.status >= 400:
            await _raise_for_status(upstream, wrapped)
        return wrapped

    async def _watch_reads(self) -> None:
        """Fail the body reads that waited for their upstream longer than its read timeout
        (what aiohttp's ``sock_read`` did, checked every :attr:`watch_interval` instead of on
        every chunk)."""
        while True:
            await asyncio.sleep(self.watch_interval)
            self.pool.prune()
            now = time.monotonic()
            for response in list(self._open):
                since = response.waiting_since
                if since is not None and now - since > response.read_timeout:
                    response.expire()


async def _raise_for_status(upstream: str, response: UpstreamResponse) -> None:
    try:
        async with asyncio.timeout(10):  # not wait_for: see meters/connection.py
            raw = await response.read(MAX_ERROR_BODY)
    except (UpstreamStreamError, TimeoutError):
        raw = b""
    finally:
        response.close()
    message = _error_message(raw) or f"HTTP {response.status}"
    status = response.status
    if status in (400, 422):
        # The model API rejected a parameter we passed through: that is the client's input.
        raise BadRequest(f"the model API rejected the request: {message}",
                         code="upstream_rejected")
    if status == 429:
        raise RateLimited(f"the model API is rate limiting: {message}")
    raise UpstreamError(f"upstream {upstream!r} answered HTTP {status}: {message}")


def _error_message(raw: bytes) -> str:
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return raw[:200].decode("utf-8", errors="replace").strip()
    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(error, dict) and isinstance(error.get("message"), str):
        return str(error["message"])[:500]
    if isinstance(error, str):
        return error[:500]
    return ""
