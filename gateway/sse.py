"""Incremental parsing of an upstream Server-Sent Events byte stream.

Events are yielded with their original bytes so the relay forwards them untouched (no JSON
re-encode on the hot path); only the ``event`` name and ``data`` text are decoded.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass

from sse_starlette import EventSourceResponse
from starlette.types import Message, Receive, Scope, Send

#: An upstream event larger than this is a protocol error, not something to buffer forever.
MAX_EVENT_BYTES = 4 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class SSEEvent:
    """One server-sent event: its name (``None`` for the default), its data and raw bytes."""

    event: str | None
    data: str
    raw: bytes


class SSEProtocolError(ValueError):
    """The upstream sent something that is not a server-sent event stream."""


def parse_event(raw: bytes) -> SSEEvent | None:
    """Decode one event block (without its terminating blank line); None for comments only."""
    name: str | None = None
    data: list[str] = []
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise SSEProtocolError("upstream event is not UTF-8") from exc
    for line in text.splitlines():
        if not line or line.startswith(":"):
            continue
        field, _, value = line.partition(":")
        if value.startswith(" "):
            value = value[1:]
        if field == "data":
            data.append(value)
        elif field == "event":
            name = value
    if name is None and not data:
        return None
    return SSEEvent(event=name, data="\n".join(data), raw=raw.rstrip(b"\r\n") + b"\n\n")


async def iter_batches(chunks: AsyncIterator[bytes]) -> AsyncIterator[list[SSEEvent]]:
    """Split a byte stream into events, yielding the events completed by each chunk together.

    A chunk may hold thousands of events (a fast upstream read late): they are cut out by
    offset and the remainder is copied once per chunk, never once per event.
    """
    buffer = b""
    async for chunk in chunks:
        buffer = buffer + chunk if buffer else chunk
        if b"\r" in buffer:
            buffer = buffer.replace(b"\r\n", b"\n")
        start = 0
        batch: list[SSEEvent] = []
        while True:
            end = buffer.find(b"\n\n", start)
            if end < 0:
                break
            event = parse_event(buffer[start:end])
            start = end + 2
            if event is not None:
                batch.append(event)
        buffer = buffer[start:]
        if len(buffer) > MAX_EVENT_BYTES:
            raise SSEProtocolError("upstream event exceeds the maximum event size")
        if batch:
            yield batch
    if buffer.strip():
        event = parse_event(buffer)
        if event is not None:
            yield [event]


def encode(data: bytes | str, event: str | None = None) -> bytes:
    """Encode one event; ``data`` must be a single line (JSON is)."""
    payload = data.encode("utf-8") if isinstance(data, str) else data
    if event is None:
        return b"data: " + payload + b"\n\n"
    return b"event: " + event.encode("ascii") + b"\ndata: " + payload + b"\n\n"


#: Scope key under which the application's entry point keeps the server's request cycle.
CONNECTION_KEY = "tollstream.connection"


def remember_connection(scope: Scope, send: Send) -> None:
    """Record the server's request cycle (uvicorn: ``send.__self__``, which knows whether the
    client is still connected) before any middleware wraps ``send``."""
    if scope["type"] == "http":
        scope[CONNECTION_KEY] = getattr(send, "__self__", None)


class ClientGone(OSError):
    """The client closed the connection; the message was not written."""


class EventStreamResponse(EventSourceResponse):
    """sse-starlette's response, made exact about delivery.

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
    """

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        cycle = scope.get(CONNECTION_KEY) or getattr(send, "__self__", None)

        async def checked(message: Message) -> None:
            await send(message)
            if getattr(cycle, "disconnected", False):
                raise ClientGone("the client disconnected")

        await super().__call__(scope, receive, checked)
