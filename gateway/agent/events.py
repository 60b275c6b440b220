"""Server-sent events as bytes, for the agent side: split a byte stream into whole events
(forwarded byte for byte) and pick out the gateway's payment control events, which the
agent's SDK must never see (the ``openai`` SDK parses every event's data as a chunk)."""

from __future__ import annotations

from typing import Any

import orjson


class EventSplitter:
    """Incremental splitter: feed it chunks, get back the complete events (each with its
    blank-line terminator, ``\\n\\n`` or ``\\r\\n\\r\\n``, exactly as received)."""

    def __init__(self) -> None:
        self.buffer = b""

    def feed(self, chunk: bytes) -> list[bytes]:
        self.buffer += chunk
        events: list[bytes] = []
        while True:
            end, size = self.buffer.find(b"\n\n"), 2
            crlf = self.buffer.find(b"\r\n\r\n")
            if crlf >= 0 and (end < 0 or crlf < end):
                end, size = crlf, 4
            if end < 0:
                return events
            events.append(self.buffer[:end + size])
            self.buffer = self.buffer[end + size:]

    def rest(self) -> bytes:
        """What is left after the last complete event (a stream cut mid-event)."""
        rest, self.buffer = self.buffer, b""
        return rest


def is_payment_control(event: bytes) -> bool:
    """A gateway event meant for a payment client (``event: payment-...``, or the
    ``: tollstream payment-...`` comment of a paused stream), not for the agent's SDK."""
    for line in event.splitlines():
        if line.startswith(b": tollstream payment") or line.startswith(b"event: payment-"):
            return True
    return False


def payment_event(event: bytes) -> tuple[str, dict[str, Any]] | None:
    """``(name, data)`` of an ``event: payment-...`` event (its JSON data), else None."""
    name = None
    data: list[bytes] = []
    for line in event.splitlines():
        if line.startswith(b"event:"):
            name = line[6:].strip().decode("utf-8", "replace")
        elif line.startswith(b"data:"):
            data.append(line[5:].removeprefix(b" "))
    if name is None or not name.startswith("payment-"):
        return None
    try:
        parsed = orjson.loads(b"\n".join(data))
    except orjson.JSONDecodeError:
        return None
    return (name, parsed) if isinstance(parsed, dict) else None
