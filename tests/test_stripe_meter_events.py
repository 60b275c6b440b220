"""Usage to Stripe billing meters (#11): one meter event per finished request of an account with
a Stripe customer, queued with the request's final charge, none lost while Stripe is down, none
duplicated after a restart (the identifier is the request's; a resend is deduplicated)."""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest

from tests.conftest import RunningGateway, sim_stats, track_prefix
from tests.servers import gateway_process, serve
from tests.stripe_server import create_stripe_app
from tests.test_faults import write_config
from tests.test_stripe_charge import SECRET

pytestmark = pytest.mark.timeout(90)

Factory = Callable[..., contextlib.AbstractContextManager[RunningGateway]]
BODY = {"model": "exact", "stream": True, "max_tokens": 7,
        "messages": [{"role": "user", "content": "hi"}]}


@pytest.fixture(scope="module")
def stripe_url() -> Iterator[str]:
    with serve(create_stripe_app(SECRET)) as url:
        yield url


@pytest.fixture
def mode(stripe_url: str) -> Iterator[Callable[..., None]]:
    def set_mode(**values: Any) -> None:
        httpx.post(f"{stripe_url}/_sim/mode", json=values, timeout=5)
    yield set_mode
    set_mode(down=False, delay=0)


def events(stripe_url: str, customer: str) -> list[dict[str, Any]]:
    state = httpx.get(f"{stripe_url}/_sim/state", timeout=5).json()
    return [e for e in state["meter_events"].values()
            if e["payload"]["stripe_customer_id"] == customer]


def usage_config(stripe_url: str) -> dict[str, Any]:
    return {"enabled": True, "charge": False, "api_base": stripe_url,
            "meter_event_name": "tollstream_tokens", "meter_events_interval_seconds": 0.1}


@pytest.fixture
def ugw(gateway_factory: Factory, stripe_url: str,
        monkeypatch: pytest.MonkeyPatch) -> Iterator[RunningGateway]:
    monkeypatch.setenv("TOLLSTREAM_STRIPE_SECRET_KEY", SECRET)
    with gateway_factory(stripe=usage_config(stripe_url)) as running:
        yield running


def customer_account(gw: RunningGateway, customer: str | None) -> str:
    body: dict[str, Any] = {"balance": "1000"}
    if customer:
        body["stripe_customer"] = customer
    with gw.admin() as admin:
        created = admin.post("/admin/accounts", json=body)
    assert created.status_code == 201, created.text
    return str(created.json()["api_key"])


def ask(url: str, key: str) -> str:
    """One answer; its request id."""
    answer = httpx.post(f"{url}/v1/chat/completions", json=BODY, timeout=20,
                        headers={"authorization": f"Bearer {key}"})
    assert answer.status_code == 200 and b"[DONE]" in answer.content
    return answer.headers["x-request-id"]


def wait_for(count: int, stripe_url: str, customer: str, seconds: float = 15
             ) -> list[dict[str, Any]]:
    deadline = time.monotonic() + seconds
    while len(found := events(stripe_url, customer)) < count:
        assert time.monotonic() < deadline, f"{len(found)} of {count} meter events"
        time.sleep(0.05)
    return found


def attempts(stripe_url: str, customer: str, count: int) -> None:
    """Until Stripe was asked ``count`` times to take ``customer``'s events (bounded)."""
    deadline = time.monotonic() + 15
    while len([r for r in httpx.get(f"{stripe_url}/_sim/state", timeout=5).json()["requests"]
               if r["path"] == "/v1/billing/meter_events"
               and any(customer in value for _, value in r["form"])]) < count:
        assert time.monotonic() < deadline, f"fewer than {count} sends"
        time.sleep(0.02)


def passes(gw: RunningGateway, count: int) -> None:
    """Until the gateway's sender made ``count`` more passes (bounded)."""
    sender = gw.gateway.usage
    assert sender is not None
    target, deadline = sender.passes + count, time.monotonic() + 15
    while sender.passes < target:
        assert time.monotonic() < deadline
        time.sleep(0.02)


def test_one_meter_event_per_request(ugw: RunningGateway, stripe_url: str, sim: str) -> None:
    customer = f"cus_{secrets.token_hex(6)}"
    key = customer_account(ugw, customer)
    other = customer_account(ugw, None)  # no Stripe customer: nothing reported
    requests = {ask(ugw.url, key) for _ in range(3)}
    ask(ugw.url, other)
    found = wait_for(3, stripe_url, customer)
    reported = sim_stats(sim)["reported"]
    assert {e["identifier"] for e in found} == requests  # each request's X-Request-Id
    assert all(e["event_name"] == "tollstream_tokens" for e in found)
    # The value is the tokens billed: the prompt as the model reported it, 7 output tokens.
    assert sorted(int(e["payload"]["value"]) for e in found) == sorted(
        r["input"] + r["output"] for r in reported[:3])
    passes(ugw, 3)  # three more passes: nothing else arrives
    assert len(events(stripe_url, customer)) == 3


def test_none_lost_while_stripe_is_down(ugw: RunningGateway, stripe_url: str,
                                        mode: Callable[..., None]) -> None:
    customer = f"cus_{secrets.token_hex(6)}"
    key = customer_account(ugw, customer)
    mode(down=True)
    for _ in range(2):
        ask(ugw.url, key)
    attempts(stripe_url, customer, 3)  # the sender keeps meeting the outage
    assert events(stripe_url, customer) == []
    mode(down=False)
    assert len(wait_for(2, stripe_url, customer)) == 2


def test_none_duplicated_after_a_crash_mid_send(sim: str, redis_url: str, stripe_url: str,
                                                mode: Callable[..., None]) -> None:
    prefix = track_prefix(f"t{secrets.token_hex(4)}:")
    config = write_config(sim, redis_url, prefix)
    with open(config, "a") as handle:
        handle.write(f'\n[stripe]\nenabled = true\ncharge = false\napi_base = "{stripe_url}"\n'
                     'meter_event_name = "tollstream_tokens"\n'
                     "meter_events_interval_seconds = 0.1\n")
    env = {"TOLLSTREAM_STRIPE_SECRET_KEY": SECRET}
    customer = f"cus_{secrets.token_hex(6)}"
    mode(delay=2)  # the send is in flight when the gateway dies
    with gateway_process(config, env=env) as (url, proc):
        with httpx.Client(base_url=url, timeout=10,
                          headers={"authorization": "Bearer test-admin-token"}) as admin:
            key = admin.post("/admin/accounts", json={"balance": "1000",
                                                      "stripe_customer": customer}
                             ).json()["api_key"]
        ask(url, key)
        attempts(stripe_url, customer, 1)  # in flight (delayed) when the gateway dies
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(5)
    mode(delay=0)
    with gateway_process(config, env=env):  # resends what was in flight
        attempts(stripe_url, customer, 2)  # resent after the crash
        deadline = time.monotonic() + 10  # and the first, delayed send lands too
        while httpx.get(f"{stripe_url}/_sim/state", timeout=5).json()["in_flight"]:
            assert time.monotonic() < deadline
            time.sleep(0.05)
    assert len(events(stripe_url, customer)) == 1  # one event, sent twice
