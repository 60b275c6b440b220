"""The hot path's shortcuts give what the long way gives.

* ``ChatStream.inspect`` recognizes content-only chunks without parsing them: for every event
  (the simulator's streams, OpenAI's shapes, generated chunks with escapes, tool calls, usage,
  finish reasons, several choices, invalid JSON) it must learn exactly what the full parse
  learns, leave the same state behind (id, model, created) and truncate to the same bytes.
* ``parse_event`` takes a shortcut for one-line events; lines end at CR/LF only.
* ``EventStreamResponse`` sends body chunks straight to the server's ``send`` when no
  middleware could want them, and is exactly as strict about delivery that way.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import orjson
import pytest
from fastapi import Request
from hypothesis import given, settings
from hypothesis import strategies as st
from starlette.middleware.base import BaseHTTPMiddleware
from starlette.types import Message

from gateway.app import GatewayApp
from gateway.dialects import EventInfo
from gateway.dialects.openai_chat import _CONTENT_CHUNK, ChatStream, OpenAIChat
from gateway.sse import MAX_EVENT_BYTES, EventSplitter, SSEEvent, SSEProtocolError, parse_event
from gateway.sse_response import CONNECTION_KEY, SERVER_SEND_KEY, EventStreamResponse
from meters.tokens import get_tokenizer
from tests.conftest import SIM_KEY
from tests.servers import serve

pytestmark = pytest.mark.timeout(120)

TOKENIZER = get_tokenizer("o200k_base")
DIALECT = OpenAIChat()


def _streams(wants_usage: bool) -> tuple[ChatStream, ChatStream]:
    body: dict[str, Any] = {"model": "m", "stream": True,
                            "messages": [{"role": "user", "content": "hi"}]}
    if wants_usage:
        body["stream_options"] = {"include_usage": True}
    request = DIALECT.parse_request(body)
    return ChatStream(request), ChatStream(request)


def _full(stream: ChatStream, event: SSEEvent) -> EventInfo:
    """The long way: what ``inspect`` did before the fast path, parse and read."""
    if event.data == "[DONE]":
        return EventInfo(final=True, terminal=True)
    return stream._parsed(orjson.loads(event.data))


def _outcome(read: Any, stream: ChatStream, event: SSEEvent) -> tuple[str, Any]:
    try:
        return "ok", read(stream, event)
    except ValueError as exc:
        return "error", type(exc).__name__


def assert_same(events: list[SSEEvent], *, wants_usage: bool = False) -> int:
    """Both ways over one stream give the same answers and state; returns how many events took
    the fast path. Each event is also truncated (on copies of the streams at that point) at a
    few token counts, which must give identical bytes."""
    fast, full = _streams(wants_usage)
    shortcuts = 0
    for event in events:
        shortcuts += _CONTENT_CHUNK.fullmatch(event.data) is not None
        got = _outcome(ChatStream.inspect, fast, event)
        want = _outcome(_full, full, event)
        assert got == want, event.data
        assert (fast.id, fast.model, fast.created) == (full.id, full.model, full.created)
        if got[0] != "ok" or not got[1].texts:
            continue
        n = TOKENIZER.counter().measure(got[1].texts)
        for keep in sorted({0, 1, n // 2, n}):
            # Fresh copies so that truncating does not change the streams compared next.
            a, b = _copy(fast), _copy(full)
            assert a.truncate(keep, TOKENIZER.counter()) == b.truncate(
                keep, TOKENIZER.counter()), (event.data, keep)
    return shortcuts


def _copy(stream: ChatStream) -> ChatStream:
    twin = ChatStream(stream.request)
    twin.id, twin.model, twin.created = stream.id, stream.model, stream.created
    twin._last = orjson.loads(orjson.dumps(stream._last)) if stream._last is not None else None
    twin._unparsed = stream._unparsed
    if twin._last is not None and stream._unparsed is None:
        # Re-read the copied object so the field references point into the copy.
        twin._parsed(twin._last)
    return twin


def _event(data: str) -> SSEEvent:
    event = parse_event(b"data: " + data.encode())
    assert event is not None
    return event


def _chunk(delta: dict[str, Any], *, finish: str | None = None, usage: Any = None,
           extra: dict[str, Any] | None = None, head: dict[str, Any] | None = None) -> str:
    obj: dict[str, Any] = {"id": "chatcmpl-Ab1", "object": "chat.completion.chunk",
                           "created": 1761000000, "model": "gpt-4o-mini-2024-07-18",
                           **(head or {}),
                           "choices": [{"index": 0, "delta": delta, "logprobs": None,
                                        "finish_reason": finish}]}
    if usage is not False:
        obj["usage"] = usage
    obj.update(extra or {})
    return orjson.dumps(obj).decode()


# -- the simulator's streams, every shape it sends ---------------------------------------------

SIM_VARIANTS: list[dict[str, str]] = [
    {},
    {"x-sim-tokens-per-chunk": "3"},
    {"x-sim-tool-call": "1"},
    {"x-sim-reasoning-tokens": "5"},
    {"x-sim-no-usage": "1"},
    {"x-sim-fail-after": "4"},
    {"x-sim-bad-json-after": "3"},
]


@pytest.mark.parametrize("headers", SIM_VARIANTS, ids=lambda h: ",".join(h) or "plain")
@pytest.mark.parametrize("wants_usage", [False, True])
async def test_simulator_streams_read_the_same_both_ways(sim: str, headers: dict[str, str],
                                                         wants_usage: bool) -> None:
    body: dict[str, Any] = {"model": "gpt-4o-mini", "stream": True, "max_tokens": 40,
                            "messages": [{"role": "user", "content": "say something"}],
                            "stream_options": {"include_usage": True}}
    async with httpx.AsyncClient(timeout=30) as client, client.stream(
            "POST", f"{sim}/v1/chat/completions", json=body,
            headers={"authorization": f"Bearer {SIM_KEY}", "x-sim-output-tokens": "30",
                     **headers}) as response:
        assert response.status_code == 200

        splitter = EventSplitter()
        events = [event async for chunk in response.aiter_raw()
                  for event in splitter.feed(chunk)]
        events += splitter.finish()
        assert splitter.error is None
    shortcuts = assert_same(events, wants_usage=wants_usage)
    if "x-sim-tool-call" not in headers:
        assert shortcuts >= 5  # the test compares the fast path, not only the long way


# -- OpenAI's own shapes and the tricky ones -----------------------------------------------------

OPENAI_SHAPES = [
    # the first chunk: role, empty content, refusal null
    _chunk({"role": "assistant", "content": "", "refusal": None},
           head={"service_tier": "default", "system_fingerprint": "fp_0ba0d124f1"},
           extra={"obfuscation": "Xy9"}),
    _chunk({"content": "Hello"}, head={"service_tier": "default",
                                       "system_fingerprint": "fp_0ba0d124f1"},
           extra={"obfuscation": "aBc"}),
    _chunk({"content": " world"}, head={"system_fingerprint": None}),
    _chunk({"content": "no usage key"}, usage=False),
    _chunk({"content": "say \"hi\"\\n\ttab"}),
    _chunk({"content": "caf\u00e9 \u2603 \U0001F600 \u2028 \u0085 \u2029 end"}),
    _chunk({"content": "\\"}),
    _chunk({"content": "\x00\x1f"}),
    _chunk({"content": "</script>/"}),
    _chunk({}, finish="stop"),
    _chunk({"content": "last words"}, finish="length"),
    _chunk({"tool_calls": [{"index": 0, "id": "call_1", "type": "function",
                            "function": {"name": "f", "arguments": ""}}]}),
    _chunk({"tool_calls": [{"index": 0, "function": {"arguments": "{\"q\": \"x\"}"}}]}),
    _chunk({"content": "with a tool", "tool_calls": [{"index": 0, "function": {
        "arguments": "{}"}}]}),
    _chunk({"refusal": "I can't"}),
    _chunk({"reasoning_content": "thinking"}),
    _chunk({"content": "x"}, usage={"prompt_tokens": 5, "completion_tokens": 1,
                                    "total_tokens": 6}),
    orjson.dumps({"id": "chatcmpl-Ab1", "object": "chat.completion.chunk", "created": 1,
                  "model": "m", "choices": [], "usage": {
                      "prompt_tokens": 9, "completion_tokens": 3, "total_tokens": 12,
                      "prompt_tokens_details": {"cached_tokens": 4}}}).decode(),
    orjson.dumps({"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "m",
                  "choices": [{"index": 0, "delta": {"content": "a"}, "logprobs": None,
                               "finish_reason": None},
                              {"index": 1, "delta": {"content": "b"}, "logprobs": None,
                               "finish_reason": None}]}).decode(),
    orjson.dumps({"error": {"message": "overloaded", "type": "server_error"}}).decode(),
    '{"error": "plain"}',
    "[1, 2]",
    '"a string"',
    "[DONE]",
    # spacing, key order, other servers: parsed in full, same answers
    json.dumps(json.loads(_chunk({"content": "spaced"}))),
    json.dumps(json.loads(_chunk({"content": "ascii \u00e9 \U0001F600"})), ensure_ascii=True,
               separators=(",", ":")),
    json.dumps(json.loads(_chunk({"content": "sorted"})), sort_keys=True),
    # near misses of the fast shape: every one must be parsed (or refused) as JSON says
    _chunk({"content": "a"}).replace('"created":1761000000', '"created":01761000000'),
    _chunk({"content": "a"}).replace('"created":1761000000', '"created":-1'),
    _chunk({"content": "a"}).replace('"created":1761000000', '"created":1.5'),
    _chunk({"content": "a"}).replace('"created":1761000000', '"created":123456789012345678901'),
    _chunk({"content": "a"}).replace('"id":"chatcmpl-Ab1"', '"id":"x\\"y"'),
    _chunk({"content": "a"}).replace('"id":"chatcmpl-Ab1"', '"id":null'),
    _chunk({"content": "a"}).replace('"content":"a"', '"content":"\\ud800"'),
    _chunk({"content": "a"}).replace('"content":"a"', '"content":"\\ud83d\\ude00"'),
    _chunk({"content": "a"}).replace('"content":"a"', '"content":"\\x41"'),
    _chunk({"content": "a"}).replace('"content":"a"', '"content":"\\u00"'),
    _chunk({"content": "a"}).replace('"content":"a"', '"content":"tab\there"'),
    _chunk({"content": "a"}) + " ",
    _chunk({"content": "a"})[:-1],
    _chunk({"content": "a"}) + "}",
    _chunk({"content": "a"}).replace('"index":0', '"index":1'),
    _chunk({"content": "a"}, head={"system_fingerprint": "fp", "service_tier": "flex"}).replace(
        '"service_tier":"flex"', '"system_fingerprint":"again"'),
]


def test_openai_shapes_read_the_same_both_ways() -> None:
    events = [_event(data) for data in OPENAI_SHAPES]
    assert assert_same(events) >= 8
    assert assert_same(events, wants_usage=True) >= 8


def test_a_truncated_fast_chunk_is_parsed_then() -> None:
    fast, _ = _streams(False)
    info = fast.inspect(_event(_chunk({"content": "one two three four five"})))
    assert info.texts == ["one two three four five"] and fast._last is None
    kept = fast.truncate(2, TOKENIZER.counter())
    assert kept is not None and kept[1] == 2
    assert orjson.loads(kept[0][6:])["choices"][0]["delta"]["content"] == "one two"


def test_an_error_after_a_fast_chunk_keeps_it_the_one_to_truncate() -> None:
    fast, full = _streams(False)
    events = [_event(_chunk({"content": "alpha beta"})),
              _event('{"error": {"message": "x"}}')]
    for event in events:
        assert fast.inspect(event) == _full(full, event)
    assert fast.truncate(1, TOKENIZER.counter()) == full.truncate(1, TOKENIZER.counter())


# -- generated chunks: any content, any of the optional keys ------------------------------------

HEADS = st.fixed_dictionaries({}, optional={
    "service_tier": st.one_of(st.none(), st.sampled_from(["default", "flex", "é"])),
    "system_fingerprint": st.one_of(st.none(), st.text(max_size=8))})
DELTAS = st.one_of(
    st.fixed_dictionaries({"content": st.text(max_size=40)},
                          optional={"role": st.just("assistant"), "refusal": st.none()}),
    st.fixed_dictionaries({}, optional={
        "content": st.one_of(st.none(), st.text(max_size=10)),
        "refusal": st.one_of(st.none(), st.text(max_size=10)),
        "reasoning_content": st.text(max_size=10),
        "tool_calls": st.lists(st.fixed_dictionaries({"index": st.integers(0, 2)}, optional={
            "function": st.fixed_dictionaries({}, optional={
                "name": st.text(max_size=5), "arguments": st.text(max_size=10)})}),
            max_size=2)}))
CHUNKS = st.builds(
    lambda delta, finish, usage, head, extra, created, ascii_only, index: (
        _chunk(delta, finish=finish, usage=usage, head=head, extra=extra)
        .replace('"created":1761000000', f'"created":{created}')
        .replace('"index":0', f'"index":{index}'), ascii_only),
    DELTAS,
    st.one_of(st.none(), st.sampled_from(["stop", "length", "tool_calls", ""])),
    st.one_of(st.none(), st.just(False), st.fixed_dictionaries(
        {"prompt_tokens": st.integers(0, 99), "completion_tokens": st.integers(0, 99)})),
    HEADS,
    st.fixed_dictionaries({}, optional={"obfuscation": st.text(max_size=6)}),
    st.integers(0, 2**40),
    st.booleans(),
    st.sampled_from([0, 0, 0, 1]))


@settings(max_examples=400, deadline=None)
@given(st.lists(CHUNKS, min_size=1, max_size=6), st.booleans())
def test_generated_chunks_read_the_same_both_ways(chunks: list[tuple[str, bool]],
                                                  wants_usage: bool) -> None:
    events = []
    for data, ascii_only in chunks:
        if ascii_only:  # the same JSON with \\uXXXX escapes (surrogate pairs for emoji)
            data = json.dumps(json.loads(data), ensure_ascii=True, separators=(",", ":"))
        events.append(_event(data))
    assert_same(events, wants_usage=wants_usage)


# -- parse_event ---------------------------------------------------------------------------------

@pytest.mark.parametrize("raw", [
    b"data: {\"a\":1}", b"data: ", b"data:x", b"data: a\ndata: b", b"event: e\ndata: d",
    b": comment", b"data: a\r\ndata: b", b"data: a\rdata: b", b"id: 1\ndata: x",
    "data: {\"c\":\"a\u2028b\u0085c\u2029\"}".encode(),
    "event: e\ndata: {\"c\":\"a\u2028b\"}".encode(),
])
def test_parse_event_splits_lines_at_cr_and_lf_only(raw: bytes) -> None:
    event = parse_event(raw)
    lines = raw.replace(b"\r\n", b"\n").replace(b"\r", b"\n").split(b"\n")
    data = [line.split(b":", 1)[1].removeprefix(b" ").decode() for line in lines
            if line.startswith(b"data")]
    names = [line[7:].decode() for line in lines if line.startswith(b"event: ")]
    if not data and not names:
        assert event is None
        return
    assert event is not None
    assert event.data == "\n".join(data) and event.event == (names[-1] if names else None)
    assert event.raw == raw.rstrip(b"\r\n") + b"\n\n"


def test_parse_event_refuses_invalid_utf8_both_ways() -> None:
    for raw in (b"data: \xff", b"event: e\ndata: \xff"):
        with pytest.raises(SSEProtocolError):
            parse_event(raw)


def test_the_splitter_gives_the_events_before_a_break_then_nothing() -> None:
    splitter = EventSplitter()
    assert [e.data for e in splitter.feed(b"data: a\n\ndata: b\r\n\r\ndata: \xff\n\n"
                                          b"data: c\n\n")] == ["a", "b"]
    assert isinstance(splitter.error, SSEProtocolError)
    assert splitter.feed(b"data: d\n\n") == [] and splitter.finish() == []


def test_the_splitter_bounds_an_unfinished_event_and_finishes_an_unterminated_one() -> None:
    splitter = EventSplitter()
    assert splitter.feed(b"data: x") == [] and splitter.error is None
    assert [e.data for e in splitter.finish()] == ["x"]
    oversized = EventSplitter()
    assert [e.data for e in oversized.feed(b"data: a\n\ndata: " + b"y" * MAX_EVENT_BYTES)
            ] == ["a"]
    assert oversized.error is not None and "maximum event size" in str(oversized.error)
    assert oversized.buffer == b""


# -- EventStreamResponse: one send per chunk, straight to the server when it can -----------------

class _Connection:
    disconnected = False


class _App:
    def __init__(self, middleware: list[Any]) -> None:
        self.user_middleware = middleware


def _run(scope_extra: dict[str, Any], *, disconnect_after: int = 3
         ) -> tuple[list[bytes], list[bytes], int]:
    """Stream 1000 events; the client goes away after ``disconnect_after`` writes. Returns
    (bodies through the wrapped send, bodies through the server's send, events produced)."""
    connection = _Connection()
    wrapped: list[bytes] = []
    direct: list[bytes] = []
    produced = 0

    async def events() -> AsyncIterator[bytes]:
        nonlocal produced
        for i in range(1000):
            produced += 1
            yield f"data: {i}\n\n".encode()

    def server(into: list[bytes]) -> Any:
        async def send(message: Message) -> None:
            if message["type"] == "http.response.body" and message.get("body"):
                if connection.disconnected:
                    return  # what uvicorn does: the message is silently dropped
                into.append(message["body"])
                if len(wrapped) + len(direct) == disconnect_after:
                    connection.disconnected = True
        return send

    async def receive() -> Message:
        await asyncio.sleep(3600)  # no disconnect message: only the send check can tell
        return {"type": "http.disconnect"}

    scope = {"type": "http", "method": "GET", "path": "/", "headers": [],
             CONNECTION_KEY: connection, SERVER_SEND_KEY: server(direct), **scope_extra}
    response = EventStreamResponse(events(), ping=0)

    async def main() -> None:
        with pytest.raises(BaseException):  # noqa: B017 (ClientGone, maybe in a group)
            await asyncio.wait_for(response(scope, receive, server(wrapped)), 10)

    asyncio.run(main())
    return wrapped, direct, produced


def test_body_chunks_go_straight_to_the_server_and_stop_at_a_disconnect() -> None:
    wrapped, direct, produced = _run({"app": _App([])})
    assert wrapped == [] and len(direct) == 3 and produced <= 5


@pytest.mark.parametrize("extra", [{"app": _App(["a middleware"])}, {"app": object()}, {}],
                         ids=["user-middleware", "unknown-app", "no-app"])
def test_body_chunks_go_through_the_middleware_when_one_might_want_them(
        extra: dict[str, Any]) -> None:
    wrapped, direct, produced = _run(extra)
    assert direct == [] and len(wrapped) == 3 and produced <= 5


def _gateway_app(*, middleware: bool) -> Iterator[GatewayApp]:
    app = GatewayApp()
    seen: list[int] = []

    @app.get("/events")
    async def stream(request: Request) -> EventStreamResponse:
        async def events() -> AsyncIterator[bytes]:
            for i in range(50):
                yield f"data: {i}\n\n".encode()
        return EventStreamResponse(events(), ping=15)

    if middleware:
        class Counting(BaseHTTPMiddleware):
            async def dispatch(self, request: Any, call_next: Any) -> Any:
                response = await call_next(request)
                seen.append(1)
                return response
        app.add_middleware(Counting)
    app.state.seen = seen
    yield app


@pytest.mark.parametrize("middleware", [False, True])
def test_a_stream_through_the_gateway_app_arrives_whole(middleware: bool) -> None:
    for app in _gateway_app(middleware=middleware):
        with serve(app) as url:
            response = httpx.get(f"{url}/events", timeout=10)
        assert response.status_code == 200
        assert response.headers["x-request-id"] and response.headers["x-accel-buffering"] == "no"
        assert response.headers["content-type"].startswith("text/event-stream")
        assert response.text == "".join(f"data: {i}\n\n" for i in range(50))
        assert app.state.seen == ([1] if middleware else [])
