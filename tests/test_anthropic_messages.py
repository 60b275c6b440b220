"""Anthropic Messages through a real gateway, with the stock anthropic SDK."""

from __future__ import annotations

from typing import Any

import anthropic
import httpx
import pytest

from meters.tokens import get_tokenizer
from tests.conftest import RunningGateway, sim_stats

pytestmark = pytest.mark.timeout(60)

O200K = get_tokenizer("o200k_base")
MESSAGES: list[Any] = [{"role": "user", "content": "Write a long poem."}]


def estimate(deltas: list[str]) -> int:
    """What the meter counts for these deltas: the Claude estimate's running total."""
    counter = get_tokenizer("estimate").counter()
    total = 0
    for delta in deltas:
        total += counter.measure([delta])
        counter.commit([delta])
    return total


def assert_cut_billed(gw: RunningGateway, account: str, deltas: list[str], balance: int
                      ) -> int:
    """A cut stream is billed exactly the estimate of what it delivered, which is the whole
    balance but for less than the price of the one token that did not fit (a cut falls on a
    token boundary; a simulator token costs at most 3 estimate tokens)."""
    billed = estimate(deltas)
    state = gw.balance(account)
    assert (state["held"], state["spent"]) == ("0", str(billed))
    assert 0 <= balance - billed < 3 and state["balance"] == str(balance - billed)
    return billed


def client(gw: RunningGateway, key: str) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=gw.url, api_key=key, max_retries=0, timeout=20)


def run(gw: RunningGateway, key: str, **kwargs: Any) -> tuple[list[str], Any]:
    deltas: list[str] = []
    with client(gw, key).messages.stream(model="claude-exact", messages=MESSAGES,
                                         **kwargs) as stream:
        for event in stream:
            if event.type == "content_block_delta":
                delta = event.delta
                text = getattr(delta, "text", None) or getattr(delta, "partial_json", None) \
                    or getattr(delta, "thinking", None)
                if text:
                    deltas.append(text)
        return deltas, stream.get_final_message()


@pytest.mark.parametrize("per_chunk", [1, 4])
def test_exact_cutoff_at_n_paid_tokens(gw: RunningGateway, per_chunk: int) -> None:
    account, key = gw.create_account(40)
    deltas, final = run(gw, key, max_tokens=1000,
                        extra_headers={"x-sim-tokens-per-chunk": str(per_chunk)})
    # The meter counts the stream's running total with the estimate.
    billed = assert_cut_billed(gw, account, deltas, 40)
    assert final.stop_reason == "max_tokens" and final.usage.output_tokens == billed
    assert final.content[0].text == "".join(deltas)


def test_completed_stream_is_billed_from_reported_usage(gw: RunningGateway) -> None:
    account, key = gw.create_account(10_000)
    deltas, final = run(gw, key, max_tokens=20)
    assert final.stop_reason == "max_tokens" and final.usage.output_tokens == 20
    assert O200K.count("".join(deltas)) == 20
    # The estimate counted more than 20 while streaming; the bill is the reported 20.
    assert estimate(deltas) > 20
    assert gw.balance(account)["spent"] == "20"


def test_tool_use_deltas_are_metered_and_a_cut_parses(gw: RunningGateway) -> None:
    account, key = gw.create_account(25)
    deltas, final = run(gw, key, max_tokens=500, extra_headers={"x-sim-tool-call": "1"})
    assert_cut_billed(gw, account, deltas, 25)
    assert final.stop_reason == "max_tokens" and final.content[0].type == "tool_use"


def test_thinking_deltas_are_metered(gw: RunningGateway) -> None:
    account, key = gw.create_account(10_000)
    _, final = run(gw, key, max_tokens=10, extra_headers={"x-sim-thinking": "1"})
    assert final.content[0].type == "thinking"
    assert final.usage.output_tokens == 18  # 10 text + 8 thinking tokens, as reported
    assert gw.balance(account)["spent"] == "18"
    poor, poor_key = gw.create_account(6)
    deltas, cut = run(gw, poor_key, max_tokens=10, extra_headers={"x-sim-thinking": "1"})
    assert cut.stop_reason == "max_tokens"
    assert_cut_billed(gw, poor, deltas, 6)


def test_x_api_key_auth_and_upstream_key(gw: RunningGateway, sim: str) -> None:
    _, key = gw.create_account(100)
    response = httpx.post(f"{gw.url}/v1/messages", timeout=10,
                          headers={"x-api-key": key, "anthropic-version": "2023-06-01"},
                          json={"model": "claude-exact", "max_tokens": 5,
                                "messages": MESSAGES})
    assert response.status_code == 200 and response.json()["usage"]["output_tokens"] == 5
    import hashlib

    from tests.conftest import SIM_KEY
    assert sim_stats(sim)["last_key_sha256"] == hashlib.sha256(SIM_KEY.encode()).hexdigest()


def test_count_tokens_is_free(gw: RunningGateway) -> None:
    account, key = gw.create_account(100)
    counted = client(gw, key).messages.count_tokens(model="claude-exact", messages=MESSAGES)
    assert counted.input_tokens > 0
    assert gw.balance(account)["spent"] == "0"


def test_errors_come_in_anthropic_shape(gw: RunningGateway) -> None:
    _, key = gw.create_account(0)
    with pytest.raises(anthropic.BadRequestError) as bad:
        client(gw, key).messages.create(model="claude-exact", messages=MESSAGES,
                                        max_tokens=0)
    assert bad.value.body["type"] == "error"  # type: ignore[index]
    assert bad.value.body["tollstream"]["param"] == "max_tokens"  # type: ignore[index]
    with pytest.raises(anthropic.AuthenticationError):
        client(gw, "tsk_wrong").messages.create(model="claude-exact", messages=MESSAGES,
                                                max_tokens=5)
    with pytest.raises(anthropic.NotFoundError):
        client(gw, key).messages.create(model="claude-nope", messages=MESSAGES, max_tokens=5)
    with pytest.raises(anthropic.APIStatusError) as unpaid:
        client(gw, key).messages.create(model="claude-exact", messages=MESSAGES, max_tokens=5)
    assert unpaid.value.status_code == 402
    assert "balance" in unpaid.value.message
    raw = httpx.post(f"{gw.url}/v1/messages", content=b"{oops", timeout=10,
                     headers={"x-api-key": key})
    assert raw.status_code == 400 and raw.json()["error"]["type"] == "invalid_request_error"
