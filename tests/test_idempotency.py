"""``Idempotency-Key`` on metered requests: a retry gets the first answer and is never charged
again; the key is scoped to the paying account and bound to its request; a retry while the first
runs gets 409 with Retry-After; a request that charged nothing leaves no record."""

from __future__ import annotations

import threading
import time
from typing import Any

import httpx
import pytest

from tests.conftest import RunningGateway, sim_stats

pytestmark = pytest.mark.timeout(60)

CHAT = "/v1/chat/completions"


def body(max_tokens: int = 20, *, stream: bool = True, content: str = "hi") -> dict[str, Any]:
    return {"model": "exact", "stream": stream, "max_tokens": max_tokens,
            "messages": [{"role": "user", "content": content}]}


def post(gw: RunningGateway, key: str, idem: str | None, payload: dict[str, Any],
         **headers: str) -> httpx.Response:
    extra = {"authorization": f"Bearer {key}", **headers}
    if idem is not None:
        extra["idempotency-key"] = idem
    return httpx.post(f"{gw.url}{CHAT}", json=payload, headers=extra, timeout=30)


def test_a_retried_stream_is_answered_from_the_first_and_charged_once(
        gw: RunningGateway, sim: str) -> None:
    account, key = gw.create_account(100)
    first = post(gw, key, "retry-1", body())
    assert first.status_code == 200 and b"[DONE]" in first.content
    assert gw.balance(account)["spent"] == "20"
    started = sim_stats(sim)["streams_started"]
    again = post(gw, key, "retry-1", body())
    assert again.status_code == 200 and again.headers["idempotent-replayed"] == "true"
    assert again.content == first.content  # byte for byte
    assert again.headers["content-type"].startswith("text/event-stream")
    assert sim_stats(sim)["streams_started"] == started  # the model was not asked again
    state = gw.balance(account)
    assert (state["spent"], state["balance"]) == ("20", "80")
    # The same key with another request: refused, nothing charged.
    other = post(gw, key, "retry-1", body(content="something else"))
    assert other.status_code == 409
    assert other.json()["error"]["code"] == "idempotency_key_reused"
    # Another key is another request.
    assert post(gw, key, "retry-2", body()).status_code == 200
    assert gw.balance(account)["spent"] == "40"


def test_non_streaming_replay(gw: RunningGateway) -> None:
    account, key = gw.create_account(100)
    first = post(gw, key, "ns", body(stream=False))
    again = post(gw, key, "ns", body(stream=False))
    assert first.status_code == again.status_code == 200
    assert again.json() == first.json() and again.headers["idempotent-replayed"] == "true"
    assert gw.balance(account)["spent"] == "20"


def test_keys_are_scoped_to_the_paying_account(gw: RunningGateway) -> None:
    one, key_one = gw.create_account(100)
    two, key_two = gw.create_account(100)
    assert post(gw, key_one, "shared", body()).status_code == 200
    assert post(gw, key_two, "shared", body(10)).status_code == 200  # its own request
    assert (gw.balance(one)["spent"], gw.balance(two)["spent"]) == ("20", "10")


def test_a_retry_while_the_first_runs_gets_409_retry_after(gw: RunningGateway) -> None:
    account, key = gw.create_account(100)
    results: dict[str, httpx.Response] = {}
    slow = threading.Thread(target=lambda: results.update(first=post(
        gw, key, "running", body(30), **{"x-sim-tokens-per-second": "20"})))
    slow.start()
    deadline = time.monotonic() + 10
    while gw.balance(account)["held"] == "0":  # the first one holds money: it runs
        assert time.monotonic() < deadline
        time.sleep(0.02)
    during = post(gw, key, "running", body(30), **{"x-sim-tokens-per-second": "20"})
    assert during.status_code == 409 and during.headers["retry-after"] == "1"
    assert during.json()["error"]["code"] == "idempotency_in_progress"
    slow.join(30)
    assert results["first"].status_code == 200
    after = post(gw, key, "running", body(30), **{"x-sim-tokens-per-second": "20"})
    assert after.content == results["first"].content
    assert gw.balance(account)["spent"] == "30"


def test_a_request_that_charged_nothing_leaves_no_record(gw: RunningGateway) -> None:
    account, key = gw.create_account(0)
    refused = post(gw, key, "later", body())
    assert refused.status_code == 402
    with gw.admin() as admin:
        admin.post(f"/admin/accounts/{account}/credit", json={"amount": "50"})
    assert post(gw, key, "later", body()).status_code == 200  # runs anew, not a replay
    assert gw.balance(account)["spent"] == "20"


@pytest.mark.parametrize("bad", ["", "x" * 256, "tab\there"])
def test_a_malformed_key_is_refused_naming_the_header(gw: RunningGateway, bad: str) -> None:
    account, key = gw.create_account(100)
    refused = post(gw, key, bad, body())
    assert refused.status_code == 400
    error = refused.json()["error"]
    assert error["code"] == "invalid_idempotency_key" and error["param"] == "idempotency-key"
    assert gw.balance(account)["spent"] == "0"
