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
from gateway.dialects.openai_chat import OpenAIChat
from gateway.sse import SSEEvent, encode
from meters.tokens import Tokenizer

_METERED = {"response.output_text.delta", "response.function_call_arguments.delta",
            "response.refusal.delta", "response.reasoning_text.delta",
            "response.reasoning_summary_text.delta"}


def _input_text(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        return "\n".join(_input_text(item) for item in value)
    if isinstance(value, dict):
        parts = [value.get(k) for k in ("text", "arguments", "output")]
        texts = [p for p in parts if isinstance(p, str)]
        texts.append(_input_text(value.get("content")))
        return "\n".join(t for t in texts if t)
    return ""


class OpenAIResponses:
    """The Responses dialect."""

    name = "openai_responses"
    path = "/responses"

    def parse_request(self, body: Any) -> ParsedRequest:
        body = require_object(body)
        model = require_string(body, "model")
        given = body.get("input")
        if not (isinstance(given, str) and given) and not (isinstance(given, list) and given):
            bad("input", "input is required: a string or a non-empty array of input items")
        texts = [_input_text(body.get("instructions")), _input_text(given)]
        if body.get("tools") is not None:
            texts.append(orjson.dumps(body["tools"]).decode())
        items = len(given) if isinstance(given, list) else 1
        return ParsedRequest(model=model, stream=optional_bool(body, "stream"),
                             max_output=optional_positive_int(body, "max_output_tokens"),
                             wants_usage=True, prompt_text="\n".join(texts),
                             prompt_overhead=3 + 3 * items, body=body)

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
        for item in body.get("output") or []:
            if item.get("type") == "function_call":
                texts.append(item.get("arguments") or "")
            for part in item.get("content") or []:
                texts.append(part.get("text") or "")
        return _usage(body.get("usage")), "".join(texts)

    def error_body(self, info: ErrorInfo) -> dict[str, Any]:
        return _CHAT.error_body(info)


_CHAT = OpenAIChat()


def _usage(raw: Any) -> Usage:
    if not isinstance(raw, dict):
        return Usage()
    given, produced = raw.get("input_tokens"), raw.get("output_tokens")
    return Usage(given if isinstance(given, int) else None,
                 produced if isinstance(produced, int) else None)


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
        self._fields: list[Field] = []
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
            self.response = dict(obj.get("response") or self.response)
        elif kind == "response.output_item.added":
            item = copy.deepcopy(obj.get("item") or {})
            if item.get("type") == "function_call":
                item["arguments"] = ""
            self.items[obj.get("output_index", 0)] = item
        elif kind == "response.content_part.added":
            index, content_index = obj.get("output_index", 0), obj.get("content_index", 0)
            self.open_parts[index] = content_index
            parts = self.items.setdefault(index, {"type": "message"}).setdefault("content", [])
            part = dict(obj.get("part") or {"type": "output_text", "text": ""})
            if content_index < len(parts):
                parts[content_index] = part
            else:
                parts.append(part)
        elif kind == "response.content_part.done":
            self.open_parts.pop(obj.get("output_index", 0), None)
        elif kind == "response.output_item.done":
            self.done.add(obj.get("output_index", 0))
        elif kind in ("response.completed", "response.incomplete"):
            return EventInfo(usage=_usage((obj.get("response") or {}).get("usage")),
                             final=True)
        elif kind in ("response.failed", "error"):
            error = (obj.get("response") or {}).get("error") or obj
            return EventInfo(error=str(error.get("message") or "upstream error"))
        return EventInfo()

    def _commit(self, chars: int) -> None:
        """Record the first ``chars`` of the pending delta as delivered."""
        obj, text = self._last, self._pending[:chars]
        self._pending = ""
        if obj is None or not text:
            return
        item = self.items.setdefault(obj.get("output_index", 0), {"type": "message"})
        if obj.get("type") == "response.function_call_arguments.delta":
            item["arguments"] = item.get("arguments", "") + text
        elif obj.get("type") == "response.output_text.delta":
            parts = item.setdefault("content", [])
            index = obj.get("content_index", 0)
            while len(parts) <= index:
                parts.append({"type": "output_text", "text": "", "annotations": []})
            parts[index]["text"] = parts[index].get("text", "") + text

    def truncate(self, keep_tokens: int, tokenizer: Tokenizer) -> bytes | None:
        if self._last is None or keep_tokens <= 0:
            return None
        split_fields(self._fields, keep_tokens, tokenizer)
        self._commit(len(self._last["delta"]))
        return encode(orjson.dumps(self._last), self._last.get("type"))

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
            elif index in self.open_parts:
                content_index = self.open_parts[index]
                part = item.get("content", [])[content_index]
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
