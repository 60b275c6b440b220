"""Anthropic Messages: ``POST /v1/messages`` (what Claude Code speaks).

Metered text: ``text_delta.text``, ``input_json_delta.partial_json`` (tool use) and
``thinking_delta.thinking``; ``signature_delta`` carries no tokens. Usage comes from
``message_start`` (input) and ``message_delta`` (output). Reported input counts every prompt
token: ``input_tokens`` plus ``cache_creation_input_tokens`` and ``cache_read_input_tokens``
(Anthropic's ``input_tokens`` excludes the cached part), all at the model's input price.

No accurate offline tokenizer exists for current Claude models, so these models are configured
with the ``estimate`` tokenizer (:class:`meters.tokens.EstimateTokenizer`: one token per 3 UTF-8
bytes of the stream's running total, rounded up once). The rule: **meter the prompt at the
upstream's reported input from ``message_start`` on (before any output is granted: the hold is
re-priced, up or down), meter the output with the estimate while streaming, bill the upstream's
reported usage when the stream completes**. The estimate over-counts English (Claude averages
~3.5-4 bytes per token), so a stream it meters stops early rather than late; a cut stream is
billed the estimate of what it delivered (the upstream never reports usage for it). The worst
case, measured, is in README.md ("Billing rule").

A cut ends the open content block (``content_block_stop``), then ``message_delta`` with
``stop_reason: "max_tokens"``, ``usage.output_tokens`` = tokens delivered and the
machine-readable reason under ``tollstream``, then ``message_stop``: the stock ``anthropic``
SDK parses it as an ordinary length-capped message.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import orjson
from pydantic import StrictBool

from gateway.body import parse
from gateway.dialects import ErrorInfo, EventInfo, ParsedRequest, Usage
from gateway.dialects.common import (
    FieldRef,
    NonEmptyStr,
    PositiveInt,
    PromptEstimate,
    Wire,
    as_dict,
    as_list,
    bad,
    split_fields,
)
from gateway.sse import SSEEvent, encode
from meters.tokens import TokenCounter

DEFAULT_VERSION = "2023-06-01"

_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error",
                402: "billing_error", 403: "permission_error", 404: "not_found_error",
                409: "invalid_request_error", 413: "request_too_large",
                429: "rate_limit_error", 503: "overloaded_error"}

_DELTA_FIELDS = {"text_delta": "text", "input_json_delta": "partial_json",
                 "thinking_delta": "thinking"}


# -- the request, as far as the gateway reads it (everything else is forwarded as sent) --------

class Block(Wire):
    """A content block of any type (text, image, document, tool_use, tool_result, thinking,
    search_result, server tool blocks, ...): only its ``type`` is required."""

    type: NonEmptyStr
    text: str | None = None


class Message(Wire):
    # Any role: "user", "assistant", and "system" mid-conversation (the beta Claude Code uses).
    role: NonEmptyStr
    content: str | list[Block]


class MessagesRequest(Wire):
    model: NonEmptyStr
    max_tokens: PositiveInt
    messages: list[Message]
    system: str | list[Block] | None = None
    stream: StrictBool | None = None
    tools: list[dict[str, Any]] | None = None


class CountTokensRequest(MessagesRequest):
    max_tokens: PositiveInt = 1  # count_tokens takes no max_tokens


def _count(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


def reported_usage(usage: dict[str, Any], output: int | None = None) -> Usage:
    """The prompt the upstream reports, every part of it: Anthropic's ``input_tokens`` is
    only the uncached part; cache writes and reads come on top."""
    given = usage.get("input_tokens")
    if not isinstance(given, int) or isinstance(given, bool):
        return Usage(None, output)
    read = _count(usage.get("cache_read_input_tokens"))
    write = _count(usage.get("cache_creation_input_tokens"))
    return Usage(_count(given) + read + write, output, read, write)


class AnthropicMessages:
    """The Anthropic Messages dialect."""

    name = "anthropic_messages"
    path = "/messages"

    def parse_request(self, body: Any, *, count_only: bool = False) -> ParsedRequest:
        if not isinstance(body, dict):
            raise bad("body", "the request body must be a JSON object")
        request = parse(CountTokensRequest if count_only else MessagesRequest, body)
        if not request.messages:
            raise bad("messages", "messages must be a non-empty array of message objects")
        prompt = PromptEstimate()
        prompt.add(body.get("system"))
        prompt.add(body["messages"])
        prompt.add(body.get("tools"))
        return ParsedRequest(model=request.model, stream=bool(request.stream),
                             max_output=request.max_tokens, wants_usage=True,
                             prompt_text=prompt.text,
                             prompt_overhead=5 + 3 * len(request.messages)
                             + prompt.media_tokens, body=body)

    def upstream_body(self, request: ParsedRequest, *, model: str,
                      max_output: int | None) -> dict[str, Any]:
        body = dict(request.body)
        body["model"] = model
        if max_output is not None:
            body["max_tokens"] = max_output
        return body

    def upstream_headers(self, headers: Mapping[str, str], api_key: str | None
                         ) -> dict[str, str]:
        out = {"content-type": "application/json",
               "anthropic-version": headers.get("anthropic-version", DEFAULT_VERSION)}
        if headers.get("anthropic-beta"):
            out["anthropic-beta"] = headers["anthropic-beta"]
        if api_key:
            out["x-api-key"] = api_key
        return out

    def open_stream(self, request: ParsedRequest) -> MessagesStream:
        return MessagesStream(request)

    def response_usage(self, body: Any) -> tuple[Usage, str]:
        body = as_dict(body)
        usage = as_dict(body.get("usage"))
        estimate = PromptEstimate()
        estimate.add([block for block in as_list(body.get("content"))
                      if isinstance(block, dict) and block.get("type") != "image"])
        output = usage.get("output_tokens")
        return reported_usage(usage, output if isinstance(output, int) else None), estimate.text

    def error_body(self, info: ErrorInfo) -> dict[str, Any]:
        return {"type": "error",
                "error": {"type": _ERROR_TYPES.get(info.status, "api_error"),
                          "message": info.message},
                "tollstream": {"code": info.code, "param": info.param, **info.extra}}


class MessagesStream:
    """State of one Messages stream: the open content block and reported input usage."""

    def __init__(self, request: ParsedRequest) -> None:
        self.request = request
        self.open_block: int | None = None
        self.prompt_usage = Usage()
        self._last: dict[str, Any] | None = None
        self._last_event = "content_block_delta"
        self._fields: list[FieldRef] = []

    def inspect(self, event: SSEEvent) -> EventInfo:
        obj = orjson.loads(event.data)
        if not isinstance(obj, dict):
            return EventInfo()
        kind = obj.get("type") or event.event
        if kind == "content_block_delta":
            delta = as_dict(obj.get("delta"))
            key = _DELTA_FIELDS.get(delta.get("type") or "")
            if key and isinstance(delta.get(key), str) and delta[key]:
                self._last, self._last_event = obj, event.event or kind
                self._fields = [(delta, key)]
                return EventInfo(texts=[delta[key]])
            return EventInfo()
        if kind == "content_block_start":
            index = obj.get("index")
            self.open_block = index if isinstance(index, int) else 0
        elif kind == "content_block_stop":
            self.open_block = None
        elif kind == "message_start":
            self.prompt_usage = reported_usage(
                as_dict(as_dict(obj.get("message")).get("usage")))
            return EventInfo(usage=self.prompt_usage)
        elif kind == "message_delta":
            usage = as_dict(obj.get("usage"))
            output = usage.get("output_tokens")
            output = output if isinstance(output, int) else None
            final = reported_usage(usage, output)
            if final.input_tokens is None:  # the prompt was reported at the start only
                final = dataclasses.replace(self.prompt_usage, output_tokens=output)
            return EventInfo(usage=final,
                             final=bool(as_dict(obj.get("delta")).get("stop_reason")))
        elif kind == "message_stop":
            return EventInfo(final=True, terminal=True)
        elif kind == "error":
            error = as_dict(obj.get("error"))
            return EventInfo(error=str(error.get("message") or "upstream error"))
        return EventInfo()

    def truncate(self, keep_tokens: int, counter: TokenCounter
                 ) -> tuple[bytes, int] | None:
        if self._last is None or keep_tokens <= 0:
            return None
        kept = split_fields(self._fields, keep_tokens, counter)
        return encode(orjson.dumps(self._last), self._last_event), kept

    def cut(self, reason: Mapping[str, Any], usage: Usage) -> list[bytes]:
        events = []
        if self.open_block is not None:
            events.append(encode(orjson.dumps({"type": "content_block_stop",
                                               "index": self.open_block}),
                                 "content_block_stop"))
        events.append(encode(orjson.dumps({
            "type": "message_delta",
            "delta": {"stop_reason": "max_tokens", "stop_sequence": None},
            "usage": {"output_tokens": usage.output_tokens or 0},
            "tollstream": dict(reason)}), "message_delta"))
        events.append(encode(b'{"type":"message_stop"}', "message_stop"))
        return events

    def error(self, info: ErrorInfo) -> list[bytes]:
        body = {"type": "error", "error": {"type": _ERROR_TYPES.get(info.status, "api_error"),
                                           "message": info.message},
                "tollstream": {"code": info.code}}
        return [encode(orjson.dumps(body), "error")]
