"""OpenAI Responses: ``POST /v1/responses`` (what Codex speaks).

Metered text: ``response.output_text.delta``, ``response.function_call_arguments.delta``,
``response.refusal.delta`` and reasoning text/summary deltas when the upstream streams them.
Usage comes from the terminal ``response.completed`` / ``response.incomplete`` event; its
``output_tokens`` includes reasoning tokens that were not streamed, which the billing rule bills
from the reported usage.

A cut closes what is open the way the API does (``response.output_text.done``,
``response.content_part.done`` / ``response.function_call_arguments.done``, then
``response.output_item.done``, each carrying exactly the delivered text), then ends with
``response.incomplete`` whose response has ``incomplete_details.reason: "max_output_tokens"``,
the delivered usage, and the machine-readable reason under ``tollstream``.
"""

from __future__ import annotations

import copy
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
from gateway.dialects.openai_chat import OpenAIChat, openai_usage
from gateway.sse import SSEEvent, encode
from meters.tokens import TokenCounter

_METERED = {"response.output_text.delta", "response.function_call_arguments.delta",
            "response.refusal.delta", "response.reasoning_text.delta",
            "response.reasoning_summary_text.delta", "response.custom_tool_call_input.delta"}


# -- the request, as far as the gateway reads it (everything else is forwarded as sent) --------

class InputItem(Wire):
    """An input item of any type (message with any role, function_call(_output), reasoning,
    custom tool calls, item references, ...): only its own declared fields are checked."""

    type: str | None = None
    role: str | None = None
    content: str | list[dict[str, Any]] | None = None


class ResponsesRequest(Wire):
    model: NonEmptyStr
    input: str | list[InputItem] | None = None
    instructions: str | None = None
    stream: StrictBool | None = None
    max_output_tokens: PositiveInt | None = None
    tools: list[dict[str, Any]] | None = None
    previous_response_id: str | None = None


class OpenAIResponses:
    """The Responses dialect."""

    name = "openai_responses"
    path = "/responses"

    def parse_request(self, body: Any) -> ParsedRequest:
        if not isinstance(body, dict):
            raise bad("body", "the request body must be a JSON object")
        request = parse(ResponsesRequest, body)
        # input may be left out when the conversation lives upstream (previous_response_id,
        # conversation) or in a stored prompt; otherwise there is nothing to answer.
        if not request.input and not any(body.get(k) for k in (
                "previous_response_id", "conversation", "prompt")):
            raise bad("input", "input is required: a string or a non-empty array of input "
                               "items")
        prompt = PromptEstimate()
        prompt.add(body.get("instructions"))
        prompt.add(body.get("input"))
        prompt.add(body.get("tools"))
        items = len(request.input) if isinstance(request.input, list) else 1
        return ParsedRequest(model=request.model, stream=bool(request.stream),
                             max_output=request.max_output_tokens, wants_usage=True,
                             prompt_text=prompt.text,
                             prompt_overhead=3 + 3 * items + prompt.media_tokens, body=body)

    def upstream_body(self, request: ParsedRequest, *, model: str,
                      max_output: int | None) -> dict[str, Any]:
        body = dict(request.body)
        body["model"] = model
        if max_output is not None:
            body["max_output_tokens"] = max_output
        return body

    def upstream_headers(self, headers: Mapping[str, str], api_key: str | None
                         ) -> dict[str, str]:
        return bearer_headers(api_key)

    def open_stream(self, request: ParsedRequest) -> ResponsesStream:
        return ResponsesStream(request)

    def response_usage(self, body: Any) -> tuple[Usage, str]:
        texts: list[str] = []
        for item in as_list(as_dict(body).get("output")):
            item = as_dict(item)
            if isinstance(item.get("arguments"), str):
                texts.append(item["arguments"])
            texts += text_of(item.get("content"))
        return _usage(as_dict(body).get("usage")), "".join(texts)

    def error_body(self, info: ErrorInfo) -> dict[str, Any]:
        return _CHAT.error_body(info)


_CHAT = OpenAIChat()


def _usage(raw: Any) -> Usage:
    return openai_usage(raw, "input_tokens", "output_tokens")


def _index(obj: dict[str, Any], key: str) -> int:
    """An output/content index from an upstream event (0 when absent or malformed)."""
    value = obj.get(key)
    return value if isinstance(value, int) and 0 <= value < 1 << 16 else 0


class ResponsesStream:
    """State of one Responses stream: the response snapshot, open items, delivered text."""

    def __init__(self, request: ParsedRequest) -> None:
        self.request = request
        self.response: dict[str, Any] = {"id": "resp_tollstream", "object": "response",
                                         "model": request.model, "output": []}
        self.sequence = 0
        self.items: dict[int, dict[str, Any]] = {}   # output_index -> item (delivered text)
        self.open_parts: dict[int, int] = {}         # output_index -> open content_index
        self.done: set[int] = set()
        self._last: dict[str, Any] | None = None
        self._fields: list[FieldRef] = []
        self._pending = ""  # the last metered delta, until it is known to be delivered

    def inspect(self, event: SSEEvent) -> EventInfo:
        # The relay only asks about the next event once the previous one was delivered.
        self._commit(len(self._pending))
        obj = orjson.loads(event.data)
        if not isinstance(obj, dict):
            return EventInfo()
        kind = obj.get("type") or event.event or ""
        if isinstance(obj.get("sequence_number"), int):
            self.sequence = obj["sequence_number"]
        if kind in _METERED and isinstance(obj.get("delta"), str) and obj["delta"]:
            self._last, self._fields, self._pending = obj, [(obj, "delta")], obj["delta"]
            return EventInfo(texts=[obj["delta"]])
        if kind in ("response.created", "response.in_progress"):
            self.response = dict(as_dict(obj.get("response")) or self.response)
        elif kind == "response.output_item.added":
            item = copy.deepcopy(as_dict(obj.get("item")))
            # Only delivered text goes into a cut's closing events.
            if item.get("type") == "function_call":
                item["arguments"] = ""
            elif item.get("type") == "custom_tool_call":
                item["input"] = ""
            self.items[_index(obj, "output_index")] = item
        elif kind == "response.content_part.added":
            index, content_index = _index(obj, "output_index"), _index(obj, "content_index")
            self.open_parts[index] = content_index
            parts = self._parts(index)
            part = dict(as_dict(obj.get("part")) or {"type": "output_text", "text": ""})
            if content_index < len(parts):
                parts[content_index] = part
            else:
                parts.append(part)
        elif kind == "response.content_part.done":
            self.open_parts.pop(_index(obj, "output_index"), None)
        elif kind == "response.output_item.done":
            self.done.add(_index(obj, "output_index"))
        elif kind in ("response.completed", "response.incomplete"):
            return EventInfo(usage=_usage(as_dict(obj.get("response")).get("usage")),
                             final=True, terminal=True)
        elif kind in ("response.failed", "error"):
            error = as_dict(as_dict(obj.get("response")).get("error")) or obj
            return EventInfo(error=str(error.get("message") or "upstream error"))
        return EventInfo()

    def _parts(self, index: int) -> list[Any]:
        item = self.items.setdefault(index, {"type": "message"})
        if not isinstance(item.get("content"), list):
            item["content"] = []
        parts: list[Any] = item["content"]
        return parts

    def _commit(self, chars: int) -> None:
        """Record the first ``chars`` of the pending delta as delivered."""
        obj, text = self._last, self._pending[:chars]
        self._pending = ""
        if obj is None or not text:
            return
        index = _index(obj, "output_index")
        if obj.get("type") == "response.function_call_arguments.delta":
            item = self.items.setdefault(index, {"type": "function_call"})
            item["arguments"] = str(item.get("arguments") or "") + text
        elif obj.get("type") == "response.custom_tool_call_input.delta":
            item = self.items.setdefault(index, {"type": "custom_tool_call"})
            item["input"] = str(item.get("input") or "") + text
        elif obj.get("type") == "response.output_text.delta":
            parts = self._parts(index)
            content_index = _index(obj, "content_index")
            while len(parts) <= content_index:
                parts.append({"type": "output_text", "text": "", "annotations": []})
            part = parts[content_index] = as_dict(parts[content_index])
            part["text"] = str(part.get("text") or "") + text

    def truncate(self, keep_tokens: int, counter: TokenCounter
                 ) -> tuple[bytes, int] | None:
        if self._last is None or keep_tokens <= 0:
            return None
        kept = split_fields(self._fields, keep_tokens, counter)
        self._commit(len(self._last["delta"]))
        return encode(orjson.dumps(self._last), self._last.get("type")), kept

    def _event(self, kind: str, **data: Any) -> bytes:
        self.sequence += 1
        return encode(orjson.dumps({"type": kind, "sequence_number": self.sequence, **data}),
                      kind)

    def cut(self, reason: Mapping[str, Any], usage: Usage) -> list[bytes]:
        events: list[bytes] = []
        for index, item in sorted(self.items.items()):
            if index in self.done:
                continue
            item["status"] = "incomplete"
            item_id = item.get("id", "")
            if item.get("type") == "function_call":
                events.append(self._event("response.function_call_arguments.done",
                                          item_id=item_id, output_index=index,
                                          arguments=item.get("arguments", "")))
            elif item.get("type") == "custom_tool_call":
                events.append(self._event("response.custom_tool_call_input.done",
                                          item_id=item_id, output_index=index,
                                          input=item.get("input", "")))
            elif index in self.open_parts and self.open_parts[index] < len(self._parts(index)):
                content_index = self.open_parts[index]
                part = as_dict(self._parts(index)[content_index])
                events.append(self._event("response.output_text.done", item_id=item_id,
                                          output_index=index, content_index=content_index,
                                          text=part.get("text", ""), logprobs=[]))
                events.append(self._event("response.content_part.done", item_id=item_id,
                                          output_index=index, content_index=content_index,
                                          part=part))
            events.append(self._event("response.output_item.done", output_index=index,
                                      item=item))
        given, produced = usage.input_tokens or 0, usage.output_tokens or 0
        response = {**self.response, "status": "incomplete",
                    "incomplete_details": {"reason": "max_output_tokens"},
                    "output": [item for _, item in sorted(self.items.items())],
                    "usage": {"input_tokens": given,
                              "input_tokens_details": {"cached_tokens": 0},
                              "output_tokens": produced,
                              "output_tokens_details": {"reasoning_tokens": 0},
                              "total_tokens": given + produced}}
        events.append(self._event("response.incomplete", response=response,
                                  tollstream=dict(reason)))
        return events

    def error(self, info: ErrorInfo) -> list[bytes]:
        # The "error" key makes the openai SDK raise APIError, as for a failed upstream.
        return [self._event("error", code=info.code, message=info.message, param=None,
                            error={"message": info.message, "code": info.code})]
