"""Facilitator server (on real uvicorn) and RemoteFacilitator client, against the dev chain."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import httpx
import pytest
from fastapi import FastAPI
from fastapi.responses import JSONResponse, PlainTextResponse

from gateway.chain.devchain import DevChain
from gateway.errors import PaymentRejected, ServiceUnavailable, UpstreamError
from gateway.rails.evm import ERR_NONCE_USED, ERR_VALUE_MISMATCH, EvmNetwork, EvmSettler
from gateway.rails.facilitator import LocalSettlement, Settlement, create_facilitator_app
from gateway.rails.facilitator_client import RemoteFacilitator
from gateway.rails.x402 import PaymentPayload, PaymentPayloadV1, PaymentRequirements
from gateway.rails.x402_challenge import exact_requirements
from tests.chain_fixtures import *  # noqa: F403  (session fixtures: chain, evm_network, settler)
from tests.chain_fixtures import PAY_TO, RpcProxy, make_auth, new_account, rpc_result, via
from tests.servers import free_port, serve

pytestmark = pytest.mark.asyncio(loop_scope="session")


@pytest.fixture(scope="module")
def facilitator_url(evm_network: EvmNetwork) -> Iterator[str]:
    # The app runs on uvicorn's own loop, so it gets its own settler (aiohttp is per-loop).
    with serve(create_facilitator_app(EvmSettler(), [evm_network])) as url:
        yield url


def _payment(network: EvmNetwork, key: str, *, amount: int = 20_000,
             value: int | None = None) -> tuple[PaymentPayload, PaymentRequirements]:
    requirements = exact_requirements(network, amount=amount, pay_to=PAY_TO)
    auth = make_auth(network, key, value=amount if value is None else value)
    payload = PaymentPayload.model_validate({
        "x402Version": 2, "accepted": requirements.model_dump(by_alias=True),
        "payload": {"signature": auth.signature, "authorization": {
            "from": auth.from_, "to": auth.to, "value": str(auth.value),
            "validAfter": str(auth.valid_after), "validBefore": str(auth.valid_before),
            "nonce": auth.nonce}}})
    return payload, requirements


async def test_supported(facilitator_url: str, chain: DevChain) -> None:
    remote = RemoteFacilitator(facilitator_url, timeout=10)
    try:
        supported = await remote.supported()
    finally:
        await remote.aclose()
    assert [(k.x402_version, k.scheme, k.network) for k in supported.kinds] == [
        (2, "exact", "eip155:31337")]
    assert supported.signers["eip155:*"] == [chain.relayer_address]


async def test_remote_verify_settle_and_replay(facilitator_url: str, chain: DevChain,
                                               evm_network: EvmNetwork,
                                               settler: EvmSettler) -> None:
    remote: Settlement = RemoteFacilitator(facilitator_url, timeout=30)
    payload, requirements = _payment(evm_network, chain.wallets[0].private_key)
    before = await settler.balance_of(PAY_TO, evm_network)
    try:
        assert await remote.verify(payload, requirements) == chain.wallets[0].address
        result = await remote.settle(payload, requirements)
        assert result.amount == 20_000 and result.payer == chain.wallets[0].address
        assert result.network == "eip155:31337"
        status = await settler.transaction_status(result.tx_hash, evm_network)
        assert status.state == "success"
        assert await settler.balance_of(PAY_TO, evm_network) == before + 20_000
        with pytest.raises(PaymentRejected) as info:
            await remote.verify(payload, requirements)
        assert info.value.code == ERR_NONCE_USED
        with pytest.raises(PaymentRejected) as info:
            await remote.settle(payload, requirements)
        assert info.value.code == ERR_NONCE_USED
    finally:
        assert isinstance(remote, RemoteFacilitator)
        await remote.aclose()


async def test_remote_rejection_codes_and_v1(facilitator_url: str, chain: DevChain,
                                             evm_network: EvmNetwork) -> None:
    remote = RemoteFacilitator(facilitator_url, timeout=30)
    try:
        payload, requirements = _payment(evm_network, chain.wallets[1].private_key,
                                         value=19_999)
        with pytest.raises(PaymentRejected) as info:
            await remote.verify(payload, requirements)
        assert info.value.code == ERR_VALUE_MISMATCH
        with pytest.raises(PaymentRejected) as info:
            await remote.settle(payload, requirements)
        assert info.value.code == ERR_VALUE_MISMATCH
        # A v1 payment is restated as v2 for the facilitator.
        good, requirements = _payment(evm_network, chain.wallets[1].private_key)
        v1 = PaymentPayloadV1(scheme="exact", network="eip155:31337", payload=good.payload)
        assert await remote.verify(v1, requirements) == chain.wallets[1].address
        # Requirements for a network the facilitator does not serve.
        other = exact_requirements(
            EvmNetwork(network="eip155:1", chain_id=1, rpc_url="http://127.0.0.1:9",
                       asset=evm_network.asset, token_name="USD Coin", token_version="2",
                       relayer_key=evm_network.relayer_key), amount=20_000, pay_to=PAY_TO)
        with pytest.raises(PaymentRejected) as info:
            await remote.verify(as_accepted(good, other), other)
        assert info.value.code == "invalid_network"
    finally:
        await remote.aclose()


def as_accepted(payload: PaymentPayload, requirements: PaymentRequirements) -> PaymentPayload:
    return payload.model_copy(update={"accepted": requirements})


async def test_malformed_requests(facilitator_url: str) -> None:
    """As the SDK's facilitator: a body that is not a JSON object is 400; any x402 request
    that is malformed is 200 with isValid/success false and the reason."""
    async with httpx.AsyncClient(timeout=10) as client:
        r = await client.post(f"{facilitator_url}/verify", content=b"{nope")
        assert r.status_code == 400 and r.json()["isValid"] is False
        r = await client.post(f"{facilitator_url}/verify",
                              json={"x402Version": 2, "paymentPayload": {"x402Version": 2},
                                    "paymentRequirements": {}})
        assert r.status_code == 200 and r.json()["isValid"] is False
        r = await client.post(f"{facilitator_url}/settle", json={"x402Version": 3})
        assert r.status_code == 200 and r.json()["errorReason"] == "invalid_x402_version"


async def test_facilitator_down_is_service_unavailable(chain: DevChain,
                                                       evm_network: EvmNetwork) -> None:
    remote = RemoteFacilitator(f"http://127.0.0.1:{free_port()}", timeout=2)
    payload, requirements = _payment(evm_network, chain.wallets[0].private_key)
    try:
        with pytest.raises(ServiceUnavailable):
            await remote.verify(payload, requirements)
        with pytest.raises(ServiceUnavailable):
            await remote.settle(payload, requirements)
    finally:
        await remote.aclose()


async def test_facilitator_garbage_is_upstream_error(chain: DevChain,
                                                     evm_network: EvmNetwork) -> None:
    junk = FastAPI()

    @junk.post("/verify")
    async def verify() -> PlainTextResponse:
        return PlainTextResponse("<html>oops</html>")

    @junk.post("/settle")
    async def settle() -> JSONResponse:
        return JSONResponse({"ok": True})

    @junk.get("/supported")
    async def supported() -> JSONResponse:
        return JSONResponse({"kinds": "all"}, status_code=500)

    payload, requirements = _payment(evm_network, chain.wallets[0].private_key)
    with serve(junk) as url:
        remote = RemoteFacilitator(url, timeout=5)
        try:
            with pytest.raises(UpstreamError):
                await remote.verify(payload, requirements)
            with pytest.raises(UpstreamError):
                await remote.settle(payload, requirements)
            with pytest.raises(UpstreamError):
                await remote.supported()
        finally:
            await remote.aclose()


async def test_local_settlement(chain: DevChain, evm_network: EvmNetwork,
                                settler: EvmSettler) -> None:
    local: Settlement = LocalSettlement(settler, [evm_network])
    payload, requirements = _payment(evm_network, chain.wallets[1].private_key, amount=3_000)
    assert await local.verify(payload, requirements) == chain.wallets[1].address
    result = await local.settle(payload, requirements)
    assert result.amount == 3_000 and result.block_number is not None
    with pytest.raises(PaymentRejected) as info:
        await local.settle(payload, requirements)
    assert info.value.code == ERR_NONCE_USED


async def test_deeply_nested_body_is_400_not_a_crash(facilitator_url: str) -> None:
    """Importing web3 raises Python's recursion limit to 100000 (py_ecc), so the stdlib JSON
    parser overflows the C stack on deeply nested input and kills the process (segfault);
    the facilitator parses with orjson, which refuses nesting past 1024."""
    nested = b"[" * 100_000 + b"]" * 100_000
    async with httpx.AsyncClient(timeout=10) as client:
        for path in ("/verify", "/settle"):
            response = await client.post(f"{facilitator_url}{path}", content=nested)
            assert response.status_code == 400
        assert (await client.get(f"{facilitator_url}/supported")).status_code == 200


async def test_malformed_shapes(facilitator_url: str, chain: DevChain,
                                evm_network: EvmNetwork) -> None:
    payload, requirements = _payment(evm_network, chain.wallets[0].private_key)
    good = {"x402Version": 2,
            "paymentPayload": payload.model_dump(mode="json", by_alias=True, exclude_none=True),
            "paymentRequirements": requirements.model_dump(mode="json", by_alias=True)}
    async with httpx.AsyncClient(timeout=10) as client:
        for path in ("/verify", "/settle"):
            r = await client.post(f"{facilitator_url}{path}", json=[good])
            assert r.status_code == 400
            r = await client.post(f"{facilitator_url}{path}", json={
                **good, "paymentRequirements": {"scheme": "exact",
                                                "extra": {"name": "USD Coin", "version": "2"}}})
            assert r.status_code == 200
            body = r.json()
            assert (body.get("invalidReason") or body.get("errorReason")) == \
                "invalid_payment_requirements"


async def test_chain_down_is_503_and_a_lost_receipt_names_the_transaction(
        chain: DevChain, evm_network: EvmNetwork, settler: EvmSettler,
        rpc_proxy: RpcProxy) -> None:
    """The facilitator's chain is unreachable: 503 from /verify and /settle, and the client
    raises ServiceUnavailable. When /settle sent a transaction but got no receipt in time,
    the 503 names it and so does the client's error: the caller can reconcile."""
    down = dataclasses.replace(evm_network, rpc_url=f"http://127.0.0.1:{free_port()}",
                               rpc_timeout=2.0)
    lossy = via(rpc_proxy, evm_network, receipt_timeout=1.0)
    rpc_proxy.hooks["eth_getTransactionReceipt"] = lambda req, fwd: rpc_result(req, None)
    for network, sends in ((down, False), (lossy, True)):
        with serve(create_facilitator_app(EvmSettler(), [network])) as url:
            remote = RemoteFacilitator(url, timeout=30)
            payload, requirements = _payment(network, new_account(
                chain, tokens=20_000).key.to_0x_hex())
            try:
                if not sends:
                    with pytest.raises(ServiceUnavailable):
                        await remote.verify(payload, requirements)
                with pytest.raises(ServiceUnavailable) as info:
                    await remote.settle(payload, requirements)
            finally:
                await remote.aclose()
        if sends:
            status = await settler.transaction_status(info.value.extra["transaction"],
                                                      evm_network)
            assert status.state == "success"
        else:
            assert "transaction" not in info.value.extra


async def test_local_settlement_refuses_other_schemes_networks_assets(
        evm_network: EvmNetwork, settler: EvmSettler, chain: DevChain) -> None:
    local = LocalSettlement(settler, [evm_network])
    payload, requirements = _payment(evm_network, chain.wallets[0].private_key)
    for change, code in (({"scheme": "upto"}, "unsupported_scheme"),
                         ({"network": "eip155:1"}, "invalid_network"),
                         ({"asset": PAY_TO}, "invalid_payment_requirements")):
        with pytest.raises(PaymentRejected) as info:
            await local.verify(payload, requirements.model_copy(update=change))
        assert info.value.code == code


async def test_supported_of_the_wrong_shape(chain: DevChain) -> None:
    junk = FastAPI()

    @junk.get("/supported")
    async def supported() -> JSONResponse:
        return JSONResponse({"kinds": "all"})

    with serve(junk) as url:
        remote = RemoteFacilitator(url, timeout=5)
        try:
            with pytest.raises(UpstreamError, match="unexpected shape"):
                await remote.supported()
        finally:
            await remote.aclose()
