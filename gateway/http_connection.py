"""One HTTP/1.1 client connection (:class:`Connection`): an asyncio protocol that parses the
answer with httptools in its read callback and buffers the body for its one reader, who is
woken by a future (see :mod:`gateway.http_client` for why, and for the pool around it).

The errors of the exchange are here too; ``OSError`` and ``TimeoutError`` from connecting are
left as they are.
"""

from __future__ import annotations

import asyncio
import time
import zlib
from collections.abc import Callable, Hashable
from typing import cast

import httptools

#: A reader this far behind stops the socket until it catches up.
HIGH_WATER = 256 * 1024


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


class Connection(asyncio.Protocol):
    """One connection, carrying one answer at a time. The parser's callbacks fill
    :attr:`status` and the body buffer; :meth:`take` and :meth:`wait` read it."""

    def __init__(self, origin: Hashable, on_lost: Callable[[Connection], None]) -> None:
        self.origin, self._on_lost = origin, on_lost
        self.transport: asyncio.Transport | None = None
        self.idle_since = 0.0
        self.recycle()

    def recycle(self) -> None:
        """Ready for the next exchange (a reused connection: the last one ended cleanly)."""
        loop = asyncio.get_running_loop()
        self.status = 0
        self.error: ClientError | None = None
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
        #: Takes body data in the read callback while the reader waits with nothing buffered
        #: (the relay's fast lane, gateway/feed.py): returns False to leave it to the reader.
        self.sink: Callable[[bytes], bool] | None = None

    # -- asyncio.Protocol ------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A cast, not an isinstance check: uvloop's transports (the gateway's loop) are not
        # subclasses of asyncio.Transport, though they implement it.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self.fail(MalformedResponse(f"the upstream's answer is not HTTP/1.1: {exc}"))

    def connection_lost(self, exc: Exception | None) -> None:
        self._on_lost(self)
        if self.complete or self.error is not None:
            return
        if self._head.done() and self._until_close:
            self._end()  # a close-delimited body: the close is its end
            return
        self.error = Disconnected("the upstream closed the connection before the answer ended")
        self.wake()

    # -- httptools callbacks (they must not raise: the parser would wrap it) ---------------

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name.lower(), value))

    def on_headers_complete(self) -> None:
        self.status = self._parser.get_status_code()
        if self.status < 200:  # an interim answer (103 Early Hints): the real one follows
            self._headers.clear()
            return
        # Asked now: llhttp's answer is only meaningful before the message completes.
        self._keep_alive = self._parser.should_keep_alive()
        names = {name for name, _ in self._headers}
        self._until_close = (b"content-length" not in names
                             and b"transfer-encoding" not in names
                             and self.status not in (204, 304))
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
            body = self._decoded(body)
        if body:
            waiter = self._waiter
            if (self.sink is not None and waiter is not None and not waiter.done()
                    and not self._buffer and self.sink(body)):
                return
            self._buffer.append(body)
            self._size += len(body)
            if self._size > HIGH_WATER and not self._paused and self.transport is not None:
                self._paused = True
                self.transport.pause_reading()
            self.wake()

    def on_message_complete(self) -> None:
        if self.status >= 200:  # not the end of an interim answer
            self._end()

    def _decoded(self, body: bytes, last: bool = False) -> bytes:
        """``body`` through the body's decoder (its rest when ``last``). A corrupt body fails
        the exchange (and gives ``b""``) rather than raising inside the parser's callback."""
        assert self._decoder is not None
        try:
            return self._decoder.flush() if last else self._decoder.decompress(body)
        except zlib.error as exc:
            self.fail(MalformedResponse(f"the upstream's compressed body is corrupt: {exc}"))
            return b""

    # -- the reader's side -----------------------------------------------------------------

    def _end(self) -> None:
        if self._decoder is not None:
            rest = self._decoded(b"", last=True)
            if self.error is not None:
                return
            if rest:
                self._buffer.append(rest)
                self._size += len(rest)
        self.complete = True
        # The server's idle timer starts about now, not when the reader is done with it.
        self.idle_since = time.monotonic()
        self.wake()

    def wake(self) -> None:
        """Wake the reader: data, the end or an error arrived, or a sink that took the data
        left it work."""
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
        self.wake()
        self.close()

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
        """Done with the answer and not kept for another: closed (which, before the answer's
        end, tells the model to stop)."""
        if self.transport is not None:
            self.transport.close()


__all__ = ["HIGH_WATER", "ClientError", "Connection", "Disconnected", "InvalidHeader",
           "MalformedResponse", "ReadTimeout"]
