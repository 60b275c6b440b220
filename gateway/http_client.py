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

Errors are its own (:class:`ClientError` and subclasses, or ``OSError`` / ``TimeoutError``
from connecting); :mod:`gateway.upstream` turns them into the gateway's.
"""

from __future__ import annotations

import asyncio
import ssl
import time
import zlib
from dataclasses import dataclass
from urllib.parse import urlsplit

import httptools

#: A reader this far behind stops the socket until it catches up.
HIGH_WATER = 256 * 1024
#: An idle connection older than this is closed rather than reused: below the 5 s after which
#: uvicorn and Node servers close idle connections, so the gateway does not send on a
#: connection such a server is closing (nginx keeps them 75 s, Cloudflare longer).
KEEPALIVE_SECONDS = 4.0


class ClientError(Exception):
    """The exchange failed after the connection was made."""


class Disconnected(ClientError):
    """The connection closed (or was closed) before the answer ended."""


class MalformedResponse(ClientError):
    """The upstream's bytes are not an HTTP/1.1 answer this client reads."""


class ReadTimeout(ClientError):
    """The reader gave up waiting for the body (see ``gateway.upstream``'s read watch)."""


class InvalidHeader(ValueError):
    """A header this client will not send: a line break in it, or outside latin-1."""


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


class Connection(asyncio.Protocol):
    """One connection, carrying one answer at a time. The parser's callbacks fill
    :attr:`status` and the body buffer; :meth:`take` and :meth:`wait` read it."""

    def __init__(self, pool: Pool, origin: Origin) -> None:
        self.pool, self.origin = pool, origin
        self.transport: asyncio.Transport | None = None
        self.status = 0
        self.error: ClientError | None = None
        self.idle_since = 0.0
        self._reset()

    def _reset(self) -> None:
        loop = asyncio.get_running_loop()
        self.status = 0
        self.complete = False
        self._parser = httptools.HttpResponseParser(self)
        self._headers: list[tuple[bytes, bytes]] = []
        self._head: asyncio.Future[None] = loop.create_future()
        self._buffer: list[bytes] = []
        self._size = 0
        self._waiter: asyncio.Future[None] | None = None
        self._paused = False
        self._decoder: zlib._Decompress | None = None
        self._until_close = False  # the body ends when the connection does
        self._keep_alive = False

    # -- asyncio.Protocol ------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self.fail(MalformedResponse(f"the upstream's answer is not HTTP/1.1: {exc}"))
        except zlib.error as exc:  # raised by on_body, through the parser
            self.fail(MalformedResponse(f"the upstream's compressed body is corrupt: {exc}"))

    def connection_lost(self, exc: Exception | None) -> None:
        self.pool.forget(self)
        if self.complete or self.error is not None:
            return
        if self._head.done() and self._until_close:
            self._end()  # a close-delimited body: the close is its end
            return
        self.error = Disconnected("the upstream closed the connection before the answer ended")
        self._wake()

    # -- httptools callbacks (they must not raise: the parser would wrap it) ---------------

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name.lower(), value))

    def on_headers_complete(self) -> None:
        self.status = self._parser.get_status_code()
        # Asked now: llhttp's answer is only meaningful before the message completes.
        self._keep_alive = self._parser.should_keep_alive()
        names = {name for name, _ in self._headers}
        self._until_close = (b"content-length" not in names
                             and b"transfer-encoding" not in names
                             and self.status not in (204, 304) and self.status >= 200)
        for name, value in self._headers:
            if name == b"content-encoding":
                coding = value.strip().lower()
                if coding in (b"gzip", b"x-gzip", b"deflate"):
                    self._decoder = zlib.decompressobj(47)  # gzip or zlib, by its header
                elif coding not in (b"", b"identity"):
                    self.fail(MalformedResponse(
                        f"the upstream's body is encoded {value.decode('latin-1')!r}"))
                    return
        if not self._head.done():
            self._head.set_result(None)

    def on_body(self, body: bytes) -> None:
        if self.error is not None:
            return  # failed: nothing more is read
        if self._decoder is not None:
            body = self._decoder.decompress(body)
        if body:
            self._buffer.append(body)
            self._size += len(body)
            if self._size > HIGH_WATER and not self._paused and self.transport is not None:
                self._paused = True
                self.transport.pause_reading()
            self._wake()

    def on_message_complete(self) -> None:
        self._end()

    # -- the reader's side -----------------------------------------------------------------

    def _end(self) -> None:
        if self._decoder is not None:
            rest = self._decoder.flush()
            if rest:
                self._buffer.append(rest)
                self._size += len(rest)
        self.complete = True
        self._wake()

    def _wake(self) -> None:
        if not self._head.done():
            if self.error is not None:
                self._head.set_exception(self.error)
                self._head.exception()  # retrieved: a caller that stopped waiting is fine
            else:
                self._head.set_result(None)
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            if not waiter.done():
                waiter.set_result(None)

    def fail(self, error: ClientError) -> None:
        """End the exchange with ``error`` and close the connection."""
        if self.error is None and not self.complete:
            self.error = error
        self._wake()
        if self.transport is not None:
            self.transport.close()

    def send(self, head: bytes, body: bytes) -> None:
        assert self.transport is not None
        self.transport.write(head + body)

    async def head(self) -> None:
        """Wait for the answer's status line and headers."""
        await self._head

    def ready(self) -> bool:
        """Whether :meth:`take` has something to say: data, the end, or an error."""
        return bool(self._buffer) or self.complete or self.error is not None

    def take(self) -> bytes:
        """What arrived since the last take (``b""`` when nothing did)."""
        if not self._buffer:
            return b""
        data = self._buffer[0] if len(self._buffer) == 1 else b"".join(self._buffer)
        self._buffer.clear()
        self._size = 0
        if self._paused and self.transport is not None:
            self._paused = False
            self.transport.resume_reading()
        return data

    async def wait(self) -> None:
        """Until :meth:`ready`."""
        if self.ready():
            return
        self._waiter = asyncio.get_running_loop().create_future()
        await self._waiter

    def reusable(self) -> bool:
        return (self.complete and self.error is None and not self._buffer
                and self._keep_alive and not self._until_close
                and self.transport is not None and not self.transport.is_closing())

    def close(self) -> None:
        """Done with the answer: back to the pool when it was read to its end over a
        connection that stays open, else closed (which tells the model to stop)."""
        if self.reusable():
            self.pool.release(self)
        elif self.transport is not None:
            self.transport.close()

    def recycle(self) -> None:
        self._reset()


class Pool:
    """Idle connections by origin; connections are made on demand, without a limit (as the
    aiohttp connector had ``limit=0``): each stream holds one for its length."""

    def __init__(self, ssl_context: ssl.SSLContext | None = None,
                 keepalive: float = KEEPALIVE_SECONDS) -> None:
        self._ssl = ssl_context
        self.keepalive = keepalive
        self._idle: dict[Origin, list[Connection]] = {}
        self.connections_made = 0

    def _context(self) -> ssl.SSLContext:
        if self._ssl is None:
            self._ssl = ssl.create_default_context()
        return self._ssl

    async def request(self, url: str, head_lines: list[str], body: bytes, *,
                      connect_timeout: float, head_timeout: float) -> Connection:
        """POST ``body`` to ``url`` with the given header lines; return the connection once
        the answer's head arrived (the body not read yet; the caller closes it).

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
            if conn.transport is not None:
                conn.transport.close()
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
            if conn.transport is not None:
                conn.transport.close()
        return None

    async def _connect(self, origin: Origin, timeout: float) -> Connection:
        loop = asyncio.get_running_loop()
        tls = origin.scheme == "https"
        async with asyncio.timeout(timeout):
            _, conn = await loop.create_connection(
                lambda: Connection(self, origin), origin.host, origin.port,
                ssl=self._context() if tls else None,
                server_hostname=origin.host if tls else None)
        self.connections_made += 1
        return conn

    def release(self, conn: Connection) -> None:
        conn.idle_since = time.monotonic()
        self._idle.setdefault(conn.origin, []).append(conn)

    def forget(self, conn: Connection) -> None:
        """A connection closed: it is not idle any more."""
        idle = self._idle.get(conn.origin)
        if idle and conn in idle:
            idle.remove(conn)

    def close(self) -> None:
        for idle in self._idle.values():
            for conn in idle:
                if conn.transport is not None:
                    conn.transport.close()
        self._idle.clear()


__all__ = ["ClientError", "Connection", "Disconnected", "InvalidHeader", "MalformedResponse",
           "Origin", "Pool", "ReadTimeout"]
