"""Money under faults: the upstream failing before or during a stream, a lapsed heartbeat, a
reservation swept by another process, and a final charge below what was already charged.

Everything runs for real: gateways under uvicorn on free ports, the simulator's fault modes
(``x-sim-status``, ``x-sim-stall-seconds``, ``x-sim-drop-after``, ``x-sim-bad-json-after``,
...), Valkey, and the stock ``openai`` / ``anthropic`` SDKs. For every fault on every dialect
each test checks what the client sees (never a 500; a clean error event in the dialect), that
the hold came back (``held == 0``), that exactly the billing rule was charged (README, "Billing
rule": nothing when the upstream failed before streaming, the delivered tokens when it failed
mid-stream), and that the upstream connection was closed. The money invariant of every account
is checked after each test by ``tests/conftest.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import signal
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import anthropic
import httpx
import openai
import pytest
import redis

from gateway.app import create_app
from gateway.simulator import text_of
from meters.connection import connect
from meters.errors import LedgerUnavailable
from meters.ledger import Ledger
from meters.meter import Outcome, StreamMeter
from meters.money import Asset
from meters.rates import Rate
from meters.tokens import Tokenizer, get_tokenizer
from tests.conftest import (
    ADMIN_TOKEN,
    SIM_KEY,
    TEST_MODELS,
    RunningGateway,
    make_settings,
    new_prefix,
    sim_stats,
    track_prefix,
)
from tests.servers import gateway_process, serve

pytestmark = pytest.mark.timeout(60)

GatewayFactory = Callable[..., contextlib.AbstractContextManager[RunningGateway]]

O200K = get_tokenizer("o200k_base")
ESTIMATE = get_tokenizer("estimate")
ONE_PER_TOKEN = Rate.parse(Asset(), input_per_mtok="0", output_per_mtok="1")
#: The gateway's upstream read timeout in these tests (``[upstreams.sim] read_timeout``).
READ_TIMEOUT = 0.5
#: The simulator's pace: a fault comes 20 ms after the token before it, so that token has
#: reached the gateway (and the client) before the fault does.
PACE = {"x-sim-tokens-per-second": "50"}
#: Output tokens the upstream emits before a mid-stream fault: more than one lease (16), so
#: some were charged while streaming and the rest at the end.
N = 20
CREDIT = 10_000
SDK_TIMEOUT = 15.0
PROMPT = "Write a long poem."


def metered(tokenizer: Tokenizer, deltas: list[str]) -> int:
    """Output tokens a stream of ``deltas`` is metered as (the Claude estimate rounds once per
    stream, a real tokenizer counts each delta)."""
    return tokenizer.counter().measure(deltas)


def wait_until(condition: Callable[[], Any], timeout: float = 5.0, what: str = "") -> Any:
    """Poll ``condition`` until it returns something truthy; fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what or condition}")
        time.sleep(0.02)


def settled(gw: RunningGateway, account: str) -> dict[str, Any]:
    """The account once no stream holds money for it (a final charge may still be on its way
    when the client has seen the error event)."""
    return dict(wait_until(lambda: (s := gw.balance(account))["held"] == "0" and s,
                           what="the hold to come back"))


def assert_billed(state: dict[str, Any], spent: int, *, credited: int = CREDIT) -> None:
    assert (state["held"], state["spent"], state["balance"], state["credited"],
            state["shortfall"]) == ("0", str(spent), str(credited - spent), str(credited),
                                    "0"), state


# -- the three dialects through their stock SDKs -------------------------------------------

@dataclass
class StreamResult:
    """What a client got from a stream: the text deltas, and the error that ended it."""

    deltas: list[str] = field(default_factory=list)
    error: Exception | None = None
    error_event: Any = None

    def tokens(self, tokenizer: Tokenizer) -> int:
        """Delivered tokens as the gateway meters a stream's deltas."""
        return metered(tokenizer, self.deltas)


@dataclass(frozen=True)
class Api:
    name: str
    model: str
    tokenizer: Tokenizer

    def openai(self, gw: RunningGateway, key: str) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{gw.url}/v1", api_key=key, max_retries=0,
                             timeout=SDK_TIMEOUT)

    def anthropic(self, gw: RunningGateway, key: str) -> anthropic.Anthropic:
        return anthropic.Anthropic(base_url=gw.url, api_key=key, max_retries=0,
                                   timeout=SDK_TIMEOUT)

    def stream(self, gw: RunningGateway, key: str, headers: dict[str, str],
               max_tokens: int = 200) -> StreamResult:
        result = StreamResult()
        try:
            if self.name == "chat":
                for chunk in self.openai(gw, key).chat.completions.create(
                        model=self.model, messages=[{"role": "user", "content": PROMPT}],
                        stream=True, max_tokens=max_tokens, extra_headers=headers):
                    if chunk.choices and chunk.choices[0].delta.content:
                        result.deltas.append(chunk.choices[0].delta.content)
            elif self.name == "responses":
                for event in self.openai(gw, key).responses.create(
                        model=self.model, input=PROMPT, stream=True,
                        max_output_tokens=max_tokens, extra_headers=headers):
                    if event.type == "response.output_text.delta":
                        result.deltas.append(event.delta)
                    elif event.type == "error":
                        result.error_event = event
            else:
                for message_event in self.anthropic(gw, key).messages.create(
                        model=self.model, messages=[{"role": "user", "content": PROMPT}],
                        stream=True, max_tokens=max_tokens, extra_headers=headers):
                    if message_event.type == "content_block_delta":
                        text = getattr(message_event.delta, "text", None)
                        if text:
                            result.deltas.append(text)
        except (openai.APIError, anthropic.APIError) as exc:
            result.error = exc
        return result

    def create(self, gw: RunningGateway, key: str, headers: dict[str, str]) -> Any:
        """A non-streaming request."""
        if self.name == "chat":
            return self.openai(gw, key).chat.completions.create(
                model=self.model, messages=[{"role": "user", "content": PROMPT}],
                max_tokens=20, extra_headers=headers)
        if self.name == "responses":
            return self.openai(gw, key).responses.create(
                model=self.model, input=PROMPT, max_output_tokens=20, extra_headers=headers)
        return self.anthropic(gw, key).messages.create(
            model=self.model, messages=[{"role": "user", "content": PROMPT}], max_tokens=20,
            extra_headers=headers)

    def status_error(self, exc: BaseException) -> tuple[int, str]:
        """(status, gateway code) of an HTTP error answer, checking it has the dialect's
        shape."""
        sdk = anthropic if self.name == "messages" else openai
        assert isinstance(exc, sdk.APIStatusError), repr(exc)
        body = exc.response.json()
        if self.name == "messages":
            assert body["type"] == "error" and body["error"]["message"], body
            return exc.status_code, body["tollstream"]["code"]
        assert body["error"]["message"] and body["error"]["type"], body
        return exc.status_code, body["error"]["code"]

    def stream_error_code(self, result: StreamResult) -> str:
        """The code of the error event that ended a stream, checking it is a clean error event
        in the dialect (the SDK parsed it), not a broken connection."""
        if result.error_event is not None:  # the Responses SDK yields an upstream's own event
            return str(result.error_event.code)
        exc = result.error
        assert exc is not None, "the stream ended without an error"
        assert not isinstance(exc, openai.APIConnectionError | anthropic.APIConnectionError), \
            f"the connection broke instead of an error event: {exc!r}"
        if self.name == "messages":
            assert isinstance(exc, anthropic.APIStatusError) and exc.status_code == 200
            body: Any = exc.body
            assert body["type"] == "error", body
            return str(body.get("tollstream", {}).get("code") or body["error"]["type"])
        assert type(exc) is openai.APIError, repr(exc)
        body = exc.body
        assert isinstance(body, dict) and body["message"], body
        return str(body["code"])


APIS = [Api("chat", "exact", O200K), Api("messages", "claude-exact", ESTIMATE),
        Api("responses", "resp-exact", O200K)]


@pytest.fixture(scope="module")
def fault_gateway(sim_url: str, redis_url: str) -> Iterator[RunningGateway]:
    """A gateway whose upstream read timeout is short, so a stalled upstream fails fast. One
    for the module (each test has its own account, and waits for its upstream stream to end
    so that the simulator's stats are its own)."""
    settings = make_settings(sim_url, upstreams={"sim": {
        "base_url": f"{sim_url}/v1", "api_key": SIM_KEY, "forward_headers": ["x-sim-"],
        "read_timeout": READ_TIMEOUT}})
    app = create_app(settings, redis_url)
    with serve(app) as url:
        yield RunningGateway(url, settings, app.state.gateway)


@pytest.fixture
def fgw(fault_gateway: RunningGateway, sim: str) -> RunningGateway:
    track_prefix(fault_gateway.settings.key_prefix)
    return fault_gateway


# -- the upstream fails before streaming: nothing billed, the hold returned -----------------

@pytest.mark.parametrize("api", APIS, ids=lambda a: a.name)
@pytest.mark.parametrize(("upstream_status", "status", "code"), [
    (500, 502, "upstream_error"), (503, 502, "upstream_error"),
    (429, 429, "upstream_rate_limited"), (400, 400, "upstream_rejected")])
def test_upstream_status_before_streaming_returns_the_hold(
        fgw: RunningGateway, sim: str, api: Api, upstream_status: int, status: int,
        code: str) -> None:
    account, key = fgw.create_account(CREDIT)
    result = api.stream(fgw, key, {"x-sim-status": str(upstream_status)})
    assert result.deltas == []
    assert result.error is not None
    assert api.status_error(result.error) == (status, code)
    assert_billed(settled(fgw, account), 0)
    stats = sim_stats(sim)
    # One upstream call (no retry), answered in full: no stream was started.
    assert (stats["status_errors"], stats["streams_started"]) == (1, 0)


@pytest.mark.parametrize("api", APIS, ids=lambda a: a.name)
def test_upstream_stall_before_first_byte_times_out_and_returns_the_hold(
        fgw: RunningGateway, sim: str, api: Api) -> None:
    account, key = fgw.create_account(CREDIT)
    started = time.monotonic()
    result = api.stream(fgw, key, {"x-sim-stall-seconds": "20"})
    elapsed = time.monotonic() - started
    assert result.deltas == [] and result.error is not None
    assert api.status_error(result.error) == (502, "upstream_timeout")
    assert READ_TIMEOUT <= elapsed < READ_TIMEOUT + 3
    assert_billed(settled(fgw, account), 0)
    # The gateway gave up and closed the connection; the stalled upstream noticed.
    stats = wait_until(lambda: (s := sim_stats(sim))["stalls_abandoned"] == 1 and s,
                       what="the simulator to see the connection closed")
    assert stats["cancellations"][-1]["during"] == "stall"
    assert stats["cancellations"][-1]["at"] - started < READ_TIMEOUT + 1.5


# -- the upstream fails mid-stream: the delivered tokens billed, nothing more ---------------

def _cancelled(sim: str) -> dict[str, Any]:
    return dict(wait_until(lambda: (s := sim_stats(sim))["streams_cancelled"] == 1 and s,
                           what="the gateway to close the upstream connection"))


@pytest.mark.parametrize("api", APIS, ids=lambda a: a.name)
def test_upstream_drops_the_connection_mid_stream(fgw: RunningGateway, sim: str,
                                                  api: Api) -> None:
    account, key = fgw.create_account(CREDIT)
    result = api.stream(fgw, key, {**PACE, "x-sim-drop-after": str(N)})
    assert api.stream_error_code(result) == "upstream_error"
    # Every token the upstream sent before the reset reached the client (the reset comes a
    # pace later) and exactly those are billed.
    assert O200K.count("".join(result.deltas)) == N
    assert_billed(settled(fgw, account), result.tokens(api.tokenizer))
    stats = sim_stats(sim)
    assert (stats["streams_dropped"], stats["streams_completed"]) == (1, 0)


RAW_REQUESTS: dict[str, tuple[str, dict[str, Any]]] = {
    "chat": ("/v1/chat/completions", {"model": "exact", "stream": True, "max_tokens": 200,
                                      "messages": [{"role": "user", "content": PROMPT}]}),
    "messages": ("/v1/messages", {"model": "claude-exact", "stream": True, "max_tokens": 200,
                                  "messages": [{"role": "user", "content": PROMPT}]}),
    "responses": ("/v1/responses", {"model": "resp-exact", "stream": True, "input": PROMPT,
                                    "max_output_tokens": 200}),
}


@pytest.mark.parametrize("api", APIS, ids=lambda a: a.name)
def test_the_client_stream_ends_cleanly_after_an_upstream_drop(fgw: RunningGateway,
                                                               sim: str, api: Api) -> None:
    """On the wire: the upstream's reset does not reach the client. Its response is a
    complete HTTP body (httpx would raise on a missing terminating chunk) whose last event is
    the dialect's error event."""
    account, key = fgw.create_account(CREDIT)
    path, body = RAW_REQUESTS[api.name]
    response = httpx.post(f"{fgw.url}{path}", json=body, timeout=SDK_TIMEOUT, headers={
        "authorization": f"Bearer {key}", "anthropic-version": "2023-06-01",
        **PACE, "x-sim-drop-after": str(N)})
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    events = [e for e in response.text.replace("\r\n", "\n").split("\n\n") if e.strip()]
    last = events[-1].splitlines()
    data = httpx.Response(200, content=last[-1].removeprefix("data: ")).json()
    if api.name == "chat":
        assert data["error"]["code"] == "upstream_error"
    elif api.name == "messages":
        assert last[0] == "event: error" and data["type"] == "error"
        assert data["tollstream"]["code"] == "upstream_error"
    else:
        assert last[0] == "event: error" and data["type"] == "error"
        assert data["code"] == "upstream_error"
    assert "[DONE]" not in response.text
    delivered = int(settled(fgw, account)["spent"])
    assert delivered == metered(api.tokenizer, [text_of(i, 1) for i in range(N)])


@pytest.mark.parametrize("api", APIS, ids=lambda a: a.name)
def test_upstream_sends_undecodable_json_mid_stream(fgw: RunningGateway, sim: str,
                                                    api: Api) -> None:
    account, key = fgw.create_account(CREDIT)
    result = api.stream(fgw, key, {**PACE, "x-sim-bad-json-after": str(N),
                                   "x-sim-output-tokens": "500"}, max_tokens=500)
    failed_at = time.monotonic()
    assert api.stream_error_code(result) == "upstream_error"
    assert O200K.count("".join(result.deltas)) == N
    assert_billed(settled(fgw, account), result.tokens(api.tokenizer))
    # The model was still generating (480 more tokens at 50/s): the gateway closed it.
    stats = _cancelled(sim)
    assert stats["streams_completed"] == 0
    assert stats["cancellations"][-1]["at"] - failed_at < 1.0


@pytest.mark.parametrize("api", APIS, ids=lambda a: a.name)
def test_upstream_stalls_mid_stream_past_the_read_timeout(fgw: RunningGateway, sim: str,
                                                          api: Api) -> None:
    account, key = fgw.create_account(CREDIT)
    result = api.stream(fgw, key, {**PACE, "x-sim-stall-after": str(N),
                                   "x-sim-stall-seconds": "20"})
    assert api.stream_error_code(result) == "upstream_error"
    assert O200K.count("".join(result.deltas)) == N
    assert_billed(settled(fgw, account), result.tokens(api.tokenizer))
    stats = _cancelled(sim)
    assert stats["cancellations"][-1]["during"] == "stream"


@pytest.mark.parametrize("api", APIS, ids=lambda a: a.name)
def test_upstream_ends_the_body_early_without_finishing(fgw: RunningGateway, sim: str,
                                                        api: Api) -> None:
    account, key = fgw.create_account(CREDIT)
    result = api.stream(fgw, key, {**PACE, "x-sim-end-after": str(N)})
    assert api.stream_error_code(result) == "upstream_error"
    assert "ended the stream early" in str(result.error)
    assert O200K.count("".join(result.deltas)) == N
    assert_billed(settled(fgw, account), result.tokens(api.tokenizer))


@pytest.mark.parametrize("api", APIS, ids=lambda a: a.name)
def test_upstream_error_event_mid_stream(fgw: RunningGateway, sim: str, api: Api) -> None:
    account, key = fgw.create_account(CREDIT)
    result = api.stream(fgw, key, {**PACE, "x-sim-fail-after": str(N)})
    # The upstream's own error event is passed through as the API sent it.
    assert api.stream_error_code(result) in ("sim_failure", "api_error", "server_error")
    assert O200K.count("".join(result.deltas)) == N
    assert_billed(settled(fgw, account), result.tokens(api.tokenizer))
    assert sim_stats(sim)["streams_failed"] == 1


@pytest.mark.parametrize("api", APIS, ids=lambda a: a.name)
def test_upstream_failure_in_a_burst_bills_what_was_delivered(fgw: RunningGateway, sim: str,
                                                              api: Api) -> None:
    """No pace: the bad event may arrive in the same read as the tokens before it. Whatever
    the client got is what is billed, never more (and never more than the upstream sent)."""
    account, key = fgw.create_account(CREDIT)
    result = api.stream(fgw, key, {"x-sim-bad-json-after": str(N),
                                   "x-sim-tokens-per-chunk": "3"})
    assert api.stream_error_code(result) == "upstream_error"
    assert O200K.count("".join(result.deltas)) <= N
    assert_billed(settled(fgw, account), result.tokens(api.tokenizer))
    wait_until(lambda: (s := sim_stats(sim))["streams_completed"] + s["streams_cancelled"],
               what="the upstream stream to end")


# -- non-streaming requests: an answer that never comes or cannot be read is not billed -----

@pytest.mark.parametrize("api", APIS, ids=lambda a: a.name)
@pytest.mark.parametrize(("headers", "status", "code", "upstream"), [
    ({"x-sim-status": "429"}, 429, "upstream_rate_limited", "status_errors"),
    ({"x-sim-status": "503"}, 502, "upstream_error", "status_errors"),
    ({"x-sim-stall-seconds": "20"}, 502, "upstream_timeout", "stalls_abandoned"),
    ({"x-sim-drop-after": "0"}, 502, "upstream_unreachable", "streams_dropped"),
    ({"x-sim-bad-json-after": "0"}, 502, "upstream_error", None),
], ids=["429", "503", "stall", "drop", "bad-json"])
def test_non_streaming_upstream_failure_bills_nothing(
        fgw: RunningGateway, sim: str, api: Api, headers: dict[str, str], status: int,
        code: str, upstream: str | None) -> None:
    account, key = fgw.create_account(CREDIT)
    with pytest.raises((openai.APIStatusError, anthropic.APIStatusError)) as info:
        api.create(fgw, key, headers)
    assert api.status_error(info.value) == (status, code)
    assert_billed(settled(fgw, account), 0)
    if upstream is not None:  # the fault happened once (no retry), and is over
        wait_until(lambda: sim_stats(sim)[upstream] == 1, what=upstream)


# -- the refund branch of settle.lua --------------------------------------------------------

async def test_settle_refunds_a_charge_above_the_final_total(redis_url: str) -> None:
    """An estimate charged 48 tokens while streaming; the upstream reports 40 at the end: 8
    are refunded from ``spent`` to the balance, the rest of the hold is returned."""
    ledger = Ledger(connect(redis_url), prefix=new_prefix())
    try:
        await ledger.heartbeat()
        account, _ = await ledger.create_account(1000)
        meter = StreamMeter(ledger, account.id, ONE_PER_TOKEN, lease_tokens=16)
        await meter.open(0)
        for _ in range(50):  # 50 estimated tokens, one at a time: renewals at 16, 32, 48
            assert await meter.acquire(1) == 1
            meter.delivered_tokens(1)
        before = await ledger.get_account(account.id)
        assert (before.balance, before.held, before.spent) == (936, 16, 48)
        bill = await meter.close(Outcome.COMPLETED, reported_input=0, reported_output=40)
        assert (bill.output_tokens, bill.delivered_tokens, bill.charged, bill.shortfall) == \
            (40, 50, 40, 0)
        after = await ledger.get_account(account.id)
        assert (after.balance, after.held, after.spent, after.credited) == (960, 0, 40, 1000)
        # A meter closed twice charges once.
        assert (await meter.close(Outcome.COMPLETED)).charged == 0
        assert await ledger.get_account(account.id) == after

        # Reported usage of nothing at all refunds everything charged while streaming.
        meter = StreamMeter(ledger, account.id, ONE_PER_TOKEN, lease_tokens=16)
        await meter.open(0)
        for _ in range(20):
            meter.delivered_tokens(await meter.acquire(1))
        assert (await ledger.get_account(account.id)).spent == 40 + 16
        bill = await meter.close(Outcome.COMPLETED, reported_input=0, reported_output=0)
        assert bill.charged == 0
        final = await ledger.get_account(account.id)
        assert (final.balance, final.held, final.spent) == (960, 0, 40)
    finally:
        await ledger.redis.aclose()


async def test_a_retried_final_charge_charges_once(redis_url: str) -> None:
    """The relay defers a final charge whose Redis call failed or timed out (the script may
    have run), and the keeper retries it with the same target: it must not charge twice."""
    ledger = Ledger(connect(redis_url), prefix=new_prefix())
    try:
        account, _ = await ledger.create_account(100)
        meter = StreamMeter(ledger, account.id, ONE_PER_TOKEN, lease_tokens=16)
        await ledger.heartbeat()  # just before the grants: a loaded machine is slow
        await meter.open(0)
        meter.delivered_tokens(meter.take(10))
        first = await ledger.settle(account.id, meter.rid, charged_target=10)
        assert (first.charged, first.returned) == (10, 6)
        await ledger.settle(account.id, meter.rid, charged_target=10)  # the retry
        state = await ledger.get_account(account.id)
        assert (state.balance, state.held, state.spent) == (90, 0, 10)
    finally:
        await ledger.redis.aclose()


def test_claude_estimate_reconciled_down_to_reported_usage(gw: RunningGateway,
                                                           sim: str) -> None:
    """Through the gateway: the Claude estimate (3 bytes a token) meters the sim's 40 tokens
    as 64 and charges them lease by lease while streaming; the bill is the reported 40
    exactly, the difference refunded."""
    account, key = gw.create_account(CREDIT)
    seen: list[int] = []
    stop = threading.Event()

    def watch() -> None:  # the account as an operator sees it while the stream runs
        with gw.admin() as admin:
            while not stop.is_set():
                seen.append(int(admin.get(f"/admin/accounts/{account}").json()["spent"]))
                time.sleep(0.01)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        client = anthropic.Anthropic(base_url=gw.url, api_key=key, max_retries=0,
                                     timeout=SDK_TIMEOUT)
        with client.messages.stream(model="claude-exact", max_tokens=40,
                                    messages=[{"role": "user", "content": PROMPT}],
                                    extra_headers=PACE) as stream:
            deltas = [e.delta.text for e in stream
                      if e.type == "content_block_delta" and e.delta.type == "text_delta"]
            final = stream.get_final_message()
    finally:
        stop.set()
        watcher.join(5)
    estimated = metered(ESTIMATE, deltas)
    assert final.usage.output_tokens == 40 and O200K.count("".join(deltas)) == 40
    assert estimated == metered(ESTIMATE, [text_of(0, 40)]) > 40
    # Charged while streaming: at each lease renewal (16 estimated tokens), above 40.
    assert 40 < max(seen) <= estimated
    assert_billed(settled(gw, account), 40)


# -- a lapsed heartbeat, a process that cannot renew it, a swept reservation ----------------

@contextlib.contextmanager
def redis_user(redis_url: str) -> Iterator[tuple[str, Callable[[bool], None]]]:
    """A Redis user for one "process", and a switch that cuts it off from Redis (every command
    refused) or lets it back: a network partition between that process and the ledger."""
    name, password = f"proc{secrets.token_hex(4)}", secrets.token_hex(16)
    with redis.Redis.from_url(redis_url) as admin:
        admin.acl_setuser(name, enabled=True, passwords=[f"+{password}"], keys=["*"],
                          channels=["*"], commands=["+@all"])
        parts = urlsplit(redis_url)
        url = urlunsplit(parts._replace(netloc=f"{name}:{password}@{parts.netloc}"))

        def reachable(yes: bool) -> None:
            # (enabled=True: redis-py's default would switch the user off, refusing the new
            # connections a pool opens after the switch back.)
            admin.acl_setuser(name, enabled=True, commands=["+@all" if yes else "-@all"])

        try:
            yield url, reachable
        finally:
            admin.acl_deluser(name)


async def test_lapsed_heartbeat_stops_grants_until_liveness_is_proven(redis_url: str) -> None:
    ledger = Ledger(connect(redis_url), prefix=new_prefix(), owner_ttl_seconds=1.5)
    try:
        account, _ = await ledger.create_account(100)
        meter = StreamMeter(ledger, account.id, ONE_PER_TOKEN, lease_tokens=16)
        await ledger.heartbeat()  # just before the grants: a loaded machine is slow
        await meter.open(0)
        assert meter.take(4) == 4
        meter.delivered_tokens(4)
        # Nobody renews the heartbeat (the process' keeper is stuck): once it lapses, the
        # lease's 12 remaining tokens are not handed out.
        deadline = time.monotonic() + 5
        while ledger.is_alive():
            assert time.monotonic() < deadline
            await asyncio.sleep(0.02)
        assert meter.covered - meter.granted == 12
        assert meter.take(4) == 0
        # A renewal proves liveness first (one heartbeat), then grants resume.
        assert await meter.acquire(4) == 4
        meter.delivered_tokens(4)
        assert ledger.is_alive()
        bill = await meter.close(Outcome.COMPLETED)
        assert bill.charged == 8
        state = await ledger.get_account(account.id)
        assert (state.balance, state.held, state.spent) == (92, 0, 8)
    finally:
        await ledger.redis.aclose()


async def _lapse(ledger: Ledger, sweeper: Ledger) -> None:
    """Wait until ``ledger`` cannot prove itself alive and its heartbeat key expired, then
    sweep its holds from the other process."""
    deadline = time.monotonic() + 5
    while ledger.is_alive() or await sweeper.redis.exists(
            ledger.alive_key(ledger.owner)):
        assert time.monotonic() < deadline, "the heartbeat did not lapse"
        await asyncio.sleep(0.02)
    assert await sweeper.sweep() == (1, 16)  # the whole hold: its 4 delivered tokens too


async def test_process_cut_off_from_the_ledger_stops_and_its_swept_lease_is_refused(
        redis_url: str) -> None:
    prefix = new_prefix()
    with redis_user(redis_url) as (url, reachable):
        here = Ledger(connect(url), prefix=prefix, owner_ttl_seconds=1.5)
        there = Ledger(connect(redis_url), prefix=prefix)  # another gateway process
        try:
            account, _ = await here.create_account(100)
            meter = StreamMeter(here, account.id, ONE_PER_TOKEN, lease_tokens=16)
            await here.heartbeat()  # just before the grants: a loaded machine is slow
            await meter.open(0)
            meter.delivered_tokens(meter.take(4))
            reachable(False)
            # It cannot renew its heartbeat: no grant from the lease, no renewal.
            with pytest.raises(LedgerUnavailable):
                await here.heartbeat()
            await _lapse(here, there)
            assert meter.take(1) == 0
            with pytest.raises(LedgerUnavailable):
                await meter.acquire(1)
            assert meter.take(1) == 0
            state = await there.get_account(account.id)
            assert (state.balance, state.held, state.spent) == (100, 0, 0)  # hold swept
            # Back online: the swept reservation's next lease is refused, and the final
            # charge bills exactly the 4 delivered tokens (from the balance: the hold is gone).
            reachable(True)
            await here.heartbeat()
            with pytest.raises(LedgerUnavailable, match="returned while it was still running"):
                await meter.renew()
            bill = await meter.close(Outcome.LEDGER_ERROR)
            assert (bill.output_tokens, bill.charged, bill.shortfall) == (4, 4, 0)
            state = await there.get_account(account.id)
            assert (state.balance, state.held, state.spent, state.credited) == (96, 0, 4, 100)
        finally:
            await here.redis.aclose()
            await there.redis.aclose()


async def test_no_grant_from_a_swept_lease_after_the_heartbeat_recovers(
        redis_url: str) -> None:
    prefix = new_prefix()
    with redis_user(redis_url) as (url, reachable):
        here = Ledger(connect(url), prefix=prefix, owner_ttl_seconds=1.5)
        there = Ledger(connect(redis_url), prefix=prefix)
        meter = StreamMeter(here, "", ONE_PER_TOKEN, lease_tokens=16)
        try:
            account, _ = await here.create_account(100)
            meter = StreamMeter(here, account.id, ONE_PER_TOKEN, lease_tokens=16)
            await here.heartbeat()  # just before the grants: a loaded machine is slow
            await meter.open(0)
            meter.delivered_tokens(meter.take(4))
            reachable(False)
            await _lapse(here, there)
            reachable(True)
            await here.heartbeat()  # the keeper's next beat succeeds
            # The 12 tokens left in the lease are not covered by any hold any more.
            assert meter.take(12) == 0
        finally:
            reachable(True)
            with contextlib.suppress(LedgerUnavailable):
                await meter.close(Outcome.LEDGER_ERROR)
            await here.redis.aclose()
            await there.redis.aclose()


def _sse_stream(url: str, key: str, headers: dict[str, str]
                ) -> contextlib.AbstractContextManager[httpx.Response]:
    return httpx.Client(timeout=SDK_TIMEOUT).stream(
        "POST", f"{url}/v1/chat/completions",
        headers={"authorization": f"Bearer {key}", **headers},
        json={"model": "exact", "messages": [{"role": "user", "content": PROMPT}],
              "stream": True, "max_tokens": 400})


def _content(line: str) -> str:
    if not line.startswith("data: {"):
        return ""
    chunk = httpx.Response(200, content=line[6:]).json()
    choices = chunk.get("choices") or [{}]
    return str((choices[0].get("delta") or {}).get("content") or "")


def _error(line: str) -> dict[str, Any] | None:
    if not line.startswith("data: {"):
        return None
    error = httpx.Response(200, content=line[6:]).json().get("error")
    return dict(error) if error else None


def test_gateway_cut_off_from_the_ledger_stops_the_stream_and_bills_it_later(
        gateway_factory: GatewayFactory, sim: str, redis_url: str) -> None:
    """A gateway loses Redis mid-stream with most of its lease left: it stops within its
    heartbeat margin, ends the stream with the dialect's error event, closes the upstream;
    another gateway sweeps its hold; once it is back its keeper bills exactly the delivered
    tokens."""
    prefix = new_prefix()
    with redis_user(redis_url) as (url, reachable), \
            gateway_factory(key_prefix=prefix, reservation_ttl_seconds=1.0) as other:
        settings = make_settings(sim, key_prefix=prefix, reservation_ttl_seconds=1.0,
                                 lease_tokens=1000)
        app = create_app(settings, url)
        with serve(app) as gw_url:
            gw = RunningGateway(gw_url, settings, app.state.gateway)
            account, key = gw.create_account(CREDIT)
            text, error = "", None
            cut_off_at = ended_at = 0.0
            with _sse_stream(gw_url, key, {"x-sim-tokens-per-second": "20",
                                           "x-sim-output-tokens": "400"}) as response:
                for line in response.iter_lines():
                    text += _content(line)
                    error = error or _error(line)
                    if not cut_off_at and O200K.count(text) >= 5:
                        reachable(False)
                        cut_off_at = time.monotonic()
                ended_at = time.monotonic()
            delivered = O200K.count(text)
            assert error is not None and error["code"] == "ledger_unavailable", error
            # Stopped by the lapsed heartbeat (2/3 of the TTL), long before the lease's end.
            assert 5 <= delivered < 40 and ended_at - cut_off_at < 1.0 + 1.0  # TTL + slack
            _cancelled(sim)
            # The other gateway returns the hold once the heartbeat key has expired.
            wait_until(lambda: other.balance(account)["held"] == "0", what="the sweep")
            assert other.balance(account)["spent"] == "0"
            # Back online: the deferred final charge bills exactly the delivered tokens.
            reachable(True)
            state = wait_until(lambda: (s := other.balance(account))["spent"] != "0" and s,
                               what="the deferred charge")
            assert_billed(state, delivered)
            assert other.gateway.keeper.swept_reservations == 1


def _write_config(sim: str, redis_url: str, prefix: str) -> str:
    lines = [f'redis_url = "{redis_url}"', f'key_prefix = "{prefix}"',
             f'admin_token = "{ADMIN_TOKEN}"', "lease_tokens = 16",
             "reservation_ttl_seconds = 1.0", "[upstreams.sim]", f'base_url = "{sim}/v1"',
             f'api_key = "{SIM_KEY}"', 'forward_headers = ["x-sim-"]', '[models."exact"]']
    lines += [f'{k} = "{v}"' for k, v in TEST_MODELS["exact"].items()]
    fd, path = tempfile.mkstemp(suffix=".toml", prefix="tollstream-test-")
    os.write(fd, "\n".join(lines).encode())
    os.close(fd)
    return path


def test_stalled_gateway_process_swept_by_another_ends_the_stream_billed_delivered(
        gateway_factory: GatewayFactory, sim: str, redis_url: str) -> None:
    """A gateway process freezes mid-stream (SIGSTOP) past its reservation TTL; another one
    sweeps its hold. When it wakes up, its next lease is refused (the reservation was
    returned): the stream ends with the ledger error event and only delivered tokens are
    billed."""
    prefix = new_prefix()
    config = _write_config(sim, redis_url, prefix)
    try:
        with gateway_process(config) as (url, proc), \
                gateway_factory(key_prefix=prefix, reservation_ttl_seconds=1.0) as other:
            account, key = other.create_account(CREDIT)
            text, error = "", None
            stopped = False
            try:
                with _sse_stream(url, key, {"x-sim-tokens-per-second": "20",
                                            "x-sim-output-tokens": "400"}) as response:
                    for line in response.iter_lines():
                        text += _content(line)
                        error = error or _error(line)
                        if not stopped and O200K.count(text) >= 5:
                            os.kill(proc.pid, signal.SIGSTOP)
                            stopped = True
                            wait_until(lambda: other.balance(account)["held"] == "0",
                                       what="the other gateway to sweep the hold")
                            os.kill(proc.pid, signal.SIGCONT)
            finally:
                if stopped:
                    os.kill(proc.pid, signal.SIGCONT)
            assert error is not None and error["code"] == "ledger_unavailable", error
            assert other.gateway.keeper.swept_reservations == 1
            delivered = O200K.count(text)
            assert 5 <= delivered <= 5 + 16
            assert_billed(settled(other, account), delivered)
    finally:
        os.unlink(config)
