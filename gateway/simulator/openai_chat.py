"""The simulator's OpenAI Chat Completions API (streaming and not, tool calls, usage)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import orjson
from fastapi import FastAPI, Request
from fastapi.responses import Response

from gateway.simulator.common import Sim, SimError, text_of


def register(app: FastAPI, sim: Sim) -> None:
    """Add this API's routes to the simulator."""
    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        try:
            body, plan = await sim.prepare(request, "chat")
        except SimError as exc:
            return sim.error("chat", exc)
        rid, model, created = f"chatcmpl-sim{sim.stats.streams_started}", body["model"], 1700000000
        reasoning = plan.reasoning
        usage = {"prompt_tokens": plan.input_tokens,
                 "prompt_tokens_details": {"cached_tokens": plan.cached},
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
            sim.report(plan, plan.output + reasoning)
            return await sim.answer({
                "id": rid, "object": "chat.completion", "created": created, "model": model,
                "choices": [{"index": 0, "message": message, "finish_reason": finish}],
                "usage": usage}, plan)
        extra = {"usage": None} if plan.usage else {}

        def chunk(delta: dict[str, Any], reason: str | None = None) -> bytes:
            return sim.sse({"id": rid, "object": "chat.completion.chunk", "created": created,
                        "model": model, "choices": [{"index": 0, "delta": delta,
                                                     "logprobs": None,
                                                     "finish_reason": reason}], **extra})

        async def events() -> AsyncIterator[bytes]:
            yield chunk({"role": "assistant", "content": "" if not plan.tool else None})
            if plan.tool:
                yield chunk({"tool_calls": [{"index": 0, "id": "call_sim", "type": "function",
                                             "function": {"name": "search",
                                                          "arguments": '{"q": "'}}]})
            async for piece in sim.pieces(plan):
                if isinstance(piece, bytes):
                    yield piece
                    continue
                if piece is None:
                    sim.stats.streams_failed += 1
                    yield sim.sse({"error": {"message": "simulated upstream failure",
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
                sim.report(plan, plan.output + reasoning)  # before the client sees the end
                yield sim.sse({"id": rid, "object": "chat.completion.chunk", "created": created,
                           "model": model, "choices": [], "usage": usage})
            yield b"data: [DONE]\n\n"
            sim.stats.streams_completed += 1

        return sim.stream(events())
