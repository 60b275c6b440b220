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
``x-sim-reasoning-tokens: N`` (reported, not streamed), ``x-sim-input-tokens: N`` (report
this prompt size instead of counting it: a prompt the gateway cannot see, e.g. one cached or
stored upstream), ``x-sim-cached-tokens: N`` (N of the prompt's tokens reported as read from
the prompt cache, each API its own way), ``x-sim-thinking: 1`` (Anthropic: a
thinking block first, N = 8 thinking tokens, counted in ``output_tokens``).

``GET /sim/stats`` counts streams started / completed / failed / cancelled (the client went
away: the monotonic time it was noticed is recorded) and the SHA-256 of the last API key seen.
"""

from __future__ import annotations

from typing import Any

import uvicorn
from fastapi import FastAPI

from gateway.simulator import anthropic_messages, openai_chat, openai_responses
from gateway.simulator.common import WORDS, SimConfig, SimStats, text_of
from gateway.simulator.common import Sim as _Sim

__all__ = ["WORDS", "SimConfig", "create_app", "serve", "text_of"]


def create_app(config: SimConfig) -> FastAPI:
    """The simulator as an ASGI app."""
    app = FastAPI(title="tollstream upstream simulator", docs_url=None, redoc_url=None)
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
