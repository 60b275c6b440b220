"""x402 ``upto`` end to end: the official x402 SDK's upto client authorizes a maximum with
Permit2 on the local chain (our Permit2 and proxy at their canonical addresses), the gateway
streams against it and settles once, on-chain, for exactly what was delivered."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import secrets
import signal
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import openai
import pytest
from eth_account import Account
from eth_account.messages import encode_typed_data

from gateway.chain.devchain import DevChain
from gateway.rails.evm import EvmNetwork, EvmSettler
from gateway.rails.upto import (
    UPTO_PROXY_ADDRESS,
    UptoAuthorization,
    UptoEvm,
    parse_upto_payload,
    typed_data,
)
from gateway.rails.x402 import PaymentRequired, PaymentRequirements, decode_model
from gateway.rails.x402_upto import upto_account_id
from meters.tokens import get_tokenizer
from tests.chain_fixtures import *  # noqa: F403  (session fixtures: chain, evm_network, settler)
from tests.chain_fixtures import PAY_TO, new_account
from tests.conftest import RunningGateway
from tests.test_x402_gateway import x402_config

pytestmark = [pytest.mark.timeout(120), pytest.mark.asyncio(loop_scope="session")]

O200K = get_tokenizer("o200k_base")
MESSAGES: list[Any] = [{"role": "user", "content": "Tell me everything."}]
CHAT = "/v1/chat/completions"
Factory = Callable[..., contextlib.AbstractContextManager[RunningGateway]]


def upto_config(chain: DevChain, **upto: Any) -> dict[str, Any]:
    return x402_config(chain, upto={"enabled": True, "max": "0.001", **upto})


@pytest.fixture
def ugw(gateway_factory: Factory, chain: DevChain) -> Iterator[RunningGateway]:
    with gateway_factory(x402=upto_config(chain, idle_seconds=1, sweep_seconds=0.2)) as gw:
        yield gw


def body(max_tokens: int, *, stream: bool = True) -> dict[str, Any]:
    return {"model": "exact", "messages": MESSAGES, "max_tokens": max_tokens, "stream": stream}


def challenge(gw: RunningGateway, max_tokens: int) -> list[PaymentRequirements]:
    response = httpx.post(f"{gw.url}{CHAT}", json=body(max_tokens), timeout=10)
    assert response.status_code == 402
    required = decode_model(response.headers["PAYMENT-REQUIRED"], PaymentRequired,
                            header="PAYMENT-REQUIRED")
    return list(required.accepts)


def upto_offer(gw: RunningGateway, max_tokens: int) -> PaymentRequirements:
    return next(req for req in challenge(gw, max_tokens) if req.scheme == "upto")


def sdk_header(key: str, req: PaymentRequirements, **changes: Any) -> str:
    """A PAYMENT-SIGNATURE the official SDK's upto client signs for ``req`` (its fields
    changed by ``changes`` first: a payer offering another amount)."""
    from x402.mechanisms.evm.upto.client import UptoEvmScheme
    from x402.schemas import PaymentRequirements as SdkRequirements

    data = {**req.model_dump(mode="json", by_alias=True), **changes}
    sdk_req = SdkRequirements.model_validate(data)
    inner = UptoEvmScheme(Account.from_key(key)).create_payment_payload(sdk_req)
    payload = {"x402Version": 2, "accepted": data, "payload": inner}
    return base64.b64encode(json.dumps(payload).encode()).decode()


def crafted_header(key: str, req: PaymentRequirements, *, amount: int | None = None,
                   to: str | None = None, deadline: int | None = None,
                   valid_after: int = 0, nonce: int | None = None,
                   sign_as: str | None = None) -> tuple[str, int]:
    """A payment signed by hand (to make the bad ones the SDK would never sign); returns the
    header and its nonce."""
    owner = Account.from_key(key).address
    nonce = secrets.randbits(256) if nonce is None else nonce
    auth = UptoAuthorization.model_validate({
        "from": owner, "spender": UPTO_PROXY_ADDRESS, "nonce": str(nonce),
        "deadline": str(deadline if deadline is not None else int(time.time()) + 600),
        "permitted": {"token": req.asset, "amount": str(amount or req.amount)},
        "witness": {"to": to or req.pay_to, "facilitator": req.extra.model_extra[
            "facilitatorAddress"] if req.extra.model_extra else "", "validAfter":
            str(valid_after)}})
    message = encode_typed_data(full_message=typed_data(auth, int(req.network.split(":")[1])))
    signature = Account.sign_message(message, sign_as or key).signature.to_0x_hex()
    accepted = {**req.model_dump(mode="json", by_alias=True),
                "amount": str(amount or req.amount)}
    payload = {"x402Version": 2, "accepted": accepted,
               "payload": {"signature": signature, "permit2Authorization":
                           auth.model_dump(mode="json", by_alias=True)}}
    return base64.b64encode(json.dumps(payload).encode()).decode(), nonce


def hold_record(redis_url: str, prefix: str, nonce: int) -> dict[str, str]:
    """The upto hold record of the authorization with ``nonce`` (empty: none)."""
    import redis as sync_redis

    client = sync_redis.Redis.from_url(redis_url, decode_responses=True)
    try:
        # upto:id:<network:asset:payer:nonce> names the account; the record is beside it.
        for key in client.scan_iter(match=f"{prefix}upto:id:*:{nonce}"):
            account = client.get(key)
            if account is not None:
                return dict(client.hgetall(f"{prefix}upto:{{{account}}}"))
    finally:
        client.close()
    return {}


def settled_record(redis_url: str, prefix: str, nonce: int, state: str = "settled"
                   ) -> dict[str, str] | None:
    record = hold_record(redis_url, prefix, nonce)
    return record if record.get("state") == state else None


def wait_for(condition: Callable[[], Any], what: str, seconds: float = 20) -> Any:
    deadline = time.monotonic() + seconds
    while True:
        value = condition()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


async def official_client_stream(url: str, chain: DevChain, key: str, *, max_tokens: int,
                                 output: int) -> str:
    """The text of a stream the stock openai SDK reads over the official x402 SDK's httpx
    client, which answers the 402 with an upto authorization (its only scheme)."""
    from x402 import x402Client
    from x402.http.clients import x402HttpxClient
    from x402.mechanisms.evm.upto.client import UptoEvmScheme

    client = x402Client()
    client.register("eip155:*", UptoEvmScheme(Account.from_key(key)))
    client.set_spend_controls({"allowed_assets": [{"network": chain.network,
                                                   "asset": chain.token}]})
    async with x402HttpxClient(client, timeout=30) as http:
        sdk = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0,
                                 http_client=http)
        stream = await sdk.chat.completions.create(
            model="exact", messages=MESSAGES, stream=True, max_tokens=max_tokens,
            extra_headers={"x-sim-output-tokens": str(output)})
        return "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])


def nonce_of(header: str) -> int:
    payload = parse_upto_payload(json.loads(base64.b64decode(header)))
    return payload.payload.permit2_authorization.nonce


async def test_upto_is_offered_beside_exact_for_the_requests_most(
        ugw: RunningGateway, chain: DevChain) -> None:
    accepts = challenge(ugw, 40)
    assert [req.scheme for req in accepts] == ["exact", "upto"]
    upto = accepts[1]
    assert upto.amount == 40  # prompt free, 40 output tokens at 1 unit each
    extra = upto.extra.model_dump(by_alias=True)
    assert extra["facilitatorAddress"] == chain.relayer_address
    assert extra["assetTransferMethod"] == "permit2" and extra["name"] == chain.token_name
    # Capped: [x402.upto] max is 0.001 USDC = 1,000 units.
    assert upto_offer(ugw, 5_000).amount == 1_000


async def test_the_official_client_pays_upto_and_openai_streams_settled_to_the_token(
        ugw: RunningGateway, chain: DevChain, evm_network: EvmNetwork,
        settler: EvmSettler) -> None:
    """The stock openai SDK over the x402 SDK's httpx client: the 402 is answered with an
    upto authorization for 60 tokens, 30 stream, and exactly 30 units move on-chain."""

    wallet = chain.wallets[1]
    payer_before = await settler.balance_of(wallet.address, evm_network)
    merchant_before = await settler.balance_of(PAY_TO, evm_network)
    text = await official_client_stream(ugw.url, chain, wallet.private_key, max_tokens=60,
                                        output=30)
    assert O200K.count(text) == 30
    assert await settler.balance_of(wallet.address, evm_network) == payer_before - 30
    assert await settler.balance_of(PAY_TO, evm_network) == merchant_before + 30


async def test_a_stream_carries_its_settlement_and_a_replay_is_refused(
        ugw: RunningGateway, chain: DevChain, evm_network: EvmNetwork,
        settler: EvmSettler, redis_url: str) -> None:
    wallet = chain.wallets[2]
    header = sdk_header(wallet.private_key, upto_offer(ugw, 50))
    before = await settler.balance_of(wallet.address, evm_network)
    comments: list[str] = []
    with httpx.Client(timeout=30) as http, http.stream(
            "POST", f"{ugw.url}{CHAT}", json=body(50),
            headers={"PAYMENT-SIGNATURE": header, "x-sim-output-tokens": "20"}) as response:
        assert response.status_code == 200
        lines = list(response.iter_lines())
    comments = [line for line in lines if line.startswith(": payment-response ")]
    assert len(comments) == 1 and lines.index(comments[0]) < lines.index("data: [DONE]")
    settled = json.loads(base64.b64decode(comments[0].split(" ", 2)[2]))
    assert settled["success"] is True and settled["amount"] == "20"
    assert settled["payer"] == wallet.address and settled["transaction"].startswith("0x")
    assert await settler.balance_of(wallet.address, evm_network) == before - 20
    record = hold_record(redis_url, ugw.settings.key_prefix, nonce_of(header))
    assert record["state"] == "settled" and record["capture"] == "20"
    assert record["transaction"] == settled["transaction"]
    # The account was the request's alone: it is gone.
    account = record["account"]
    assert account == upto_account_id(f"{chain.network}:{chain.token.lower()}:"
                                      f"{wallet.address.lower()}:{nonce_of(header)}")
    with ugw.admin() as admin:
        assert admin.get(f"/admin/accounts/{account}").status_code == 404
    replay = httpx.post(f"{ugw.url}{CHAT}", json=body(50), timeout=30,
                        headers={"PAYMENT-SIGNATURE": header})
    assert replay.status_code == 402 and replay.json()["code"] == "permit2_invalid_nonce"
    assert await settler.balance_of(wallet.address, evm_network) == before - 20


async def test_a_non_streaming_answer_has_the_settlement_header(
        ugw: RunningGateway, chain: DevChain, evm_network: EvmNetwork,
        settler: EvmSettler) -> None:
    wallet = chain.wallets[0]
    header = sdk_header(wallet.private_key, upto_offer(ugw, 25))
    before = await settler.balance_of(wallet.address, evm_network)
    response = httpx.post(f"{ugw.url}{CHAT}", json=body(25, stream=False), timeout=30,
                          headers={"PAYMENT-SIGNATURE": header, "x-sim-output-tokens": "25"})
    assert response.status_code == 200, response.text
    settled = json.loads(base64.b64decode(response.headers["PAYMENT-RESPONSE"]))
    assert settled["success"] is True and settled["amount"] == "25"
    assert await settler.balance_of(wallet.address, evm_network) == before - 25


async def test_a_stream_is_cut_at_the_maximum_and_settles_the_maximum(
        ugw: RunningGateway, chain: DevChain, evm_network: EvmNetwork,
        settler: EvmSettler) -> None:
    """The payer authorizes 12 units for a request asking up to 60 tokens: the stream is cut
    at the 12th token and 12 move."""
    wallet = chain.wallets[1]
    offer = upto_offer(ugw, 60)
    header = sdk_header(wallet.private_key, offer, amount="12")
    before = await settler.balance_of(wallet.address, evm_network)
    sdk = openai.OpenAI(base_url=f"{ugw.url}/v1", api_key="unused", max_retries=0, timeout=30,
                        default_headers={"PAYMENT-SIGNATURE": header})
    text = "".join(c.choices[0].delta.content or "" for c in sdk.chat.completions.create(
        model="exact", messages=MESSAGES, stream=True, max_tokens=60,
        extra_headers={"x-sim-output-tokens": "60"}) if c.choices)
    assert O200K.count(text) == 12
    assert await settler.balance_of(wallet.address, evm_network) == before - 12


async def test_a_disconnect_settles_what_was_delivered(
        ugw: RunningGateway, chain: DevChain, evm_network: EvmNetwork,
        settler: EvmSettler, redis_url: str) -> None:
    wallet = chain.wallets[2]
    header = sdk_header(wallet.private_key, upto_offer(ugw, 800))
    before = await settler.balance_of(wallet.address, evm_network)
    received = 0
    with httpx.Client(timeout=30) as http, http.stream(
            "POST", f"{ugw.url}{CHAT}", json=body(800),
            headers={"PAYMENT-SIGNATURE": header, "x-sim-output-tokens": "800",
                     "x-sim-tokens-per-second": "200"}) as response:
        for line in response.iter_lines():
            if line.startswith("data: {"):
                delta = json.loads(line[6:])["choices"][0]["delta"]
                received += bool(delta.get("content"))
            if received == 40:
                break  # the agent leaves
    prefix = ugw.settings.key_prefix
    record = wait_for(lambda: settled_record(redis_url, prefix, nonce_of(header)),
                      "the settlement")
    captured = int(record["capture"])
    # Everything the client read was paid for; at most what one write more carried was sent
    # after it stopped reading and before the disconnect was seen.
    assert 40 <= captured < 800
    assert await settler.balance_of(wallet.address, evm_network) == before - captured


@pytest.mark.parametrize("case", ["recipient", "reused_nonce", "expired", "not_yet_valid",
                                  "forged", "over_the_cap", "no_permit2_approval"])
async def test_bad_upto_payments_are_refused_and_settle_nothing(
        ugw: RunningGateway, chain: DevChain, evm_network: EvmNetwork,
        settler: EvmSettler, redis_url: str, case: str) -> None:
    wallet = chain.wallets[0]
    offer = upto_offer(ugw, 30)
    key = wallet.private_key
    now = int(time.time())
    expected = {"recipient": "invalid_permit2_recipient_mismatch",
                "reused_nonce": "permit2_invalid_nonce", "expired": "permit2_deadline_expired",
                "not_yet_valid": "permit2_not_yet_valid", "forged": "invalid_permit2_signature",
                "over_the_cap": "invalid_payment_requirements",
                "no_permit2_approval": "permit2_allowance_required"}[case]
    if case == "recipient":
        header, _ = crafted_header(key, offer, to=new_account(chain).address)
    elif case == "reused_nonce":
        first, nonce = crafted_header(key, offer)
        ok = httpx.post(f"{ugw.url}{CHAT}", json=body(30), timeout=30,
                        headers={"PAYMENT-SIGNATURE": first})
        assert ok.status_code == 200
        wait_for(lambda: settled_record(redis_url, ugw.settings.key_prefix, nonce), "settled")
        header, _ = crafted_header(key, offer, nonce=nonce)  # a new signature, same nonce
    elif case == "expired":
        header, _ = crafted_header(key, offer, deadline=now - 1)
    elif case == "not_yet_valid":
        header, _ = crafted_header(key, offer, valid_after=now + 3600)
    elif case == "forged":
        header, _ = crafted_header(key, offer, sign_as=chain.wallets[1].private_key)
    elif case == "over_the_cap":
        header, _ = crafted_header(key, offer, amount=1_001)
    else:
        account = new_account(chain, tokens=10_000)  # funded, never approved Permit2
        key = "0x" + bytes(account.key).hex()
        header, _ = crafted_header(key, offer)
    payer = Account.from_key(key).address
    before = await settler.balance_of(payer, evm_network)
    merchant = await settler.balance_of(PAY_TO, evm_network)
    response = httpx.post(f"{ugw.url}{CHAT}", json=body(30), timeout=30,
                          headers={"PAYMENT-SIGNATURE": header})
    assert response.status_code == 402, response.text
    assert response.json()["code"] == expected
    assert "PAYMENT-REQUIRED" in response.headers  # a fresh challenge to pay again
    assert await settler.balance_of(payer, evm_network) == before
    assert await settler.balance_of(PAY_TO, evm_network) == merchant


async def test_settling_above_the_authorized_maximum_is_refused_on_our_side(
        ugw: RunningGateway, chain: DevChain, evm_network: EvmNetwork) -> None:
    from gateway.errors import PaymentRejected
    from gateway.rails.upto import UptoPaymentPayload

    header = sdk_header(chain.wallets[0].private_key, upto_offer(ugw, 30))
    payload = UptoPaymentPayload.model_validate(json.loads(base64.b64decode(header)))
    evm = UptoEvm(settler_rpc := EvmSettler().rpc)
    try:
        with pytest.raises(PaymentRejected) as refused:
            await evm.settle(payload, 31, evm_network)
        assert refused.value.code == "invalid_upto_evm_payload_settlement_exceeds_amount"
        owner = payload.payload.permit2_authorization.from_
        assert not await evm.nonce_used(evm_network, owner,
                                        payload.payload.permit2_authorization.nonce)
    finally:
        await settler_rpc.aclose()


async def test_a_request_that_fails_before_streaming_settles_nothing(
        ugw: RunningGateway, chain: DevChain, evm_network: EvmNetwork,
        settler: EvmSettler, redis_url: str) -> None:
    wallet = chain.wallets[1]
    header = sdk_header(wallet.private_key, upto_offer(ugw, 30))
    before = await settler.balance_of(wallet.address, evm_network)
    response = httpx.post(f"{ugw.url}{CHAT}", json=body(30), timeout=30,
                          headers={"PAYMENT-SIGNATURE": header, "x-sim-status": "500"})
    assert response.status_code == 502
    record = wait_for(lambda: settled_record(redis_url, ugw.settings.key_prefix,
                                             nonce_of(header), "expired"), "the hold to expire")
    assert record["capture"] == "0" and record["transaction"] == ""
    assert await settler.balance_of(wallet.address, evm_network) == before


async def test_a_crash_mid_stream_is_settled_once_after_a_restart(
        sim: str, redis_url: str, chain: DevChain, evm_network: EvmNetwork,
        settler: EvmSettler) -> None:
    """kill -9 the gateway mid-stream: the next process's sweep returns the dead stream's
    lease, its keeper settles what the account spent (at most what was delivered, short of it
    by at most one lease), once; a second restart settles nothing more."""
    from tests.conftest import track_prefix
    from tests.servers import gateway_process
    from tests.test_faults import write_config

    prefix = track_prefix(f"t{secrets.token_hex(4)}:")
    config = write_config(sim, redis_url, prefix)
    settings = upto_config(chain, idle_seconds=1, sweep_seconds=0.2)
    network = settings["networks"].pop("local")
    lines = ["", "[x402]"] + [f"{k} = {json.dumps(v)}" for k, v in settings.items()
                              if k not in ("networks", "upto")]
    lines += ["", "[x402.upto]"] + [f"{k} = {json.dumps(v)}"
                                    for k, v in settings["upto"].items()]
    lines += ["", "[x402.networks.local]"] + [f"{k} = {json.dumps(v)}"
                                              for k, v in network.items()]
    with open(config, "a") as handle:
        handle.write("\n".join(lines) + "\n")
    wallet = chain.wallets[0]
    before = await settler.balance_of(wallet.address, evm_network)
    received: list[str] = []
    ended: list[BaseException] = []

    with gateway_process(config) as (url, proc):
        response = httpx.post(f"{url}{CHAT}", json=body(400), timeout=10)
        accepts = decode_model(response.headers["PAYMENT-REQUIRED"], PaymentRequired,
                               header="PAYMENT-REQUIRED").accepts
        header = sdk_header(wallet.private_key, next(a for a in accepts if a.scheme == "upto"))

        def agent() -> None:
            try:
                with httpx.Client(timeout=30) as http, http.stream(
                        "POST", f"{url}{CHAT}", json=body(400),
                        headers={"PAYMENT-SIGNATURE": header, "x-sim-output-tokens": "400",
                                 "x-sim-tokens-per-second": "100"}) as stream:
                    for line in stream.iter_lines():
                        if line.startswith("data: {"):
                            received.append(line)
            except httpx.HTTPError as exc:  # the gateway died under it
                ended.append(exc)

        thread = threading.Thread(target=agent)
        thread.start()
        deadline = time.monotonic() + 30
        while len(received) < 50:
            assert time.monotonic() < deadline and thread.is_alive(), ended
            time.sleep(0.01)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(5)
        thread.join(30)
    delivered = len(received)
    assert ended and 50 <= delivered < 400
    nonce = nonce_of(header)
    with gateway_process(config) as (url, _):
        state = wait_for(lambda: settled_record(redis_url, prefix, nonce), "the keeper", 30)
    captured = int(state["capture"])
    assert delivered - 16 <= captured <= delivered  # at most one lease uncommitted
    # Once: exactly the captured amount left the payer (Permit2's nonce is spent, and the
    # record is out of the open set, so no later keeper pass sends it again).
    assert await settler.balance_of(wallet.address, evm_network) == before - captured
    assert not _open_upto(redis_url, prefix)


def _open_upto(redis_url: str, prefix: str) -> set[str]:
    import redis as sync_redis

    client = sync_redis.Redis.from_url(redis_url, decode_responses=True)
    try:
        return set(client.smembers(f"{prefix}uptos:open"))
    finally:
        client.close()




async def test_a_stream_outliving_its_authorization_is_cut_and_settled_in_time(
        gateway_factory: Factory, chain: DevChain, evm_network: EvmNetwork,
        settler: EvmSettler, redis_url: str) -> None:
    """An authorization expiring mid-stream: the keeper freezes it deadline_margin before the
    deadline, the stream spends the lease it holds and is cut, and what it delivered is
    settled before Permit2 would refuse it."""
    config = upto_config(chain, idle_seconds=1, sweep_seconds=0.2, deadline_margin_seconds=5)
    with gateway_factory(x402=config) as gw:
        wallet = chain.wallets[1]
        header, nonce = crafted_header(wallet.private_key, upto_offer(gw, 600),
                                       deadline=int(time.time()) + 9)
        before = await settler.balance_of(wallet.address, evm_network)
        sdk = openai.OpenAI(base_url=f"{gw.url}/v1", api_key="unused", max_retries=0,
                            timeout=30, default_headers={"PAYMENT-SIGNATURE": header})
        text = "".join(c.choices[0].delta.content or "" for c in sdk.chat.completions.create(
            model="exact", messages=MESSAGES, stream=True, max_tokens=600,
            extra_headers={"x-sim-output-tokens": "600", "x-sim-tokens-per-second": "50"})
            if c.choices)
        delivered = O200K.count(text)
        record = wait_for(lambda: settled_record(redis_url, gw.settings.key_prefix, nonce),
                          "the settlement", 15)
    assert 0 < delivered < 600  # cut, not run to the end
    assert int(record["capture"]) == delivered
    assert await settler.balance_of(wallet.address, evm_network) == before - delivered


@contextlib.contextmanager
def sdk_upto_facilitator(chain: DevChain, evm_network: EvmNetwork) -> Iterator[str]:
    """A facilitator service built from the official SDK (``x402Facilitator`` with its exact
    and upto EVM mechanisms) on the dev chain, with its own funded signer."""
    from x402 import x402Facilitator
    from x402.mechanisms.evm.exact.facilitator import ExactEvmScheme
    from x402.mechanisms.evm.signers import FacilitatorWeb3Signer
    from x402.mechanisms.evm.upto.facilitator import UptoEvmScheme

    from tests.servers import serve
    from tests.test_facilitator_interop import sdk_facilitator_app

    relayer = new_account(chain, eth=10**18)
    signer = FacilitatorWeb3Signer("0x" + bytes(relayer.key).hex(), evm_network.rpc_url)
    facilitator = x402Facilitator()
    facilitator.register([evm_network.network], ExactEvmScheme(signer))
    facilitator.register([evm_network.network], UptoEvmScheme(signer))
    with serve(sdk_facilitator_app(facilitator, required={})) as url:
        yield url


async def test_remote_mode_streams_upto_settled_by_the_sdks_facilitator(
        gateway_factory: Factory, chain: DevChain, evm_network: EvmNetwork,
        settler: EvmSettler) -> None:
    """The gateway in remote mode: the 402 names the SDK facilitator's address (from its
    /supported), the SDK facilitator verifies the authorization and settles the charge."""

    with sdk_upto_facilitator(chain, evm_network) as url, gateway_factory(x402=upto_config(
            chain, idle_seconds=1, sweep_seconds=0.2) | {
                "mode": "remote", "facilitator_url": url}) as gw:
        offer = upto_offer(gw, 60)
        facilitator = (offer.extra.model_extra or {})["facilitatorAddress"]
        assert facilitator != chain.relayer_address  # the SDK facilitator's own signer
        wallet = chain.wallets[4]
        payer_before = await settler.balance_of(wallet.address, evm_network)
        merchant_before = await settler.balance_of(PAY_TO, evm_network)
        text = await official_client_stream(gw.url, chain, wallet.private_key,
                                            max_tokens=60, output=25)
    assert O200K.count(text) == 25
    assert await settler.balance_of(wallet.address, evm_network) == payer_before - 25
    assert await settler.balance_of(PAY_TO, evm_network) == merchant_before + 25


def approved_but_unfunded(chain: DevChain) -> str:
    """A payer that approved Permit2 and holds no tokens: its key."""
    from tests.chain_fixtures import full_token, send_as

    account = new_account(chain, eth=10**16)
    key = "0x" + bytes(account.key).hex()
    data = full_token(chain).encode_abi("approve", args=[chain.permit2, 2**256 - 1])
    receipt = send_as(chain, key, {"to": chain.token, "data": data}, gas=100_000)
    assert receipt["status"] == 1
    return key


@pytest.mark.parametrize("case", ["spender", "token", "network", "too_small", "near_deadline",
                                  "no_balance"])
async def test_more_bad_upto_payments_name_their_reason(
        ugw: RunningGateway, chain: DevChain, evm_network: EvmNetwork,
        settler: EvmSettler, case: str) -> None:
    offer = upto_offer(ugw, 30)
    key = chain.wallets[2].private_key
    expected = {"spender": "invalid_permit2_spender", "token": "permit2_token_mismatch",
                "network": "invalid_network", "too_small": "invalid_payment_requirements",
                "near_deadline": "permit2_deadline_expired",
                "no_balance": "permit2_insufficient_balance"}[case]
    if case == "no_balance":
        key = approved_but_unfunded(chain)
        header, _ = crafted_header(key, offer)
    elif case == "near_deadline":  # valid, but less than deadline_margin_seconds (30) left
        header, _ = crafted_header(key, offer, deadline=int(time.time()) + 20)
    elif case == "too_small":  # below the prompt and the first output tokens (10)
        header, _ = crafted_header(key, offer, amount=5)
    else:
        header, _ = crafted_header(key, offer)
        payload = json.loads(base64.b64decode(header))
        auth = payload["payload"]["permit2Authorization"]
        if case == "spender":
            auth["spender"] = new_account(chain).address
        elif case == "token":
            auth["permitted"]["token"] = new_account(chain).address
        else:
            payload["accepted"]["network"] = "eip155:8453"
        header = base64.b64encode(json.dumps(payload).encode()).decode()
    payer = Account.from_key(key).address
    before = await settler.balance_of(payer, evm_network)
    response = httpx.post(f"{ugw.url}{CHAT}", json=body(30), timeout=30,
                          headers={"PAYMENT-SIGNATURE": header})
    assert response.status_code == 402, response.text
    assert response.json()["code"] == expected
    assert await settler.balance_of(payer, evm_network) == before


@pytest.mark.parametrize("path, value", [
    ("payload.permit2Authorization.witness", None),
    ("payload.permit2Authorization.nonce", "-1"),
    ("payload.signature", "0xzz"),
    ("payload.permit2Authorization.from", "0x1234"),
])
async def test_malformed_upto_payloads_get_400_naming_the_field(
        ugw: RunningGateway, chain: DevChain, path: str, value: Any) -> None:
    header, _ = crafted_header(chain.wallets[0].private_key, upto_offer(ugw, 30))
    payload = json.loads(base64.b64decode(header))
    *parents, last = path.split(".")
    node = payload
    for name in parents:
        node = node[name]
    if value is None:
        del node[last]
    else:
        node[last] = value
    response = httpx.post(f"{ugw.url}{CHAT}", json=body(30), timeout=30, headers={
        "PAYMENT-SIGNATURE": base64.b64encode(json.dumps(payload).encode()).decode()})
    assert response.status_code == 400, response.text
    answer = response.json()
    assert answer["code"] == "invalid_payment" and answer["param"] == path
    assert "PAYMENT-REQUIRED" in response.headers


async def test_one_authorization_serves_one_request_even_concurrently(
        ugw: RunningGateway, chain: DevChain, evm_network: EvmNetwork,
        settler: EvmSettler, redis_url: str) -> None:
    """A second request with an authorization whose stream is still running is refused; the
    first is settled for what it delivered alone. The status page counts it meanwhile."""
    wallet = chain.wallets[3]
    header = sdk_header(wallet.private_key, upto_offer(ugw, 100))
    before = await settler.balance_of(wallet.address, evm_network)
    with httpx.Client(timeout=30) as http, http.stream(
            "POST", f"{ugw.url}{CHAT}", json=body(100),
            headers={"PAYMENT-SIGNATURE": header, "x-sim-output-tokens": "100",
                     "x-sim-tokens-per-second": "100"}) as first:
        lines = first.iter_lines()
        assert next(line for line in lines if line.startswith("data: {"))
        second = httpx.post(f"{ugw.url}{CHAT}", json=body(100), timeout=30,
                            headers={"PAYMENT-SIGNATURE": header})
        assert second.status_code == 402
        assert second.json()["code"] == "permit2_invalid_nonce"
        with ugw.admin() as admin:  # the status page counts it while it runs
            page = admin.get("/admin/").text
        assert "<td>x402 upto authorizations open</td><td class=num>1</td>" in page
        rest = list(lines)
    assert "data: [DONE]" in rest
    record = wait_for(lambda: settled_record(redis_url, ugw.settings.key_prefix,
                                             nonce_of(header)), "the settlement")
    assert record["capture"] == "100"
    assert await settler.balance_of(wallet.address, evm_network) == before - 100
