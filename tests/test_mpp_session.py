"""MPP ``evm`` session end to end on the local chain: open (both fee modes), vouchers metered
by streams, top-up, cooperative close paying the payee exactly what was spent, every bad
credential and voucher refused with its problem type and nothing changed, settlement in the
background. Real chain (the project's escrow), real Redis, a real gateway on a free port."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import secrets
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import mpp
import pytest

from gateway.agent.session import SessionWallet, session_challenge
from gateway.chain.devchain import DevChain
from gateway.rails.evm import EvmNetwork, EvmSettler
from gateway.rails.mpp.channel import ZERO_ADDRESS, compute_channel_id, sign_voucher
from gateway.rails.mpp.escrow import EscrowClient
from gateway.rails.mpp.scheme import b64url
from gateway.rails.mpp.settler import ChannelSettler
from meters.channels import Channels, account_of
from meters.connection import connect
from meters.ledger import Ledger
from tests.chain_fixtures import *  # noqa: F403  (session fixtures: chain, evm_network, settler)
from tests.chain_fixtures import new_account
from tests.conftest import RunningGateway
from tests.test_mpp_charge import SECRET, mpp_config

pytestmark = [pytest.mark.timeout(120), pytest.mark.asyncio(loop_scope="session")]

Factory = Callable[..., contextlib.AbstractContextManager[RunningGateway]]
DEPOSIT = 1000  # atomic units: 1,000 tokens of the "exact" model
CHAT = "/v1/chat/completions"


def session_config(chain: DevChain, **extra: Any) -> dict[str, Any]:
    return mpp_config(chain, **{
        "charge": False, "session": True, "escrow": chain.escrow,
        "suggested_deposit": "0.001", "min_deposit": "0.0001",
        "min_voucher_delta": "0.00001", "settle_interval_seconds": 3600,
        "settle_threshold": "0.0001", "session_pause_timeout_seconds": 2, **extra})


@pytest.fixture
def sgw(gateway_factory: Factory, chain: DevChain) -> Iterator[RunningGateway]:
    with gateway_factory(mpp=session_config(chain)) as running:
        yield running


def body(max_tokens: int = 20) -> dict[str, Any]:
    return {"model": "exact", "stream": True, "max_tokens": max_tokens,
            "messages": [{"role": "user", "content": "hi"}]}


def challenge(gw: RunningGateway) -> mpp.Challenge:
    response = httpx.post(f"{gw.url}{CHAT}", json=body(), timeout=10)
    assert response.status_code == 402
    found = session_challenge(response.headers)
    assert found is not None
    return found


def wallet(chain: DevChain, index: int) -> SessionWallet:
    return SessionWallet(chain.wallets[index].private_key, token_name=chain.token_name,
                         token_version=chain.token_version, spend_cap=10 * DEPOSIT,
                         deposit=DEPOSIT)


def head(gw: RunningGateway, credential: str) -> httpx.Response:
    return httpx.head(f"{gw.url}{CHAT}", headers={"authorization": credential}, timeout=30)


def paid(gw: RunningGateway, credential: str) -> httpx.Response:
    """A model request carrying ``credential`` (HEAD answers have no body to read a problem
    from; the same checks run on either)."""
    return httpx.post(f"{gw.url}{CHAT}", json=body(), timeout=30,
                      headers={"authorization": credential})


def stream(gw: RunningGateway, credential: str, max_tokens: int = 20) -> httpx.Response:
    with httpx.Client(timeout=30) as client:
        response = client.post(f"{gw.url}{CHAT}", json=body(max_tokens),
                               headers={"authorization": credential})
    return response


def receipt(response: httpx.Response) -> dict[str, Any]:
    raw = response.headers["payment-receipt"]
    return dict(json.loads(base64.urlsafe_b64decode(raw + "=" * (-len(raw) % 4))))


def problem(response: httpx.Response, kind: str, status: int = 402) -> None:
    assert response.status_code == status, response.text
    assert response.json()["type"].split("/problems/")[1] == kind, response.json()
    assert "payment-receipt" not in response.headers


async def test_the_session_challenge(sgw: RunningGateway, chain: DevChain) -> None:
    found = challenge(sgw)
    assert found.verify(SECRET, "tollstream.test")
    request = found.request
    assert request["amount"] == "1" and request["unitType"] == "llm_token"
    assert request["suggestedDeposit"] == "1000" and request["currency"] == chain.token
    details = request["methodDetails"]
    assert details["escrowContract"] == chain.escrow and details["chainId"] == chain.chain_id
    assert details["feePayer"] is True and details["minVoucherDelta"] == "10"
    assert details["credentialTypes"] == ["authorization", "hash"]


async def test_open_vouchers_stream_top_up_and_close(
        sgw: RunningGateway, chain: DevChain, evm_network: EvmNetwork,
        settler: EvmSettler) -> None:
    agent = wallet(chain, 11)
    payee = chain.relayer_address
    payer_before = await settler.balance_of(agent.address, evm_network)
    payee_before = await settler.balance_of(payee, evm_network)
    opened = head(sgw, agent.open(challenge(sgw)))  # relayed: the agent needs no ETH
    assert opened.status_code == 200, opened.text
    assert receipt(opened)["channelId"] == agent.channel_id
    assert await settler.balance_of(agent.address, evm_network) == payer_before - DEPOSIT
    account = account_of(agent.channel_id or "")
    # A voucher on the model request itself: 300 authorized, a 20-token answer spends 20.
    first = stream(sgw, agent.voucher(300))
    assert first.status_code == 200, first.text
    assert receipt(first)["acceptedCumulative"] == "300"
    state = sgw.balance(account)
    assert (state["credited"], state["spent"], state["balance"]) == ("300", "20", "280")
    # The same voucher again is an idempotent replay: it authorizes nothing more.
    again = stream(sgw, agent.voucher(300), max_tokens=30)
    assert again.status_code == 200 and sgw.balance(account)["spent"] == "50"
    # A bare voucher on HEAD: no model call.
    assert head(sgw, agent.voucher(400)).status_code == 200
    assert sgw.balance(account)["credited"] == "400"
    # Top up: the deposit grows on-chain and in the ledger's view of the channel.
    topped = head(sgw, agent.top_up(500))
    assert topped.status_code == 200, topped.text
    escrow = EscrowClient(evm_network, chain.escrow)
    try:
        assert (await escrow.get_channel(agent.channel_id or "")).deposit == DEPOSIT + 500
        assert head(sgw, agent.voucher(1200)).status_code == 200
        # Close for exactly what was spent: the payee gets that, the payer the rest.
        spent = int(sgw.balance(account)["spent"])
        assert spent == 50
        too_much = httpx.post(f"{sgw.url}{CHAT}", timeout=30,
                              headers={"authorization": agent.voucher(1200, action="close")})
        problem(too_much, "verification-failed")
        closed = httpx.post(f"{sgw.url}{CHAT}", timeout=30,
                            headers={"authorization": agent.voucher(spent, action="close")})
        assert closed.status_code == 200, closed.text
        closing = receipt(closed)
        assert closing["txHash"].startswith("0x") and closing["spent"] == "50"
        final = await escrow.get_channel(agent.channel_id or "")
        assert final.finalized and final.settled == spent
    finally:
        await escrow.aclose()
    assert await settler.balance_of(payee, evm_network) == payee_before + spent
    assert await settler.balance_of(agent.address, evm_network) == payer_before - spent
    state = sgw.balance(account)
    assert (state["credited"], state["spent"], state["balance"], state["held"]) == (
        "50", "50", "0", "0")
    # Nothing more on a closed channel.
    problem(paid(sgw, agent.voucher(1300)), "session/channel-finalized", 410)


async def test_open_by_the_agent_itself(sgw: RunningGateway, chain: DevChain,
                                        evm_network: EvmNetwork) -> None:
    """feePayer false: the agent sends its own approve + open and the transaction hash."""
    payer = new_account(chain, tokens=10 * DEPOSIT, eth=10**17)  # pays its own gas
    key = payer.key.hex()
    agent = SessionWallet(key, token_name=chain.token_name, token_version=chain.token_version,
                          spend_cap=10 * DEPOSIT, deposit=DEPOSIT)
    found = challenge(sgw)
    payee = found.request["recipient"]
    salt = "0x" + secrets.token_hex(32)
    escrow = EscrowClient(evm_network, chain.escrow)
    try:
        outcome = await escrow.open(key, payee=payee, deposit=DEPOSIT, salt=salt)
    finally:
        await escrow.aclose()
    channel_id = compute_channel_id(payer=agent.address, payee=payee, token=chain.token,
                                    salt=salt, authorized_signer=ZERO_ADDRESS,
                                    escrow=chain.escrow, chain_id=chain.chain_id)
    initial = sign_voucher(key, channel_id=channel_id, cumulative_amount=0,
                           chain_id=chain.chain_id, escrow=chain.escrow)
    payload = {"action": "open", "type": "hash", "channelId": channel_id, "salt": salt,
               "hash": outcome.tx_hash, "cumulativeAmount": "0",
               "signature": initial.signature}
    problem(paid(sgw, agent.credential(found, payload)), "malformed-credential")
    opened = head(sgw, agent.credential(found, payload,
                                        source=f"did:pkh:eip155:{chain.chain_id}:"
                                               f"{agent.address}"))
    assert opened.status_code == 200, opened.text
    agent.channel_id, agent.challenge = channel_id, found
    assert stream(sgw, agent.voucher(100)).status_code == 200
    assert sgw.balance(account_of(channel_id))["spent"] == "20"


async def test_bad_vouchers_get_their_problem_and_change_nothing(
        sgw: RunningGateway, chain: DevChain) -> None:
    agent = wallet(chain, 9)
    assert head(sgw, agent.open(challenge(sgw))).status_code == 200
    assert head(sgw, agent.voucher(100)).status_code == 200
    account = account_of(agent.channel_id or "")
    before = sgw.balance(account)
    found = agent.challenge
    assert found is not None

    def voucher(amount: int, *, key: str = agent.private_key, channel: str | None = None,
                chain_id: int = chain.chain_id, escrow: str = chain.escrow,
                signature: str | None = None, action: str = "voucher") -> str:
        channel_id = channel or agent.channel_id or ""
        signed = sign_voucher(key, channel_id=channel_id, cumulative_amount=amount,
                              chain_id=chain_id, escrow=escrow)
        return agent.credential(found, {"action": action, "channelId": channel_id,
                                        "cumulativeAmount": str(amount),
                                        "signature": signature or signed.signature})

    problem(paid(sgw, voucher(200, key=chain.wallets[8].private_key)),
            "session/signer-mismatch")
    problem(paid(sgw, voucher(200, chain_id=1)), "session/signer-mismatch")
    problem(paid(sgw, voucher(200, escrow=chain.token)), "session/signer-mismatch")
    good = sign_voucher(agent.private_key, channel_id=agent.channel_id or "",
                        cumulative_amount=200, chain_id=chain.chain_id, escrow=chain.escrow)
    raw = bytes.fromhex(good.signature[2:])
    order = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141
    high_s = raw[:32] + (order - int.from_bytes(raw[32:64], "big")).to_bytes(32, "big") + \
        bytes([55 - raw[64]])
    problem(paid(sgw, voucher(200, signature="0x" + high_s.hex())),
            "session/invalid-signature")
    problem(paid(sgw, voucher(200, signature="0x" + "00" * 65)),
            "session/invalid-signature")
    problem(paid(sgw, voucher(105)), "session/delta-too-small")
    problem(paid(sgw, voucher(DEPOSIT + 1)), "session/amount-exceeds-deposit")
    other = "0x" + secrets.token_hex(32)
    problem(paid(sgw, voucher(200, channel=other)), "session/channel-not-found", 410)
    problem(paid(sgw, b64url(b"{}").join(["Payment ", ""])), "malformed-credential")
    tampered = agent.credential(found, {"action": "voucher"})
    problem(paid(sgw, tampered), "malformed-credential")
    # Lower or equal: 200, nothing changes (after the signature was checked).
    assert head(sgw, voucher(50)).status_code == 200
    assert head(sgw, voucher(100)).status_code == 200
    assert sgw.balance(account) == before


async def test_a_forced_close_stops_vouchers_and_is_settled_at_once(
        sgw: RunningGateway, chain: DevChain, evm_network: EvmNetwork, redis_url: str
        ) -> None:
    payer = new_account(chain, tokens=10 * DEPOSIT, eth=10**17)  # requestClose costs gas
    agent = SessionWallet(payer.key.hex(), token_name=chain.token_name,
                          token_version=chain.token_version, spend_cap=10 * DEPOSIT,
                          deposit=DEPOSIT)
    assert head(sgw, agent.open(challenge(sgw))).status_code == 200
    assert stream(sgw, agent.voucher(100)).status_code == 200  # spends 20
    escrow = EscrowClient(evm_network, chain.escrow)
    try:
        await escrow.request_close(agent.private_key, agent.channel_id or "")
        # Spent 20; accepted vouchers: 0 and 100. Within the grace period the cheapest
        # voucher covering what was delivered is captured (a settler on this event loop,
        # sharing the gateway's Redis, stands for the gateway's own background pass).
        ledger = Ledger(connect(sgw.gateway.settings.redis_url or redis_url),
                        prefix=sgw.settings.key_prefix)
        try:
            one = ChannelSettler(escrow=escrow, channels=Channels(ledger), ledger=ledger,
                                 payee_key=chain.relayer_key, interval=1, threshold=10**9)
            assert await one.settle_all() == 1
        finally:
            await ledger.redis.aclose()
        chain_state = await escrow.get_channel(agent.channel_id or "")
        assert chain_state.close_requested_at and chain_state.settled == 100
    finally:
        await escrow.aclose()
    problem(paid(sgw, agent.voucher(200)), "session/channel-finalized", 410)


def append_mpp(config: str, chain: DevChain, **extra: Any) -> None:
    """Add an [mpp] session section to a TOML config written by tests/test_faults.py."""
    settings = session_config(chain, **extra)
    network = settings.pop("network")
    lines = ["", "[mpp]"]
    lines += [f"{k} = {json.dumps(v)}" for k, v in settings.items()]
    lines += ["", "[mpp.network]"]
    lines += [f"{k} = {json.dumps(v)}" for k, v in network.items()]
    with open(config, "a") as handle:
        handle.write("\n".join(lines) + "\n")


async def test_vouchers_accepted_before_a_crash_are_settled_once_after_it(
        sim: str, redis_url: str, chain: DevChain, evm_network: EvmNetwork,
        settler: EvmSettler) -> None:
    import os
    import signal

    from tests.servers import gateway_process
    from tests.test_faults import write_config

    prefix = f"t{secrets.token_hex(4)}:"
    config = write_config(sim, redis_url, prefix)
    append_mpp(config, chain)  # settles only every hour: nothing before the crash
    agent = wallet(chain, 7)
    payee = chain.relayer_address
    with gateway_process(config) as (url, proc):
        found = session_challenge(httpx.post(f"{url}{CHAT}", json=body(), timeout=10).headers)
        assert found is not None
        assert httpx.head(f"{url}{CHAT}", timeout=30,
                          headers={"authorization": agent.open(found)}).status_code == 200
        # 200 authorized, a long answer spends it all (cut at the last paid token).
        spent = httpx.post(f"{url}{CHAT}", json=body(250), timeout=30,
                           headers={"authorization": agent.voucher(200)})
        assert spent.status_code == 200 and b"allowance_exhausted" in spent.content
        assert httpx.head(f"{url}{CHAT}", timeout=30,
                          headers={"authorization": agent.voucher(600)}).status_code == 200
        payee_before = await settler.balance_of(payee, evm_network)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(5)
    channel_id = agent.channel_id or ""
    escrow = EscrowClient(evm_network, chain.escrow)
    try:
        assert (await escrow.get_channel(channel_id)).settled == 0
        # A new process, settling every half second, captures the voucher that covers what
        # was spent (200; the 600 one runs ahead of delivery), once.
        restarted = write_config(sim, redis_url, prefix)
        append_mpp(restarted, chain, settle_interval_seconds=0.5)
        with gateway_process(restarted) as (_, again_proc):
            deadline = time.monotonic() + 30
            while (await escrow.get_channel(channel_id)).settled == 0:
                if time.monotonic() > deadline:
                    again_proc.terminate()
                    err = again_proc.stderr.read().decode() if again_proc.stderr else ""
                    raise AssertionError(f"not settled after the restart: {err[-3000:]}")
                await asyncio.sleep(0.2)
        assert (await escrow.get_channel(channel_id)).settled == 200
        assert await settler.balance_of(payee, evm_network) == payee_before + 200
        # Another pass, from yet another process, finds nothing left to settle.
        from gateway.rails.mpp.settler import ChannelSettler
        from meters.channels import Channels
        from meters.connection import connect
        from meters.ledger import Ledger

        ledger = Ledger(connect(redis_url), prefix=prefix)
        again = ChannelSettler(escrow=escrow, channels=Channels(ledger), ledger=ledger,
                               payee_key=chain.relayer_key, interval=1, threshold=1)
        assert await again.settle_all(force=True) == 0
        await ledger.redis.aclose()
    finally:
        await escrow.aclose()
    assert await settler.balance_of(payee, evm_network) == payee_before + 200
