"""Shared parts of the simulated model API: the text, the plan of a response, pacing,
stats and SSE helpers."""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import orjson
from fastapi import Request
from fastapi.responses import JSONResponse, Response

from gateway.sse import EventStreamResponse
from meters.tokens import get_tokenizer

WORDS = (" the", " quick", " brown", " fox", " jumps", " over", " a", " lazy", " dog", ",",
         " and", " then", " it", " runs", " far", " away", " into", " green", " hills", ".",
         " every", " morning", " birds", " sing", " while", " rivers", " flow", " past",
         " old", " stone", " bridges", ".")
THINKING_TOKENS = 8
#: What the simulator reports for one image or other media block in a prompt: a realistic
#: figure, below the gateway's conservative estimate (meters.tokens.IMAGE_TOKENS), so tests
#: see the estimate cover it and the report reconcile it.
MEDIA_TOKENS = 1000
_MEDIA = ("image", "image_url", "input_image", "document", "file", "input_file", "input_audio")


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
    #: The usage reported for each completed response: {"input", "cached", "output"}.
    reported: list[dict[str, int]] = field(default_factory=list)


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
    cached: int = 0  # of input_tokens, read from the prompt cache


class SimError(Exception):
    def __init__(self, status: int, kind: str, message: str) -> None:
        super().__init__(message)
        self.status, self.kind, self.message = status, kind, message


def text_of(start: int, count: int) -> str:
    return "".join(WORDS[(start + i) % len(WORDS)] for i in range(count))


def _int_header(request: Request, name: str, default: int | None) -> int | None:
    value = request.headers.get(name)
    return int(value) if value is not None and value.isdigit() else default


def flatten(value: Any) -> str:
    """The text of a prompt field (string, content parts, messages), for counting."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        return " ".join(flatten(v) for v in value)
    if isinstance(value, dict):
        return " ".join(flatten(v) for k, v in value.items() if k in ("text", "content",
                                                                      "input", "system"))
    return ""


def media_count(value: Any) -> int:
    """Media blocks (images, documents, files, audio) anywhere in a prompt."""
    if isinstance(value, list):
        return sum(media_count(v) for v in value)
    if isinstance(value, dict):
        if value.get("type") in _MEDIA:
            return 1
        return sum(media_count(v) for v in value.values())
    return 0


class Sim:
    """The simulator's shared state and the helpers every API module uses."""

    def __init__(self, config: SimConfig) -> None:
        self.config = config
        self.stats = SimStats()
        self.o200k = get_tokenizer("o200k_base")

    def report(self, plan: Plan, output_tokens: int) -> None:
        """Remember the usage a completed response reported (tests bill from it)."""
        self.stats.reported.append({"input": plan.input_tokens, "cached": plan.cached,
                                    "output": output_tokens})
        del self.stats.reported[:-1000]

    def error(self, api: str, exc: SimError) -> Response:
        if api == "anthropic":
            body: dict[str, Any] = {"type": "error", "error": {"type": exc.kind,
                                                               "message": exc.message}}
        else:
            body = {"error": {"message": exc.message, "type": exc.kind, "code": exc.kind}}
        return JSONResponse(body, status_code=exc.status)

    async def prepare(self, request: Request, api: str) -> tuple[dict[str, Any], Plan]:
        key = request.headers.get("x-api-key")
        auth = request.headers.get("authorization", "")
        if auth.lower().startswith("bearer "):
            key = auth[7:]
        if key:
            self.stats.last_key_sha256 = hashlib.sha256(key.encode()).hexdigest()
        if self.config.api_key and key != self.config.api_key:
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
            fields = [body.get("system"), body.get("messages")]
        elif api == "responses":
            limit = body.get("max_output_tokens")
            fields = [body.get("instructions"), body.get("input")]
        else:
            limit = body.get("max_completion_tokens") or body.get("max_tokens")
            fields = [body.get("messages")]
        prompt = "".join(flatten(f) for f in fields)
        media = MEDIA_TOKENS * media_count(fields)
        wanted = _int_header(request, "x-sim-output-tokens", self.config.default_output_tokens)
        assert wanted is not None
        output = min(wanted, limit) if isinstance(limit, int) else wanted
        rate = request.headers.get("x-sim-tokens-per-second")
        wants_usage = api != "chat" or bool((body.get("stream_options") or {})
                                            .get("include_usage"))
        plan = Plan(output=output, capped=isinstance(limit, int) and limit <= wanted,
                    rate=float(rate) if rate else self.config.tokens_per_second,
                    per_chunk=max(1, _int_header(request, "x-sim-tokens-per-chunk",
                                                 self.config.tokens_per_chunk) or 1),
                    fail_after=_int_header(request, "x-sim-fail-after", None),
                    usage=wants_usage and request.headers.get("x-sim-no-usage") != "1",
                    tool=request.headers.get("x-sim-tool-call") == "1",
                    reasoning=_int_header(request, "x-sim-reasoning-tokens", 0) or 0,
                    thinking=api == "anthropic" and request.headers.get("x-sim-thinking")
                    == "1",
                    input_tokens=_int_header(request, "x-sim-input-tokens", None)
                    or self.o200k.count(prompt) + media,
                    cached=_int_header(request, "x-sim-cached-tokens", 0) or 0)
        return body, plan

    async def pieces(self, plan: Plan) -> AsyncIterator[str | None]:
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
            self.stats.tokens_emitted += n

    def stream(self, events: AsyncIterator[bytes]) -> EventStreamResponse:
        async def tracked() -> AsyncIterator[bytes]:
            self.stats.streams_started += 1
            finished = False
            try:
                async for event in events:
                    yield event
                finished = True
            finally:
                if not finished:
                    self.stats.streams_cancelled += 1
                    self.stats.cancellations.append({"at": time.monotonic()})
                    del self.stats.cancellations[:-100]
        return EventStreamResponse(tracked(), ping=0, sep="\n")

    @staticmethod
    def sse(data: Any, event: str | None = None) -> bytes:
        head = f"event: {event}\n".encode() if event else b""
        return head + b"data: " + orjson.dumps(data) + b"\n\n"
