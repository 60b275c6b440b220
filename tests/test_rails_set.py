"""Several rails behind one gateway (x402, MPP's evm charge, Stripe holds): a payment one rail
refuses is answered with every rail's fresh challenge and the refusing rail's own words; a
cut stream's top-up hint lists every way to pay; the status page and /metrics gather every
rail; a hold closes through the set; count_tokens takes a payment credential."""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import json
from collections.abc import Callable, Iterator

import httpx
import mpp
import pytest

from gateway.chain.devchain import DevChain
from tests.chain_fixtures import *  # noqa: F403  (session fixtures: chain, evm_network, settler)
from tests.conftest import ADMIN_TOKEN, TEST_MODELS, RunningGateway
from tests.servers import serve
from tests.stripe_server import create_stripe_app
from tests.test_mpp_charge import mpp_config
from tests.test_stripe_charge import CENTS, SECRET, credential, spt
from tests.test_x402_gateway import x402_config

pytestmark = pytest.mark.timeout(90)

Factory = Callable[..., contextlib.AbstractContextManager[RunningGateway]]
CHAT = "/v1/chat/completions"
BODY = {"model": "exact", "stream": True, "max_tokens": 5,
        "messages": [{"role": "user", "content": "hi"}]}


@pytest.fixture(scope="module")
def stripe_url() -> Iterator[str]:
    with serve(create_stripe_app(SECRET)) as url:
        yield url


@pytest.fixture
def every(gateway_factory: Factory, chain: DevChain, stripe_url: str,
          monkeypatch: pytest.MonkeyPatch) -> Iterator[RunningGateway]:
    monkeypatch.setenv("TOLLSTREAM_STRIPE_SECRET_KEY", SECRET)
    with gateway_factory(models={**TEST_MODELS, "cents": CENTS}, x402=x402_config(chain),
                         mpp=mpp_config(chain),
                         stripe={"enabled": True, "api_base": stripe_url,
                                 "network_id": "profile_tollstream_test",
                                 "capture": "manual"}) as running:
        yield running


def offered(response: httpx.Response) -> set[str]:
    """What a 402 offers: x402, and each Payment challenge's method/intent."""
    found = {"x402"} if "payment-required" in response.headers else set()
    for value in response.headers.get_list("www-authenticate"):
        challenge = mpp.Challenge.from_www_authenticate(value)
        found.add(f"{challenge.method}/{challenge.intent}")
    return found


ALL = {"x402", "evm/charge", "stripe/charge"}


def test_a_refused_x402_payment_comes_back_with_every_challenge(
        every: RunningGateway) -> None:
    first = httpx.post(f"{every.url}{CHAT}", json=BODY, timeout=10)
    assert first.status_code == 402 and offered(first) == ALL
    required = json.loads(base64.b64decode(first.headers["payment-required"]))
    accepted = {**required["accepts"][0], "amount": "1"}  # not what was offered
    payload = {"x402Version": 2, "accepted": accepted, "payload": {
        "signature": "0x" + "11" * 65, "authorization": {
            "from": "0x" + "22" * 20, "to": accepted["payTo"], "value": "1",
            "validAfter": "0", "validBefore": "99999999999", "nonce": "0x" + "33" * 32}}}
    refused = httpx.post(f"{every.url}{CHAT}", json=BODY, timeout=10, headers={
        "payment-signature": base64.b64encode(json.dumps(payload).encode()).decode()})
    assert refused.status_code == 402 and offered(refused) == ALL  # fresh, every rail
    body = refused.json()
    assert body["code"] == "invalid_payment_requirements"  # what x402 said
    assert body["x402Version"] == 1 and body["type"].endswith("/payment-required")


def test_a_refused_payment_credential_keeps_its_problem_and_gets_every_challenge(
        every: RunningGateway) -> None:
    first = httpx.post(f"{every.url}{CHAT}", json=BODY, timeout=10)
    stripe_challenge = next(mpp.Challenge.from_www_authenticate(v) for v in
                            first.headers.get_list("www-authenticate") if "stripe" in v)
    tampered = dataclasses.replace(stripe_challenge.to_echo(), realm="elsewhere")
    bad = mpp.Credential(challenge=tampered, payload={"spt": spt()}).to_authorization()
    refused = httpx.post(f"{every.url}{CHAT}", json=BODY, timeout=10,
                         headers={"authorization": bad})
    assert refused.status_code == 402 and offered(refused) == ALL
    assert refused.json()["type"].endswith("/invalid-challenge")
    # On HEAD (a payment action alone) too: every challenge, no body.
    head = httpx.head(f"{every.url}{CHAT}", timeout=10, headers={"authorization": bad})
    assert head.status_code == 402 and offered(head) == ALL


def test_cut_streams_name_every_way_to_top_up(every: RunningGateway) -> None:
    _, key = every.create_account(3)
    cut = httpx.post(f"{every.url}{CHAT}", json=BODY, timeout=10,
                     headers={"authorization": f"Bearer {key}"})
    [reason] = [json.loads(line[6:])["tollstream"] for line in cut.text.splitlines()
                if line.startswith("data: {") and '"tollstream"' in line]
    assert reason["top_up"]["method"] == "any"
    assert {hint["method"] for hint in reason["top_up"]["options"]} == {"x402", "mpp"}


def test_the_status_page_metrics_and_a_hold_close_through_the_set(
        every: RunningGateway) -> None:
    found = next(mpp.Challenge.from_www_authenticate(v) for v in httpx.post(
        f"{every.url}{CHAT}", json={**BODY, "model": "cents"}, timeout=10
    ).headers.get_list("www-authenticate") if "stripe" in v)
    paid = httpx.post(f"{every.url}{CHAT}", json={**BODY, "model": "cents"}, timeout=20,
                      headers={"authorization": credential(found, spt())})
    assert paid.status_code == 200, paid.text
    key = paid.headers["tollstream-api-key"]
    page = httpx.get(f"{every.url}/admin/", timeout=10,
                     headers={"authorization": f"Bearer {ADMIN_TOKEN}"}).text
    assert "x402 deposits settling or awaiting credit" in page
    assert "Stripe holds open</td><td class=num>1" in page
    assert httpx.get(f"{every.url}/metrics", timeout=10).status_code == 200
    # count_tokens accepts the same key as any route; and a payment credential too.
    counted = httpx.post(f"{every.url}/v1/messages/count_tokens", timeout=10,
                         json={"model": "claude-exact", "messages": [
                             {"role": "user", "content": "hi"}]},
                         headers={"authorization": f"Bearer {key}"})
    assert counted.status_code == 200 and counted.json()["input_tokens"] > 0
    closed = httpx.post(f"{every.url}/v1/balance/close", timeout=20,
                        headers={"authorization": f"Bearer {key}"})
    assert closed.status_code == 200 and closed.json()["captured"] == "5"


def test_count_tokens_takes_a_payment_credential(every: RunningGateway) -> None:
    found = next(mpp.Challenge.from_www_authenticate(v) for v in httpx.post(
        f"{every.url}{CHAT}", json=BODY, timeout=10).headers.get_list("www-authenticate")
        if "stripe" in v)
    counted = httpx.post(f"{every.url}/v1/messages/count_tokens", timeout=20,
                         json={"model": "claude-exact", "messages": [
                             {"role": "user", "content": "hi"}]},
                         headers={"authorization": credential(found, spt())})
    assert counted.status_code == 200, counted.text
    assert counted.headers["tollstream-api-key"].startswith("tsk_")  # what was paid arrives
