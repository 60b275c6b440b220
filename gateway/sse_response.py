"""The SSE response the gateway streams to its clients: exact about delivery, lean per send.

sse-starlette's ``EventSourceResponse`` (headers, HEAD, pings, shutdown), with the per-chunk
loop and the tasks around it replaced for their cost (benchmarks/RESULTS.md, #13 item 4), and
each send checked so that a message is either written or raises :class:`ClientGone`.
"""

from __future__ import annotations

import asyncio
import logging
import weakref
from datetime import UTC, datetime
from typing import Any

import anyio
from sse_starlette import EventSourceResponse
from sse_starlette.event import ServerSentEvent, ensure_bytes
from starlette.types import Message, Receive, Scope, Send

log = logging.getLogger("sse_starlette.sse")  # sse-starlette's, for its own messages

#: Seconds into a stream at which its disconnect and ping watcher starts (see
#: :meth:`EventStreamResponse._serve`).
WATCH_AFTER = 0.1


#: Scope key under which the application's entry point keeps the server's request cycle.
CONNECTION_KEY = "tollstream.connection"
#: Scope key under which it keeps the ``send`` it was handed, before any middleware wraps it.
SERVER_SEND_KEY = "tollstream.server_send"


def remember_connection(scope: Scope, send: Send) -> None:
    """Record the server's request cycle (uvicorn: ``send.__self__``, which knows whether the
    client is still connected) and the ``send`` the application was handed, before any
    middleware wraps it."""
    if scope["type"] == "http":
        scope[CONNECTION_KEY] = getattr(send, "__self__", None)
        scope[SERVER_SEND_KEY] = send


class ClientGone(OSError):
    """The client closed the connection; the message was not written."""


def _body_send(scope: Scope) -> Send | None:
    """The ``send`` a body chunk can go to directly, skipping the middleware's wrappers; None
    when some wrapper might need to see the body.

    Measured (py-spy, 64 paced one-token streams): each body chunk went through four
    wrappers (the delivery check, Starlette's exception handler, its error middleware, the
    request-id header) and sse-starlette's per-send timeout scope, about 5% of the gateway's
    CPU beside the write itself (benchmarks/RESULTS.md, #13 item 4). The wrappers of
    Starlette's own stack and the request-id one act on the ``http.response.start`` message
    only (which still goes through them all); a middleware added to the application could act
    on bodies (compression), so then nothing is skipped.
    """
    send = scope.get(SERVER_SEND_KEY)
    app = scope.get("app")
    if send is None or getattr(app, "user_middleware", None) != []:
        return None
    return send


class DirectWriter:
    """The client's connection, for body chunks written from outside the response's task:
    the relay's fast lane writes plain paid events from the upstream's read callback
    (gateway/feed.py) instead of waking the stream's task to ``send`` them.

    It writes to uvicorn's httptools request cycle as that cycle's ``send`` would (one chunk
    of the chunked body per write), so it is attached only to that server's cycles, once the
    response's head is out, and detached before the body ends. Elsewhere (another server,
    middleware that wants the body) it is never attached and every chunk goes through
    ``send``.
    """

    __slots__ = ("_cycle",)

    def __init__(self) -> None:
        self._cycle: Any = None

    def attach(self, cycle: object) -> None:
        """Write to ``cycle`` from now on, if it is a uvicorn httptools cycle sending a
        chunked body."""
        if (type(cycle).__module__ == "uvicorn.protocols.http.httptools_impl"
                and getattr(cycle, "chunked_encoding", None) is True
                and getattr(cycle, "response_started", False)
                and not getattr(cycle, "response_complete", True)):
            self._cycle = cycle

    def detach(self) -> None:
        self._cycle = None

    def ready(self) -> bool:
        """Whether a chunk written now is delivered as ``send`` would deliver it: attached,
        the client still connected, and its socket not backed up (``send`` would wait for it
        to drain; the chunk is left to the task, which does)."""
        cycle = self._cycle
        return (cycle is not None and not cycle.disconnected and not cycle.flow.write_paused
                and not cycle.transport.is_closing())

    def write(self, body: bytes) -> None:
        """One non-empty body chunk (after :meth:`ready`), framed as uvicorn frames it."""
        self._cycle.transport.write(b"%x\r\n%b\r\n" % (len(body), body))


class EventStreamResponse(EventSourceResponse):
    """sse-starlette's response, made exact about delivery, with a lean send per chunk.

    uvicorn silently drops messages sent after the client disconnected, so a generator pushing
    a fast upstream would keep "sending" (and the meter would keep billing) until the
    disconnect listener got a turn. Here each send is checked: uvicorn sets ``disconnected``
    before it drops a message and never after writing one, so a message is either written or
    raises :class:`ClientGone`, and the generator is closed at the ``yield`` of the first
    message that did not reach the client. Servers without that flag fall back to
    sse-starlette's disconnect listener.

    The flag lives on uvicorn's request cycle, the object whose ``send`` uvicorn hands the
    application. Starlette wraps ``send`` before a response sees it, so the application's
    entry point records the cycle in the scope (:func:`remember_connection`).

    Headers, HEAD and the behaviour are sse-starlette's; two parts are replaced for their
    cost. The per-chunk loop (:meth:`_stream_response`): one ``send`` per chunk, without a
    timeout scope when no ``send_timeout`` was asked for, straight to the server's ``send``
    when no middleware could want the body (:func:`_body_send`). And the tasks around it
    (:meth:`_serve`): the stream runs in the request's own task, one watcher task listens
    for the disconnect and sends the pings, one listener per event loop cancels the streams
    at shutdown. With a ``send_timeout`` or a ``data_sender_callable``, sse-starlette's
    ``__call__`` serves the response unchanged.
    """

    _cycle: object = None
    _direct: Send | None = None
    #: True while nothing but the stream itself can send (:meth:`_serve` before its watcher
    #: starts): the last message then needs no lock against the pings.
    _alone = False

    def __init__(self, *args: Any, writer: DirectWriter | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        #: Attached to the client's connection once the head is sent, when body chunks may
        #: skip ``send`` (:func:`_body_send`); the relay's fast lane writes through it.
        self._writer = writer

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        cycle = scope.get(CONNECTION_KEY) or getattr(send, "__self__", None)
        self._cycle = cycle
        self._direct = _body_send(scope) if scope["type"] == "http" else None

        async def checked(message: Message) -> None:
            await send(message)
            # The end of the body is not checked: every event was written, and a client that
            # stops reading at ``[DONE]`` (the SDKs do) is not an error to log.
            if getattr(cycle, "disconnected", False) and message.get("more_body", True):
                raise ClientGone("the client disconnected")

        if (scope["type"] != "http" or scope["method"].upper() == "HEAD"
                or self.send_timeout is not None or self.data_sender_callable is not None):
            await super().__call__(scope, receive, checked)
            return
        await self._serve(receive, checked)

    async def _serve(self, receive: Receive, send: Send) -> None:
        """sse-starlette's four tasks in one: the stream runs in the request's own task, and
        a single watcher task listens for the client's disconnect and sends the pings.

        Measured (py-spy, one-token requests): sse-starlette's ``__call__`` spawns four anyio
        tasks in a task group per response (the stream, pings, the shutdown listener, the
        disconnect listener) and registers an event with its shutdown watcher, a large share
        of the gateway's CPU per request (benchmarks/RESULTS.md, #13 item 4). The semantics
        are kept: a disconnect or a server shutdown cancels the stream (its generator is
        closed and settles), a ping goes out every ``ping`` seconds under the send lock.

        The watcher starts :data:`WATCH_AFTER` seconds into the stream: most answers are over
        by then, and need no task at all. Until then a disconnect is noticed at the next send
        (each is checked), or when the watcher starts.
        """
        loop = asyncio.get_running_loop()
        watcher: asyncio.Task[None] | None = None
        with anyio.CancelScope() as stop:

            def watch() -> None:
                nonlocal watcher
                self._alone = False
                watcher = loop.create_task(self._watch(receive, send, stop))

            self._alone = True
            later = loop.call_later(WATCH_AFTER, watch)
            live = _cancel_on_shutdown(stop)
            try:
                await self._stream_response(send)
            finally:
                later.cancel()
                live.discard(stop)
                if watcher is not None:
                    watcher.cancel()
        if self.background is not None:
            await self.background()

    async def _watch(self, receive: Receive, send: Send, stop: anyio.CancelScope) -> None:
        """Until the client disconnects (then the stream is cancelled): pings, if asked."""
        interval = self.ping_interval
        try:
            while True:
                try:
                    if interval > 0:
                        async with asyncio.timeout(interval):
                            message = await receive()
                    else:
                        message = await receive()
                except TimeoutError:
                    await self._send_ping(send)
                    continue
                if message["type"] == "http.disconnect":
                    self.active = False
                    if self.client_close_handler_callable:
                        await self.client_close_handler_callable(message)
                    break
        except OSError:
            pass  # a ping the client did not take (ClientGone): it is gone
        stop.cancel()

    async def _send_ping(self, send: Send) -> None:
        ping = (self.ping_message_factory() if self.ping_message_factory else
                ServerSentEvent(comment=f"ping - {datetime.now(UTC)}", sep=self.sep))
        async with self._send_lock:
            if self.active:
                await send({"type": "http.response.body", "body": ensure_bytes(ping, self.sep),
                            "more_body": True})

    async def _stream_response(self, send: Send) -> None:
        """sse-starlette's loop (``send`` is the checked one), one ``send`` per chunk."""
        if self.send_timeout is not None:
            # A deadline per send was asked for: sse-starlette's path keeps it.
            await super()._stream_response(send)
            return
        await send({"type": "http.response.start", "status": self.status_code,
                    "headers": self.raw_headers})
        direct, cycle, sep = self._direct, self._cycle, self.sep
        writer = self._writer if direct is not None else None
        if writer is not None:
            writer.attach(cycle)
        try:
            await self._send_chunks(send, direct, cycle, sep)
        finally:
            if writer is not None:
                writer.detach()
        end = {"type": "http.response.body", "body": b"", "more_body": False}
        if self._alone:
            # No watcher, so no ping to wait for: anyio's lock would cost a loop turn (its
            # acquire yields) on every request. A watcher started meanwhile finds the
            # response inactive and sends nothing. The end of the body is not checked for
            # delivery (see ``checked``): it can skip the wrappers too.
            self.active = False
            await (send if direct is None else direct)(end)
            return
        async with self._send_lock:
            self.active = False
            await send(end)

    async def _send_chunks(self, send: Send, direct: Send | None, cycle: object,
                           sep: str) -> None:
        """Every chunk of the body but its end, each ``send`` checked for delivery."""
        async for data in self.body_iterator:
            try:
                # The relay yields bytes; anything else is encoded as sse-starlette would.
                chunk = data if type(data) is bytes else ensure_bytes(data, sep)
                message = {"type": "http.response.body", "body": chunk, "more_body": True}
                if direct is None:
                    await send(message)
                else:
                    await direct(message)
                    if getattr(cycle, "disconnected", False):
                        raise ClientGone("the client disconnected")
            except BaseException:
                # As sse-starlette does: the iterator is suspended at its ``yield``; close it
                # (its clean-up settles the bill for what was delivered) before the error
                # escapes, within the cleanup deadline.
                await self._close_iterator()
                raise

    async def _close_iterator(self) -> None:
        aclose = getattr(self.body_iterator, "aclose", None)
        if aclose is None:
            return
        with anyio.move_on_after(self._cleanup_timeout, shield=True) as scope:
            try:
                await aclose()
            except Exception:
                log.exception(
                    "Error closing body iterator after encoding or send failure")
        if scope.cancel_called:
            log.warning(
                "Body iterator cleanup cancelled after %s seconds", self._cleanup_timeout)



#: Per event loop, the cancel scopes of the streams being served: cancelled all at once when
#: the server begins to shut down (sse-starlette's ``AppStatus``), as sse-starlette's
#: per-response shutdown listener did, with one listener per loop instead of one per response.
_LIVE: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, set[anyio.CancelScope]] = (
    weakref.WeakKeyDictionary())
_LISTENERS: set[asyncio.Task[None]] = set()  # strong references: the loop keeps weak ones


def _cancel_on_shutdown(scope: anyio.CancelScope) -> set[anyio.CancelScope]:
    """Cancel ``scope`` when the server shuts down; the set to discard it from when done."""
    loop = asyncio.get_running_loop()
    live = _LIVE.get(loop)
    if live is None:
        live = _LIVE[loop] = set()
        listener = loop.create_task(_cancel_at_shutdown(loop, live))
        _LISTENERS.add(listener)
        listener.add_done_callback(_LISTENERS.discard)
    live.add(scope)
    return live


async def _cancel_at_shutdown(loop: asyncio.AbstractEventLoop,
                              live: set[anyio.CancelScope]) -> None:
    try:
        await EventSourceResponse._listen_for_exit_signal()
    finally:
        # The next stream on this loop starts a listener of its own (which returns at once
        # while the server is still shutting down: that stream is cancelled too).
        if _LIVE.get(loop) is live:
            del _LIVE[loop]
    for scope in list(live):
        scope.cancel()
