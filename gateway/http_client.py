"""A lean HTTP/1.1 client for the model APIs: a keep-alive pool per origin, one request per
connection at a time, the response's body handed to its one reader as it arrives.

Why not aiohttp, which it replaced: on a streamed answer the gateway's cost is per chunk, and
aiohttp's receive path (its protocol, ``StreamReader``, ``readany``) cost 8-18 us of the
gateway's ~73 us per chunk, the largest single part that was not the gateway's own work
(benchmarks/RESULTS.md, sessions 20-21). Here the bytes are parsed in the protocol's callback
by httptools (uvicorn's parser, already a dependency), appended to a buffer, and the reader,
if it waits, is woken by one future.

What it does: TLS (the system's trust store, as aiohttp used), ``Content-Length``, chunked and
close-delimited bodies, gzip/deflate bodies (it asks for none), flow control (a reader that
stops reading stops the socket, so a paused stream holds its upstream by TCP), connections
reused only after a complete answer. What it does not, on purpose: redirects, proxies (aiohttp
was not told to trust the environment either), cookies, HTTP/2, retries (a POST to a model API
is not idempotent: it is billed upstream).

:class:`Pool` is the client; one connection and the errors of an exchange are in
:mod:`gateway.http_connection`. Errors are those (:class:`ClientError` and subclasses), or
``OSError`` / ``TimeoutError`` from connecting; :mod:`gateway.upstream` turns them into the
gateway's.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections.abc import Hashable
from dataclasses import dataclass
from urllib.parse import urlsplit

from gateway.http_connection import (
    HIGH_WATER,
    ClientError,
    Connection,
    Disconnected,
    InvalidHeader,
    MalformedResponse,
    ReadTimeout,
)

#: An idle connection older than this is closed rather than reused: below the 5 s after which
#: uvicorn and Node servers close idle connections, so the gateway does not send on a
#: connection such a server is closing (nginx keeps them 75 s, Cloudflare longer).
KEEPALIVE_SECONDS = 4.0


@dataclass(frozen=True)
class Origin:
    """Where a connection goes: one pool of idle connections each."""

    scheme: str
    host: str
    port: int

    @classmethod
    def of(cls, url: str) -> tuple[Origin, str]:
        """The origin of an absolute ``http(s)`` URL, and its request target."""
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s) URL: {url!r}")
        port = parts.port or (443 if parts.scheme == "https" else 80)
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        return cls(parts.scheme, parts.hostname, port), target

    @property
    def host_header(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        default = 443 if self.scheme == "https" else 80
        return host if self.port == default else f"{host}:{self.port}"


class Pool:
    """Idle connections by origin; connections are made on demand, without a limit (as the
    aiohttp connector had ``limit=0``): each stream holds one for its length."""

    def __init__(self, ssl_context: ssl.SSLContext | None = None,
                 keepalive: float = KEEPALIVE_SECONDS) -> None:
        self._ssl = ssl_context
        self.keepalive = keepalive
        self._idle: dict[Hashable, list[Connection]] = {}  # by Origin
        self.connections_made = 0

    def _context(self) -> ssl.SSLContext:
        if self._ssl is None:
            self._ssl = ssl.create_default_context()
        return self._ssl

    def done(self, conn: Connection) -> None:
        """The caller is done with ``conn``'s answer: kept for reuse when it was read to its
        end over a connection that stays open, else closed (which, before the answer's end,
        tells the model to stop)."""
        if conn.reusable():
            self._release(conn)
        else:
            conn.close()

    async def request(self, url: str, head_lines: list[str], body: bytes, *,
                      connect_timeout: float, head_timeout: float) -> Connection:
        """POST ``body`` to ``url`` with the given header lines; return the connection once
        the answer's head arrived (the body not read yet; the caller hands it back with
        :meth:`done`).

        Raises ``OSError`` or ``TimeoutError`` (connecting), :class:`ClientError` (after),
        ``TimeoutError`` (no head within ``head_timeout``), :class:`InvalidHeader`,
        ``ValueError`` (not an http(s) URL)."""
        origin, target = Origin.of(url)
        lines = [f"POST {target} HTTP/1.1", f"host: {origin.host_header}",
                 f"content-length: {len(body)}", *head_lines]
        for line in lines:
            if "\r" in line or "\n" in line or "\0" in line:
                raise InvalidHeader(f"{line.split(':', 1)[0]!r} holds a line break")
        try:
            head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        except UnicodeEncodeError as exc:
            raise InvalidHeader("a header holds a character outside latin-1") from exc
        conn = self._idle_connection(origin)
        if conn is None:
            conn = await self._connect(origin, connect_timeout)
        # No retry, even when a reused connection closes before a byte of the answer: that
        # is also how a server that read the request and died looks, and a POST to a model
        # API may be billed upstream. KEEPALIVE_SECONDS keeps that race rare.
        return await self._exchange(conn, head, body, head_timeout)

    @staticmethod
    async def _exchange(conn: Connection, head: bytes, body: bytes, timeout: float
                        ) -> Connection:
        try:
            conn.send(head, body)
            async with asyncio.timeout(timeout):
                await conn.head()
        except BaseException:
            conn.close()
            raise
        return conn

    def _idle_connection(self, origin: Origin) -> Connection | None:
        idle = self._idle.get(origin)
        now = time.monotonic()
        while idle:
            conn = idle.pop()
            if (now - conn.idle_since < self.keepalive and conn.transport is not None
                    and not conn.transport.is_closing()):
                conn.recycle()
                return conn
            conn.close()
        return None

    async def _connect(self, origin: Origin, timeout: float) -> Connection:
        loop = asyncio.get_running_loop()
        tls = origin.scheme == "https"
        async with asyncio.timeout(timeout):
            _, conn = await loop.create_connection(
                lambda: Connection(origin, self.forget), origin.host, origin.port,
                ssl=self._context() if tls else None,
                server_hostname=origin.host if tls else None)
        self.connections_made += 1
        return conn

    def _release(self, conn: Connection) -> None:
        """Keep ``conn`` for reuse (its ``idle_since``: when its answer ended)."""
        idle = self._idle.setdefault(conn.origin, [])
        idle.append(conn)
        self._prune(idle, time.monotonic())

    def prune(self) -> None:
        """Close the connections idle past the keep-alive, so a burst's connections do not
        stay open (a file descriptor each) once the load is gone. Called periodically."""
        now = time.monotonic()
        for idle in self._idle.values():
            self._prune(idle, now)

    def _prune(self, idle: list[Connection], now: float) -> None:
        # Oldest first (near enough: appended as released, taken from the end; one out of
        # order is closed when taken or at a later prune).
        expired = 0
        while expired < len(idle) and now - idle[expired].idle_since >= self.keepalive:
            expired += 1
        if expired:
            for conn in idle[:expired]:
                conn.close()  # its connection_lost finds it gone already
            del idle[:expired]

    def idle(self) -> int:
        """How many connections are idle in the pool."""
        return sum(len(idle) for idle in self._idle.values())

    def forget(self, conn: Connection) -> None:
        """A connection closed: it is not idle any more."""
        idle = self._idle.get(conn.origin)
        if idle and conn in idle:
            idle.remove(conn)

    def close(self) -> None:
        for idle in self._idle.values():
            for conn in idle:
                conn.close()
        self._idle.clear()


__all__ = ["HIGH_WATER", "ClientError", "Connection", "Disconnected", "InvalidHeader",
           "MalformedResponse", "Origin", "Pool", "ReadTimeout"]
