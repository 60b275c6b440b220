"""Dialects: everything that differs between model APIs, behind one interface.

A dialect parses the client's request, shapes the upstream request, reads the upstream's
events (which text to meter, what usage it reports, whether it finished), truncates an event at
a token boundary, writes the clean terminal events of a cut, and renders errors in its API's
own shape. The meter, the ledger and the payment rails never look inside a dialect's JSON.

Adding a dialect is one new module with a :class:`Dialect` and a line in :data:`DIALECTS`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from gateway.sse import SSEEvent
from meters.rates import Prompt
from meters.tokens import TokenCounter


@dataclass(frozen=True, slots=True)
class ParsedRequest:
    """What the gateway needs to know about a client request."""

    model: str
    stream: bool
    max_output: int | None
    wants_usage: bool
    prompt_text: str
    prompt_overhead: int
    body: dict[str, Any]


@dataclass(frozen=True, slots=True)
class Usage:
    """Token usage as the upstream reported it (``None``: not reported).

    ``input_tokens`` counts every prompt token; ``cache_read_tokens`` and
    ``cache_write_tokens`` are the parts of it the upstream read from or wrote to its prompt
    cache (priced apart when the model's rate says so).
    """

    input_tokens: int | None = None
    output_tokens: int | None = None
    cache_read_tokens: int = 0
    cache_write_tokens: int = 0

    @property
    def prompt(self) -> Prompt | None:
        """The reported prompt by price class, None if the prompt was not reported."""
        if self.input_tokens is None:
            return None
        cached = self.cache_read_tokens + self.cache_write_tokens
        return Prompt(max(self.input_tokens - cached, 0), self.cache_read_tokens,
                      self.cache_write_tokens)


@dataclass(slots=True)
class EventInfo:
    """What the relay learns from one upstream event.

    ``texts``: the generated text in it (content, tool-call arguments, reasoning) to meter;
    ``usage``: usage it reports; ``final``: the upstream declares the response complete;
    ``terminal``: the protocol's last event (``[DONE]``, ``message_stop``,
    ``response.completed``): the relay settles the bill before sending it, so a client that
    saw the end of the stream sees a settled ledger; ``error``: the upstream reports a failure
    (message); ``forward``: False to hide it.
    """

    texts: list[str] = field(default_factory=list)
    usage: Usage | None = None
    final: bool = False
    terminal: bool = False
    error: str | None = None
    forward: bool = True


@dataclass(frozen=True, slots=True)
class ErrorInfo:
    """An error to render in a dialect's shape."""

    status: int
    code: str
    message: str
    param: str | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)


class DialectStream(Protocol):
    """Per-stream state of a dialect (open content blocks, ids, sequence numbers)."""

    def inspect(self, event: SSEEvent) -> EventInfo:
        """Read one upstream event."""
        ...

    def truncate(self, keep_tokens: int, counter: TokenCounter) -> tuple[bytes, int] | None:
        """Re-encode the last inspected event keeping at most its first ``keep_tokens``
        tokens (as ``counter``, which measured it, counts them); returns the event and the
        tokens it kept (a cut on a token boundary may keep fewer), None if nothing is kept."""
        ...

    def cut(self, reason: Mapping[str, Any], usage: Usage) -> list[bytes]:
        """The events that end the stream cleanly after a cut, carrying ``reason`` and the
        usage actually delivered; the last one is the protocol's end marker."""
        ...

    def error(self, info: ErrorInfo) -> list[bytes]:
        """The events that end the stream after a failure (upstream or ledger)."""
        ...


class Dialect(Protocol):
    """One model API."""

    name: str
    #: Upstream path, appended to the upstream's base URL.
    path: str

    def parse_request(self, body: Any) -> ParsedRequest:
        """Validate the client's JSON; raise :class:`gateway.errors.BadRequest`."""
        ...

    def upstream_body(self, request: ParsedRequest, *, model: str,
                      max_output: int | None) -> dict[str, Any]:
        """The JSON to send upstream (usage reporting on, model renamed, output capped)."""
        ...

    def upstream_headers(self, headers: Mapping[str, str], api_key: str | None
                         ) -> dict[str, str]:
        """Headers for the upstream call (auth with the operator's key, version headers)."""
        ...

    def open_stream(self, request: ParsedRequest) -> DialectStream:
        ...

    def response_usage(self, body: Any) -> tuple[Usage, str]:
        """Usage and generated text of a non-streaming response."""
        ...

    def error_body(self, info: ErrorInfo) -> dict[str, Any]:
        ...


def get_dialect(name: str) -> Dialect:
    """The dialect called ``name`` (as in the model configuration)."""
    return DIALECTS[name]


def _registry() -> dict[str, Dialect]:
    from gateway.dialects.anthropic_messages import AnthropicMessages
    from gateway.dialects.openai_chat import OpenAIChat
    from gateway.dialects.openai_responses import OpenAIResponses

    return {"openai_chat": OpenAIChat(), "anthropic_messages": AnthropicMessages(),
            "openai_responses": OpenAIResponses()}


DIALECTS: dict[str, Dialect] = _registry()
