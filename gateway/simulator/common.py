"""Shared parts of the simulated model API: the text, the plan of a response, pacing,
stats and SSE helpers."""

from __future__ import annotations

import asyncio
import hashlib
import socket
import struct
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import orjson
from fastapi import Request
from fastapi.responses import JSONResponse, Response

from gateway.sse_response import EventStreamResponse
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


#: Error types of the simulated HTTP errors (``x-sim-status``), by status.
_STATUS_KINDS = {400: "invalid_request_error", 401: "authentication_error",
                 404: "not_found_error", 429: "rate_limit_error", 503: "overloaded_error"}

#: The event ``x-sim-bad-json-after`` sends: its data is cut off inside a JSON string.
BAD_JSON_EVENT = b'data: {"sim": "undecodable", "text": " the\n\n'


@dataclass
class SimStats:
    streams_started: int = 0
    streams_completed: int = 0
    #: Streams the simulator broke on purpose (error event, dropped connection, bad JSON).
    streams_failed: int = 0
    #: Streams whose client went away before their end (their times are in ``cancellations``).
    streams_cancelled: int = 0
    #: Streams whose connection the simulator aborted (``x-sim-drop-after``).
    streams_dropped: int = 0
    #: Requests answered with a simulated HTTP error (``x-sim-status``).
    status_errors: int = 0
    #: Requests whose client went away during a stall before the first byte.
    stalls_abandoned: int = 0
    tokens_emitted: int = 0
    #: ``{"at": monotonic time, "during": "stream" | "stall"}`` per client that went away.
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
    status: int | None = None
    stall: float = 0.0
    stall_after: int | None = None
    drop_after: int | None = None
    bad_json_after: int | None = None
    end_after: int | None = None
    #: The connection's transport (uvicorn only), so that a drop can abort it.
    transport: asyncio.Transport | None = field(default=None, compare=False, repr=False)


class SimError(Exception):
    def __init__(self, status: int, kind: str, message: str) -> None:
        super().__init__(message)
        self.status, self.kind, self.message = status, kind, message


def text_of(start: int, count: int) -> str:
    return "".join(WORDS[(start + i) % len(WORDS)] for i in range(count))


def _int_header(request: Request, name: str, default: int | None) -> int | None:
    value = request.headers.get(name)
    return int(value) if value is not None and value.isdigit() else default


def _float_header(request: Request, name: str) -> float:
    try:
        return max(float(request.headers.get(name, "0")), 0.0)
    except ValueError:
        return 0.0


class _Dropped(Exception):
    """Raised through a stream's generators to end it on purpose: after its connection was
    aborted, or to end the body early but cleanly (``x-sim-end-after``)."""


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
        status = _int_header(request, "x-sim-status", None)
        if status is not None and not 400 <= status <= 599:
            raise SimError(400, "invalid_request_error", "x-sim-status must be 400 to 599")
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
                    cached=_int_header(request, "x-sim-cached-tokens", 0) or 0, status=status,
                    stall=_float_header(request, "x-sim-stall-seconds"),
                    stall_after=_int_header(request, "x-sim-stall-after", None),
                    drop_after=_int_header(request, "x-sim-drop-after", None),
                    bad_json_after=_int_header(request, "x-sim-bad-json-after", None),
                    end_after=_int_header(request, "x-sim-end-after", None),
                    transport=request.scope.get("tollstream.sim.transport"))
        if plan.stall and plan.stall_after is None:
            await self._stall_before_answer(plan)
        if plan.status is not None:
            self.stats.status_errors += 1
            raise SimError(plan.status, _STATUS_KINDS.get(plan.status, "api_error"),
                           f"simulated HTTP {plan.status}")
        return body, plan

    async def _stall_before_answer(self, plan: Plan) -> None:
        """Send nothing for ``plan.stall`` seconds; stop early (and record it) when the client
        closes the connection, as a real server notices a reader that gave up."""
        deadline = time.monotonic() + plan.stall
        while time.monotonic() < deadline:
            if plan.transport is not None and plan.transport.is_closing():
                self.stats.stalls_abandoned += 1
                self._cancelled("stall")
                raise SimError(499, "client_closed", "the client closed the connection")
            await asyncio.sleep(min(0.01, max(deadline - time.monotonic(), 0)))

    def _cancelled(self, during: str) -> None:
        self.stats.cancellations.append({"at": time.monotonic(), "during": during})
        del self.stats.cancellations[:-100]

    async def pieces(self, plan: Plan) -> AsyncIterator[str | bytes | None]:
        """The output text in chunks, paced: ``str`` pieces of text, ``bytes`` a raw event to
        send as is (the undecodable one), ``None`` where the API's error event goes. A fault
        comes when the next chunk would, after exactly the tokens before it. A dropped
        connection raises through the API's generator (caught by :meth:`stream`)."""
        delay = plan.per_chunk / plan.rate if plan.rate > 0 else 0.0
        faults = [n for n in (plan.fail_after, plan.drop_after, plan.bad_json_after,
                              plan.stall_after, plan.end_after) if n is not None]
        sent = 0
        stalled = bad_sent = False
        while sent < plan.output:
            if plan.stall_after is not None and not stalled and sent >= plan.stall_after:
                stalled = True
                await asyncio.sleep(plan.stall)  # cancelled if the client goes away
            # Even in burst mode, yield to the loop so a disconnect is noticed.
            await asyncio.sleep(delay)
            if plan.fail_after is not None and sent >= plan.fail_after:
                yield None
                return
            if plan.drop_after is not None and sent >= plan.drop_after:
                await self._drop(plan)
            if plan.end_after is not None and sent >= plan.end_after:
                self.stats.streams_failed += 1
                raise _Dropped()  # the body ends here, cleanly, without the closing events
            if plan.bad_json_after is not None and not bad_sent and sent >= plan.bad_json_after:
                bad_sent = True
                self.stats.streams_failed += 1
                yield BAD_JSON_EVENT  # then the model goes on generating
                continue
            n = min(plan.per_chunk, plan.output - sent,
                    *(f - sent for f in faults if f > sent))
            yield text_of(sent, n)
            sent += n
            self.stats.tokens_emitted += n

    async def _drop(self, plan: Plan) -> None:
        """Abort the connection mid-stream (a reset, not a clean end of the body) once what
        was sent so far has left the process, so the client has every byte before the reset."""
        self.stats.streams_failed += 1
        self.stats.streams_dropped += 1
        await self._abort(plan)
        raise _Dropped()

    async def _abort(self, plan: Plan) -> None:
        transport = plan.transport
        if transport is None:  # not under uvicorn: the response ends without its terminator
            return
        deadline = time.monotonic() + 5
        while transport.get_write_buffer_size() and time.monotonic() < deadline:
            await asyncio.sleep(0.001)
        sock = transport.get_extra_info("socket")
        if sock is not None:  # linger 0: close() sends a TCP reset
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        transport.abort()
        await asyncio.sleep(0)  # let the server see the connection is gone

    async def answer(self, payload: dict[str, Any], plan: Plan) -> Response:
        """A non-streaming answer, with the faults that apply to one: ``x-sim-drop-after``
        resets the connection instead of answering, ``x-sim-bad-json-after`` cuts the JSON
        body in half."""
        if plan.drop_after is not None:
            self.stats.streams_dropped += 1
            await self._abort(plan)
        raw = orjson.dumps(payload)
        if plan.bad_json_after is not None:
            raw = raw[: len(raw) // 2]
        return Response(raw, media_type="application/json")

    def stream(self, events: AsyncIterator[bytes]) -> EventStreamResponse:
        async def tracked() -> AsyncIterator[bytes]:
            self.stats.streams_started += 1
            finished = False
            try:
                async for event in events:
                    yield event
                finished = True
            except _Dropped:
                finished = True  # ended by the simulator, not by the client
            finally:
                if not finished:
                    self.stats.streams_cancelled += 1
                    self._cancelled("stream")
        return EventStreamResponse(tracked(), ping=0, sep="\n")

    @staticmethod
    def sse(data: Any, event: str | None = None) -> bytes:
        head = f"event: {event}\n".encode() if event else b""
        return head + b"data: " + orjson.dumps(data) + b"\n\n"
