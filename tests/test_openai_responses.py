"""OpenAI Responses through a real gateway, with the stock openai SDK."""

from __future__ import annotations

from typing import Any

import httpx
import openai
import pytest

from meters.tokens import get_tokenizer
from tests.conftest import RunningGateway

pytestmark = pytest.mark.timeout(60)

O200K = get_tokenizer("o200k_base")


def client(gw: RunningGateway, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{gw.url}/v1", api_key=key, max_retries=0, timeout=20)


def run(gw: RunningGateway, key: str, **kwargs: Any) -> tuple[str, list[Any]]:
    events = list(client(gw, key).responses.create(model="resp-exact", input="Write code.",
                                                   stream=True, **kwargs))
    text = "".join(e.delta for e in events if e.type in (
        "response.output_text.delta", "response.function_call_arguments.delta"))
    return text, events


@pytest.mark.parametrize("per_chunk", [1, 3])
def test_exact_cutoff_at_n_paid_tokens(gw: RunningGateway, per_chunk: int) -> None:
    account, key = gw.create_account(33)
    text, events = run(gw, key, max_output_tokens=500,
                       extra_headers={"x-sim-tokens-per-chunk": str(per_chunk)})
    assert O200K.count(text) == 33
    last = events[-1]
    assert last.type == "response.incomplete"
    assert last.response.incomplete_details.reason == "max_output_tokens"
    assert last.response.usage.output_tokens == 33
    assert last.model_extra["tollstream"]["type"] == "allowance_exhausted"
    done = [e for e in events if e.type == "response.output_text.done"]
    assert done and done[-1].text == text
    assert [e.sequence_number for e in events] == sorted({e.sequence_number for e in events})
    state = gw.balance(account)
    assert (state["balance"], state["held"], state["spent"]) == ("0", "0", "33")


def test_stream_helper_parses_a_cut(gw: RunningGateway) -> None:
    _, key = gw.create_account(12)
    with client(gw, key).responses.stream(model="resp-exact", input="Write code.") as stream:
        events = list(stream)
    # (get_final_response() insists on response.completed, for real OpenAI incomplete
    # responses too; the incomplete response is the last event.)
    last = events[-1]
    assert last.type == "response.incomplete" and last.response.status == "incomplete"
    assert O200K.count(last.response.output_text) == 12


def test_completed_stream_bills_reported_usage_with_reasoning(gw: RunningGateway) -> None:
    account, key = gw.create_account(10_000)
    text, events = run(gw, key, max_output_tokens=15,
                       extra_headers={"x-sim-output-tokens": "10",
                                      "x-sim-reasoning-tokens": "5"})
    assert events[-1].type == "response.completed" and O200K.count(text) == 10
    assert events[-1].response.usage.output_tokens == 15
    assert gw.balance(account)["spent"] == "15"  # 10 streamed + 5 reported reasoning tokens


def test_function_call_arguments_are_metered_and_a_cut_parses(gw: RunningGateway) -> None:
    account, key = gw.create_account(9)
    text, events = run(gw, key, max_output_tokens=100, extra_headers={"x-sim-tool-call": "1"})
    assert sum(O200K.count(e.delta) for e in events
               if e.type == "response.function_call_arguments.delta") == 9
    done = [e for e in events if e.type == "response.function_call_arguments.done"]
    assert done and done[-1].arguments == text
    assert events[-1].type == "response.incomplete"
    assert gw.balance(account)["spent"] == "9"


def test_non_streaming(gw: RunningGateway) -> None:
    account, key = gw.create_account(100)
    response = client(gw, key).responses.create(model="resp-exact", input="hi",
                                                max_output_tokens=7)
    assert O200K.count(response.output_text) == 7
    assert gw.balance(account)["spent"] == "7"


def test_errors_come_in_openai_shape(gw: RunningGateway) -> None:
    _, key = gw.create_account(0)
    with pytest.raises(openai.BadRequestError) as bad:
        client(gw, key).responses.create(model="resp-exact", input="")
    assert bad.value.code == "invalid_request" and bad.value.param == "input"
    with pytest.raises(openai.APIStatusError) as unpaid:
        client(gw, key).responses.create(model="resp-exact", input="hi")
    assert unpaid.value.status_code == 402
    raw = httpx.post(f"{gw.url}/v1/responses", content=b"[", timeout=10,
                     headers={"authorization": f"Bearer {key}"})
    assert raw.status_code == 400 and raw.json()["error"]["code"] == "invalid_json"
    wrong = httpx.post(f"{gw.url}/v1/responses", timeout=10,
                       headers={"authorization": f"Bearer {key}"},
                       json={"model": "exact", "input": "hi"})
    assert wrong.status_code == 400 and wrong.json()["error"]["code"] == "wrong_endpoint"


def test_upstream_failure_mid_stream_bills_delivered(gw: RunningGateway) -> None:
    account, key = gw.create_account(100)
    text, events = run(gw, key, max_output_tokens=50, extra_headers={"x-sim-fail-after": "6"})
    # The upstream's own error event reaches the client as the API sends it (the SDK yields
    # it as an ErrorEvent), and only the delivered tokens are billed.
    assert events[-1].type == "error" and O200K.count(text) == 6
    assert gw.balance(account)["spent"] == "6"
