"""Anthropic Messages: ``POST /v1/messages`` (what Claude Code speaks).

Metered text: ``text_delta.text``, ``input_json_delta.partial_json`` (tool use) and
``thinking_delta.thinking``; ``signature_delta`` carries no tokens. Usage comes from
``message_start`` (input) and ``message_delta`` (output).

No accurate offline tokenizer exists for current Claude models, so these models are configured
with the ``estimate`` tokenizer (:class:`meters.tokens.EstimateTokenizer`: one token per 3 UTF-8
bytes, rounded up per delta). The rule: **meter with the estimate while streaming, bill the
upstream's reported usage when the stream completes**. The estimate over-counts English (Claude
averages ~3.5-4 bytes per token) and rounds up per delta, so the meter never lets a stream pass
the allowance; its worst case is a cut stream that stops early, having delivered fewer real
tokens than paid for by at most the over-count (about 15-35% of the cut stream's tokens for
English text, plus up to one token per delta for the per-delta rounding). A cut stream is billed
the estimate of what it delivered (the upstream never reports usage for it), which for the
same reason is at least what the client received in real tokens.

A cut ends the open content block (``content_block_stop``), then ``message_delta`` with
``stop_reason: "max_tokens"``, ``usage.output_tokens`` = tokens delivered and the
machine-readable reason under ``tollstream``, then ``message_stop``: the stock ``anthropic``
SDK parses it as an ordinary length-capped message.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import orjson

from gateway.dialects import ErrorInfo, EventInfo, ParsedRequest, Usage
from gateway.dialects.common import (
    Field,
    bad,
    optional_bool,
    require_object,
    require_string,
    split_fields,
)
from gateway.sse import SSEEvent, encode
from meters.tokens import Tokenizer

DEFAULT_VERSION = "2023-06-01"

_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error",
                402: "billing_error", 403: "permission_error", 404: "not_found_error",
                409: "invalid_request_error", 413: "request_too_large",
                429: "rate_limit_error", 503: "overloaded_error"}

_DELTA_FIELDS = {"text_delta": "text", "input_json_delta": "partial_json",
                 "thinking_delta": "thinking"}


def _text(value: Any) -> str:
    """The countable text of a system prompt, message content or content block list."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        return "\n".join(_text(block) for block in value)
    if isinstance(value, dict):
        kind = value.get("type")
        if kind in ("text", "thinking"):
            return str(value.get("text") or value.get("thinking") or "")
        if kind == "tool_use":
            return orjson.dumps(value.get("input", {})).decode()
        if kind == "tool_result":
            return _text(value.get("content"))
    return ""


class AnthropicMessages:
    """The Anthropic Messages dialect."""

    name = "anthropic_messages"
    path = "/messages"

    def parse_request(self, body: Any) -> ParsedRequest:
        body = require_object(body)
        model = require_string(body, "model")
        max_tokens = body.get("max_tokens")
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
            bad("max_tokens", "max_tokens is required and must be a positive integer")
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            bad("messages", "messages must be a non-empty array of message objects")
        texts = [_text(body.get("system"))]
        for i, message in enumerate(messages):
            if not isinstance(message, dict) or message.get("role") not in ("user",
                                                                             "assistant"):
                bad(f"messages[{i}]", f"messages[{i}] must be an object with role "
                                      "\"user\" or \"assistant\"")
            texts.append(_text(message.get("content")))
        if body.get("tools") is not None:
            texts.append(orjson.dumps(body["tools"]).decode())
        return ParsedRequest(model=model, stream=optional_bool(body, "stream"),
                             max_output=max_tokens, wants_usage=True,
                             prompt_text="\n".join(texts),
                             prompt_overhead=5 + 3 * len(messages), body=body)

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
        usage = body.get("usage") or {}
        text = "".join(_text(block) for block in body.get("content") or [])
        return Usage(input_tokens=usage.get("input_tokens"),
                     output_tokens=usage.get("output_tokens")), text

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
        self.input_tokens: int | None = None
        self._last: dict[str, Any] | None = None
        self._last_event = "content_block_delta"
        self._fields: list[Field] = []

    def inspect(self, event: SSEEvent) -> EventInfo:
        obj = orjson.loads(event.data)
        if not isinstance(obj, dict):
            return EventInfo()
        kind = obj.get("type") or event.event
        if kind == "content_block_delta":
            delta = obj.get("delta") or {}
            key = _DELTA_FIELDS.get(delta.get("type", ""))
            if key and isinstance(delta.get(key), str) and delta[key]:
                self._last, self._last_event = obj, event.event or kind
                self._fields = [(delta, key)]
                return EventInfo(texts=[delta[key]])
            return EventInfo()
        if kind == "content_block_start":
            self.open_block = obj.get("index")
        elif kind == "content_block_stop":
            self.open_block = None
        elif kind == "message_start":
            usage = (obj.get("message") or {}).get("usage") or {}
            self.input_tokens = usage.get("input_tokens")
            return EventInfo(usage=Usage(self.input_tokens, None))
        elif kind == "message_delta":
            usage = obj.get("usage") or {}
            output = usage.get("output_tokens")
            return EventInfo(usage=Usage(usage.get("input_tokens", self.input_tokens),
                                         output if isinstance(output, int) else None),
                             final=bool((obj.get("delta") or {}).get("stop_reason")))
        elif kind == "message_stop":
            return EventInfo(final=True)
        elif kind == "error":
            error = obj.get("error") or {}
            return EventInfo(error=str(error.get("message") or "upstream error"))
        return EventInfo()

    def truncate(self, keep_tokens: int, tokenizer: Tokenizer) -> bytes | None:
        if self._last is None or keep_tokens <= 0:
            return None
        split_fields(self._fields, keep_tokens, tokenizer)
        return encode(orjson.dumps(self._last), self._last_event)

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
