"""Pre-authorized Stripe holds (#11): an SPT authorizes 5.00, the account it funds is metered to
the token, and closing captures exactly what was spent (a partial capture) or cancels a hold
with nothing spent; the sweeper closes idle holds, and after a kill -9 it captures once."""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import mpp
import openai
import pytest

from tests.conftest import TEST_MODELS, RunningGateway, track_prefix
from tests.servers import gateway_process
from tests.stripe_server import create_stripe_app
from tests.test_faults import write_config
from tests.test_stripe_charge import BODY, CENTS, CHAT, SECRET, challenge, credential, spt

pytestmark = [pytest.mark.timeout(90), pytest.mark.asyncio(loop_scope="session")]

Factory = Callable[..., contextlib.AbstractContextManager[RunningGateway]]
MPP = {"enabled": True, "realm": "tollstream.test", "secret": "s" * 32, "charge": False,
       "session": False}


@pytest.fixture(scope="module")
def stripe_url() -> Iterator[str]:
    from tests.servers import serve

    with serve(create_stripe_app(SECRET)) as url:
        yield url


def intent(stripe_url: str, reference: str) -> dict[str, Any]:
    return dict(httpx.get(f"{stripe_url}/_sim/state", timeout=5).json()
                ["payment_intents"][reference])


def hold_config(stripe_url: str, **extra: Any) -> dict[str, Any]:
    return {"enabled": True, "api_base": stripe_url, "network_id": "profile_tollstream_test",
            "credit": "5.00", "capture": "manual", "timeout_seconds": 5, **extra}


@pytest.fixture
def hgw(gateway_factory: Factory, stripe_url: str,
        monkeypatch: pytest.MonkeyPatch) -> Iterator[RunningGateway]:
    monkeypatch.setenv("TOLLSTREAM_STRIPE_SECRET_KEY", SECRET)
    with gateway_factory(models={**TEST_MODELS, "cents": CENTS}, mpp=MPP,
                         stripe=hold_config(stripe_url)) as running:
        yield running


def authorize(gw: RunningGateway) -> tuple[str, str, str]:
    """Pay a hold; (API key, account, PaymentIntent id)."""
    paid = httpx.post(f"{gw.url}{CHAT}", json={**BODY, "max_tokens": 1}, timeout=20,
                      headers={"authorization": credential(challenge(gw), spt())})
    assert paid.status_code == 200, paid.text
    receipt = mpp.Receipt.from_payment_receipt(paid.headers["payment-receipt"])
    key = paid.headers["tollstream-api-key"]
    account = httpx.get(f"{gw.url}/v1/balance", timeout=10,
                        headers={"authorization": f"Bearer {key}"}).json()["account_id"]
    return key, account, receipt.reference


def stream(url: str, key: str, tokens: int) -> str:
    client = openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=30)
    return "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model="cents", messages=BODY["messages"], stream=True, max_tokens=tokens)
        if c.choices)


def close(url: str, key: str) -> httpx.Response:
    return httpx.post(f"{url}/v1/balance/close", timeout=20,
                      headers={"authorization": f"Bearer {key}"})


async def test_a_hold_is_captured_for_exactly_what_was_spent(
        hgw: RunningGateway, stripe_url: str) -> None:
    key, account, reference = authorize(hgw)  # 1 token: 1 cent
    authorized = intent(stripe_url, reference)
    assert (authorized["status"], authorized["capture_method"]) == (
        "requires_capture", "manual")
    assert authorized["amount_capturable"] == 500
    stream(hgw.url, key, 136)
    assert hgw.balance(account)["spent"] == "137"  # 1.37 USD
    closed = close(hgw.url, key)
    assert closed.status_code == 200, closed.text
    assert closed.json() == {
        "account_id": account, "reference": reference, "status": "captured",
        "authorized": "500", "captured": "137", "released": "363",
        "stripe_status": "succeeded"}
    captured = intent(stripe_url, reference)
    assert (captured["status"], captured["amount_received"]) == ("succeeded", 137)
    state = hgw.balance(account)
    assert (state["spent"], state["balance"], state["credited"]) == ("137", "0", "137")
    # Closed: nothing more to spend, nothing more to close.
    assert httpx.post(f"{hgw.url}{CHAT}", json=BODY, timeout=10, headers={
        "authorization": f"Bearer {key}"}).status_code == 402
    assert close(hgw.url, key).json()["error"]["code"] == "hold_closed"


async def test_a_hold_with_nothing_spent_is_cancelled_when_idle(
        gateway_factory: Factory, stripe_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TOLLSTREAM_STRIPE_SECRET_KEY", SECRET)
    with gateway_factory(models={**TEST_MODELS, "cents": CENTS}, mpp=MPP,
                         stripe=hold_config(stripe_url, hold_idle_seconds=1,
                                            hold_sweep_seconds=0.2)) as gw:
        found = challenge(gw)
        paid = httpx.post(f"{gw.url}{CHAT}", timeout=20, json={**BODY, "max_tokens": 1},
                          headers={"authorization": credential(found, spt()),
                                   "x-sim-status": "503"})  # the model fails: nothing spent
        assert paid.status_code == 502
        assert "tollstream-api-key" in paid.headers  # what was paid reaches the payer
        assert "payment-receipt" not in paid.headers  # never on an error
        deadline = time.monotonic() + 15
        while True:
            state = httpx.get(f"{stripe_url}/_sim/state", timeout=5).json()
            [pi] = [pi for pi in state["payment_intents"].values()
                    if pi["metadata"].get("challenge_id") == found.id]
            if pi["status"] == "canceled":
                break
            assert time.monotonic() < deadline, "the idle hold was never cancelled"
            time.sleep(0.1)
        assert pi["amount_received"] == 0


async def test_a_running_stream_keeps_its_hold_open(hgw: RunningGateway) -> None:
    key, _, _ = authorize(hgw)
    with httpx.Client(timeout=30) as client, client.stream(
            "POST", f"{hgw.url}{CHAT}", json={**BODY, "max_tokens": 200},
            headers={"authorization": f"Bearer {key}", "x-sim-tokens-per-second": "50"}
            ) as response:
        for line in response.iter_lines():
            if line.startswith("data: {"):
                busy = close(hgw.url, key)
                assert busy.status_code == 409
                assert busy.json()["error"]["code"] == "hold_busy"
                break
    deadline = time.monotonic() + 10
    while (answer := close(hgw.url, key)).status_code == 409:  # the stream's end settles
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert answer.status_code == 200 and answer.json()["status"] == "captured"


async def test_a_close_of_an_account_without_a_hold_is_404(hgw: RunningGateway) -> None:
    _, key = hgw.create_account(100)
    refused = close(hgw.url, key)
    assert refused.status_code == 404 and refused.json()["error"]["code"] == "no_hold"


async def test_after_a_crash_the_sweeper_captures_once(
        sim: str, redis_url: str, stripe_url: str) -> None:
    prefix = track_prefix(f"t{secrets.token_hex(4)}:")
    config = write_config(sim, redis_url, prefix)
    models = ['[models."cents"]'] + [f'{k} = "{v}"' for k, v in CENTS.items()]
    section = ["[mpp]", 'enabled = true', 'realm = "tollstream.test"',
               f'secret = "{"s" * 32}"', "charge = false", "session = false", "[stripe]",
               "enabled = true", f'api_base = "{stripe_url}"',
               'network_id = "profile_tollstream_test"', 'capture = "manual"',
               "hold_idle_seconds = 3600"]
    with open(config, "a") as handle:
        handle.write("\n" + "\n".join(models + section) + "\n")
    env = {"TOLLSTREAM_STRIPE_SECRET_KEY": SECRET}
    with gateway_process(config, env=env) as (url, proc):
        found = mpp.Challenge.from_www_authenticate(next(
            v for v in httpx.post(f"{url}{CHAT}", json=BODY, timeout=10).headers.get_list(
                "www-authenticate") if 'method="stripe"' in v))
        paid = httpx.post(f"{url}{CHAT}", json={**BODY, "max_tokens": 50}, timeout=20,
                          headers={"authorization": credential(found, spt())})
        assert paid.status_code == 200, paid.text
        reference = mpp.Receipt.from_payment_receipt(paid.headers["payment-receipt"]).reference
        os.kill(proc.pid, signal.SIGKILL)  # before any capture
        proc.wait(5)
    assert intent(stripe_url, reference)["status"] == "requires_capture"
    # The next process, with a short idle time, finds the hold and captures it.
    fast = config + ".fast.toml"
    with open(config) as source, open(fast, "w") as target:
        target.write(source.read().replace("hold_idle_seconds = 3600",
                                           "hold_idle_seconds = 1\nhold_sweep_seconds = 0.2"))
    with gateway_process(fast, env=env):
        deadline = time.monotonic() + 20
        while intent(stripe_url, reference)["status"] != "succeeded":
            assert time.monotonic() < deadline, "the hold was never captured"
            time.sleep(0.1)
    captured = intent(stripe_url, reference)
    assert captured["amount_received"] == 50  # what the killed process's answer spent
    calls = [r for r in httpx.get(f"{stripe_url}/_sim/state", timeout=5).json()["requests"]
             if r["path"] == f"/v1/payment_intents/{reference}/capture"]
    assert len(calls) == 1  # captured once


async def test_a_hold_nearing_its_expiry_is_closed(stripe_url: str, redis_url: str) -> None:
    from gateway.rails.stripe.client import StripeApi
    from gateway.rails.stripe.holds import HoldKeeper
    from meters.connection import connect
    from meters.ledger import Ledger
    from meters.money import fiat_account

    ledger = Ledger(connect(redis_url), prefix=track_prefix(f"t{secrets.token_hex(4)}:"))
    api = StripeApi(SECRET, api_base=stripe_url, timeout=5)
    keeper = HoldKeeper(api=api, ledger=ledger, idle_seconds=10**6, max_seconds=100,
                        interval=60)
    try:
        intent = await api.create_payment_intent(
            {"amount": 300, "currency": "usd", "confirm": True, "capture_method": "manual",
             "shared_payment_granted_token": spt(), "payment_method_types": ["card"]},
            idempotency_key=secrets.token_hex(8))
        account = fiat_account("usd", secrets.token_hex(8))
        await ledger.ensure_account(account)
        await ledger.credit(account, 300, idempotency_key=intent["id"], purpose="stripe")
        now = int(time.time())
        await keeper.holds.open(intent["id"], account_id=account, amount=300,
                                expires=now + 100, now=now)
        assert await keeper.sweep(now=now + 50) == 0  # neither idle nor expiring yet
        assert await keeper.sweep(now=now + 100) == 1  # about to lapse: closed, unspent
        assert intent_state(stripe_url, intent["id"]) == "canceled"
        assert await keeper.close(intent["id"]) is None  # closed already
        assert await keeper.sweep(now=now + 200) == 0
    finally:
        await api.aclose()
        await ledger.redis.aclose()


def intent_state(stripe_url: str, reference: str) -> str:
    return str(intent(stripe_url, reference)["status"])
