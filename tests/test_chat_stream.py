"""OpenAI chat completions through a real gateway, with the stock openai SDK.

Every stream here goes through uvicorn on a free port, the real simulator upstream and a real
Valkey server; each test is time-bounded by pytest-timeout.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import httpx
import openai
import pytest

from meters.tokens import get_tokenizer
from tests.conftest import RunningGateway, sim_stats

pytestmark = pytest.mark.timeout(60)

O200K = get_tokenizer("o200k_base")
MESSAGES: list[Any] = [{"role": "user", "content": "Say something long."}]


def client(gw: RunningGateway, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{gw.url}/v1", api_key=key, max_retries=0, timeout=20)


def stream_text(gw: RunningGateway, key: str, **kwargs: Any) -> tuple[str, list[Any]]:
    chunks = list(client(gw, key).chat.completions.create(
        model=kwargs.pop("model", "exact"), messages=MESSAGES, stream=True, **kwargs))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    return text, chunks


@pytest.mark.parametrize("per_chunk", [1, 5])
def test_balance_for_exactly_n_tokens(gw: RunningGateway, per_chunk: int) -> None:
    account, key = gw.create_account(37)
    text, chunks = stream_text(gw, key, max_tokens=500,
                               extra_headers={"x-sim-tokens-per-chunk": str(per_chunk)})
    assert O200K.count(text) == 37
    last = chunks[-1]
    assert last.choices[0].finish_reason == "length"
    reason = last.model_extra["tollstream"]
    assert reason["type"] == "allowance_exhausted"
    assert reason["delivered_tokens"] == 37
    assert reason["balance"] == "0"
    state = gw.balance(account)
    assert (state["balance"], state["held"], state["spent"]) == ("0", "0", "37")


def test_cut_text_is_a_prefix_of_the_uncut_text(gw: RunningGateway) -> None:
    _, rich = gw.create_account(10_000)
    full, _ = stream_text(gw, rich, max_tokens=40)
    _, poor = gw.create_account(13)
    cut, _ = stream_text(gw, poor, max_tokens=40,
                         extra_headers={"x-sim-tokens-per-chunk": "4"})
    assert full.startswith(cut) and O200K.count(cut) == 13


def test_usage_chunk_only_for_clients_that_ask(gw: RunningGateway) -> None:
    _, key = gw.create_account(10_000)
    _, plain = stream_text(gw, key, max_tokens=10)
    assert all(c.choices for c in plain)  # the usage chunk the gateway asked for is hidden
    _, asked = stream_text(gw, key, max_tokens=10, stream_options={"include_usage": True})
    assert asked[-1].choices == [] and asked[-1].usage.completion_tokens == 10
    # Cut streams report the delivered usage to clients that asked.
    _, poor = gw.create_account(4)
    _, cut = stream_text(gw, poor, max_tokens=10, stream_options={"include_usage": True})
    assert cut[-1].usage.completion_tokens == 4


def test_completed_stream_billed_from_reported_usage(gw: RunningGateway) -> None:
    account, key = gw.create_account(1_000_000)
    _, chunks = stream_text(gw, key, model="priced", max_tokens=25,
                            stream_options={"include_usage": True},
                            extra_headers={"x-sim-reasoning-tokens": "7"})
    usage = chunks[-1].usage
    assert usage.completion_tokens == 32  # 25 streamed + 7 hidden reasoning tokens
    rate = gw.gateway.router.exact["priced"].rate
    expected = rate.charge(usage.prompt_tokens, usage.completion_tokens)
    state = gw.balance(account)
    assert int(state["spent"]) == expected
    assert int(state["balance"]) == 1_000_000 - expected and state["held"] == "0"


def test_completed_stream_without_usage_billed_by_count(gw: RunningGateway) -> None:
    account, key = gw.create_account(1000)
    text, _ = stream_text(gw, key, max_tokens=20, extra_headers={"x-sim-no-usage": "1"})
    assert O200K.count(text) == 20
    assert gw.balance(account)["spent"] == "20"


def test_prompt_the_balance_cannot_cover_is_refused_before_upstream(gw: RunningGateway
                                                                    ) -> None:
    account, key = gw.create_account(0)
    before = sim_stats(gw.settings.upstreams["sim"].base_url.removesuffix("/v1"))
    with pytest.raises(openai.APIStatusError) as info:
        stream_text(gw, key, model="priced", max_tokens=10)
    assert info.value.status_code == 402
    body = info.value.response.json()["error"]
    assert body["code"] == "insufficient_funds" and body["balance"] == "0"
    assert int(body["needed"]) > 0 and "prompt" in body["message"]
    after = sim_stats(gw.settings.upstreams["sim"].base_url.removesuffix("/v1"))
    assert after["streams_started"] == before["streams_started"]
    assert gw.balance(account)["balance"] == "0"


def test_upstream_error_mid_stream_bills_delivered(gw: RunningGateway) -> None:
    account, key = gw.create_account(1000)
    received = ""
    with pytest.raises(openai.APIError):
        for chunk in client(gw, key).chat.completions.create(
                model="exact", messages=MESSAGES, stream=True, max_tokens=100,
                extra_headers={"x-sim-fail-after": "12"}):
            if chunk.choices:
                received += chunk.choices[0].delta.content or ""
    assert O200K.count(received) == 12
    state = gw.balance(account)
    assert (state["spent"], state["held"], state["balance"]) == ("12", "0", "988")


def test_non_streaming_is_capped_to_the_affordable_output(gw: RunningGateway) -> None:
    account, key = gw.create_account(15)
    answer = client(gw, key).chat.completions.create(model="exact", messages=MESSAGES,
                                                     max_tokens=100)
    assert answer.usage is not None and answer.usage.completion_tokens == 15
    assert answer.choices[0].finish_reason == "length"
    assert O200K.count(answer.choices[0].message.content or "") == 15
    state = gw.balance(account)
    assert (state["spent"], state["held"], state["balance"]) == ("15", "0", "0")


def test_client_disconnect_bills_delivered_and_closes_upstream(gw: RunningGateway,
                                                               sim: str) -> None:
    account, key = gw.create_account(1000)
    received = 0
    with httpx.Client(timeout=10) as http, http.stream(
            "POST", f"{gw.url}/v1/chat/completions",
            headers={"authorization": f"Bearer {key}", "x-sim-tokens-per-second": "10"},
            json={"model": "exact", "messages": MESSAGES, "stream": True,
                  "max_tokens": 500}) as response:
        for line in response.iter_lines():
            if line.startswith("data: {"):
                chunk = httpx.Response(200, content=line[6:]).json()
                if chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                    received += O200K.count(chunk["choices"][0]["delta"]["content"])
            if received >= 5:
                break
    closed_at = time.monotonic()
    deadline = closed_at + 3
    while time.monotonic() < deadline:
        stats = sim_stats(sim)
        if stats["streams_cancelled"] >= 1 and gw.balance(account)["held"] == "0":
            break
        time.sleep(0.05)
    stats = sim_stats(sim)
    assert stats["streams_cancelled"] == 1
    assert stats["cancellations"][-1]["at"] - closed_at < 1.0
    state = gw.balance(account)
    assert (state["spent"], state["held"]) == (str(received), "0")


def test_concurrent_streams_deliver_exactly_the_balance(gw: RunningGateway) -> None:
    total = 2000
    account, key = gw.create_account(total)
    observed: list[int] = []

    async def one(aclient: openai.AsyncOpenAI) -> int:
        text = ""
        try:
            stream = await aclient.chat.completions.create(
                model="exact", messages=MESSAGES, stream=True, max_tokens=100_000,
                extra_headers={"x-sim-tokens-per-chunk": "3", "x-sim-output-tokens": "100000"})
            async for chunk in stream:
                if chunk.choices:
                    text += chunk.choices[0].delta.content or ""
        except openai.APIStatusError as exc:
            assert exc.status_code == 402
        return O200K.count(text)

    async def watch(stop: asyncio.Event) -> None:
        async with httpx.AsyncClient(base_url=gw.url, timeout=10, headers={
                "authorization": "Bearer test-admin-token"}) as admin:
            while not stop.is_set():
                body = (await admin.get(f"/admin/accounts/{account}")).json()
                observed.extend([int(body["balance"]), int(body["held"])])
                await asyncio.sleep(0.01)

    async def main() -> list[int]:
        async with openai.AsyncOpenAI(base_url=f"{gw.url}/v1", api_key=key, max_retries=0,
                                      timeout=30) as aclient:
            stop = asyncio.Event()
            watcher = asyncio.create_task(watch(stop))
            counts = await asyncio.gather(*(one(aclient) for _ in range(50)))
            stop.set()
            await watcher
            return list(counts)

    counts = asyncio.run(main())
    assert sum(counts) == total
    assert observed and min(observed) >= 0
    state = gw.balance(account)
    assert (state["balance"], state["held"], state["spent"]) == ("0", "0", str(total))


def test_info_routes(gw: RunningGateway) -> None:
    account, key = gw.create_account(123)
    with httpx.Client(base_url=gw.url, timeout=5) as http:
        assert http.get("/healthz").json() == {"status": "ok"}
        assert http.get("/readyz").json() == {"status": "ready"}
        models = http.get("/v1/models").json()
        assert {m["id"] for m in models["data"]} >= {"exact", "priced"}
        priced = next(m for m in models["data"] if m["id"] == "priced")
        assert priced["tollstream"]["output_per_mtok"] == "0.6"
        balance = http.get("/v1/balance", headers={"authorization": f"Bearer {key}"}).json()
        assert balance["balance"] == "123" and balance["account_id"] == account
        stream_text(gw, key, max_tokens=3)
        metrics = http.get("/metrics").text
        assert 'tollstream_tokens_metered_total{kind="output",model="exact"} 3.0' in metrics
        assert "tollstream_active_streams 0.0" in metrics


def test_pause_policy_waits_for_a_top_up_then_resumes(gateway_factory: Any) -> None:
    with gateway_factory(exhausted_policy="pause", pause_timeout_seconds=1.5) as gw:
        account, key = gw.create_account(10)
        received, notices = 0, 0
        with httpx.Client(timeout=20) as http, http.stream(
                "POST", f"{gw.url}/v1/chat/completions",
                headers={"authorization": f"Bearer {key}"},
                json={"model": "exact", "messages": MESSAGES, "stream": True,
                      "max_tokens": 500}) as response:
            for line in response.iter_lines():
                if line.startswith(": tollstream payment-required"):
                    notices += 1
                    if notices == 1:
                        with gw.admin() as admin:  # top up while the stream waits
                            admin.post(f"/admin/accounts/{account}/credit",
                                       json={"amount": "7"})
                elif line.startswith("data: {"):
                    chunk = httpx.Response(200, content=line[6:]).json()
                    if chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                        received += O200K.count(chunk["choices"][0]["delta"]["content"])
        state = gw.balance(account)
    # 10 tokens, a pause, 7 more after the top-up, a second pause that times out: the cut.
    assert notices == 2 and received == 17
    assert (state["balance"], state["held"], state["spent"]) == ("0", "0", "17")
