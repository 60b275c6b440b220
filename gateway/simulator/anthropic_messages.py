"""The simulator's Anthropic Messages API (text, tool use, thinking, count_tokens)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import orjson
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from gateway.simulator.common import THINKING_TOKENS, Sim, SimError, flatten, text_of


def register(app: FastAPI, sim: Sim) -> None:
    """Add this API's routes to the simulator."""
    @app.post("/v1/messages/count_tokens")
    async def count_tokens(request: Request) -> Response:
        try:
            body = orjson.loads(await request.body())
        except orjson.JSONDecodeError:
            return sim.error("anthropic", SimError(400, "invalid_request_error", "not JSON"))
        prompt = flatten(body.get("system")) + flatten(body.get("messages"))
        return JSONResponse({"input_tokens": sim.o200k.count(prompt)})

    @app.post("/v1/messages")
    async def messages(request: Request) -> Response:
        try:
            body, plan = await sim.prepare(request, "anthropic")
        except SimError as exc:
            return sim.error("anthropic", exc)
        mid = f"msg_sim{sim.stats.streams_started}"
        thinking = THINKING_TOKENS if plan.thinking else 0
        stop = "tool_use" if plan.tool else "max_tokens" if plan.capped else "end_turn"
        out_tokens = plan.output + thinking + plan.reasoning

        def message(content: list[Any], output_tokens: int, reason: str | None
                    ) -> dict[str, Any]:
            return {"id": mid, "type": "message", "role": "assistant", "model": body["model"],
                    "content": content, "stop_reason": reason, "stop_sequence": None,
                    # Anthropic counts cache reads apart from input_tokens.
                    "usage": {"input_tokens": plan.input_tokens - plan.cached,
                              "cache_read_input_tokens": plan.cached,
                              "output_tokens": output_tokens}}

        if not body.get("stream"):
            content: list[Any] = [{"type": "text", "text": text_of(0, plan.output)}]
            if plan.tool:
                content = [{"type": "tool_use", "id": "toolu_sim", "name": "search",
                            "input": {"q": text_of(0, plan.output)}}]
            sim.report(plan, out_tokens)
            return await sim.answer(message(content, out_tokens, stop), plan)

        async def events() -> AsyncIterator[bytes]:
            yield sim.sse({"type": "message_start", "message": message([], 1, None)},
                      "message_start")
            index = 0
            if plan.thinking:
                yield sim.sse({"type": "content_block_start", "index": 0, "content_block": {
                    "type": "thinking", "thinking": "", "signature": ""}},
                          "content_block_start")
                yield sim.sse({"type": "content_block_delta", "index": 0, "delta": {
                    "type": "thinking_delta", "thinking": text_of(7, thinking)}},
                          "content_block_delta")
                yield sim.sse({"type": "content_block_delta", "index": 0, "delta": {
                    "type": "signature_delta", "signature": "c2lt"}}, "content_block_delta")
                yield sim.sse({"type": "content_block_stop", "index": 0}, "content_block_stop")
                index = 1
            block: dict[str, Any] = {"type": "text", "text": ""}
            if plan.tool:
                block = {"type": "tool_use", "id": "toolu_sim", "name": "search", "input": {}}
            yield sim.sse({"type": "content_block_start", "index": index,
                       "content_block": block}, "content_block_start")
            yield sim.sse({"type": "ping"}, "ping")
            if plan.tool:
                yield sim.sse({"type": "content_block_delta", "index": index, "delta": {
                    "type": "input_json_delta", "partial_json": '{"q": "'}},
                    "content_block_delta")
            async for piece in sim.pieces(plan):
                if isinstance(piece, bytes):
                    yield piece
                    continue
                if piece is None:
                    sim.stats.streams_failed += 1
                    yield sim.sse({"type": "error", "error": {"type": "api_error",
                                                          "message": "simulated failure"}},
                              "error")
                    return
                delta = ({"type": "input_json_delta", "partial_json": piece} if plan.tool
                         else {"type": "text_delta", "text": piece})
                yield sim.sse({"type": "content_block_delta", "index": index, "delta": delta},
                          "content_block_delta")
            if plan.tool:
                yield sim.sse({"type": "content_block_delta", "index": index, "delta": {
                    "type": "input_json_delta", "partial_json": '"}'}}, "content_block_delta")
            yield sim.sse({"type": "content_block_stop", "index": index}, "content_block_stop")
            usage = {"output_tokens": out_tokens} if plan.usage else {}
            if plan.usage:
                sim.report(plan, out_tokens)  # before the client can see the end
            yield sim.sse({"type": "message_delta", "delta": {"stop_reason": stop,
                                                          "stop_sequence": None},
                       "usage": usage}, "message_delta")
            yield sim.sse({"type": "message_stop"}, "message_stop")
            sim.stats.streams_completed += 1

        return sim.stream(events())
