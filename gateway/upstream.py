"""The pooled HTTP client that talks to model APIs.

It is aiohttp rather than httpx: on the hot path httpx's pool walks every connection on each
request start and close (``is_idle`` / ``has_expired``, a socket check per idle connection)
and parses HTTP/1.1 in pure Python; with tens of concurrent streams that was the largest single
cost of the gateway (benchmarks/RESULTS.md). aiohttp's exceptions never leave this module:
:class:`UpstreamResponse` raises :class:`UpstreamStreamError`, :meth:`Upstreams.open` raises
the gateway's own errors.
"""

from __future__ import annotations

import asyncio
import time
import weakref
from collections.abc import AsyncIterator, Mapping
from typing import Any

import aiohttp
import orjson

from gateway.errors import BadRequest, RateLimited, UpstreamError
from gateway.settings import Settings

_NEVER_FORWARD = frozenset({"authorization", "x-api-key", "cookie", "payment-signature",
                            "x-payment", "host", "content-length"})

#: Upstream error bodies are read for their message, never more than this.
MAX_ERROR_BODY = 64 * 1024


class UpstreamStreamError(Exception):
    """The upstream's body broke off or could not be read."""


class UpstreamResponse:
    """A response whose body has not been read yet. Closing it before its end closes the
    connection, which is how the model is told to stop generating.

    ``read_timeout``: the longest a read of the body may wait for the upstream (its
    :class:`Upstreams` watches the reads and closes a response that waited longer).
    """

    def __init__(self, response: aiohttp.ClientResponse, read_timeout: float) -> None:
        self._response = response
        self.status = response.status
        self.read_timeout = read_timeout
        self._ahead = b""  # read by buffered(), not yet returned by chunks()
        #: ``time.monotonic()`` when the read under way began waiting; None between reads.
        self.waiting_since: float | None = None
        self.timed_out = False

    async def chunks(self) -> AsyncIterator[bytes]:
        """The body, chunk by chunk as it arrives (everything received so far per chunk)."""
        content = self._response.content
        try:
            while True:
                if self._ahead:
                    chunk, self._ahead = self._ahead, b""
                else:
                    self.waiting_since = time.monotonic()
                    chunk = await content.readany()
                    self.waiting_since = None
                    if not chunk:
                        return
                yield chunk
        except (aiohttp.ClientError, TimeoutError) as exc:
            name = "TimeoutError" if self.timed_out else type(exc).__name__
            raise UpstreamStreamError(name) from exc

    def expire(self) -> None:
        """The read under way waited past the read timeout: it fails, the connection closes."""
        self.timed_out = True
        self.close()

    def buffered(self) -> bool:
        """Whether the next read of :meth:`chunks` returns without waiting: data (or the end,
        or an error) has already arrived. Call it only between reads."""
        if self._ahead:
            return True
        content = self._response.content
        if content.is_eof() or content.exception() is not None:
            return True
        # read_nowait: aiohttp's public way to look at what arrived; kept for chunks().
        self._ahead = content.read_nowait()
        return bool(self._ahead)

    async def read(self, limit: int) -> bytes:
        """The whole body; :class:`UpstreamStreamError` past ``limit`` bytes."""
        body = bytearray()
        async for chunk in self.chunks():
            body += chunk
            if len(body) > limit:
                raise UpstreamStreamError("the answer is too large")
        return bytes(body)

    def close(self) -> None:
        # close(), not release(): a half-read stream must drop its connection.
        self._response.close()


class Upstreams:
    """One pooled session for all upstreams of the process."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._session: aiohttp.ClientSession | None = None
        #: The responses whose bodies may still be read, for the read-timeout watch.
        self._open: weakref.WeakSet[UpstreamResponse] = weakref.WeakSet()
        self._watch: asyncio.Task[None] | None = None
        timeouts = [u.read_timeout for u in settings.upstreams.values()] or [1.0]
        #: How often the reads are looked at: a read times out within a quarter of the
        #: timeout after it (at most a second after it).
        self.watch_interval = min(1.0, min(timeouts) / 4)

    def session(self) -> aiohttp.ClientSession:
        # Created lazily, inside the event loop that uses it.
        if self._session is None:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=30),
                skip_auto_headers=("User-Agent",))
        return self._session

    async def aclose(self) -> None:
        if self._watch is not None:
            self._watch.cancel()
            self._watch = None
        if self._session is not None:
            await self._session.close()
            self._session = None

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
        timeout = aiohttp.ClientTimeout(total=None, connect=cfg.connect_timeout,
                                        sock_read=cfg.read_timeout)
        try:
            url = self.url(upstream, path)
            response = await self.session().post(
                f"{url}?{query}" if query else url, data=orjson.dumps(body),
                headers=dict(headers), timeout=timeout)
        except TimeoutError as exc:
            raise UpstreamError(f"upstream {upstream!r} timed out",
                                code="upstream_timeout") from exc
        except aiohttp.ClientError as exc:
            raise UpstreamError(f"upstream {upstream!r} is unreachable",
                                code="upstream_unreachable") from exc
        if response.connection is not None:
            # sock_read bounded the wait for the head. For the body aiohttp would move a
            # timer on every chunk received (about 4% of the gateway's CPU per streamed token,
            # py-spy; benchmarks/RESULTS.md, #13 item 4): its reads are watched by one task
            # per process instead (_watch_reads). (aiohttp turns it off so for WebSockets.)
            response.connection.protocol.read_timeout = None  # type: ignore[union-attr]
        wrapped = UpstreamResponse(response, cfg.read_timeout)
        self._open.add(wrapped)
        if self._watch is None:
            self._watch = asyncio.get_running_loop().create_task(self._watch_reads())
        if response.status >= 400:
            await _raise_for_status(upstream, wrapped)
        return wrapped


    async def _watch_reads(self) -> None:
        """Fail the body reads that waited for their upstream longer than its read timeout
        (what aiohttp's ``sock_read`` did, checked every :attr:`watch_interval` instead of on
        every chunk)."""
        while True:
            await asyncio.sleep(self.watch_interval)
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
