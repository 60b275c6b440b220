"""The relay's fast lane (gateway/feed.py): plain paid events written to the client from the
upstream's read callback, everything else handed to the stream's task, in order.

Each test drives a real gateway (uvicorn on a free port, a real Valkey). For most of them the
upstream is a loopback server that writes a whole crafted answer at once, so the lane sees
many events in one read and must stop and hand over in the middle of it: at a lease renewal,
at a cut, at the end, at an undecodable or non-UTF-8 event. What is checked is what the
client receives (every event once, in order) and what the ledger bills (exactly that).
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import orjson
import pytest

from meters.tokens import get_tokenizer
from tests.conftest import RunningGateway

pytestmark = pytest.mark.timeout(60)

O200K = get_tokenizer("o200k_base")
WORDS = [f" w{i}" for i in range(40)]  # " w17": two tokens each in o200k
ADMIN = {"authorization": "Bearer test-admin-token"}


def chat_chunk(delta: dict[str, Any], finish: str | None = None) -> bytes:
    return b"data: " + orjson.dumps({
        "id": "c1", "object": "chat.completion.chunk", "created": 1, "model": "m",
        "choices": [{"index": 0, "delta": delta, "logprobs": None,
                     "finish_reason": finish}]}) + b"\n\n"


def chat_body(words: list[str]) -> bytes:
    """A whole chat completion stream: role, one chunk per word, the finish, usage, [DONE]."""
    return (chat_chunk({"role": "assistant", "content": ""})
            + b"".join(chat_chunk({"content": word}) for word in words)
            + chat_chunk({}, "stop")
            + b"data: " + orjson.dumps({"id": "c1", "object": "chat.completion.chunk",
                                        "created": 1, "model": "m", "choices": [],
                                        "usage": {"prompt_tokens": 5, "completion_tokens":
                                                  O200K.count("".join(words))}}) + b"\n\n"
            + b"data: [DONE]\n\n")


@contextlib.contextmanager
def crafted_upstream(answer: Callable[[], list[bytes]], go: threading.Event | None = None
                     ) -> Iterator[str]:
    """A loopback model API answering every request with ``answer()``'s pieces, each in one
    ``sendall`` (a close-delimited SSE body), each only once ``go`` is set when given.
    Yields its base URL."""
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]

    def serve_one(conn: socket.socket) -> None:
        with conn:
            data = b""
            while b"\r\n\r\n" not in data:
                data += conn.recv(65536)
            head, _, body = data.partition(b"\r\n\r\n")
            length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                          if line.lower().startswith(b"content-length:"))
            while len(body) < length:
                body += conn.recv(65536)
            conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
                         b"connection: close\r\n\r\n")
            with contextlib.suppress(OSError):  # the gateway closes early on a cut
                for piece in answer():
                    if go is not None:
                        go.wait(20)
                        go.clear()
                    conn.sendall(piece)

    def accept() -> None:
        with contextlib.suppress(OSError):
            while True:
                conn, _ = server.accept()
                threading.Thread(target=serve_one, args=(conn,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        server.close()


def gateway_on(gateway_factory: Any, base_url: str, **overrides: Any
               ) -> contextlib.AbstractContextManager[RunningGateway]:
    return gateway_factory(upstreams={"sim": {"base_url": base_url, "api_key": "k"}},
                           **overrides)


def lane_reads(gw: RunningGateway) -> float:
    for line in httpx.get(f"{gw.url}/metrics", timeout=5).text.splitlines():
        if line.startswith("tollstream_fast_lane_reads_total "):
            return float(line.split()[1])
    raise AssertionError("no fast lane metric")


def chat_events(gw: RunningGateway, key: str, headers: dict[str, str] | None = None,
                go: threading.Event | None = None) -> list[Any]:
    """The data of every event the client receives, decoded ("[DONE]" as is). With ``go``:
    set once the answer's head arrived.

    The gateway writes its answer's head and runs the relay up to its first wait for the
    upstream in one step of its event loop, so once the client has the head the relay is
    waiting: a body the upstream sends after ``go`` reaches the fast lane."""
    events: list[Any] = []
    with httpx.stream("POST", f"{gw.url}/v1/chat/completions", timeout=20, json={
            "model": "exact", "stream": True, "max_tokens": 1000,
            "messages": [{"role": "user", "content": "hi"}]},
            headers={"authorization": f"Bearer {key}", **(headers or {})}) as response:
        assert response.status_code == 200
        if go is not None:
            go.set()
        for line in response.iter_lines():
            if line.startswith("data: "):
                data = line[6:]
                events.append(data if data == "[DONE]" else orjson.loads(data))
    return events


def texts(events: list[Any]) -> list[str]:
    return [e["choices"][0]["delta"].get("content") or "" for e in events
            if isinstance(e, dict) and e.get("choices")]


def spent(gw: RunningGateway, account: str) -> tuple[int, int]:
    state = gw.balance(account)
    return int(state["spent"]), int(state["held"])


@pytest.mark.parametrize("usage", [True, False])
def test_paced_stream_goes_through_the_lane_and_bills_exactly(gw: RunningGateway,
                                                              usage: bool) -> None:
    """Billed by the upstream's usage when it reports one, else by what was delivered (the
    count the lane keeps)."""
    account, key = gw.create_account(10_000)
    before = lane_reads(gw)
    events = chat_events(gw, key, {"x-sim-tokens-per-second": "400",
                                   "x-sim-output-tokens": "30",
                                   **({} if usage else {"x-sim-no-usage": "1"})})
    assert events[-1] == "[DONE]"
    delivered = O200K.count("".join(texts(events)))
    assert delivered == 30
    # Most of the paced reads were delivered by the lane, not by the stream's task.
    assert lane_reads(gw) - before >= 20
    assert spent(gw, account) == (30, 0)


@pytest.mark.parametrize("lease_tokens", [1, 3, 16])
def test_one_read_with_lease_renewals_and_the_end_arrives_whole_and_in_order(
        gateway_factory: Any, lease_tokens: int) -> None:
    words, go = WORDS[:20], threading.Event()
    with crafted_upstream(lambda: [chat_body(words)], go) as url, gateway_on(
            gateway_factory, url, lease_tokens=lease_tokens) as gw:
        account, key = gw.create_account(10_000)
        events = chat_events(gw, key, go=go)
        # The lane delivered the first events of the read, then handed the rest over (at a
        # lease renewal, or at the finish), and the task delivered those.
        assert lane_reads(gw) >= 1
        assert spent(gw, account) == (O200K.count("".join(words)), 0)
    assert texts(events) == ["", *words, ""]
    assert events[-1] == "[DONE]"
    assert [e["choices"][0]["finish_reason"] for e in events
            if isinstance(e, dict) and e.get("choices")][-1] == "stop"


@pytest.mark.parametrize("balance", [1, 7, 22])
def test_a_cut_inside_one_read_stops_at_the_last_paid_token(gateway_factory: Any,
                                                            balance: int) -> None:
    words, go = WORDS[:20], threading.Event()
    with crafted_upstream(lambda: [chat_body(words)], go) as url, gateway_on(
            gateway_factory, url, lease_tokens=4) as gw:
        account, key = gw.create_account(balance)
        events = chat_events(gw, key, go=go)
        assert lane_reads(gw) >= 1
        assert spent(gw, account) == (balance, 0)
    got = "".join(texts(events))
    assert O200K.count(got) == balance
    assert "".join(words).startswith(got)
    assert events[-1] == "[DONE]"
    assert events[-2]["tollstream"]["delivered_tokens"] == balance


def test_the_same_answer_in_pieces_of_every_size_bills_the_same(gateway_factory: Any) -> None:
    body = chat_body(WORDS[:12])
    sizes = iter([1, 7, 50, 333])  # one per request

    def pieces() -> list[bytes]:
        size = next(sizes)
        return [body[i:i + size] for i in range(0, len(body), size)]

    with crafted_upstream(pieces) as url, gateway_on(
            gateway_factory, url, lease_tokens=3) as gw:
        for _ in range(4):
            account, key = gw.create_account(10_000)
            events = chat_events(gw, key)
            assert texts(events) == ["", *WORDS[:12], ""]
            assert spent(gw, account) == (O200K.count("".join(WORDS[:12])), 0)


@pytest.mark.parametrize("broken", [b"data: {not json\n\n", b"data: \xff\xfe\n\n"],
                         ids=["undecodable-json", "not-utf8"])
def test_a_broken_event_after_plain_ones_in_one_read(gateway_factory: Any,
                                                     broken: bytes) -> None:
    """The plain events before it are delivered and billed, then the stream's error; nothing
    after it."""
    words = WORDS[:5]
    body = (b"".join(chat_chunk({"content": word}) for word in words)
            + broken + chat_chunk({"content": " never"}))
    go = threading.Event()
    with crafted_upstream(lambda: [body], go) as url, gateway_on(gateway_factory, url) as gw:
        account, key = gw.create_account(10_000)
        events = chat_events(gw, key, go=go)
        assert lane_reads(gw) >= 1
        assert spent(gw, account) == (O200K.count("".join(words)), 0)
    assert texts(events) == words
    assert any(isinstance(e, dict) and e.get("error", {}).get("code") == "upstream_error"
               for e in events)


def test_an_idempotent_stream_is_recorded_whole_not_sent_past_the_recorder(
        gw: RunningGateway) -> None:
    account, key = gw.create_account(10_000)
    before = lane_reads(gw)
    headers = {"idempotency-key": "lane-replay-1", "x-sim-tokens-per-second": "400",
               "x-sim-output-tokens": "12"}
    first = chat_events(gw, key, headers)
    assert lane_reads(gw) == before  # the recorder must see every event
    replay = chat_events(gw, key, headers)
    assert texts(replay) == texts(first) and O200K.count("".join(texts(first))) == 12
    assert spent(gw, account) == (12, 0)


def test_a_client_that_reads_slowly_gets_every_event_once(gateway_factory: Any) -> None:
    """The client's socket backs up (uvicorn pauses writing): the lane leaves the events to
    the task, whose send waits for the socket to drain, and takes over again after."""
    words = [f" w{i}" for i in range(3000)]
    body = chat_body(words)
    pieces = [body[i:i + 4096] for i in range(0, len(body), 4096)]
    with crafted_upstream(lambda: pieces) as url, gateway_on(gateway_factory, url) as gw:
        account, key = gw.create_account(10**9)
        host, port = gw.url.removeprefix("http://").split(":")
        request = orjson.dumps({"model": "exact", "stream": True, "max_tokens": 100_000,
                                "messages": [{"role": "user", "content": "hi"}]})
        with socket.create_connection((host, int(port)), timeout=20) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\n"
                         b"authorization: Bearer " + key.encode() + b"\r\n"
                         b"content-type: application/json\r\nconnection: close\r\n"
                         b"content-length: " + str(len(request)).encode() + b"\r\n\r\n"
                         + request)
            raw = b""
            while True:
                # A slow reader: small reads, so the gateway's socket backs up behind it.
                piece = sock.recv(2048)
                if not piece:
                    break
                raw += piece
                if len(raw) < 200_000:
                    time.sleep(0.0005)  # the behaviour under test, not a wait for a condition
        assert spent(gw, account) == (O200K.count("".join(words)), 0)
    head, _, chunked = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")
    body_out = dechunk(chunked)
    data = [line[6:] for line in body_out.split(b"\n") if line.startswith(b"data: ")]
    assert data[-1] == b"[DONE]"
    events = [orjson.loads(d) for d in data[:-1]]
    assert texts(events) == ["", *words, ""]


def dechunk(data: bytes) -> bytes:
    out, rest = b"", data
    while rest:
        size_line, _, rest = rest.partition(b"\r\n")
        size = int(size_line, 16)
        if size == 0:
            break
        out, rest = out + rest[:size], rest[size + 2:]
    return out


DIALECTS = {  # model, path, request body
    "chat": ("exact", "/v1/chat/completions",
             {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1000}),
    "messages": ("claude-exact", "/v1/messages",
                 {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1000}),
    "responses": ("resp-exact", "/v1/responses", {"input": "hi", "max_output_tokens": 1000}),
}


def sse_events(raw: str) -> list[tuple[str | None, Any]]:
    """(event name, decoded data) of every event in an SSE text."""
    events: list[tuple[str | None, Any]] = []
    for block in raw.replace("\r\n", "\n").split("\n\n"):
        name, data = None, None
        for line in block.split("\n"):
            if line.startswith("event: "):
                name = line[7:]
            elif line.startswith("data: "):
                data = line[6:]
        if data is not None:
            events.append((name, data if data == "[DONE]" else orjson.loads(data)))
    return events


@pytest.mark.parametrize("dialect", sorted(DIALECTS))
@pytest.mark.parametrize("balance", [5, 13, 10_000])
def test_one_read_answers_the_same_with_and_without_the_lane(
        gateway_factory: Any, sim: str, dialect: str, balance: int) -> None:
    """A real upstream answer (the simulator's, for each dialect) arriving in one read, cut
    mid-read or not: the client sees the same events, and the ledger bills the same, whether
    the lane takes the read or the task does (an idempotent request: the recorder must see
    every event, so it has no lane). The cut's closing events carry the delivered text, which
    a dialect keeps as it inspects: an event inspected twice, or skipped, would show there."""
    model, path, request = DIALECTS[dialect]
    upstream_body = {**request, "model": "sim-model", "stream": True}
    answer = httpx.post(f"{sim}{path}", json=upstream_body, timeout=10, headers={
        "authorization": "Bearer sim-upstream-secret", "x-api-key": "sim-upstream-secret",
        "anthropic-version": "2023-06-01", "x-sim-output-tokens": "30"}).content
    assert answer.count(b"\n\n") > 30
    # The first piece up to the first word ("the"), the rest in one read for the lane: the
    # client sees the word once the relay waits for the upstream again.
    split = answer.index(b"\n\n", answer.index(b'" the"')) + 2
    go = threading.Event()
    runs: dict[bool, tuple[list[tuple[str | None, Any]], tuple[int, int]]] = {}
    with crafted_upstream(lambda: [answer[:split], answer[split:]], go) as url, gateway_on(
            gateway_factory, url, lease_tokens=4) as gw:
        for lane in (True, False):
            account, key = gw.create_account(balance)
            before = lane_reads(gw)
            headers = {"authorization": f"Bearer {key}", "x-api-key": key,
                       "anthropic-version": "2023-06-01"}
            if not lane:
                headers["idempotency-key"] = f"no-lane-{dialect}-{balance}"
            with httpx.stream("POST", f"{gw.url}{path}", timeout=20, headers=headers,
                              json={**request, "model": model, "stream": True}) as response:
                assert response.status_code == 200
                go.set()
                raw = ""
                for line in response.iter_lines():
                    raw += line + "\n"
                    if '" the"' in line:
                        go.set()
            assert (lane_reads(gw) > before) is lane
            runs[lane] = (sse_events(raw), spent(gw, account))
    (with_lane, billed), (without, billed_without) = runs[True], runs[False]
    assert billed == billed_without
    if dialect == "messages" and balance < 30:
        # Claude's output is counted by an estimate, whose cut can fall short of the balance
        # by a token (a word the estimate prices at two when one is left).
        assert balance - 1 <= billed[0] <= balance and billed[1] == 0
    else:
        assert billed == (min(balance, 30), 0)
    assert normalized(with_lane) == normalized(without)


def normalized(events: list[tuple[str | None, Any]]) -> list[tuple[str | None, Any]]:
    """Without what differs from one request to the next (ids the gateway makes)."""
    def scrub(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: scrub(v) for k, v in value.items() if k not in ("request_id", "top_up")}
        if isinstance(value, list):
            return [scrub(v) for v in value]
        return value
    return [(name, scrub(data)) for name, data in events]
