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

import re
import time
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
    bearer_headers,
    split_fields,
    text_of,
)
from gateway.sse import SSEEvent, encode
from meters.tokens import TokenCounter

_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error",
                402: "payment_required", 404: "invalid_request_error",
                409: "invalid_request_error", 413: "invalid_request_error",
                429: "rate_limit_error"}


# -- the request, as far as the gateway reads it (everything else is forwarded as sent) --------

class ContentPart(Wire):
    type: NonEmptyStr
    text: str | None = None


class FunctionCall(Wire):
    name: str | None = None
    arguments: str | None = None


class ToolCall(Wire):
    function: FunctionCall | None = None


class Message(Wire):
    # Any role: system, developer, user, assistant, tool, function, and whatever comes next.
    role: NonEmptyStr
    content: str | list[ContentPart] | None = None
    tool_calls: list[ToolCall] | None = None


class StreamOptions(Wire):
    include_usage: StrictBool | None = None


class ChatRequest(Wire):
    model: NonEmptyStr
    messages: list[Message]
    stream: StrictBool | None = None
    stream_options: StreamOptions | None = None
    n: PositiveInt | None = None
    max_tokens: PositiveInt | None = None
    max_completion_tokens: PositiveInt | None = None
    tools: list[dict[str, Any]] | None = None


class OpenAIChat:
    """The Chat Completions dialect."""

    name = "openai_chat"
    path = "/chat/completions"

    def parse_request(self, body: Any) -> ParsedRequest:
        if not isinstance(body, dict):
            raise bad("body", "the request body must be a JSON object")
        request = parse(ChatRequest, body)
        if not request.messages:
            raise bad("messages", "messages must be a non-empty array of message objects")
        if request.n is not None and request.n != 1:
            raise bad("n", "n must be 1: tollstream meters one choice per request")
        prompt = PromptEstimate()
        prompt.add(body["messages"])
        prompt.add(body.get("tools"))
        options = request.stream_options
        return ParsedRequest(
            model=request.model, stream=bool(request.stream),
            max_output=request.max_completion_tokens or request.max_tokens,
            wants_usage=bool(options and options.include_usage),
            prompt_text=prompt.text,
            prompt_overhead=3 + 3 * len(request.messages) + prompt.media_tokens, body=body)

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
        for choice in as_list(as_dict(body).get("choices")):
            message = as_dict(as_dict(choice).get("message"))
            texts += text_of(message.get("content"))
            for call in as_list(message.get("tool_calls")):
                texts += text_of(as_dict(as_dict(call).get("function")).get("arguments"))
        return _usage(as_dict(body).get("usage")), "".join(texts)

    def error_body(self, info: ErrorInfo) -> dict[str, Any]:
        return {"error": {"message": info.message,
                          "type": _ERROR_TYPES.get(info.status, "api_error"),
                          "param": info.param, "code": info.code, **info.extra}}


def openai_usage(raw: Any, prompt_key: str, output_key: str) -> Usage:
    """OpenAI's usage: the prompt count includes its cached part
    (``*_tokens_details.cached_tokens``)."""
    if not isinstance(raw, dict):
        return Usage()
    prompt, completion = raw.get(prompt_key), raw.get(output_key)
    prompt = prompt if isinstance(prompt, int) and not isinstance(prompt, bool) else None
    cached = as_dict(raw.get(f"{prompt_key}_details")).get("cached_tokens")
    cached = cached if isinstance(cached, int) and 0 < cached <= (prompt or 0) else 0
    return Usage(input_tokens=prompt,
                 output_tokens=completion if isinstance(completion, int) else None,
                 cache_read_tokens=cached)


def _usage(raw: Any) -> Usage:
    return openai_usage(raw, "prompt_tokens", "completion_tokens")


#: A JSON string without escapes (its text is its value) and one with them.
_PLAIN = r'[^"\\\x00-\x1f]*'
# (runs of plain characters between escapes: no alternation per character)
_TEXT = r'[^"\\\x00-\x1f]*(?:\\(?:["\\/bfnrt]|u[0-9a-fA-F]{4})[^"\\\x00-\x1f]*)*'
#: The chunk nearly every event of a stream is: one choice, content only, nothing final, as
#: OpenAI (and the simulator) write it, byte for byte (no spaces, this key order). Only valid
#: JSON matches, and what :meth:`ChatStream.inspect` learns from a match is what parsing it
#: gives (tests/test_fast_path.py compares both); any other event, tool calls, usage, a finish
#: reason, several choices, other keys or spacing, is parsed in full.
_CONTENT_CHUNK = re.compile(
    r'\{"id":"(' + _PLAIN + r')","object":"chat\.completion\.chunk",'
    r'"created":(0|[1-9][0-9]{0,15}),"model":"(' + _PLAIN + r')"'
    r'(?:,"(?:service_tier|system_fingerprint)":(?:"' + _PLAIN + r'"|null))*'
    r',"choices":\[\{"index":0,"delta":\{(?:"role":"assistant",)?"content":"(' + _TEXT + r')"'
    r'(?:,"refusal":null)?\},"logprobs":null,"finish_reason":null\}\]'
    r'(?:,"usage":null)?(?:,"obfuscation":"' + _PLAIN + r'")?\}')


class ChatStream:
    """State of one chat completion stream."""

    def __init__(self, request: ParsedRequest) -> None:
        self.request = request
        self.id = "chatcmpl-tollstream"
        self.model = request.model
        self.created = int(time.time())
        self._last: dict[str, Any] | None = None
        self._fields: list[FieldRef] = []
        #: The last event when it took the fast path: parsed only if it is truncated.
        self._unparsed: str | None = None

    def inspect(self, event: SSEEvent) -> EventInfo:
        data = event.data
        if data == "[DONE]":
            return EventInfo(final=True, terminal=True)
        match = _CONTENT_CHUNK.fullmatch(data)
        if match is not None:
            text = match[4]
            if "\\" in text:
                try:
                    text = orjson.loads(f'"{text}"')
                except ValueError:  # e.g. a lone surrogate: let the full parse decide
                    return self._parsed(orjson.loads(data))
            # What the full parse would note; the object itself only if it is truncated.
            self.id, self.created, self.model = match[1], int(match[2]), match[3]
            self._unparsed = data
            return EventInfo(texts=[text] if text else [])
        return self._parsed(orjson.loads(data))

    def _parsed(self, obj: Any) -> EventInfo:
        """What a parsed event says (the full path)."""
        if not isinstance(obj, dict):
            return EventInfo()
        if "error" in obj:
            error = obj["error"]
            message = error.get("message") if isinstance(error, dict) else str(error)
            return EventInfo(error=str(message or "upstream error"))
        self._last = obj
        self._unparsed = None
        self.id = obj.get("id", self.id)
        self.model = obj.get("model", self.model)
        self.created = obj.get("created", self.created)
        info = EventInfo()
        fields: list[FieldRef] = []
        choices = as_list(obj.get("choices"))
        for choice in choices:
            choice = as_dict(choice)
            delta = as_dict(choice.get("delta"))
            for key in ("content", "refusal", "reasoning_content"):
                if isinstance(delta.get(key), str) and delta[key]:
                    fields.append((delta, key))
            for call in as_list(delta.get("tool_calls")):
                function = as_dict(as_dict(call).get("function"))
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

    def truncate(self, keep_tokens: int, counter: TokenCounter
                 ) -> tuple[bytes, int] | None:
        if self._unparsed is not None:
            # The fast path skipped the object; parsing it now sets what the full path
            # would have set then (the id, model and created it noted are its own).
            self._parsed(orjson.loads(self._unparsed))
        if self._last is None or keep_tokens <= 0:
            return None
        kept = split_fields(self._fields, keep_tokens, counter)
        return encode(orjson.dumps(self._last)), kept

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
