"""The simulator's OpenAI Responses API (text and function-call streams, usage)."""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator
from typing import Any

import orjson
from fastapi import FastAPI, Request
from fastapi.responses import Response

from gateway.simulator.common import Sim, SimError, text_of


def register(app: FastAPI, sim: Sim) -> None:
    """Add this API's routes to the simulator."""
    @app.post("/v1/responses")
    async def responses(request: Request) -> Response:
        try:
            body, plan = await sim.prepare(request, "responses")
        except SimError as exc:
            return sim.error("responses", exc)
        rid = f"resp_sim{sim.stats.streams_started}"
        item = "fc_sim" if plan.tool else "msg_sim"
        usage = {"input_tokens": plan.input_tokens,
                 "input_tokens_details": {"cached_tokens": plan.cached},
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
            sim.report(plan, plan.output + plan.reasoning)
            return await sim.answer(response(status, [output_item(
                "completed", arguments if plan.tool else text)], True), plan)
        seq = itertools.count()

        def ev(kind: str, **data: Any) -> bytes:
            return sim.sse({"type": kind, "sequence_number": next(seq), **data}, kind)

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
            async for piece in sim.pieces(plan):
                if isinstance(piece, bytes):
                    yield piece
                    continue
                if piece is None:
                    sim.stats.streams_failed += 1
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
            if plan.usage:
                sim.report(plan, plan.output + plan.reasoning)  # before the client sees it
            yield ev(final, response=response(final.split(".")[1], [done], plan.usage))
            sim.stats.streams_completed += 1

        return sim.stream(events())
