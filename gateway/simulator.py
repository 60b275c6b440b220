"""A simulated model API: OpenAI Chat Completions, OpenAI Responses, Anthropic Messages.

Deterministic and offline, it is the upstream of the demo, the tests and the benchmarks. Output
token ``i`` of every response is ``WORDS[i % len(WORDS)]``: each entry is a single
``o200k_base`` token, and any run of them re-encodes to exactly one token per entry, so a delta
of k entries counts as k tokens however the stream is chunked.

Per-request behaviour, through headers (tests use them): ``x-sim-output-tokens`` (length when
the request sets no maximum), ``x-sim-tokens-per-second``, ``x-sim-tokens-per-chunk``,
``x-sim-fail-after: N`` (abort after N tokens with the API's error event),
``x-sim-no-usage: 1``, ``x-sim-tool-call: 1`` (stream a tool call's arguments instead of text;
the arguments are ``{"q": "<text>"}``, whose pieces are ``{"q": "``, the text tokens, ``"}``:
the text tokens plus 2 framing tokens by the o200k count of each delta),
``x-sim-reasoning-tokens: N`` (reported, not streamed), ``x-sim-thinking: 1`` (Anthropic: a
thinking block first, N = 8 thinking tokens, counted in ``output_tokens``).

``GET /sim/stats`` counts streams started / completed / failed / cancelled (the client went
away: the monotonic time it was noticed is recorded) and the SHA-256 of the last API key seen.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import orjson
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from gateway.sse import EventStreamResponse
from meters.tokens import get_tokenizer

WORDS = (" the", " quick", " brown", " fox", " jumps", " over", " a", " lazy", " dog", ",",
         " and", " then", " it", " runs", " far", " away", " into", " green", " hills", ".",
         " every", " morning", " birds", " sing", " while", " rivers", " flow", " past",
         " old", " stone", " bridges", ".")
THINKING_TOKENS = 8


@dataclass(frozen=True)
class SimConfig:
    """Defaults of the simulated model; headers override them per request."""

    tokens_per_second: float = 0.0  # 0: as fast as possible (burst)
    tokens_per_chunk: int = 1
    default_output_tokens: int = 256
    api_key: str | None = None


@dataclass
class SimStats:
    streams_started: int = 0
    streams_completed: int = 0
    streams_failed: int = 0
    streams_cancelled: int = 0
    tokens_emitted: int = 0
    cancellations: list[dict[str, Any]] = field(default_factory=list)
    last_key_sha256: str | None = None


@dataclass(frozen=True)
class Plan:
    """What one request will generate."""

    output: int
    capped: bool
    rate: float
    per_chunk: int
    fail_after: int | None
    usage: bool
    tool: bool
    reasoning: int
    thinking: bool
    input_tokens: int


class SimError(Exception):
    def __init__(self, status: int, kind: str, message: str) -> None:
        super().__init__(message)
        self.status, self.kind, self.message = status, kind, message


def text_of(start: int, count: int) -> str:
    return "".join(WORDS[(start + i) % len(WORDS)] for i in range(count))


def _int_header(request: Request, name: str, default: int | None) -> int | None:
    value = request.headers.get(name)
    return int(value) if value is not None and value.isdigit() else default


def _flatten(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        return " ".join(_flatten(v) for v in value)
    if isinstance(value, dict):
        return " ".join(_flatten(v) for k, v in value.items() if k in ("text", "content",
                                                                      "input", "system"))
    return ""


def create_app(config: SimConfig) -> FastAPI:
    """The simulator as an ASGI app."""
    app = FastAPI(title="tollstream upstream simulator", docs_url=None, redoc_url=None)
    stats = SimStats()
    o200k = get_tokenizer("o200k_base")
    app.state.stats = stats

    def error(api: str, exc: SimError) -> Response:
        if api == "anthropic":
            body: dict[str, Any] = {"type": "error", "error": {"type": exc.kind,
                                                               "message": exc.message}}
        else:
            body = {"error": {"message": exc.message, "type": exc.kind, "code": exc.kind}}
        return JSONResponse(body, status_code=exc.status)

    async def prepare(request: Request, api: str) -> tuple[dict[str, Any], Plan]:
        key = request.headers.get("x-api-key")
        auth = request.headers.get("authorization", "")
        if auth.lower().startswith("bearer "):
            key = auth[7:]
        if key:
            stats.last_key_sha256 = hashlib.sha256(key.encode()).hexdigest()
        if config.api_key and key != config.api_key:
            raise SimError(401, "authentication_error", "invalid upstream API key")
        try:
            body = orjson.loads(await request.body())
        except orjson.JSONDecodeError as exc:
            raise SimError(400, "invalid_request_error", "body is not JSON") from exc
        if not isinstance(body, dict) or not isinstance(body.get("model"), str):
            raise SimError(400, "invalid_request_error", "model is required")
        if api == "anthropic":
            limit = body.get("max_tokens")
            if not isinstance(limit, int):
                raise SimError(400, "invalid_request_error", "max_tokens: Field required")
            prompt = _flatten(body.get("system")) + _flatten(body.get("messages"))
        elif api == "responses":
            limit = body.get("max_output_tokens")
            prompt = _flatten(body.get("instructions")) + _flatten(body.get("input"))
        else:
            limit = body.get("max_completion_tokens") or body.get("max_tokens")
            prompt = _flatten(body.get("messages"))
        wanted = _int_header(request, "x-sim-output-tokens", config.default_output_tokens)
        assert wanted is not None
        output = min(wanted, limit) if isinstance(limit, int) else wanted
        rate = request.headers.get("x-sim-tokens-per-second")
        wants_usage = api != "chat" or bool((body.get("stream_options") or {})
                                            .get("include_usage"))
        plan = Plan(output=output, capped=isinstance(limit, int) and limit <= wanted,
                    rate=float(rate) if rate else config.tokens_per_second,
                    per_chunk=max(1, _int_header(request, "x-sim-tokens-per-chunk",
                                                 config.tokens_per_chunk) or 1),
                    fail_after=_int_header(request, "x-sim-fail-after", None),
                    usage=wants_usage and request.headers.get("x-sim-no-usage") != "1",
                    tool=request.headers.get("x-sim-tool-call") == "1",
                    reasoning=_int_header(request, "x-sim-reasoning-tokens", 0) or 0,
                    thinking=api == "anthropic" and request.headers.get("x-sim-thinking")
                    == "1",
                    input_tokens=o200k.count(prompt))
        return body, plan

    async def pieces(plan: Plan) -> AsyncIterator[str | None]:
        """The output text in chunks, paced; None where the upstream fails."""
        delay = plan.per_chunk / plan.rate if plan.rate > 0 else 0.0
        sent = 0
        while sent < plan.output:
            if plan.fail_after is not None and sent >= plan.fail_after:
                yield None
                return
            n = min(plan.per_chunk, plan.output - sent)
            if plan.fail_after is not None:
                n = min(n, plan.fail_after - sent)
            # Even in burst mode, yield to the loop so a disconnect is noticed.
            await asyncio.sleep(delay)
            yield text_of(sent, n)
            sent += n
            stats.tokens_emitted += n

    def stream(events: AsyncIterator[bytes]) -> EventStreamResponse:
        async def tracked() -> AsyncIterator[bytes]:
            stats.streams_started += 1
            finished = False
            try:
                async for event in events:
                    yield event
                finished = True
            finally:
                if not finished:
                    stats.streams_cancelled += 1
                    stats.cancellations.append({"at": time.monotonic()})
                    del stats.cancellations[:-100]
        return EventStreamResponse(tracked(), ping=0, sep="\n")

    def sse(data: Any, event: str | None = None) -> bytes:
        head = f"event: {event}\n".encode() if event else b""
        return head + b"data: " + orjson.dumps(data) + b"\n\n"

    # -- OpenAI chat ------------------------------------------------------------------------
    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        try:
            body, plan = await prepare(request, "chat")
        except SimError as exc:
            return error("chat", exc)
        rid, model, created = f"chatcmpl-sim{stats.streams_started}", body["model"], 1700000000
        reasoning = plan.reasoning
        usage = {"prompt_tokens": plan.input_tokens,
                 "completion_tokens": plan.output + reasoning,
                 "total_tokens": plan.input_tokens + plan.output + reasoning,
                 "completion_tokens_details": {"reasoning_tokens": reasoning}}
        finish = "tool_calls" if plan.tool else "length" if plan.capped else "stop"
        if not body.get("stream"):
            message: dict[str, Any] = {"role": "assistant", "content": text_of(0, plan.output)}
            if plan.tool:
                message = {"role": "assistant", "content": None, "tool_calls": [{
                    "id": "call_sim", "type": "function", "function": {
                        "name": "search", "arguments": orjson.dumps(
                            {"q": text_of(0, plan.output)}).decode()}}]}
            return JSONResponse({"id": rid, "object": "chat.completion", "created": created,
                                 "model": model, "choices": [{"index": 0, "message": message,
                                                              "finish_reason": finish}],
                                 "usage": usage})
        extra = {"usage": None} if plan.usage else {}

        def chunk(delta: dict[str, Any], reason: str | None = None) -> bytes:
            return sse({"id": rid, "object": "chat.completion.chunk", "created": created,
                        "model": model, "choices": [{"index": 0, "delta": delta,
                                                     "logprobs": None,
                                                     "finish_reason": reason}], **extra})

        async def events() -> AsyncIterator[bytes]:
            yield chunk({"role": "assistant", "content": "" if not plan.tool else None})
            if plan.tool:
                yield chunk({"tool_calls": [{"index": 0, "id": "call_sim", "type": "function",
                                             "function": {"name": "search",
                                                          "arguments": '{"q": "'}}]})
            async for piece in pieces(plan):
                if piece is None:
                    stats.streams_failed += 1
                    yield sse({"error": {"message": "simulated upstream failure",
                                         "type": "server_error", "code": "sim_failure"}})
                    return
                if plan.tool:
                    yield chunk({"tool_calls": [{"index": 0, "function": {
                        "arguments": piece}}]})
                else:
                    yield chunk({"content": piece})
            if plan.tool:
                yield chunk({"tool_calls": [{"index": 0, "function": {"arguments": '"}'}}]})
            yield chunk({}, finish)
            if plan.usage:
                yield sse({"id": rid, "object": "chat.completion.chunk", "created": created,
                           "model": model, "choices": [], "usage": usage})
            yield b"data: [DONE]\n\n"
            stats.streams_completed += 1

        return stream(events())

    # -- OpenAI Responses --------------------------------------------------------------------
    @app.post("/v1/responses")
    async def responses(request: Request) -> Response:
        try:
            body, plan = await prepare(request, "responses")
        except SimError as exc:
            return error("responses", exc)
        rid = f"resp_sim{stats.streams_started}"
        item = "fc_sim" if plan.tool else "msg_sim"
        usage = {"input_tokens": plan.input_tokens, "input_tokens_details": {"cached_tokens": 0},
                 "output_tokens": plan.output + plan.reasoning,
                 "output_tokens_details": {"reasoning_tokens": plan.reasoning},
                 "total_tokens": plan.input_tokens + plan.output + plan.reasoning}
        text = text_of(0, plan.output)
        arguments = orjson.dumps({"q": text}).decode()

        def output_item(status: str, content: str) -> dict[str, Any]:
            if plan.tool:
                return {"type": "function_call", "id": item, "call_id": "call_sim",
                        "name": "search", "arguments": content, "status": status}
            return {"type": "message", "id": item, "role": "assistant", "status": status,
                    "content": [{"type": "output_text", "text": content, "annotations": []}]}

        def response(status: str, output: list[dict[str, Any]],
                     with_usage: bool) -> dict[str, Any]:
            return {"id": rid, "object": "response", "created_at": 1700000000,
                    "status": status, "model": body["model"], "output": output,
                    "incomplete_details": {"reason": "max_output_tokens"}
                    if status == "incomplete" else None,
                    "usage": usage if with_usage else None, "error": None,
                    "parallel_tool_calls": True, "tool_choice": "auto", "tools": []}

        if not body.get("stream"):
            status = "incomplete" if plan.capped else "completed"
            return JSONResponse(response(status, [output_item(
                "completed", arguments if plan.tool else text)], True))
        seq = itertools.count()

        def ev(kind: str, **data: Any) -> bytes:
            return sse({"type": kind, "sequence_number": next(seq), **data}, kind)

        async def events() -> AsyncIterator[bytes]:
            yield ev("response.created", response=response("in_progress", [], False))
            yield ev("response.in_progress", response=response("in_progress", [], False))
            yield ev("response.output_item.added", output_index=0,
                     item=output_item("in_progress", ""))
            if not plan.tool:
                yield ev("response.content_part.added", item_id=item, output_index=0,
                         content_index=0, part={"type": "output_text", "text": "",
                                                "annotations": []})
            else:
                yield ev("response.function_call_arguments.delta", item_id=item,
                         output_index=0, delta='{"q": "')
            async for piece in pieces(plan):
                if piece is None:
                    stats.streams_failed += 1
                    yield ev("error", code="server_error", message="simulated upstream "
                             "failure", param=None)
                    return
                if plan.tool:
                    yield ev("response.function_call_arguments.delta", item_id=item,
                             output_index=0, delta=piece)
                else:
                    yield ev("response.output_text.delta", item_id=item, output_index=0,
                             content_index=0, delta=piece, logprobs=[])
            if plan.tool:
                yield ev("response.function_call_arguments.delta", item_id=item,
                         output_index=0, delta='"}')
                yield ev("response.function_call_arguments.done", item_id=item,
                         output_index=0, arguments=arguments)
            else:
                yield ev("response.output_text.done", item_id=item, output_index=0,
                         content_index=0, text=text, logprobs=[])
                yield ev("response.content_part.done", item_id=item, output_index=0,
                         content_index=0, part={"type": "output_text", "text": text,
                                                "annotations": []})
            done = output_item("completed", arguments if plan.tool else text)
            yield ev("response.output_item.done", output_index=0, item=done)
            final = "response.incomplete" if plan.capped else "response.completed"
            yield ev(final, response=response(final.split(".")[1], [done], plan.usage))
            stats.streams_completed += 1

        return stream(events())

    # -- Anthropic Messages ------------------------------------------------------------------
    @app.post("/v1/messages/count_tokens")
    async def count_tokens(request: Request) -> Response:
        try:
            body = orjson.loads(await request.body())
        except orjson.JSONDecodeError:
            return error("anthropic", SimError(400, "invalid_request_error", "not JSON"))
        prompt = _flatten(body.get("system")) + _flatten(body.get("messages"))
        return JSONResponse({"input_tokens": o200k.count(prompt)})

    @app.post("/v1/messages")
    async def messages(request: Request) -> Response:
        try:
            body, plan = await prepare(request, "anthropic")
        except SimError as exc:
            return error("anthropic", exc)
        mid = f"msg_sim{stats.streams_started}"
        thinking = THINKING_TOKENS if plan.thinking else 0
        stop = "tool_use" if plan.tool else "max_tokens" if plan.capped else "end_turn"
        out_tokens = plan.output + thinking + plan.reasoning

        def message(content: list[Any], output_tokens: int, reason: str | None
                    ) -> dict[str, Any]:
            return {"id": mid, "type": "message", "role": "assistant", "model": body["model"],
                    "content": content, "stop_reason": reason, "stop_sequence": None,
                    "usage": {"input_tokens": plan.input_tokens,
                              "output_tokens": output_tokens}}

        if not body.get("stream"):
            content: list[Any] = [{"type": "text", "text": text_of(0, plan.output)}]
            if plan.tool:
                content = [{"type": "tool_use", "id": "toolu_sim", "name": "search",
                            "input": {"q": text_of(0, plan.output)}}]
            return JSONResponse(message(content, out_tokens, stop))

        async def events() -> AsyncIterator[bytes]:
            yield sse({"type": "message_start", "message": message([], 1, None)},
                      "message_start")
            index = 0
            if plan.thinking:
                yield sse({"type": "content_block_start", "index": 0, "content_block": {
                    "type": "thinking", "thinking": "", "signature": ""}},
                          "content_block_start")
                yield sse({"type": "content_block_delta", "index": 0, "delta": {
                    "type": "thinking_delta", "thinking": text_of(7, thinking)}},
                          "content_block_delta")
                yield sse({"type": "content_block_delta", "index": 0, "delta": {
                    "type": "signature_delta", "signature": "c2lt"}}, "content_block_delta")
                yield sse({"type": "content_block_stop", "index": 0}, "content_block_stop")
                index = 1
            block: dict[str, Any] = {"type": "text", "text": ""}
            if plan.tool:
                block = {"type": "tool_use", "id": "toolu_sim", "name": "search", "input": {}}
            yield sse({"type": "content_block_start", "index": index,
                       "content_block": block}, "content_block_start")
            yield sse({"type": "ping"}, "ping")
            if plan.tool:
                yield sse({"type": "content_block_delta", "index": index, "delta": {
                    "type": "input_json_delta", "partial_json": '{"q": "'}},
                    "content_block_delta")
            async for piece in pieces(plan):
                if piece is None:
                    stats.streams_failed += 1
                    yield sse({"type": "error", "error": {"type": "api_error",
                                                          "message": "simulated failure"}},
                              "error")
                    return
                delta = ({"type": "input_json_delta", "partial_json": piece} if plan.tool
                         else {"type": "text_delta", "text": piece})
                yield sse({"type": "content_block_delta", "index": index, "delta": delta},
                          "content_block_delta")
            if plan.tool:
                yield sse({"type": "content_block_delta", "index": index, "delta": {
                    "type": "input_json_delta", "partial_json": '"}'}}, "content_block_delta")
            yield sse({"type": "content_block_stop", "index": index}, "content_block_stop")
            usage = {"output_tokens": out_tokens} if plan.usage else {}
            yield sse({"type": "message_delta", "delta": {"stop_reason": stop,
                                                          "stop_sequence": None},
                       "usage": usage}, "message_delta")
            yield sse({"type": "message_stop"}, "message_stop")
            stats.streams_completed += 1

        return stream(events())

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": "sim", "object": "model", "created": 0,
                                            "owned_by": "tollstream-sim"}]}

    @app.get("/sim/stats")
    async def get_stats() -> dict[str, Any]:
        return dict(stats.__dict__)

    @app.post("/sim/reset")
    async def reset() -> dict[str, str]:
        fresh = SimStats()
        stats.__dict__.update(fresh.__dict__)
        return {"status": "reset"}

    return app


def serve(host: str, port: int, config: SimConfig) -> None:
    """Run the simulator under uvicorn (blocking)."""
    uvicorn.run(create_app(config), host=host, port=port, log_level="warning",
                loop="asyncio", http="httptools")
