"""OpenAI Chat Completions: ``POST /v1/chat/completions``.

Metered text: ``delta.content``, ``delta.refusal``, ``delta.reasoning_content`` (servers that
stream reasoning) and ``delta.tool_calls[].function.arguments``. The gateway always asks the
upstream for usage (``stream_options.include_usage``) and hides the final usage chunk from
clients that did not ask for it. A cut ends with a chunk whose ``finish_reason`` is
``"length"`` and which carries a ``tollstream`` object (the machine-readable reason), then the
usage chunk if the client asked for usage, then ``data: [DONE]``: the stock ``openai`` SDK
parses it as an ordinary length-capped completion.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import orjson

from gateway.dialects import ErrorInfo, EventInfo, ParsedRequest, Usage
from gateway.dialects.common import (
    Field,
    bad,
    bearer_headers,
    optional_bool,
    optional_positive_int,
    require_object,
    require_string,
    split_fields,
)
from gateway.sse import SSEEvent, encode
from meters.tokens import Tokenizer

_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error",
                402: "payment_required", 404: "invalid_request_error",
                409: "invalid_request_error", 413: "invalid_request_error"}


def _content_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(part.get("text", "") for part in content
                       if isinstance(part, dict) and isinstance(part.get("text"), str))
    return ""


class OpenAIChat:
    """The Chat Completions dialect."""

    name = "openai_chat"
    path = "/chat/completions"

    def parse_request(self, body: Any) -> ParsedRequest:
        body = require_object(body)
        model = require_string(body, "model")
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            bad("messages", "messages must be a non-empty array of message objects")
        texts: list[str] = []
        for i, message in enumerate(messages):
            if not isinstance(message, dict) or not isinstance(message.get("role"), str):
                bad(f"messages[{i}]", f"messages[{i}] must be an object with a role")
            texts.append(_content_text(message.get("content")))
            for call in message.get("tool_calls") or []:
                if isinstance(call, dict) and isinstance(call.get("function"), dict):
                    texts.append(str(call["function"].get("arguments", "")))
        if body.get("tools") is not None:
            texts.append(orjson.dumps(body["tools"]).decode())
        stream = optional_bool(body, "stream")
        n = body.get("n")
        if n is not None and n != 1:
            bad("n", "n must be 1: tollstream meters one choice per request")
        max_tokens = optional_positive_int(body, "max_completion_tokens")
        if max_tokens is None:
            max_tokens = optional_positive_int(body, "max_tokens")
        options = body.get("stream_options")
        if options is not None and not isinstance(options, dict):
            bad("stream_options", "stream_options must be an object")
        wants_usage = bool(options and options.get("include_usage") is True)
        return ParsedRequest(model=model, stream=stream, max_output=max_tokens,
                             wants_usage=wants_usage, prompt_text="\n".join(texts),
                             prompt_overhead=3 + 3 * len(messages), body=body)

    def upstream_body(self, request: ParsedRequest, *, model: str,
                      max_output: int | None) -> dict[str, Any]:
        body = dict(request.body)
        body["model"] = model
        if request.stream:
            body["stream_options"] = {**(body.get("stream_options") or {}),
                                      "include_usage": True}
        if max_output is not None:
            key = "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"
            body[key] = max_output
        return body

    def upstream_headers(self, headers: Mapping[str, str], api_key: str | None
                         ) -> dict[str, str]:
        return bearer_headers(api_key)

    def open_stream(self, request: ParsedRequest) -> ChatStream:
        return ChatStream(request)

    def response_usage(self, body: Any) -> tuple[Usage, str]:
        texts: list[str] = []
        for choice in body.get("choices") or []:
            message = choice.get("message") or {}
            texts.append(_content_text(message.get("content")))
            for call in message.get("tool_calls") or []:
                texts.append((call.get("function") or {}).get("arguments") or "")
        return _usage(body.get("usage")), "".join(texts)

    def error_body(self, info: ErrorInfo) -> dict[str, Any]:
        return {"error": {"message": info.message,
                          "type": _ERROR_TYPES.get(info.status, "api_error"),
                          "param": info.param, "code": info.code, **info.extra}}


def _usage(raw: Any) -> Usage:
    if not isinstance(raw, dict):
        return Usage()
    prompt, completion = raw.get("prompt_tokens"), raw.get("completion_tokens")
    return Usage(input_tokens=prompt if isinstance(prompt, int) else None,
                 output_tokens=completion if isinstance(completion, int) else None)


class ChatStream:
    """State of one chat completion stream."""

    def __init__(self, request: ParsedRequest) -> None:
        self.request = request
        self.id = "chatcmpl-tollstream"
        self.model = request.model
        self.created = int(time.time())
        self._last: dict[str, Any] | None = None
        self._fields: list[Field] = []

    def inspect(self, event: SSEEvent) -> EventInfo:
        if event.data == "[DONE]":
            return EventInfo(final=True)
        obj = orjson.loads(event.data)
        if not isinstance(obj, dict):
            return EventInfo()
        if "error" in obj:
            error = obj["error"]
            message = error.get("message") if isinstance(error, dict) else str(error)
            return EventInfo(error=str(message or "upstream error"))
        self._last = obj
        self.id = obj.get("id", self.id)
        self.model = obj.get("model", self.model)
        self.created = obj.get("created", self.created)
        info = EventInfo()
        fields: list[Field] = []
        choices = obj.get("choices") or []
        for choice in choices:
            delta = choice.get("delta") or {}
            for key in ("content", "refusal", "reasoning_content"):
                if isinstance(delta.get(key), str) and delta[key]:
                    fields.append((delta, key))
            for call in delta.get("tool_calls") or []:
                function = call.get("function") or {}
                if isinstance(function.get("arguments"), str) and function["arguments"]:
                    fields.append((function, "arguments"))
            if choice.get("finish_reason"):
                info.final = True
        self._fields = fields
        info.texts = [container[key] for container, key in fields]
        if obj.get("usage"):
            info.usage = _usage(obj["usage"])
            # The usage chunk the gateway asked for on the client's behalf stays hidden.
            info.forward = bool(choices) or self.request.wants_usage
        return info

    def truncate(self, keep_tokens: int, tokenizer: Tokenizer) -> bytes | None:
        if self._last is None or keep_tokens <= 0:
            return None
        split_fields(self._fields, keep_tokens, tokenizer)
        return encode(orjson.dumps(self._last))

    def _chunk(self, choices: list[dict[str, Any]], **extra: Any) -> bytes:
        obj: dict[str, Any] = {"id": self.id, "object": "chat.completion.chunk",
                               "created": self.created, "model": self.model,
                               "choices": choices}
        if self.request.wants_usage:
            obj["usage"] = None
        obj.update(extra)
        return encode(orjson.dumps(obj))

    def cut(self, reason: Mapping[str, Any], usage: Usage) -> list[bytes]:
        events = [self._chunk([{"index": 0, "delta": {}, "logprobs": None,
                                "finish_reason": "length"}], tollstream=dict(reason))]
        if self.request.wants_usage:
            prompt, completion = usage.input_tokens or 0, usage.output_tokens or 0
            events.append(self._chunk([], usage={"prompt_tokens": prompt,
                                                 "completion_tokens": completion,
                                                 "total_tokens": prompt + completion}))
        events.append(b"data: [DONE]\n\n")
        return events

    def error(self, info: ErrorInfo) -> list[bytes]:
        body = {"error": {"message": info.message, "type": _ERROR_TYPES.get(info.status,
                                                                              "api_error"),
                          "code": info.code, **info.extra}}
        return [encode(orjson.dumps(body))]
