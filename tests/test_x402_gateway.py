"""x402 deposits end to end: a real local chain with the project's token, a real gateway, the
official x402 client SDK and the stock openai SDK."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import openai
import pytest
from eth_account import Account

from gateway.agent import SpendCapExceeded, Wallet, paying_client
from gateway.background import serve
from gateway.chain.devchain import DevChain
from gateway.rails.evm import EvmNetwork, EvmSettler
from gateway.rails.facilitator import create_facilitator_app
from gateway.rails.x402 import (
    Authorization,
    ExactEvmPayload,
    PaymentPayload,
    PaymentRequired,
    PaymentRequirements,
    decode_model,
    encode_header,
)
from gateway.rails.x402_deposits import X402Deposits, payer_account_id
from meters.connection import connect
from meters.deposits import Deposit
from meters.ledger import Ledger
from meters.tokens import get_tokenizer
from tests.chain_fixtures import *  # noqa: F403  (session fixtures: chain, evm_network, settler)
from tests.chain_fixtures import PAY_TO, make_auth, new_account
from tests.conftest import RunningGateway, make_settings

pytestmark = [pytest.mark.timeout(90), pytest.mark.asyncio(loop_scope="session")]

O200K = get_tokenizer("o200k_base")
MESSAGES: list[Any] = [{"role": "user", "content": "Tell me everything."}]
DEPOSIT = 200  # atomic units: 200 tokens of the "exact" model
BODY = {"model": "exact", "messages": MESSAGES, "max_tokens": 5}


def x402_config(chain: DevChain, **extra: Any) -> dict[str, Any]:
    return {"enabled": True, "pay_to": PAY_TO, "deposit": "0.0002", "min_output_tokens": 10,
            "networks": {"local": {"network": chain.network, "chain_id": chain.chain_id,
                                   "rpc_url": chain.rpc_url, "asset": chain.token,
                                   "token_name": chain.token_name,
                                   "token_version": chain.token_version,
                                   "relayer_key": chain.relayer_key}}, **extra}


@pytest.fixture
def xgw(gateway_factory: Callable[..., contextlib.AbstractContextManager[RunningGateway]],
        chain: DevChain) -> Iterator[RunningGateway]:
    with gateway_factory(x402=x402_config(chain)) as running:
        yield running


def offered(gw: RunningGateway) -> PaymentRequirements:
    response = httpx.post(f"{gw.url}/v1/chat/completions", json=BODY, timeout=10)
    assert response.status_code == 402
    required = decode_model(response.headers["PAYMENT-REQUIRED"], PaymentRequired,
                            header="PAYMENT-REQUIRED")
    return required.accepts[0]


def header_for(auth: Any, req: PaymentRequirements) -> str:
    authorization = Authorization.model_validate({
        "from": auth.from_, "to": auth.to, "value": auth.value, "validAfter": auth.valid_after,
        "validBefore": auth.valid_before, "nonce": auth.nonce})
    return encode_header(PaymentPayload(accepted=req, payload=ExactEvmPayload(
        signature=auth.signature, authorization=authorization)))


def pay(gw: RunningGateway, header: str, name: str = "PAYMENT-SIGNATURE") -> httpx.Response:
    return httpx.post(f"{gw.url}/v1/chat/completions", json=BODY, timeout=30,
                      headers={name: header})


def account_state(gw: RunningGateway, network: EvmNetwork, payer: str) -> dict[str, Any]:
    with gw.admin() as admin:
        response = admin.get(
            f"/admin/accounts/{payer_account_id(network.network, network.asset, payer)}")
    return dict(response.json()) if response.status_code == 200 else {}


async def test_challenge_is_v2_header_and_v1_body(xgw: RunningGateway, chain: DevChain
                                                  ) -> None:
    response = httpx.post(f"{xgw.url}/v1/chat/completions", json=BODY, timeout=10)
    assert response.status_code == 402
    v2 = json.loads(base64.b64decode(response.headers["PAYMENT-REQUIRED"]))
    assert v2["x402Version"] == 2 and v2["accepts"][0]["amount"] == str(DEPOSIT)
    assert v2["accepts"][0]["payTo"] == PAY_TO and v2["accepts"][0]["asset"] == chain.token
    assert v2["accepts"][0]["extra"] == {"name": chain.token_name,
                                         "version": chain.token_version}
    body = response.json()
    assert body["x402Version"] == 1 and body["code"] == "missing_api_key"
    assert "accepts" in body and body["deposit"] == str(DEPOSIT)


async def test_official_x402_client_pays_then_openai_streams(
        xgw: RunningGateway, chain: DevChain, evm_network: EvmNetwork,
        settler: EvmSettler) -> None:
    from x402 import x402Client
    from x402.http.clients import x402HttpxClient
    from x402.mechanisms.evm.exact import ExactEvmScheme
    from x402.mechanisms.evm.signers import EthAccountSigner

    wallet = chain.wallets[0]
    payer_before = await settler.balance_of(wallet.address, evm_network)
    merchant_before = await settler.balance_of(PAY_TO, evm_network)
    client = x402Client()
    client.register("eip155:*", ExactEvmScheme(EthAccountSigner(
        Account.from_key(wallet.private_key))))
    client.set_spend_controls({"allowed_assets": [{"network": chain.network,
                                                   "asset": chain.token}]})
    async with x402HttpxClient(client, timeout=30) as http:
        paid = await http.post(f"{xgw.url}/v1/chat/completions", json=BODY)
    assert paid.status_code == 200, paid.text
    receipt = json.loads(base64.b64decode(paid.headers["PAYMENT-RESPONSE"]))
    assert receipt["success"] is True and receipt["payer"] == wallet.address
    key = paid.headers["Tollstream-Api-Key"]
    assert await settler.balance_of(wallet.address, evm_network) == payer_before - DEPOSIT
    assert await settler.balance_of(PAY_TO, evm_network) == merchant_before + DEPOSIT
    # The agent continues with the stock openai SDK and the issued key, paying nothing more.
    stream = openai.OpenAI(base_url=f"{xgw.url}/v1", api_key=key, max_retries=0, timeout=20)
    text = "".join(c.choices[0].delta.content or "" for c in stream.chat.completions.create(
        model="exact", messages=MESSAGES, stream=True, max_tokens=30) if c.choices)
    assert O200K.count(text) == 30
    state = account_state(xgw, evm_network, wallet.address)
    assert state["spent"] == "35" and state["balance"] == str(DEPOSIT - 35)
    assert await settler.balance_of(wallet.address, evm_network) == payer_before - DEPOSIT


async def test_v1_x_payment_header_is_accepted(xgw: RunningGateway, chain: DevChain,
                                               evm_network: EvmNetwork) -> None:
    req = offered(xgw)
    wallet = chain.wallets[1]
    auth = make_auth(evm_network, wallet.private_key, value=req.amount)
    v2 = json.loads(base64.b64decode(header_for(auth, req)))
    v1 = {"x402Version": 1, "scheme": "exact", "network": chain.network,
          "payload": v2["payload"]}
    response = pay(xgw, base64.b64encode(json.dumps(v1).encode()).decode(), "X-PAYMENT")
    assert response.status_code == 200, response.text
    assert "X-PAYMENT-RESPONSE" in response.headers
    assert account_state(xgw, evm_network, wallet.address)["credited"] == str(DEPOSIT)


@pytest.mark.parametrize("case", ["forged", "recipient", "amount", "expired", "unfunded",
                                  "network", "asset"])
async def test_bad_payments_are_rejected_and_nothing_credited(
        xgw: RunningGateway, chain: DevChain, evm_network: EvmNetwork, settler: EvmSettler,
        case: str) -> None:
    req = offered(xgw)
    wallet = chain.wallets[2]
    key = wallet.private_key
    kwargs: dict[str, Any] = {"value": req.amount}
    accepted = req
    expected = {"forged": "invalid_exact_evm_payload_signature",
                "recipient": "invalid_exact_evm_payload_recipient_mismatch",
                "amount": "invalid_exact_evm_payload_authorization_value_mismatch",
                "expired": "invalid_exact_evm_payload_authorization_valid_before",
                "unfunded": "invalid_exact_evm_insufficient_balance",
                "network": "invalid_network",
                "asset": "invalid_payment_requirements"}[case]
    payer = wallet.address
    if case == "recipient":
        kwargs["to"] = Account.create().address
    elif case == "amount":
        kwargs["value"] = req.amount - 1
    elif case == "expired":
        kwargs["valid_before"] = int(time.time()) - 5
    elif case == "unfunded":
        stranger = Account.create()
        key, payer = stranger.key.hex(), stranger.address
    elif case == "network":
        accepted = req.model_copy(update={"network": "eip155:1"})
    elif case == "asset":
        accepted = req.model_copy(update={"asset": Account.create().address})
    auth = make_auth(evm_network, key, **kwargs)
    if case == "forged":
        other = make_auth(evm_network, chain.wallets[3].private_key, **kwargs)
        auth = type(auth)(from_=auth.from_, to=auth.to, value=auth.value,
                          valid_after=auth.valid_after, valid_before=auth.valid_before,
                          nonce=auth.nonce, signature=other.signature)
    before = await settler.balance_of(payer, evm_network)
    response = pay(xgw, header_for(auth, accepted))
    assert response.status_code == 402, response.text
    assert response.json()["code"] == expected
    assert "PAYMENT-REQUIRED" in response.headers  # a fresh challenge
    assert account_state(xgw, evm_network, payer).get("credited", "0") == "0"
    assert await settler.balance_of(payer, evm_network) == before


@pytest.mark.parametrize("header", [
    "not base64 at all!!", base64.b64encode(b"not json").decode(),
    base64.b64encode(b"{}").decode(),
    base64.b64encode(json.dumps({"x402Version": 2, "accepted": {},
                                 "payload": {"signature": "0x12"}}).encode()).decode(),
    base64.b64encode(b"x" * 20_000).decode(),
])
async def test_malformed_payment_headers_get_400(xgw: RunningGateway, header: str) -> None:
    response = pay(xgw, header)
    assert response.status_code == 400, response.text
    body = response.json()
    assert body["code"] == "invalid_payment" and body["message"]
    assert "PAYMENT-REQUIRED" in response.headers


async def test_replay_and_concurrent_duplicates_settle_once(
        xgw: RunningGateway, chain: DevChain, evm_network: EvmNetwork,
        settler: EvmSettler) -> None:
    req = offered(xgw)
    wallet = chain.wallets[4]
    header = header_for(make_auth(evm_network, wallet.private_key, value=req.amount), req)
    before = await settler.balance_of(wallet.address, evm_network)

    async def send() -> httpx.Response:
        async with httpx.AsyncClient(timeout=60) as http:
            return await http.post(f"{xgw.url}/v1/chat/completions", json=BODY,
                                   headers={"PAYMENT-SIGNATURE": header})

    responses = await asyncio.gather(*(send() for _ in range(10)))
    statuses = sorted(r.status_code for r in responses)
    assert statuses == [200] + [402] * 9
    assert {r.json()["code"] for r in responses if r.status_code == 402} == {
        "invalid_exact_evm_nonce_already_used"}
    assert await settler.balance_of(wallet.address, evm_network) == before - req.amount
    assert account_state(xgw, evm_network, wallet.address)["credited"] == str(req.amount)
    replay = pay(xgw, header)
    assert replay.status_code == 402
    assert replay.json()["code"] == "invalid_exact_evm_nonce_already_used"
    assert account_state(xgw, evm_network, wallet.address)["credited"] == str(req.amount)


async def test_crash_between_settlement_and_credit_is_recovered(
        sim: str, redis_url: str, chain: DevChain, evm_network: EvmNetwork,
        settler: EvmSettler) -> None:
    settings = make_settings(sim, x402=x402_config(chain))
    ledger = Ledger(connect(redis_url), prefix=settings.key_prefix)
    wallet = chain.wallets[5]
    for crash_after_mark in (False, True):
        rail = X402Deposits(settings, ledger)
        req = rail.accepts(0)[0]
        auth = make_auth(evm_network, wallet.private_key, value=req.amount)
        payload = PaymentPayload.model_validate_json(base64.b64decode(header_for(auth, req)))
        account = payer_account_id(evm_network.network, evm_network.asset, wallet.address)
        deposit = Deposit(key=f"crash-{auth.nonce}", account_id=account, amount=req.amount,
                          payer=wallet.address, network=evm_network.network,
                          asset=evm_network.asset,
                          payload=payload.model_dump_json(by_alias=True, exclude_none=True),
                          requirements=req.model_dump_json(by_alias=True))
        claimed, _ = await rail.deposits.begin(deposit)
        assert claimed
        result = await rail.settlement.settle(payload, req)
        if crash_after_mark:
            await rail.deposits.mark_settled(deposit.key, result.tx_hash)
        await rail.aclose()  # the process "dies" here, before crediting
        restarted = X402Deposits(settings, ledger)
        assert await restarted.recover() == 1
        assert await restarted.recover() == 0
        await restarted.aclose()
    state = await ledger.get_account(account)
    assert state.credited == state.balance == 2 * req.amount
    await ledger.redis.aclose()


async def test_deposit_exhausted_then_top_up_resumes(xgw: RunningGateway, chain: DevChain,
                                                     evm_network: EvmNetwork) -> None:
    wallet = Wallet(Account.from_key(chain.wallets[6].private_key), spend_cap=3 * DEPOSIT,
                    allowed=[(chain.network, chain.token)])
    client = openai.OpenAI(base_url=f"{xgw.url}/v1", api_key="none-yet", max_retries=0,
                           http_client=paying_client(wallet, timeout=30))

    def stream() -> tuple[str, Any]:
        chunks = list(client.chat.completions.create(
            model="exact", messages=MESSAGES, stream=True, max_tokens=1000))
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        return text, chunks[-1]

    first, last = stream()
    assert O200K.count(first) == DEPOSIT and last.choices[0].finish_reason == "length"
    reason = last.model_extra["tollstream"]
    assert reason["type"] == "allowance_exhausted" and reason["top_up"]["method"] == "x402"
    assert reason["top_up"]["accepts"][0]["amount"] == str(DEPOSIT)
    # The next request gets 402 (balance 0); the transport tops up and streaming resumes.
    second, _ = stream()
    assert O200K.count(second) == DEPOSIT and wallet.spent == 2 * DEPOSIT
    third, _ = stream()
    assert O200K.count(third) == DEPOSIT and wallet.spent == 3 * DEPOSIT
    with pytest.raises(SpendCapExceeded):
        stream()  # a fourth deposit would pass the cap: the agent refuses to pay it
    state = account_state(xgw, evm_network, wallet.account.address)
    assert (state["balance"], state["spent"]) == ("0", str(3 * DEPOSIT))


async def test_a_keyed_top_up_pays_what_its_402_asked(xgw: RunningGateway,
                                                     chain: DevChain) -> None:
    """The deposit a 402 asks for depends on the request. A keyed account short of money is
    asked at least what the paid retry of the same request is verified against (a prompt whose
    rough size prices above the deposit: the demo's second request used to be refused)."""
    payer = new_account(chain, tokens=10_000)
    wallet = Wallet(payer, spend_cap=10_000, allowed=[(chain.network, chain.token)])
    client = openai.OpenAI(base_url=f"{xgw.url}/v1", api_key="none-yet", max_retries=0,
                           http_client=paying_client(wallet, timeout=30))
    prompt = "The keeper of the toll bridge counts every coin twice. " * 110
    texts = []
    for _ in range(2):
        chunks = list(client.chat.completions.create(
            model="priced", messages=[{"role": "user", "content": prompt}], stream=True,
            max_tokens=20))
        texts.append("".join(c.choices[0].delta.content or "" for c in chunks if c.choices))
    assert [O200K.count(t) for t in texts] == [20, 20]
    assert len(wallet.payments) == 2 and all(p["success"] for p in wallet.payments)
    assert wallet.payments[0]["amount"] > DEPOSIT  # the rough prompt size priced it
    # Digits count more tokens than their rough size: the first deposit (priced roughly)
    # cannot hold the exact prompt, and the 402 after it asks more than a payment for this
    # request is verified against. Paying more than asked is a larger deposit: accepted.
    digits = [{"role": "user", "content": " 1" * 2000}]
    fresh = Wallet(new_account(chain, tokens=10_000), spend_cap=10_000,
                   allowed=[(chain.network, chain.token)])
    other = openai.OpenAI(base_url=f"{xgw.url}/v1", api_key="none-yet", max_retries=0,
                          http_client=paying_client(fresh, timeout=30))
    with pytest.raises(openai.APIStatusError) as short:
        list(other.chat.completions.create(model="priced", messages=digits, stream=True,
                                           max_tokens=20))
    asked = int(short.value.response.json()["needed"])
    assert short.value.status_code == 402 and asked > fresh.payments[0]["amount"]
    chunks = list(other.chat.completions.create(model="priced", messages=digits, stream=True,
                                                max_tokens=20))
    assert O200K.count("".join(c.choices[0].delta.content or "" for c in chunks
                               if c.choices)) == 20
    assert [p["amount"] for p in fresh.payments][1] == asked  # more than verified: taken


async def test_remote_facilitator_mode(
        gateway_factory: Callable[..., contextlib.AbstractContextManager[RunningGateway]],
        chain: DevChain, evm_network: EvmNetwork, settler: EvmSettler) -> None:
    with serve(create_facilitator_app(EvmSettler(), [evm_network])) as facilitator, \
            gateway_factory(x402=x402_config(chain, mode="remote",
                                             facilitator_url=facilitator)) as gw:
        req = offered(gw)
        wallet = chain.wallets[7]
        before = await settler.balance_of(wallet.address, evm_network)
        good = pay(gw, header_for(make_auth(evm_network, wallet.private_key,
                                            value=req.amount), req))
        assert good.status_code == 200, good.text
        assert await settler.balance_of(wallet.address, evm_network) == before - req.amount
        bad = pay(gw, header_for(make_auth(evm_network, wallet.private_key,
                                           value=req.amount - 1), req))
        assert bad.status_code == 402
        assert bad.json()["code"] == "invalid_exact_evm_payload_authorization_value_mismatch"
        assert account_state(gw, evm_network, wallet.address)["credited"] == str(req.amount)
