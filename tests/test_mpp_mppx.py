"""The reference MPP implementation, npm ``mppx``, against tollstream: it parses the Payment
challenges of a 402 that also offers x402, recomputes their HMAC ids with the gateway's secret,
gets them ordered and narrowed by its ``Accept-Payment``, and its own ``evm`` charge client
picks the charge out of that 402, pays it and streams the answer. Real chain, real Redis, a
real gateway on a free port, mppx and viem pinned in package-lock.json."""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from gateway.chain.devchain import DevChain
from gateway.rails.evm import EvmNetwork, EvmSettler
from gateway.rails.x402_deposits import payer_account_id
from tests.chain_fixtures import *  # noqa: F403  (session fixtures: chain, evm_network, settler)
from tests.chain_fixtures import new_account
from tests.conftest import RunningGateway
from tests.test_mpp_charge import SECRET
from tests.test_mpp_session import session_config
from tests.test_x402_gateway import DEPOSIT, x402_config

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tests" / "mppx" / "client.mjs"
pytestmark = [
    pytest.mark.timeout(120), pytest.mark.asyncio(loop_scope="session"),
    pytest.mark.skipif(not (ROOT / "node_modules" / "mppx").exists()
                       or shutil.which("node") is None,
                       reason="mppx is installed by scripts/install (npm ci)"),
]

Factory = Callable[..., contextlib.AbstractContextManager[RunningGateway]]
CHAT = "/v1/chat/completions"


def mppx(*args: str) -> dict[str, Any]:
    run = subprocess.run(["node", str(SCRIPT), *args], capture_output=True, text=True,
                         timeout=90, cwd=ROOT)
    assert run.returncode == 0, run.stderr
    return dict(json.loads(run.stdout))


@pytest.fixture
def everything(gateway_factory: Factory, chain: DevChain) -> Iterator[RunningGateway]:
    mpp = session_config(chain, charge=True)
    with gateway_factory(x402=x402_config(chain), mpp=mpp) as running:
        yield running


async def test_mppx_parses_every_challenge_and_recomputes_their_ids(
        everything: RunningGateway, chain: DevChain) -> None:
    seen = mppx("parse", f"{everything.url}{CHAT}", SECRET)
    assert seen["status"] == 402 and seen["contentType"] == "application/problem+json"
    assert seen["body"]["x402Version"] == 1 and seen["body"]["type"].endswith("payment-required")
    by_intent = {c["intent"]: c for c in seen["challenges"]}
    assert set(by_intent) == {"charge", "session"}
    for found in by_intent.values():
        assert found["method"] == "evm" and found["realm"] == "tollstream.test"
        # mppx's HMAC over the challenge's parameters gives the id the gateway issued...
        assert found["verified"] is True
        # ... and any changed parameter does not.
        assert found["tampered"] is False
    # Accept-Payment orders the challenges by the client's q values, and drops the rest.
    assert seen["ordered"] == ["session", "charge"] and seen["narrowed"] == ["charge"]
    charge = by_intent["charge"]["request"]
    assert charge["currency"] == chain.token and charge["methodDetails"]["chainId"] == 31337
    session = by_intent["session"]["request"]
    assert session["unitType"] == "llm_token"
    assert session["methodDetails"]["escrowContract"] == chain.escrow


async def test_mppx_pays_the_evm_charge_of_a_402_offering_everything_and_streams(
        everything: RunningGateway, chain: DevChain, evm_network: EvmNetwork,
        settler: EvmSettler) -> None:
    payer = new_account(chain, tokens=10 * DEPOSIT)
    key = "0x" + payer.key.hex().removeprefix("0x")
    paid = mppx("pay", f"{everything.url}{CHAT}", key, chain.token_name,
                chain.token_version)
    assert paid["status"] == 200, paid
    assert paid["receipt"]["status"] == "success" and paid["receipt"]["method"] == "evm"
    assert paid["receipt"]["reference"].startswith("0x")
    assert paid["apiKey"].startswith("tsk_")
    assert "data: [DONE]" in paid["body"]
    # mppx announced what it can pay (x402 and a session were offered too).
    assert paid["acceptPayment"][0] == "evm/charge"
    assert await settler.balance_of(payer.address, evm_network) == 10 * DEPOSIT - DEPOSIT
    account = payer_account_id(evm_network.network, evm_network.asset, payer.address)
    state = everything.balance(account)
    assert state["credited"] == str(DEPOSIT) and state["spent"] == "5"
