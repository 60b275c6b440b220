"""Incremental parsing of an upstream Server-Sent Events byte stream.

Events are yielded with their original bytes so the relay forwards them untouched (no JSON
re-encode on the hot path); only the ``event`` name and ``data`` text are decoded.
"""

from __future__ import annotations

from dataclasses import dataclass

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
    if raw.startswith(b"data: ") and b"\n" not in raw and b"\r" not in raw:
        # The common shape (one data line, no event name), without the line-by-line walk.
        try:
            return SSEEvent(event=None, data=raw[6:].decode("utf-8"), raw=raw + b"\n\n")
        except UnicodeDecodeError as exc:
            raise SSEProtocolError("upstream event is not UTF-8") from exc
    name: str | None = None
    data: list[str] = []
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise SSEProtocolError("upstream event is not UTF-8") from exc
    # Lines end at CR, LF or CRLF only (the SSE grammar), not at every line boundary
    # str.splitlines knows: JSON strings may hold U+2028, U+2029 and U+0085 unescaped.
    for line in text.replace("\r\n", "\n").replace("\r", "\n").split("\n"):
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


class EventSplitter:
    """Cuts a byte stream into events, chunk by chunk, holding an unfinished event between
    chunks.

    A chunk may hold thousands of events (a fast upstream read late): they are cut out by
    offset and the remainder is copied once per chunk, never once per event. A chunk that
    breaks the stream (an event that is not UTF-8, or one past :data:`MAX_EVENT_BYTES`)
    still gives the events before it; :attr:`error` then says why nothing follows.
    """

    __slots__ = ("buffer", "error")

    def __init__(self) -> None:
        self.buffer = b""
        self.error: SSEProtocolError | None = None

    def feed(self, chunk: bytes) -> list[SSEEvent]:
        """The events ``chunk`` completes (none while an event is unfinished, none once
        :attr:`error` is set)."""
        if self.error is not None:
            return []
        buffer = self.buffer + chunk if self.buffer else chunk
        if b"\r" in buffer:
            buffer = buffer.replace(b"\r\n", b"\n")
        start = 0
        batch: list[SSEEvent] = []
        while True:
            end = buffer.find(b"\n\n", start)
            if end < 0:
                break
            try:
                event = parse_event(buffer[start:end])
            except SSEProtocolError as exc:
                self.error, self.buffer = exc, b""
                return batch
            start = end + 2
            if event is not None:
                batch.append(event)
        self.buffer = buffer[start:]
        if len(self.buffer) > MAX_EVENT_BYTES:
            self.error = SSEProtocolError("upstream event exceeds the maximum event size")
            self.buffer = b""
        return batch

    def finish(self) -> list[SSEEvent]:
        """At the end of the stream: the last event, if it was not terminated."""
        buffer, self.buffer = self.buffer, b""
        if not buffer.strip() or self.error is not None:
            return []
        try:
            event = parse_event(buffer)
        except SSEProtocolError as exc:
            self.error = exc
            return []
        return [] if event is None else [event]


def encode(data: bytes | str, event: str | None = None) -> bytes:
    """Encode one event; ``data`` must be a single line (JSON is)."""
    payload = data.encode("utf-8") if isinstance(data, str) else data
    if event is None:
        return b"data: " + payload + b"\n\n"
    return b"event: " + event.encode("ascii") + b"\ndata: " + payload + b"\n\n"
