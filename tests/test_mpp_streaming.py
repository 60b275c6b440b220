"""MPP session streams (specs/mpp/draft-evm-session-00.md, "Insufficient Balance During
Streaming"): the stock SDKs stream through the agent's session client, which signs a voucher
each time the stream pauses for one (``payment-need-voucher``) and the stream resumes on the
exact next token; no voucher ends it after the pause timeout, billed what was delivered; a
voucher past the deposit is preceded by a top-up; concurrent streams on one channel never
spend more than was accepted. Real chain, real Redis, a real gateway on a free port."""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import time
from collections.abc import Callable, Iterator
from typing import Any

import anthropic
import httpx
import openai
import pytest

from gateway.agent.session import SessionWallet, session_challenge
from gateway.agent.session_client import (
    SessionCapExceeded,
    SessionPayer,
    aclose_session,
    async_session_client,
    close_session,
    session_client,
)
from gateway.chain.devchain import DevChain
from gateway.rails.evm import EvmNetwork, EvmSettler
from gateway.rails.mpp.escrow import EscrowClient
from gateway.simulator.common import text_of
from meters.channels import account_of
from tests.chain_fixtures import *  # noqa: F403  (session fixtures: chain, evm_network, settler)
from tests.chain_fixtures import new_account
from tests.conftest import RunningGateway, sim_stats
from tests.test_mpp_session import CHAT, session_config

pytestmark = [pytest.mark.timeout(120), pytest.mark.asyncio(loop_scope="session")]

Factory = Callable[..., contextlib.AbstractContextManager[RunningGateway]]
MESSAGES = [{"role": "user", "content": "tell me a story"}]
PAUSE_TIMEOUT = 2.0


@pytest.fixture
def sgw(gateway_factory: Factory, chain: DevChain) -> Iterator[RunningGateway]:
    with gateway_factory(mpp=session_config(
            chain, session_pause_timeout_seconds=PAUSE_TIMEOUT)) as running:
        yield running


@pytest.fixture
def patient_sgw(gateway_factory: Factory, chain: DevChain) -> Iterator[RunningGateway]:
    """A session gateway whose pauses outlast any machine's load: for tests of what streams
    deliver, not of the pause timeout (a stream starved of vouchers by its neighbours for
    2 s on a loaded machine was cut: a test defect, not the gateway's)."""
    with gateway_factory(mpp=session_config(
            chain, session_pause_timeout_seconds=30)) as running:
        yield running


def payer_for(chain: DevChain, *, deposit: int = 1000, cap: int = 10_000, increment: int = 10,
              top_up: int | None = None) -> SessionPayer:
    """A fresh agent wallet holding ``cap`` of the test token (and no ETH: the gateway relays
    its open and top-ups)."""
    account = new_account(chain, tokens=cap)
    wallet = SessionWallet(account.key.hex(), token_name=chain.token_name,
                           token_version=chain.token_version, spend_cap=cap, deposit=deposit)
    return SessionPayer(wallet, increment=increment, top_up=top_up)


def metric(gw: RunningGateway, name: str) -> float:
    total = 0.0
    for line in httpx.get(f"{gw.url}/metrics", timeout=10).text.splitlines():
        if line.startswith(name) and not line.startswith("#"):
            total += float(line.rsplit(" ", 1)[1])
    return total


def chat_text(gw: RunningGateway, http: Any, max_tokens: int) -> str:
    client = openai.OpenAI(base_url=f"{gw.url}/v1", api_key="unused", http_client=http,
                           max_retries=0, timeout=60)
    text = ""
    for chunk in client.chat.completions.create(model="exact", messages=MESSAGES,
                                                stream=True, max_tokens=max_tokens):
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
    return text


def responses_text(gw: RunningGateway, http: Any, max_tokens: int) -> str:
    client = openai.OpenAI(base_url=f"{gw.url}/v1", api_key="unused", http_client=http,
                           max_retries=0, timeout=60)
    text = ""
    for event in client.responses.create(model="resp-exact", input="tell me a story",
                                         stream=True, max_output_tokens=max_tokens):
        if event.type == "response.output_text.delta":
            text += event.delta
    return text


def messages_text(gw: RunningGateway, http: Any, max_tokens: int) -> str:
    client = anthropic.Anthropic(base_url=gw.url, api_key="unused", http_client=http,
                                 max_retries=0, timeout=60)
    with client.messages.stream(model="claude-exact", max_tokens=max_tokens,
                                messages=MESSAGES) as stream:
        return "".join(stream.text_stream)


@pytest.mark.parametrize("read", [chat_text, responses_text, messages_text],
                         ids=["chat", "responses", "messages"])
async def test_the_sdks_stream_through_pauses_and_resume_on_the_next_token(
        patient_sgw: RunningGateway, chain: DevChain, evm_network: EvmNetwork, settler: EvmSettler,
        read: Callable[[RunningGateway, Any, int], str]) -> None:
    payer = payer_for(chain, increment=10)
    pauses, resumes = metric(patient_sgw, "tollstream_stream_pauses_total"), \
        metric(patient_sgw, "tollstream_stream_resumes_total")
    accepted = metric(patient_sgw, 'tollstream_mpp_vouchers_total{result="accepted"}')
    with session_client(payer, timeout=60) as http:
        # 10 authorized with the first request, 10 more per voucher: four pauses.
        text = await asyncio.to_thread(read, patient_sgw, http, 45)
        assert text == text_of(0, 45)  # no token lost or repeated across the pauses
        account = patient_sgw.balance(account_of(payer.channel_id or ""))
        assert (account["spent"], account["held"]) == ("45", "0")  # 45 tokens x 1 unit
        assert int(account["credited"]) == payer.wallet.authorized
        paused = metric(patient_sgw, "tollstream_stream_pauses_total") - pauses
        assert metric(patient_sgw, "tollstream_stream_resumes_total") - resumes == paused
        if read is messages_text:
            # Claude's output is metered by a conservative estimate while it streams (and
            # billed from the reported usage at the end): it asks for vouchers a bit sooner.
            assert payer.wallet.authorized >= 50 and paused >= 4
        else:
            assert payer.wallet.authorized == 50 and paused == 4
        # The open's voucher (0) is a replay; then 10 with the request and one per pause.
        assert metric(patient_sgw, 'tollstream_mpp_vouchers_total{result="accepted"}') - accepted \
            == 1 + paused
        metrics = httpx.get(f"{patient_sgw.url}/metrics").text
        assert "tollstream_mpp_unsettled_atomic_units" in metrics
        assert payer.receipts[-1]["spent"] == "45" and payer.receipts[-1]["units"] == 45
        payee_before = await settler.balance_of(chain.relayer_address, evm_network)
        closed = await asyncio.to_thread(close_session, http)
    assert (closed["spent"], closed["refund"], closed["deposit"]) == (45, 955, 1000)
    assert closed["txHash"].startswith("0x")
    assert await settler.balance_of(chain.relayer_address, evm_network) == payee_before + 45
    assert await settler.balance_of(payer.wallet.address, evm_network) == 10_000 - 45


async def test_no_voucher_ends_the_stream_after_the_timeout_billed_as_delivered(
        sgw: RunningGateway, chain: DevChain, sim: str) -> None:
    payer = payer_for(chain, deposit=100)
    with session_client(payer, timeout=60) as http:  # opens the channel, 10 authorized
        assert await asyncio.to_thread(chat_text, sgw, http, 5) == text_of(0, 5)
    wallet = payer.wallet
    before = sim_stats(sim)["streams_cancelled"]
    started = time.monotonic()
    events: list[tuple[str, dict[str, Any]]] = []
    text = ""
    with httpx.Client(timeout=30) as client, client.stream(
            "POST", f"{sgw.url}{CHAT}",
            headers={"authorization": wallet.voucher(100), "x-sim-tokens-per-second": "100",
                     "x-sim-output-tokens": "2000"},
            json={"model": "exact", "messages": MESSAGES, "stream": True,
                  "max_tokens": 2000}) as response:
        assert response.status_code == 200
        name = ""
        for line in response.iter_lines():
            if line.startswith("event: "):
                name = line[7:]
            elif line.startswith("data: {") and name:
                events.append((name, json.loads(line[6:])))
                name = ""
            elif line.startswith("data: {"):
                chunk = json.loads(line[6:])
                if chunk.get("choices") and chunk["choices"][0]["delta"].get("content"):
                    text += chunk["choices"][0]["delta"]["content"]
                if chunk.get("choices") and chunk["choices"][0].get("finish_reason"):
                    finish = chunk["choices"][0]["finish_reason"]
                    reason = chunk.get("tollstream")
    elapsed = time.monotonic() - started
    # 5 were spent before: 95 left of the deposit of 100, and then it waits for a voucher.
    assert text == text_of(0, 95)
    assert [n for n, _ in events] == ["payment-need-voucher", "payment-receipt"]
    need = events[0][1]
    assert need == {"channelId": payer.channel_id, "requiredCumulative": "110",
                    "acceptedCumulative": "100", "deposit": "100", "topUpRequired": True,
                    "minimumTopUp": "10"}
    assert PAUSE_TIMEOUT <= elapsed < PAUSE_TIMEOUT + 10
    assert finish == "length" and reason["delivered_tokens"] == 95
    assert "no payment arrived" in reason["message"]
    receipt = events[1][1]
    assert (receipt["spent"], receipt["acceptedCumulative"], receipt["units"]) == (
        "100", "100", 95)
    account = sgw.balance(account_of(payer.channel_id or ""))
    assert (account["spent"], account["held"], account["balance"]) == ("100", "0", "0")
    deadline = time.monotonic() + 5  # the upstream call was closed: the model stopped
    while sim_stats(sim)["streams_cancelled"] == before:
        assert time.monotonic() < deadline, "the upstream stream was never closed"
        time.sleep(0.05)
    assert sim_stats(sim)["tokens_emitted"] < 2000


async def test_a_voucher_past_the_deposit_is_preceded_by_a_top_up(
        patient_sgw: RunningGateway, chain: DevChain, evm_network: EvmNetwork) -> None:
    payer = payer_for(chain, deposit=100, increment=60, top_up=100)
    with session_client(payer, timeout=60) as http:
        text = await asyncio.to_thread(chat_text, patient_sgw, http, 200)
    assert text == text_of(0, 200)
    # Vouchers 60, 120 (after a top-up to 200), 180, 240 (after a top-up to 300).
    assert payer.wallet.channel_deposit == 300 and payer.wallet.authorized == 240
    escrow = EscrowClient(evm_network, chain.escrow)
    try:
        assert (await escrow.get_channel(payer.channel_id or "")).deposit == 300
    finally:
        await escrow.aclose()
    account = patient_sgw.balance(account_of(payer.channel_id or ""))
    assert (account["spent"], account["credited"]) == ("200", "240")


async def test_the_cap_stops_signing_and_the_sdk_sees_why(
        sgw: RunningGateway, chain: DevChain) -> None:
    payer = payer_for(chain, deposit=100, cap=100, increment=50)
    with session_client(payer, timeout=60) as http, pytest.raises(SessionCapExceeded):
        await asyncio.to_thread(chat_text, sgw, http, 150)
    assert payer.wallet.authorized == 100  # never past the cap
    account = sgw.balance(account_of(payer.channel_id or ""))
    deadline = time.monotonic() + 5  # the client went away: the gateway bills and releases
    while account["held"] != "0":
        assert time.monotonic() < deadline
        time.sleep(0.05)
        account = sgw.balance(account_of(payer.channel_id or ""))
    assert account["spent"] == "100"


async def test_concurrent_streams_on_one_channel_never_spend_past_accepted(
        patient_sgw: RunningGateway, chain: DevChain) -> None:
    """Divergence, on purpose, from "Concurrency Model" (one active session per channel):
    tollstream lets several streams share a channel, because every grant is one atomic
    lease in Redis against acceptedCumulative - spent."""
    payer = payer_for(chain, deposit=2000, increment=15)
    async with async_session_client(payer, timeout=60) as http:
        client = openai.AsyncOpenAI(base_url=f"{patient_sgw.url}/v1", api_key="unused",
                                    http_client=http, max_retries=0, timeout=60)

        async def one(tokens: int) -> str:
            text = ""
            async for chunk in await client.chat.completions.create(
                    model="exact", messages=MESSAGES,
                    stream=True, max_tokens=tokens):
                if chunk.choices:
                    text += chunk.choices[0].delta.content or ""
            return text

        sizes = [40, 55, 70, 85]
        texts = await asyncio.gather(*(one(n) for n in sizes))
        assert texts == [text_of(0, n) for n in sizes]
        account = patient_sgw.balance(account_of(payer.channel_id or ""))
        assert account["spent"] == str(sum(sizes)) and account["held"] == "0"
        assert int(account["credited"]) <= payer.wallet.authorized
        closed = await aclose_session(http)
    assert closed["spent"] == sum(sizes)


async def test_a_request_the_vouchers_cannot_start_gets_the_voucher_it_needs(
        patient_sgw: RunningGateway, chain: DevChain) -> None:
    payer = payer_for(chain)
    with session_client(payer, timeout=60) as http:
        assert await asyncio.to_thread(chat_text, patient_sgw, http, 10) == text_of(0, 10)
    wallet = payer.wallet
    refused = httpx.post(f"{patient_sgw.url}{CHAT}", timeout=30,
                         headers={"authorization": wallet.voucher(10)},
                         json={"model": "priced", "messages": MESSAGES, "stream": True,
                               "max_tokens": 10})
    assert refused.status_code == 402, refused.text
    body = refused.json()
    assert body["channelId"] == payer.channel_id and body["acceptedCumulative"] == "10"
    assert int(body["requiredCumulative"]) > 10
    assert session_challenge(refused.headers) is not None
    assert patient_sgw.balance(account_of(payer.channel_id or ""))["spent"] == "10"


async def test_an_idempotent_retry_on_a_session_does_not_spend_twice(
        patient_sgw: RunningGateway, chain: DevChain) -> None:
    payer = payer_for(chain)
    with session_client(payer, timeout=60) as http:  # opens the channel, spends 10
        assert await asyncio.to_thread(chat_text, patient_sgw, http, 10) == text_of(0, 10)
    answers = [httpx.post(f"{patient_sgw.url}{CHAT}", timeout=30,
                          headers={"authorization": payer.wallet.voucher(100),
                                   "idempotency-key": "answer-7"},
                          json={"model": "exact", "messages": MESSAGES, "stream": True,
                                "max_tokens": 20}) for _ in range(2)]
    assert [a.status_code for a in answers] == [200, 200]
    assert answers[1].content == answers[0].content and b"payment-receipt" in answers[1].content
    account = patient_sgw.balance(account_of(payer.channel_id or ""))
    assert (account["spent"], account["credited"]) == ("30", "100")


async def test_a_crash_mid_stream_leaves_spent_and_the_settlement_in_agreement(
        sim: str, redis_url: str, chain: DevChain, evm_network: EvmNetwork,
        settler: EvmSettler) -> None:
    """kill -9 the gateway while a session stream runs on vouchers: after a restart the
    channel's spent is at most what the agent received (the hold of the dead process comes
    back; delivered tokens not yet committed, at most one lease, are not charged), and a
    cooperative close captures exactly that spent on-chain."""
    import os
    import signal
    import threading

    from tests.conftest import track_prefix
    from tests.servers import gateway_process
    from tests.test_faults import write_config
    from tests.test_mpp_session import append_mpp

    prefix = track_prefix(f"t{secrets.token_hex(4)}:")
    config = write_config(sim, redis_url, prefix)
    append_mpp(config, chain)
    payer = payer_for(chain, increment=20)
    received: list[str] = []
    ended: list[BaseException] = []

    def agent(url: str) -> None:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0,
                               timeout=30, http_client=session_client(payer, timeout=30))
        try:
            for chunk in client.chat.completions.create(
                    model="exact", messages=MESSAGES, stream=True,  # type: ignore[arg-type]
                    max_tokens=400, extra_headers={"x-sim-tokens-per-second": "50",
                                                   "x-sim-output-tokens": "400"}):
                if chunk.choices and chunk.choices[0].delta.content:
                    received.append(chunk.choices[0].delta.content)
        except Exception as exc:  # the gateway died under it: whatever the SDK raises
            ended.append(exc)

    with gateway_process(config) as (url, proc):
        thread = threading.Thread(target=agent, args=(url,))
        thread.start()
        deadline = time.monotonic() + 30
        while len(received) < 70:  # past several pauses and vouchers
            assert time.monotonic() < deadline and thread.is_alive(), ended
            time.sleep(0.01)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(5)
        thread.join(30)
    assert ended and not thread.is_alive()
    delivered = len(received)  # one token per chunk
    account = account_of(payer.channel_id or "")
    with gateway_process(config) as (url, _):  # the next process sweeps the dead one's hold
        deadline = time.monotonic() + 30
        state: dict[str, Any] = {}
        while True:
            with httpx.Client(base_url=url, timeout=10,
                              headers={"authorization": "Bearer test-admin-token"}) as admin:
                state = admin.get(f"/admin/accounts/{account}").json()
            if state["held"] == "0":
                break
            assert time.monotonic() < deadline, state
            time.sleep(0.2)
        spent = int(state["spent"])
        assert delivered - 16 <= spent <= delivered  # at most one lease uncommitted
        assert int(state["credited"]) <= payer.wallet.authorized
        payee_before = await settler.balance_of(chain.relayer_address, evm_network)
        assert payer.spent <= spent  # its last receipt came before the crash
        payer.spent = 0  # an agent that lost track of it (restarted, say): the first close is
        with session_client(payer, timeout=30) as http:  # refused naming what was spent
            closed = await asyncio.to_thread(close_session, http, f"{url}{CHAT}")
    assert closed["spent"] == spent
    escrow = EscrowClient(evm_network, chain.escrow)
    try:
        on_chain = await escrow.get_channel(payer.channel_id or "")
    finally:
        await escrow.aclose()
    assert on_chain.finalized and on_chain.settled == spent
    assert await settler.balance_of(chain.relayer_address, evm_network) == payee_before + spent
    assert await settler.balance_of(payer.wallet.address, evm_network) == 10_000 - spent


async def test_a_client_gone_during_a_pause_ends_it_at_once(
        sgw: RunningGateway, chain: DevChain, sim: str) -> None:
    """The pause waits for a voucher, not for a client that left: the disconnect ends the
    stream (upstream closed, hold returned, delivered billed) long before the timeout."""
    payer = payer_for(chain)
    with session_client(payer, timeout=60) as http:  # opens the channel, spends 5
        assert await asyncio.to_thread(chat_text, sgw, http, 5) == text_of(0, 5)
    before = sim_stats(sim)["streams_cancelled"]
    account = account_of(payer.channel_id or "")
    with httpx.Client(timeout=30) as client, client.stream(
            "POST", f"{sgw.url}{CHAT}",
            headers={"authorization": payer.wallet.voucher(40),
                     "x-sim-tokens-per-second": "100", "x-sim-output-tokens": "2000"},
            json={"model": "exact", "messages": MESSAGES, "stream": True,
                  "max_tokens": 2000}) as response:
        for line in response.iter_lines():
            if line == "event: payment-need-voucher":
                break  # paused: go away without paying
    left = time.monotonic()
    deadline = left + PAUSE_TIMEOUT / 2
    while sim_stats(sim)["streams_cancelled"] == before or \
            sgw.balance(account)["held"] != "0":
        assert time.monotonic() < deadline, "the paused stream outlived its client"
        time.sleep(0.02)
    assert sgw.balance(account)["spent"] == "40"


async def test_a_402_without_a_session_offer_reaches_the_sdk_unpaid(
        gateway_factory: Factory, chain: DevChain) -> None:
    from tests.test_x402_gateway import x402_config

    payer = payer_for(chain)
    with gateway_factory(x402=x402_config(chain)) as xgw, \
            session_client(payer, timeout=60) as http, \
            pytest.raises(openai.APIStatusError) as refused:
        await asyncio.to_thread(chat_text, xgw, http, 5)
    assert refused.value.status_code == 402
    assert refused.value.response.json()["x402Version"] == 1  # the gateway's own body
    assert payer.channel_id is None and payer.wallet.authorized == 0  # nothing signed
