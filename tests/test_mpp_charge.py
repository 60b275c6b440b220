"""MPP ``evm`` charge end to end, beside x402 in one 402: the stock clients of both protocols
and of the model APIs read it, pympp pays it, and every bad credential gets its problem type
and changes nothing. Real chain, real Redis, a real gateway on a free port."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import json
from collections.abc import Callable, Iterator
from typing import Any

import anthropic
import httpx
import mpp
import openai
import pytest
from eth_account import Account
from mpp.client import Mpp
from mpp.methods.evm import client as evm_client

from gateway.chain.devchain import DevChain
from gateway.rails.evm import EvmNetwork, EvmSettler
from gateway.rails.mpp.charge import challenge_hashes
from gateway.rails.mpp.scheme import b64url, canonical_b64url
from gateway.rails.x402_deposits import payer_account_id
from tests.chain_fixtures import *  # noqa: F403  (session fixtures: chain, evm_network, settler)
from tests.chain_fixtures import PAY_TO, make_auth
from tests.conftest import RunningGateway
from tests.test_x402_gateway import DEPOSIT, x402_config

pytestmark = [pytest.mark.timeout(90), pytest.mark.asyncio(loop_scope="session")]

Factory = Callable[..., contextlib.AbstractContextManager[RunningGateway]]
BODY = {"model": "exact", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}
SECRET = "mpp-test-secret-0123456789"


def mpp_config(chain: DevChain, **extra: Any) -> dict[str, Any]:
    network = x402_config(chain)["networks"]["local"]
    return {"enabled": True, "realm": "tollstream.test", "secret": SECRET, "pay_to": PAY_TO,
            "deposit": "0.0002", "min_output_tokens": 10, "network": network, **extra}


@pytest.fixture
def both(gateway_factory: Factory, chain: DevChain) -> Iterator[RunningGateway]:
    with gateway_factory(x402=x402_config(chain), mpp=mpp_config(chain)) as running:
        yield running


@pytest.fixture
def only_mpp(gateway_factory: Factory, chain: DevChain) -> Iterator[RunningGateway]:
    with gateway_factory(mpp=mpp_config(chain)) as running:
        yield running


def challenge_of(response: httpx.Response, intent: str = "charge") -> mpp.Challenge:
    for value in response.headers.get_list("www-authenticate"):
        parsed = mpp.Challenge.from_www_authenticate(value)
        if parsed.intent == intent:
            return parsed
    raise AssertionError(f"no {intent} challenge in {response.headers}")


def pympp_method(chain: DevChain, key: str) -> Any:
    return evm_client.charge(currency=chain.token, account=Account.from_key(key),
                             chain_id=chain.chain_id, decimals=6,
                             authorization={"name": chain.token_name,
                                            "version": chain.token_version})


async def test_one_402_offers_x402_and_mpp_and_every_client_reads_it(
        both: RunningGateway, chain: DevChain) -> None:
    response = httpx.post(f"{both.url}/v1/chat/completions", json=BODY, timeout=10)
    assert response.status_code == 402
    assert response.headers["content-type"] == "application/problem+json"
    assert response.headers["cache-control"] == "no-store"
    body = response.json()
    # x402: the v2 header and the v1 body fields.
    v2 = json.loads(base64.b64decode(response.headers["PAYMENT-REQUIRED"]))
    assert v2["accepts"][0]["amount"] == str(DEPOSIT) and body["x402Version"] == 1
    # The Payment scheme: problem details, and a challenge pympp parses and can verify.
    assert body["type"] == "https://paymentauth.org/problems/payment-required"
    assert body["status"] == 402 and body["title"] == "Payment Required" and body["detail"]
    challenge = challenge_of(response)
    assert challenge.verify(SECRET, "tollstream.test")
    assert challenge.request["amount"] == str(DEPOSIT)
    assert challenge.request["methodDetails"]["chainId"] == chain.chain_id
    assert challenge.expires is not None
    # The model SDKs raise their usual 402 errors with our message.
    with pytest.raises(openai.APIStatusError) as oai:
        openai.OpenAI(base_url=f"{both.url}/v1", api_key="none", max_retries=0,
                      timeout=10).chat.completions.create(**BODY)  # type: ignore[call-overload]
    assert oai.value.status_code == 402 and "API key" in str(oai.value.body)
    with pytest.raises(anthropic.APIStatusError) as ant:
        anthropic.Anthropic(base_url=both.url, api_key="none", max_retries=0,
                            timeout=10).messages.create(
            model="claude-exact", max_tokens=5, messages=[{"role": "user", "content": "hi"}])
    assert ant.value.status_code == 402


async def test_official_x402_client_still_pays_the_combined_402(
        both: RunningGateway, chain: DevChain) -> None:
    from x402 import x402Client
    from x402.http.clients import x402HttpxClient
    from x402.mechanisms.evm.exact import ExactEvmScheme
    from x402.mechanisms.evm.signers import EthAccountSigner

    client = x402Client()
    client.register("eip155:*", ExactEvmScheme(EthAccountSigner(
        Account.from_key(chain.wallets[11].private_key))))
    client.set_spend_controls({"allowed_assets": [{"network": chain.network,
                                                   "asset": chain.token}]})
    async with x402HttpxClient(client, timeout=30) as http:
        paid = await http.post(f"{both.url}/v1/chat/completions", json=BODY)
    assert paid.status_code == 200, paid.text
    assert "Tollstream-Api-Key" in paid.headers


async def test_pympp_pays_the_evm_charge_then_openai_streams(
        only_mpp: RunningGateway, chain: DevChain, evm_network: EvmNetwork,
        settler: EvmSettler) -> None:
    wallet = chain.wallets[10]
    payer_before = await settler.balance_of(wallet.address, evm_network)
    async with Mpp(methods=[pympp_method(chain, wallet.private_key)],
                   paid_retry_timeout=30) as client:
        paid = await client.fetch(f"{only_mpp.url}/v1/chat/completions", method="POST",
                                  json=BODY, timeout=30)
    assert paid.status_code == 200, paid.text
    receipt = mpp.Receipt.from_payment_receipt(paid.headers["payment-receipt"])
    assert receipt.status == "success" and receipt.reference.startswith("0x")
    assert paid.headers["cache-control"] == "private"
    key = paid.headers["tollstream-api-key"]
    assert await settler.balance_of(wallet.address, evm_network) == payer_before - DEPOSIT
    account = payer_account_id(evm_network.network, evm_network.asset, wallet.address)
    state = only_mpp.balance(account)
    assert state["credited"] == str(DEPOSIT) and state["spent"] == "5"
    stream = openai.OpenAI(base_url=f"{only_mpp.url}/v1", api_key=key, max_retries=0,
                           timeout=20).chat.completions.create(
        model="exact", messages=BODY["messages"], stream=True, max_tokens=30)
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert text and only_mpp.balance(account)["spent"] == "35"


def credential(challenge: mpp.Challenge, payload: dict[str, Any]) -> str:
    return mpp.Credential(challenge=challenge.to_echo(), payload=payload).to_authorization()


def authorization_payload(chain: DevChain, network: EvmNetwork, key: str,
                          challenge: mpp.Challenge, **overrides: Any) -> dict[str, Any]:
    nonce = sorted(challenge_hashes(challenge.id, challenge.realm))[0]
    auth = make_auth(network, key, value=int(challenge.request["amount"]),
                     nonce=overrides.pop("nonce", nonce), to=overrides.pop("to", PAY_TO),
                     **overrides)
    return {"type": "authorization", "from": auth.from_, "to": auth.to,
            "value": str(auth.value), "validAfter": str(auth.valid_after),
            "validBefore": str(auth.valid_before), "nonce": auth.nonce,
            "signature": auth.signature}


def post(gw: RunningGateway, authorization: str) -> httpx.Response:
    return httpx.post(f"{gw.url}/v1/chat/completions", json=BODY, timeout=30,
                      headers={"authorization": authorization})


async def test_bad_credentials_get_their_problem_and_change_nothing(
        only_mpp: RunningGateway, chain: DevChain, evm_network: EvmNetwork,
        settler: EvmSettler) -> None:
    wallet = chain.wallets[9]
    account = payer_account_id(evm_network.network, evm_network.asset, wallet.address)
    before = await settler.balance_of(wallet.address, evm_network)

    def fresh() -> mpp.Challenge:
        return challenge_of(httpx.post(f"{only_mpp.url}/v1/chat/completions", json=BODY,
                                       timeout=10))

    def expect(response: httpx.Response, kind: str, status: int = 402) -> None:
        assert response.status_code == status, response.text
        assert response.headers["content-type"] == "application/problem+json"
        assert response.json()["type"].endswith("/" + kind), response.json()
        assert "payment-receipt" not in response.headers
        if status == 402:
            assert challenge_of(response)  # a fresh challenge to pay instead

    expect(post(only_mpp, "Payment !!!"), "malformed-credential")
    expect(post(only_mpp, "Payment " + b64url(b"[1, 2]")), "malformed-credential")
    expect(post(only_mpp, "Payment " + b64url(b'{"challenge": {}, "payload": {}}')),
           "malformed-credential")
    def good(challenge: mpp.Challenge, key: str = wallet.private_key,
             **overrides: Any) -> dict[str, Any]:
        return authorization_payload(chain, evm_network, key, challenge, **overrides)

    challenge = fresh()
    cheaper = {**challenge.request, "amount": "1"}
    tampered = dataclasses.replace(challenge, request=cheaper,
                                   request_b64=canonical_b64url(cheaper))
    expect(post(only_mpp, credential(tampered, good(challenge))), "invalid-challenge")
    other_method = dataclasses.replace(challenge, method="tempo")
    expect(post(only_mpp, credential(other_method, good(challenge))), "method-unsupported",
           400)
    expired = mpp.Challenge.create(secret_key=SECRET, realm="tollstream.test", method="evm",
                                   intent="charge", request=challenge.request,
                                   expires="2020-01-01T00:00:00Z")
    expect(post(only_mpp, credential(expired, good(expired))), "payment-expired")
    expect(post(only_mpp, credential(challenge, {**good(challenge), "value": "1"})),
           "verification-failed")
    expect(post(only_mpp, credential(challenge, {**good(challenge), "type": "permit2"})),
           "malformed-credential")
    expect(post(only_mpp, credential(challenge, good(challenge, nonce="0x" + "11" * 32))),
           "verification-failed")
    expect(post(only_mpp, credential(challenge, good(challenge, to=chain.wallets[0].address))),
           "verification-failed")
    # Checks that pass until the signature is verified burn the challenge, and it is
    # refused as used from then on.
    forged = {**good(challenge), "signature": good(challenge,
                                                    chain.wallets[8].private_key)["signature"]}
    expect(post(only_mpp, credential(challenge, forged)), "verification-failed")
    expect(post(only_mpp, credential(challenge, good(challenge))), "invalid-challenge")
    expired_auth = fresh()
    expect(post(only_mpp, credential(expired_auth, good(expired_auth, valid_before=1))),
           "payment-expired")
    assert only_mpp.balance(account) == {} or only_mpp.balance(account).get("credited") in (
        None, "0")
    assert await settler.balance_of(wallet.address, evm_network) == before


async def test_a_challenge_pays_once_even_on_concurrent_requests(
        only_mpp: RunningGateway, chain: DevChain, evm_network: EvmNetwork,
        settler: EvmSettler) -> None:
    wallet = chain.wallets[7]
    challenge = challenge_of(httpx.post(f"{only_mpp.url}/v1/chat/completions", json=BODY,
                                        timeout=10))
    header = credential(challenge, authorization_payload(chain, evm_network,
                                                         wallet.private_key, challenge))
    before = await settler.balance_of(wallet.address, evm_network)

    async def one(client: httpx.AsyncClient) -> httpx.Response:
        return await client.post(f"{only_mpp.url}/v1/chat/completions", json=BODY,
                                 headers={"authorization": header})

    async with httpx.AsyncClient(timeout=30) as client:
        results = await asyncio.gather(*(one(client) for _ in range(4)))
    assert sorted(r.status_code for r in results) == [200, 402, 402, 402]
    assert all(r.json()["type"].endswith("/invalid-challenge")
               for r in results if r.status_code == 402)
    assert before - await settler.balance_of(wallet.address, evm_network) == DEPOSIT
    account = payer_account_id(evm_network.network, evm_network.asset, wallet.address)
    assert only_mpp.balance(account)["credited"] == str(DEPOSIT)
