"""Regression tests of the hardening issue (#7): each test names the item it covers and
reproduces the defect the way it was found, from outside (the ledger, the HTTP API, the SDKs)."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from typing import Any

import anthropic
import httpx
import openai
import orjson
import pytest

from gateway.simulator.common import MEDIA_TOKENS
from meters.connection import connect
from meters.keeper import Keeper
from meters.ledger import Ledger
from meters.meter import StreamMeter
from meters.rates import Rate
from meters.tokens import IMAGE_TOKENS, get_tokenizer
from tests.conftest import ADMIN_TOKEN, TEST_MODELS, RunningGateway

pytestmark = pytest.mark.timeout(60)

Factory = Callable[..., contextlib.AbstractContextManager[RunningGateway]]
ADMIN = {"authorization": f"Bearer {ADMIN_TOKEN}"}
#: The issue's reproduction: 1.00 per million input tokens (1 atomic unit per token), 2.00 per
#: million output tokens (2 units per token), metered with the Claude estimate.
CLAUDE_PRICED = {"upstream": "sim", "dialect": "anthropic_messages", "input_per_mtok": "1.00",
                 "output_per_mtok": "2.00", "tokenizer": "estimate"}
MODELS = {**TEST_MODELS, "claude-priced": CLAUDE_PRICED,
          "chat-priced": {"upstream": "sim", "dialect": "openai_chat",
                          "input_per_mtok": "1.00", "output_per_mtok": "2.00"},
          "resp-priced": {"upstream": "sim", "dialect": "openai_responses",
                          "input_per_mtok": "1.00", "output_per_mtok": "2.00"}}


@pytest.fixture
def hgw(gateway_factory: Factory) -> Iterator[RunningGateway]:
    with gateway_factory(models=MODELS) as running:
        yield running


def sse_events(response: httpx.Response) -> list[tuple[str | None, Any]]:
    """The (event, data) pairs of a streamed response, data decoded as JSON where it is."""
    events: list[tuple[str | None, Any]] = []
    name: str | None = None
    for line in response.iter_lines():
        if line.startswith("event:"):
            name = line[6:].strip()
        elif line.startswith("data:"):
            data = line[5:].strip()
            events.append((name, data if data == "[DONE]" else orjson.loads(data)))
            name = None
    return events


def stream_raw(gw: RunningGateway, path: str, key: str, body: dict[str, Any],
               headers: dict[str, str] | None = None) -> list[tuple[str | None, Any]]:
    with httpx.Client(timeout=20) as http, http.stream(
            "POST", f"{gw.url}{path}", json={**body, "stream": True},
            headers={"authorization": f"Bearer {key}", **(headers or {})}) as response:
        assert response.status_code == 200, response.read()
        return sse_events(response)


def ledger_balance(gw: RunningGateway, account: str) -> dict[str, Any]:
    state = gw.balance(account)
    assert state["held"] == "0"
    return state


# -- item 1: a retried final charge is charged once ----------------------------------------------

async def test_item1_settle_replay_is_a_no_op(redis_url: str) -> None:
    ledger = Ledger(connect(redis_url), prefix="t-settle-replay:")
    try:
        await ledger.heartbeat()
        account, _ = await ledger.create_account(100)
        meter = StreamMeter(ledger, account.id, Rate(0, 1_000_000), lease_tokens=10)
        await meter.open(0)
        first = await ledger.settle(account.id, meter.rid, charged_target=10)
        again = await ledger.settle(account.id, meter.rid, charged_target=10)
        state = await ledger.get_account(account.id)
        assert (state.balance, state.held, state.spent) == (90, 0, 10)
        assert not first.replayed and again.replayed and first.balance == 90
        # The keeper's retry of a settle whose reply was lost (it ran in Redis) moves nothing.
        keeper = Keeper(ledger)
        keeper.defer(account.id, meter.rid, 10)
        await keeper.retry_pending()
        assert not keeper.pending
        state = await ledger.get_account(account.id)
        assert (state.balance, state.held, state.spent, state.credited) == (90, 0, 10, 100)
    finally:
        await ledger.redis.aclose()


async def test_item1_a_deferred_settle_that_never_ran_still_charges(redis_url: str) -> None:
    ledger = Ledger(connect(redis_url), prefix="t-settle-deferred:")
    try:
        await ledger.heartbeat()
        account, _ = await ledger.create_account(100)
        meter = StreamMeter(ledger, account.id, Rate(0, 1_000_000), lease_tokens=10)
        await meter.open(0)
        keeper = Keeper(ledger)
        keeper.defer(account.id, meter.rid, 7)  # the first attempt never reached Redis
        await keeper.retry_pending()
        state = await ledger.get_account(account.id)
        assert (state.balance, state.held, state.spent) == (93, 0, 7)
    finally:
        await ledger.redis.aclose()


# -- item 2: Claude streams metered on the reported prompt ---------------------------------------

@pytest.mark.parametrize(("prompt", "balance", "reported"), [
    # The reproduction: the byte estimate (29) under-counted the reported prompt (60);
    # the estimate now takes the BPE count too, and the report re-prices the hold either way.
    (" 1" * 30, 80, None),
    ("hi", 80, "60"),  # a prompt the gateway cannot see is bigger than its estimate
    ("Write a long poem about the sea.", 61, None),  # the estimate over-counts the prompt
])
def test_item2_claude_hold_repriced_from_message_start(hgw: RunningGateway, prompt: str,
                                                      balance: int, reported: str | None
                                                      ) -> None:
    account, key = hgw.create_account(balance)
    events = stream_raw(hgw, "/v1/messages", key, {
        "model": "claude-priced", "max_tokens": 1000,
        "messages": [{"role": "user", "content": prompt}]},
        headers={"x-sim-input-tokens": reported} if reported else None)
    reported_in = next(d for e, d in events if e == "message_start")["message"]["usage"][
        "input_tokens"]
    delta = next(d for e, d in events if e == "message_delta")
    delivered = delta["usage"]["output_tokens"]
    state = ledger_balance(hgw, account)
    # Billed: the reported prompt plus the delivered output, within the balance, no shortfall.
    assert state["shortfall"] == "0"
    assert int(state["spent"]) == reported_in + 2 * delivered
    # Cut at the last token the balance pays: less than one simulator token's price is left
    # (a word costs at most 3 estimate tokens of 2 units each).
    assert int(state["balance"]) < 3 * 2 and delta["delta"]["stop_reason"] == "max_tokens"
    assert (balance - reported_in) // 2 - 3 < delivered <= (balance - reported_in) // 2


def test_item2_claude_prompt_too_big_for_the_balance_delivers_nothing(
        hgw: RunningGateway) -> None:
    # The estimate says the prompt fits; the reported count (a prompt the gateway cannot see,
    # e.g. stored upstream) says it does not: no output token may go out, and the prompt the
    # upstream processed is billed as far as the balance goes.
    account, key = hgw.create_account(40)
    events = stream_raw(hgw, "/v1/messages", key, {
        "model": "claude-priced", "max_tokens": 1000,
        "messages": [{"role": "user", "content": "hi"}]}, headers={"x-sim-input-tokens": "60"})
    assert not [d for e, d in events if e == "content_block_delta"]
    delta = next(d for e, d in events if e == "message_delta")
    assert delta["usage"]["output_tokens"] == 0
    state = ledger_balance(hgw, account)
    assert (state["balance"], state["spent"]) == ("0", "40")
    assert int(state["shortfall"]) > 0


# -- item 3: the estimate rounds once per stream -------------------------------------------------

def test_item3_running_estimate_rounds_once() -> None:
    estimate = get_tokenizer("estimate")
    counter = estimate.counter()
    pieces = [" the", " quick", " brown", " fox", " jumps", " over", " a", " lazy", " dog"]
    assert len("".join(pieces)) == 42
    total = 0
    for piece in pieces:
        n = counter.measure([piece])
        counter.commit([piece])
        total += n
    assert total == 14  # ceil(42 / 3), which is more than the 9 BPE tokens
    assert sum(estimate.count(p) for p in pieces) == 17  # rounding each delta up


def test_item3_cut_claude_stream_billed_its_running_estimate(hgw: RunningGateway) -> None:
    account, key = hgw.create_account(17)
    events = stream_raw(hgw, "/v1/messages", key, {
        "model": "claude-exact", "max_tokens": 1000,
        "messages": [{"role": "user", "content": "hi"}]},
        headers={"x-sim-tokens-per-chunk": "1"})
    deltas = [d["delta"]["text"] for e, d in events if e == "content_block_delta"]
    counter = get_tokenizer("estimate").counter()
    billed = 0
    for delta in deltas:
        billed += counter.measure([delta])
        counter.commit([delta])
    assert billed == -(-len("".join(deltas).encode()) // 3)  # English: the byte count rules
    state = ledger_balance(hgw, account)
    assert state["spent"] == str(billed) and 0 <= 17 - billed < 3


# -- item 4: images and documents are not free ---------------------------------------------------

IMAGE_PART = {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}


def test_item4_an_image_is_priced_before_the_upstream_is_called(hgw: RunningGateway,
                                                               sim: str) -> None:
    # Enough for the text prompt plus a token, not for the image's conservative cost.
    account, key = hgw.create_account(200)
    client = openai.OpenAI(base_url=f"{hgw.url}/v1", api_key=key, max_retries=0, timeout=20)
    client.chat.completions.create(model="chat-priced", max_tokens=5, messages=[
        {"role": "user", "content": [{"type": "text", "text": "what is this?"}]}])
    assert hgw.balance(account)["spent"] != "0"  # the text alone was affordable
    httpx.post(f"{sim}/sim/reset", timeout=5)
    with pytest.raises(openai.APIStatusError) as info:
        client.chat.completions.create(model="chat-priced", max_tokens=5, messages=[
            {"role": "user", "content": [{"type": "text", "text": "what is this?"},
                                         IMAGE_PART]}])
    assert info.value.status_code == 402
    assert int(info.value.response.json()["error"]["needed"]) > IMAGE_TOKENS
    assert httpx.get(f"{sim}/sim/stats", timeout=5).json()["streams_started"] == 0
    # Funded, it goes through and is billed the simulator's reported image cost.
    rich, rich_key = hgw.create_account(100_000)
    rich_client = openai.OpenAI(base_url=f"{hgw.url}/v1", api_key=rich_key, max_retries=0,
                                timeout=20)
    answer = rich_client.chat.completions.create(model="chat-priced", max_tokens=5, messages=[
        {"role": "user", "content": [{"type": "text", "text": "what is this?"}, IMAGE_PART]}])
    assert answer.usage is not None and answer.usage.prompt_tokens > MEDIA_TOKENS
    assert int(ledger_balance(hgw, rich)["spent"]) == answer.usage.prompt_tokens + 2 * 5


def test_item4_claude_document_estimate_covers_the_report(hgw: RunningGateway) -> None:
    account, key = hgw.create_account(100_000)
    client = anthropic.Anthropic(base_url=hgw.url, api_key=key, max_retries=0, timeout=20)
    with client.messages.stream(model="claude-priced", max_tokens=5, messages=[
            {"role": "user", "content": [
                {"type": "document", "source": {"type": "base64",
                                                "media_type": "application/pdf",
                                                "data": "JVBERi0xLjQK" * 100}},
                {"type": "text", "text": "summarise"}]}]) as stream:
        final = stream.get_final_message()
    assert final.usage.input_tokens > MEDIA_TOKENS
    assert int(ledger_balance(hgw, account)["spent"]) == final.usage.input_tokens + 2 * 5


# -- item 6: idempotency keys are scoped to the account ------------------------------------------

def test_item6_idempotency_keys_are_per_account(hgw: RunningGateway) -> None:
    a, _ = hgw.create_account(0)
    b, _ = hgw.create_account(0)
    with hgw.admin() as admin:
        for account in (a, b):
            response = admin.post(f"/admin/accounts/{account}/credit",
                                  json={"amount": "5", "idempotency_key": "order-1"})
            assert response.status_code == 200 and response.json()["credited_now"] is True
        replay = admin.post(f"/admin/accounts/{a}/credit",
                            json={"amount": "5", "idempotency_key": "order-1"})
        assert replay.json()["credited_now"] is False
        conflict = admin.post(f"/admin/accounts/{b}/credit",
                              json={"amount": "6", "idempotency_key": "order-1"})
        assert conflict.status_code == 409
        assert conflict.json()["error"]["code"] == "duplicate_credit"
    assert hgw.balance(a)["balance"] == hgw.balance(b)["balance"] == "5"


# -- item 7: the cut reports the balance the ledger then shows ---------------------------------

@pytest.mark.parametrize(("path", "model", "balance"), [
    ("/v1/chat/completions", "priced", 312),
    ("/v1/messages", "claude-priced", 312),
    ("/v1/responses", "resp-priced", 205),
])
def test_item7_cut_reason_balance_matches_the_ledger(hgw: RunningGateway, path: str,
                                                    model: str, balance: int) -> None:
    account, key = hgw.create_account(balance)
    if path == "/v1/responses":
        body: dict[str, Any] = {"model": model, "input": "tell me a story"}
    else:
        body = {"model": model, "max_tokens": 5000,
                "messages": [{"role": "user", "content": "tell me a story"}]}
    events = stream_raw(hgw, path, key, body,
                        headers={"x-sim-output-tokens": "5000", "x-sim-tokens-per-chunk": "3"})
    reasons = [d["tollstream"] for _, d in events if isinstance(d, dict) and "tollstream" in d]
    assert len(reasons) == 1
    reason = reasons[0]
    state = ledger_balance(hgw, account)
    assert reason["balance"] == state["balance"] and "balance_provisional" not in reason
    assert reason["charged"] == state["spent"]


# -- item 9: an absurd prompt is neither a crash nor free CPU for strangers ----------------------

def test_item9_a_million_spaces(hgw: RunningGateway, caplog: pytest.LogCaptureFixture) -> None:
    body = {"model": "exact", "max_tokens": 1,
            "messages": [{"role": "user", "content": " " * 1_000_000}]}
    with caplog.at_level(logging.WARNING):
        anonymous = httpx.post(f"{hgw.url}/v1/chat/completions", json=body, timeout=20)
        assert anonymous.status_code == 401
        account, key = hgw.create_account(10_000)
        paid = httpx.post(f"{hgw.url}/v1/chat/completions", json=body, timeout=20,
                          headers={"authorization": f"Bearer {key}"})
        assert paid.status_code == 200, paid.text
    assert "Traceback" not in caplog.text and "Panic" not in caplog.text
    # Counted in pieces: about one token per 8 spaces, not zero, not a crash.
    assert int(ledger_balance(hgw, account)["spent"]) > 0


# -- item 11: every field the dialects read is validated at the wire ---------------------------

@pytest.mark.parametrize(("path", "body", "param"), [
    ("/v1/chat/completions", {"model": "exact", "messages": [
        {"role": "assistant", "content": None, "tool_calls": "call me"}]},
     "messages[0].tool_calls"),
    ("/v1/chat/completions", {"model": "exact", "messages": [
        {"role": "user", "content": [{"type": "text", "text": 5}]}]},
     "messages[0].content[0].text"),
    ("/v1/chat/completions", {"model": "exact", "messages": [
        {"role": "user", "content": 5}]}, "messages[0].content"),
    ("/v1/chat/completions", {"model": "exact", "messages": [{"role": 7, "content": "x"}]},
     "messages[0].role"),
    ("/v1/chat/completions", {"model": "exact", "messages": "hello"}, "messages"),
    ("/v1/chat/completions", {"model": "exact", "messages": [{"role": "user"}],
                              "stream_options": []}, "stream_options"),
    ("/v1/messages", {"model": "claude-exact", "max_tokens": 5, "messages": [
        {"role": "user", "content": [{"text": "no type"}]}]}, "messages[0].content[0].type"),
    ("/v1/messages", {"model": "claude-exact", "max_tokens": "5", "messages": [
        {"role": "user", "content": "x"}]}, "max_tokens"),
    ("/v1/messages", {"model": "claude-exact", "max_tokens": 5, "system": 3, "messages": [
        {"role": "user", "content": "x"}]}, "system"),
    ("/v1/responses", {"model": "resp-exact", "input": [{"role": "user", "content": 3}]},
     "input[0].content"),
    ("/v1/responses", {"model": "resp-exact", "input": 5}, "input"),
    ("/v1/responses", {"model": "resp-exact"}, "input"),
])
def test_item11_malformed_fields_are_400_naming_the_field(
        hgw: RunningGateway, path: str, body: dict[str, Any], param: str) -> None:
    account, key = hgw.create_account(100)
    response = httpx.post(f"{hgw.url}{path}", json=body, timeout=10,
                          headers={"authorization": f"Bearer {key}"})
    assert response.status_code == 400, response.text
    payload = response.json()
    error = payload["error"] if "param" in payload["error"] else payload["tollstream"]
    assert error["param"] == param, payload
    assert param in (payload["error"].get("message") or "")
    assert ledger_balance(hgw, account)["spent"] == "0"


def test_item11_tolerant_reader_accepts_what_the_apis_accept(hgw: RunningGateway) -> None:
    _, key = hgw.create_account(100_000)
    auth = {"authorization": f"Bearer {key}"}
    accepted = [
        ("/v1/chat/completions", {"model": "exact", "max_tokens": 3, "messages": [
            {"role": "developer", "content": "be brief"},
            {"role": "user", "content": [{"type": "text", "text": "hi"},
                                         {"type": "input_audio", "input_audio": {
                                             "data": "UklGRg==", "format": "wav"}}]},
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": "c1", "type": "function",
                 "function": {"name": "f", "arguments": "{}"}}]},
            {"role": "tool", "tool_call_id": "c1", "content": "42"}],
          "some_future_field": {"x": 1}}),
        ("/v1/messages?beta=true", {"model": "claude-exact", "max_tokens": 3, "messages": [
            {"role": "user", "content": "hi"},
            {"role": "system", "content": "mid-conversation system message"},
            {"role": "user", "content": [{"type": "search_result", "title": "t",
                                          "source": "s", "content": [
                                              {"type": "text", "text": "x"}]}]}],
          "system": [{"type": "text", "text": "sys", "cache_control": {"type": "ephemeral"}}],
          "thinking": {"type": "disabled"}, "context_management": {"edits": []}}),
        ("/v1/responses", {"model": "resp-exact", "max_output_tokens": 3, "input": [
            {"type": "message", "role": "developer", "content": "be brief"},
            {"type": "additional_tools", "tools": [{"type": "function", "name": "g"}]},
            {"type": "function_call", "call_id": "c", "name": "f", "arguments": "{}"},
            {"type": "function_call_output", "call_id": "c", "output": "ok"},
            {"role": "user", "content": [{"type": "input_text", "text": "hi"}]}],
          "reasoning": {"effort": "low"}, "store": False}),
    ]
    for path, body in accepted:
        response = httpx.post(f"{hgw.url}{path}", json=body, timeout=10, headers=auth)
        assert response.status_code == 200, (path, response.text)


# -- item 12: the admin API reads JSON whatever the content type -----------------------------

def test_item12_admin_accepts_curl_form_bodies(hgw: RunningGateway) -> None:
    created = httpx.post(f"{hgw.url}/admin/accounts", content=b'{"balance": "2000000"}',
                         timeout=10, headers={**ADMIN, "content-type":
                                              "application/x-www-form-urlencoded"})
    assert created.status_code == 201, created.text
    assert created.json()["balance"] == "2000000"
    bad = httpx.post(f"{hgw.url}/admin/accounts", content=b'{"balance": 2000', timeout=10,
                     headers=ADMIN)
    assert bad.status_code == 400
    assert bad.json()["error"]["code"] == "invalid_json"
    assert bad.json()["error"]["param"] == "body"
    empty = httpx.post(f"{hgw.url}/admin/accounts", timeout=10, headers=ADMIN)
    assert empty.status_code == 400 and empty.json()["error"]["code"] == "invalid_json"


# -- item 14: a finished stream is a settled stream -------------------------------------------

@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/messages", "/v1/responses"])
def test_item14_ledger_and_metrics_settled_when_the_stream_ends(hgw: RunningGateway,
                                                               path: str) -> None:
    model = {"/v1/chat/completions": "exact", "/v1/messages": "claude-exact",
             "/v1/responses": "resp-exact"}[path]
    for _ in range(5):
        account, key = hgw.create_account(10_000)
        body: dict[str, Any] = ({"model": model, "input": "go", "max_output_tokens": 3}
                                if path == "/v1/responses" else
                                {"model": model, "max_tokens": 3,
                                 "messages": [{"role": "user", "content": "go"}]})
        stream_raw(hgw, path, key, body)
        # Read at once, no waiting: the bill was settled before the last event went out.
        state = hgw.balance(account)
        assert (state["held"], state["spent"]) == ("0", "3")
    metrics = httpx.get(f"{hgw.url}/metrics", timeout=5).text
    assert f'tollstream_tokens_metered_total{{kind="output",model="{model}"}} 15.0' in metrics


# -- prompt caching: every prompt token billed, cache reads at their own price ------------------

CACHED = {"input_per_mtok": "10.00", "cache_read_per_mtok": "1.00", "output_per_mtok": "2.00"}


@pytest.mark.parametrize(("path", "dialect"), [
    ("/v1/chat/completions", "openai_chat"), ("/v1/messages", "anthropic_messages"),
    ("/v1/responses", "openai_responses")])
def test_cache_reads_are_billed_at_their_price(gateway_factory: Factory, path: str,
                                               dialect: str) -> None:
    models = {"cached": {"upstream": "sim", "dialect": dialect, **CACHED,
                         **({"tokenizer": "estimate"} if dialect == "anthropic_messages"
                            else {})}}
    with gateway_factory(models=models) as gw:
        account, key = gw.create_account(1_000_000)
        if path == "/v1/responses":
            body: dict[str, Any] = {"model": "cached", "input": "hi", "max_output_tokens": 5}
        else:
            body = {"model": "cached", "max_tokens": 5,
                    "messages": [{"role": "user", "content": "hi"}]}
        # 1,000 prompt tokens, 900 of them read from the upstream's cache; 5 output tokens.
        stream_raw(gw, path, key, body, headers={"x-sim-input-tokens": "1000",
                                                 "x-sim-cached-tokens": "900"})
        expected = -(-(100 * 10_000_000 + 900 * 1_000_000 + 5 * 2_000_000) // 1_000_000)
        assert ledger_balance(gw, account)["spent"] == str(expected)  # 1,000 + 900 + 10
