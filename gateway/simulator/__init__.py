"""A simulated model API: OpenAI Chat Completions, OpenAI Responses, Anthropic Messages.

Deterministic and offline, it is the upstream of the demo, the tests and the benchmarks. Output
token ``i`` of every response is ``WORDS[i % len(WORDS)]``: each entry is a single
``o200k_base`` token, and any run of them re-encodes to exactly one token per entry, so a delta
of k entries counts as k tokens however the stream is chunked.

Per-request behaviour, through headers (tests use them): ``x-sim-output-tokens`` (length when
the request sets no maximum), ``x-sim-tokens-per-second``, ``x-sim-tokens-per-chunk``,
``x-sim-no-usage: 1``, ``x-sim-tool-call: 1`` (stream a tool call's arguments instead of text;
the arguments are ``{"q": "<text>"}``, whose pieces are ``{"q": "``, the text tokens, ``"}``:
the text tokens plus 2 framing tokens by the o200k count of each delta),
``x-sim-reasoning-tokens: N`` (reported, not streamed), ``x-sim-input-tokens: N`` (report
this prompt size instead of counting it: a prompt the gateway cannot see, e.g. one cached or
stored upstream), ``x-sim-cached-tokens: N`` (N of the prompt's tokens reported as read from
the prompt cache, each API its own way), ``x-sim-thinking: 1`` (Anthropic: a
thinking block first, N = 8 thinking tokens, counted in ``output_tokens``).

Faults, each deterministic. Mid-stream ones come after exactly N output tokens, at the time
the next chunk would have come (so with a pace set, the tokens before a fault reach the client
before the fault does):

* ``x-sim-status: S`` (400-599): answer HTTP S before anything is streamed, with an error body
  in the API's shape (``429`` rate limit, ``503`` overloaded, ``500`` server error, ``400`` bad
  request, ...). Streaming and non-streaming requests alike.
* ``x-sim-stall-seconds: T``: send nothing, not even the status line, for T seconds, then answer
  as usual; a client that gives up (a read timeout) is noticed within ~10 ms and recorded
  (``stalls_abandoned``, a ``cancellations`` entry ``"during": "stall"``). With
  ``x-sim-stall-after: N`` the stall comes mid-stream after N tokens instead.
* ``x-sim-fail-after: N``: the API's own error event after N tokens, then the stream ends.
* ``x-sim-drop-after: N``: after N tokens (once they have left the simulator) the TCP
  connection is aborted with a reset: the body ends without its terminating chunk, as when a
  model server crashes (``streams_dropped``). Needs uvicorn, whose transport it aborts.
* ``x-sim-bad-json-after: N``: after N tokens, one event whose data is not decodable JSON;
  then the stream goes on, as a model would, until it ends or the client closes it.
* ``x-sim-end-after: N``: after N tokens the body ends, cleanly for HTTP, but without the
  API's closing events (no finish reason, no usage, no ``[DONE]``).

Non-streaming requests take ``x-sim-status``, ``x-sim-stall-seconds``, ``x-sim-drop-after``
(any N: the connection is reset instead of answered) and ``x-sim-bad-json-after`` (any N: the
JSON body is cut in half).

``GET /sim/stats`` counts streams started / completed / failed (faults above) / dropped /
cancelled (the client went away: the monotonic time it was noticed is recorded), HTTP errors
answered, stalls abandoned, and the SHA-256 of the last API key seen.
"""

from __future__ import annotations

from typing import Any

import uvicorn
from fastapi import FastAPI
from starlette.types import Receive, Scope, Send

from gateway.simulator import anthropic_messages, openai_chat, openai_responses
from gateway.simulator.common import WORDS, SimConfig, SimStats, text_of
from gateway.simulator.common import Sim as _Sim

__all__ = ["WORDS", "SimConfig", "create_app", "serve", "text_of"]


class _SimApp(FastAPI):
    """FastAPI, plus the connection's transport in the scope (under uvicorn, whose ``send``
    is a method of the request's cycle): ``x-sim-drop-after`` aborts it and a stall watches
    it for the client going away."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            transport = getattr(getattr(send, "__self__", None), "transport", None)
            if transport is not None:
                scope["tollstream.sim.transport"] = transport
        await super().__call__(scope, receive, send)


def create_app(config: SimConfig) -> FastAPI:
    """The simulator as an ASGI app."""
    app = _SimApp(title="tollstream upstream simulator", docs_url=None, redoc_url=None)
    sim = _Sim(config)
    stats = sim.stats
    app.state.stats = stats
    for api in (openai_chat, openai_responses, anthropic_messages):
        api.register(app, sim)

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
