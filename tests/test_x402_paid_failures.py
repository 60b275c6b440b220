"""A payment that was settled always reaches its payer (#7 item 5): every answer after a
successful settlement, errors included, carries ``PAYMENT-RESPONSE`` and the issued key, and
the key then works with the deposit on it."""

from __future__ import annotations

import base64
import contextlib
import json
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest

from gateway.chain.devchain import DevChain
from gateway.rails.evm import EvmNetwork
from tests.chain_fixtures import *  # noqa: F403  (session fixtures: chain, evm_network, settler)
from tests.chain_fixtures import make_auth
from tests.conftest import TEST_MODELS, RunningGateway
from tests.test_x402_gateway import DEPOSIT, header_for, offered, x402_config

pytestmark = pytest.mark.timeout(90)

#: An upstream nothing listens on: every request to the "dead" model fails before streaming.
DEAD = {"base_url": "http://127.0.0.1:9/v1", "api_key": "k", "connect_timeout": 2.0}
MODELS = {**TEST_MODELS,
          "dead": {"upstream": "dead", "dialect": "openai_chat", "input_per_mtok": "0",
                   "output_per_mtok": "1"},
          "dear": {"upstream": "sim", "dialect": "openai_chat", "input_per_mtok": "1",
                   "output_per_mtok": "1"}}


@pytest.fixture
def dgw(gateway_factory: Callable[..., contextlib.AbstractContextManager[RunningGateway]],
        chain: DevChain, sim: str) -> Iterator[RunningGateway]:
    upstreams = {"sim": {"base_url": f"{sim}/v1", "api_key": "sim-upstream-secret",
                         "forward_headers": ["x-sim-"]}, "dead": DEAD}
    with gateway_factory(x402=x402_config(chain), models=MODELS,
                         upstreams=upstreams) as running:
        yield running


def paid_request(gw: RunningGateway, network: EvmNetwork, key: str, body: dict[str, Any]
                 ) -> httpx.Response:
    req = offered(gw)
    auth = make_auth(network, key, value=req.amount)
    return httpx.post(f"{gw.url}/v1/chat/completions", json=body, timeout=30,
                      headers={"PAYMENT-SIGNATURE": header_for(auth, req)})


@pytest.mark.parametrize("stream", [False, True])
def test_upstream_failure_after_settlement_still_hands_over_the_key(
        dgw: RunningGateway, chain: DevChain, evm_network: EvmNetwork, stream: bool) -> None:
    wallet = chain.wallets[6 if stream else 7]
    response = paid_request(dgw, evm_network, wallet.private_key, {
        "model": "dead", "stream": stream, "max_tokens": 5,
        "messages": [{"role": "user", "content": "hi"}]})
    assert response.status_code == 502, response.text
    assert response.json()["error"]["code"] == "upstream_unreachable"
    receipt = json.loads(base64.b64decode(response.headers["PAYMENT-RESPONSE"]))
    assert receipt["success"] is True and receipt["payer"] == wallet.address
    key = response.headers["Tollstream-Api-Key"]
    balance = httpx.get(f"{dgw.url}/v1/balance", timeout=10,
                        headers={"authorization": f"Bearer {key}"}).json()
    # The whole deposit is there: the failed request's hold came back.
    assert (balance["balance"], balance["held"], balance["spent"]) == (str(DEPOSIT), "0", "0")
    # And the key buys tokens from a working model.
    ok = httpx.post(f"{dgw.url}/v1/chat/completions", timeout=30,
                    headers={"authorization": f"Bearer {key}"},
                    json={"model": "exact", "max_tokens": 5,
                          "messages": [{"role": "user", "content": "hi"}]})
    assert ok.status_code == 200, ok.text


def test_deposit_too_small_for_the_exact_prompt_still_hands_over_the_key(
        dgw: RunningGateway, chain: DevChain, evm_network: EvmNetwork) -> None:
    # The challenge prices the prompt roughly (a token per 3 characters, before the caller is
    # known); 400 CJK characters are 400 tokens, so the deposit it asks for (200) settles and
    # then cannot hold the exact prompt: the 402 that follows must still hand over the key.
    wallet = chain.wallets[8]
    body = {"model": "dear", "max_tokens": 5,
            "messages": [{"role": "user", "content": "雨" * 400}]}
    challenge = httpx.post(f"{dgw.url}/v1/chat/completions", json=body, timeout=10)
    assert challenge.status_code == 402 and challenge.json()["deposit"] == str(DEPOSIT)
    req = offered(dgw)
    auth = make_auth(evm_network, wallet.private_key, value=req.amount)
    response = httpx.post(f"{dgw.url}/v1/chat/completions", json=body, timeout=30,
                          headers={"PAYMENT-SIGNATURE": header_for(auth, req)})
    assert response.status_code == 402, response.text
    assert response.json()["code"] == "insufficient_funds"
    assert json.loads(base64.b64decode(response.headers["PAYMENT-RESPONSE"]))["success"]
    assert "PAYMENT-REQUIRED" in response.headers  # and how to top up
    key = response.headers["Tollstream-Api-Key"]
    balance = httpx.get(f"{dgw.url}/v1/balance", timeout=10,
                        headers={"authorization": f"Bearer {key}"}).json()
    assert (balance["balance"], balance["spent"]) == (str(DEPOSIT), "0")
