"""MPP's ``stripe`` charge (#11): an SPT buys a fiat balance through one PaymentIntent, made by
the real ``stripe`` SDK against a local server speaking Stripe's wire format
(tests/stripe_server.py). A payment is taken once however often its credential arrives;
declines, 3-D Secure and Stripe outages credit nothing; the stock ``openai`` SDK streams on
the issued key, billed in cents; pympp's client pays the challenge."""

from __future__ import annotations

import asyncio
import contextlib
import secrets
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import mpp
import openai
import pytest
import redis
from mpp.client import Mpp
from mpp.methods.stripe import client as pympp_stripe

from tests.conftest import TEST_MODELS, RunningGateway
from tests.servers import serve
from tests.stripe_server import PREVIEW_VERSION, create_stripe_app

pytestmark = [pytest.mark.timeout(60), pytest.mark.asyncio(loop_scope="session")]

Factory = Callable[..., contextlib.AbstractContextManager[RunningGateway]]
SECRET = "sk_test_tollstream"
CHAT = "/v1/chat/completions"
#: One cent per output token, nothing for input: 10,000 USDC per million tokens at 1 USD/USDC.
CENTS = {"upstream": "sim", "dialect": "openai_chat", "input_per_mtok": "0",
         "output_per_mtok": "10000"}
BODY = {"model": "cents", "stream": True, "max_tokens": 20,
        "messages": [{"role": "user", "content": "hi"}]}


@pytest.fixture(scope="module")
def stripe_url() -> Iterator[str]:
    with serve(create_stripe_app(SECRET)) as url:
        yield url


@pytest.fixture
def stripe_state(stripe_url: str) -> Iterator[Callable[[], dict[str, Any]]]:
    def state() -> dict[str, Any]:
        return dict(httpx.get(f"{stripe_url}/_sim/state", timeout=5).json())
    yield state
    httpx.post(f"{stripe_url}/_sim/mode", json={"down": False, "delay": 0}, timeout=5)


def stripe_config(stripe_url: str, **extra: Any) -> dict[str, Any]:
    return {"enabled": True, "api_base": stripe_url, "network_id": "profile_tollstream_test",
            "payment_method_types": ["card", "link"], "credit": "5.00",
            "timeout_seconds": 2, **extra}


@pytest.fixture
def sgw(gateway_factory: Factory, stripe_url: str,
        monkeypatch: pytest.MonkeyPatch) -> Iterator[RunningGateway]:
    monkeypatch.setenv("TOLLSTREAM_STRIPE_SECRET_KEY", SECRET)
    with gateway_factory(
            models={**TEST_MODELS, "cents": CENTS},
            mpp={"enabled": True, "realm": "tollstream.test", "secret": "s" * 32,
                 "charge": False, "session": False},
            stripe=stripe_config(stripe_url)) as running:
        yield running


def challenge(gw: RunningGateway, **headers: str) -> mpp.Challenge:
    response = httpx.post(f"{gw.url}{CHAT}", json=BODY, headers=headers, timeout=10)
    assert response.status_code == 402, response.text
    for value in response.headers.get_list("www-authenticate"):
        found = mpp.Challenge.from_www_authenticate(value)
        if found.method == "stripe":
            return found
    raise AssertionError("no stripe challenge")


def credential(found: mpp.Challenge, spt: str, **extra: Any) -> str:
    return mpp.Credential(challenge=found.to_echo(),
                          payload={"spt": spt, **extra}).to_authorization()


def pay(gw: RunningGateway, authorization: str, **headers: str) -> httpx.Response:
    return httpx.post(f"{gw.url}{CHAT}", json=BODY, timeout=20,
                      headers={"authorization": authorization, **headers})


def spt(kind: str = "ok") -> str:
    return f"spt_{kind}_{secrets.token_hex(6)}"


def intents_for(state: dict[str, Any], token: str) -> list[dict[str, Any]]:
    return [pi for pi in state["payment_intents"].values()
            if pi["shared_payment_granted_token"] == token]


def fiat_accounts(gw: RunningGateway, redis_url: str) -> list[str]:
    client = redis.Redis.from_url(redis_url)
    try:
        return [k.decode() for k in client.scan_iter(
            match=f"{gw.settings.key_prefix}acct:{{fiat_*}}", count=10_000)]
    finally:
        client.close()


def problem_of(response: httpx.Response, kind: str) -> dict[str, Any]:
    assert response.status_code == 402, response.text
    body = dict(response.json())
    assert body["type"].endswith("/" + kind), body
    assert "payment-receipt" not in response.headers
    return body


async def test_an_spt_buys_credit_and_the_openai_sdk_streams_with_the_key(
        sgw: RunningGateway, stripe_state: Callable[[], dict[str, Any]]) -> None:
    found = challenge(sgw)
    request = found.request
    assert (request["amount"], request["currency"]) == ("500", "usd")  # 5.00 USD in cents
    assert request["methodDetails"] == {"networkId": "profile_tollstream_test",
                                        "paymentMethodTypes": ["card", "link"]}
    token = spt()
    paid = pay(sgw, credential(found, token, externalId="order-7"))
    assert paid.status_code == 200, paid.text
    receipt = mpp.Receipt.from_payment_receipt(paid.headers["payment-receipt"])
    assert receipt.status == "success" and receipt.reference.startswith("pi_")
    # What Stripe saw: one form-encoded PaymentIntent, confirmed with the SPT, the preview
    # version, the idempotency key both MPP SDKs use, the challenge in its metadata.
    state = stripe_state()
    [intent] = intents_for(state, token)
    assert intent["id"] == receipt.reference and intent["status"] == "succeeded"
    assert intent["metadata"] == {"challenge_id": found.id}
    [call] = [r for r in state["requests"] if ["shared_payment_granted_token", token]
              in r["form"]]
    headers = call["headers"]
    assert headers["stripe-version"] == PREVIEW_VERSION
    assert headers["idempotency-key"] == f"mpp_{found.id}_{token}"
    assert headers["content-type"].startswith("application/x-www-form-urlencoded")
    assert ["confirm", "true"] in call["form"] and ["amount", "500"] in call["form"]
    # A fiat account, in cents: 20 tokens of the first answer cost 20 cents.
    key = paid.headers["tollstream-api-key"]
    balance = httpx.get(f"{sgw.url}/v1/balance", timeout=10,
                        headers={"authorization": f"Bearer {key}"}).json()
    assert balance["account_id"].startswith("fiat_usd_")
    assert (balance["asset"], balance["decimals"]) == ("USD", 2)
    assert (balance["credited"], balance["spent"]) == ("500", "20")
    client = openai.OpenAI(base_url=f"{sgw.url}/v1", api_key=key, max_retries=0, timeout=20)
    text = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model="cents", messages=BODY["messages"], stream=True, max_tokens=30) if c.choices)
    assert text
    state_after = sgw.balance(balance["account_id"])
    assert (state_after["spent"], state_after["balance"]) == ("50", "450")
    models = httpx.get(f"{sgw.url}/v1/models", timeout=10).json()["data"]
    [cents] = [m for m in models if m["id"] == "cents"]
    assert cents["tollstream"]["usd"] == {"input_per_mtok": "0.0",
                                          "output_per_mtok": "10000.0"}


async def test_a_credential_pays_once(sgw: RunningGateway,
                                      stripe_state: Callable[[], dict[str, Any]]) -> None:
    found = challenge(sgw)
    token = spt()
    authorization = credential(found, token)
    first = pay(sgw, authorization)
    assert first.status_code == 200
    problem_of(pay(sgw, authorization), "invalid-challenge")  # the key went out already
    assert len(intents_for(stripe_state(), token)) == 1
    account = httpx.get(f"{sgw.url}/v1/balance", timeout=10, headers={
        "authorization": f"Bearer {first.headers['tollstream-api-key']}"}).json()
    assert account["credited"] == "500"


async def test_the_same_credential_at_once_makes_one_payment_intent_and_one_credit(
        sgw: RunningGateway, stripe_state: Callable[[], dict[str, Any]],
        stripe_url: str) -> None:
    httpx.post(f"{stripe_url}/_sim/mode", json={"delay": 0.3}, timeout=5)  # overlap them
    found = challenge(sgw)
    token = spt()
    authorization = credential(found, token)
    async with httpx.AsyncClient(timeout=20) as client:
        answers = await asyncio.gather(*(client.post(
            f"{sgw.url}{CHAT}", json=BODY, headers={"authorization": authorization})
            for _ in range(2)))
    assert sorted(a.status_code for a in answers) in ([200, 200], [200, 402])
    [intent] = intents_for(stripe_state(), token)
    keys = {a.headers["tollstream-api-key"] for a in answers if a.status_code == 200}
    accounts = {httpx.get(f"{sgw.url}/v1/balance", timeout=10, headers={
        "authorization": f"Bearer {k}"}).json()["account_id"] for k in keys}
    [account] = accounts
    assert sgw.balance(account)["credited"] == "500"
    # The same SPT on another challenge: Stripe refuses the spent token, nothing credited.
    again = pay(sgw, credential(challenge(sgw), token))
    assert problem_of(again, "verification-failed")["reason"] == "resource_missing"
    assert intents_for(stripe_state(), token) == [intent]
    assert sgw.balance(account)["credited"] == "500"


@pytest.mark.parametrize(("kind", "reason"), [("decline", "card_declined"),
                                              ("action", "requires_action"),
                                              ("unknown", "resource_missing")])
async def test_refused_payments_credit_nothing(sgw: RunningGateway, kind: str,
                                               reason: str, redis_url: str) -> None:
    refused = pay(sgw, credential(challenge(sgw), spt(kind)))
    body = problem_of(refused, "verification-failed")
    assert body["reason"] == reason and body["detail"]
    assert "tollstream-api-key" not in refused.headers
    assert any(v.lower().startswith("payment ") for v in
               refused.headers.get_list("www-authenticate"))  # a fresh challenge
    if kind == "decline":
        assert body["declineCode"] == "generic_decline"
    assert fiat_accounts(sgw, redis_url) == []  # nothing credited anywhere


@pytest.mark.parametrize("fault", [{"down": True}, {"delay": 3}])
async def test_stripe_down_is_503_and_the_same_credential_works_later(
        sgw: RunningGateway, stripe_url: str, fault: dict[str, Any],
        stripe_state: Callable[[], dict[str, Any]], redis_url: str) -> None:
    found = challenge(sgw)
    token = spt()
    httpx.post(f"{stripe_url}/_sim/mode", json=fault, timeout=5)
    down = pay(sgw, credential(found, token))
    assert down.status_code == 503, down.text
    assert fiat_accounts(sgw, redis_url) == []
    assert down.json()["error"]["code"] == "stripe_unavailable"
    assert "tollstream-api-key" not in down.headers
    httpx.post(f"{stripe_url}/_sim/mode", json={"down": False, "delay": 0}, timeout=5)
    later = pay(sgw, credential(found, token))  # the same credential: safe to retry
    assert later.status_code == 200, later.text
    # A timed-out call may have reached Stripe: the retry replayed it, one PaymentIntent.
    assert len(intents_for(stripe_state(), token)) == 1


@pytest.mark.parametrize(("payload", "param"), [
    ({"spt": "not-an-spt"}, "payload.spt"), ({}, "payload.spt"),
    ({"spt": "spt_ok_1", "extra": 1}, "payload.extra")])
async def test_a_malformed_payload_names_the_field(sgw: RunningGateway,
                                                   payload: dict[str, Any], param: str) -> None:
    found = challenge(sgw)
    bad = mpp.Credential(challenge=found.to_echo(), payload=payload).to_authorization()
    body = problem_of(pay(sgw, bad), "malformed-credential")
    assert body["param"] == param


async def test_a_key_sent_with_the_payment_tops_its_account_up(sgw: RunningGateway) -> None:
    first = pay(sgw, credential(challenge(sgw), spt()))
    key = first.headers["tollstream-api-key"]
    topped = httpx.post(f"{sgw.url}{CHAT}", json=BODY, timeout=20, headers={
        "authorization": f"Bearer {key}",
        "payment-authorization": credential(challenge(sgw), spt())})
    assert topped.status_code == 200, topped.text
    account = httpx.get(f"{sgw.url}/v1/balance", timeout=10,
                        headers={"authorization": f"Bearer {key}"}).json()
    assert account["credited"] == "1000" and account["spent"] == "40"


async def test_pympp_pays_the_stripe_challenge(sgw: RunningGateway,
                                               stripe_state: Callable[[], dict[str, Any]]
                                               ) -> None:
    seen: list[Any] = []

    async def create_token(params: Any) -> str:
        seen.append(params)  # a real agent asks its backend for an SPT with these limits
        return spt()

    async with Mpp(methods=[pympp_stripe.charge(create_token=create_token,
                                                payment_method="pm_card_visa")]) as client:
        paid = await client.fetch(f"{sgw.url}{CHAT}", method="POST", json=BODY, timeout=30)
    assert paid.status_code == 200, paid.text
    [params] = seen
    assert (params.amount, params.currency, params.network_id) == (
        "500", "usd", "profile_tollstream_test")
    reference = mpp.Receipt.from_payment_receipt(paid.headers["payment-receipt"]).reference
    assert stripe_state()["payment_intents"][reference]["status"] == "succeeded"


async def test_a_key_of_another_asset_does_not_receive_fiat(sgw: RunningGateway) -> None:
    usdc, key = sgw.create_account(1000)
    paid = httpx.post(f"{sgw.url}{CHAT}", json=BODY, timeout=20, headers={
        "authorization": f"Bearer {key}",
        "payment-authorization": credential(challenge(sgw), spt())})
    assert paid.status_code == 200, paid.text
    fiat = httpx.get(f"{sgw.url}/v1/balance", timeout=10, headers={
        "authorization": f"Bearer {paid.headers['tollstream-api-key']}"}).json()
    assert fiat["account_id"].startswith("fiat_usd_") and fiat["credited"] == "500"
    assert sgw.balance(usdc)["credited"] == "1000"  # cents never land on a USDC account


async def test_stripe_refusing_our_key_is_503_not_the_payers_fault(
        gateway_factory: Factory, stripe_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TOLLSTREAM_STRIPE_SECRET_KEY", "sk_test_revoked")
    with gateway_factory(models={**TEST_MODELS, "cents": CENTS},
                         mpp={"enabled": True, "realm": "tollstream.test", "secret": "s" * 32,
                              "charge": False, "session": False},
                         stripe=stripe_config(stripe_url)) as gw:
        refused = pay(gw, credential(challenge(gw), spt()))
    assert refused.status_code == 503
    assert refused.json()["error"]["code"] == "stripe_unavailable"


async def test_a_challenge_for_another_currency_is_refused(
        gateway_factory: Factory, stripe_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TOLLSTREAM_STRIPE_SECRET_KEY", SECRET)
    mpp_cfg = {"enabled": True, "realm": "tollstream.test", "secret": "s" * 32,
               "charge": False, "session": False}
    with gateway_factory(models={**TEST_MODELS, "cents": CENTS}, mpp=mpp_cfg,
                         stripe=stripe_config(stripe_url)) as usd:
        found = challenge(usd)
    with gateway_factory(models={**TEST_MODELS, "cents": CENTS}, mpp=mpp_cfg,
                         stripe=stripe_config(stripe_url, currency="eur")) as eur:
        problem_of(pay(eur, credential(found, spt())), "verification-failed")
