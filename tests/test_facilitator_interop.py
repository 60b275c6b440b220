"""tollstream's facilitator and facilitator client against the official x402 SDK, both ways.

* The SDK's ``HTTPFacilitatorClient`` (which raises on anything but HTTP 200) against
  tollstream's facilitator app: invalid payments are 200 with the SDK's reason codes, v1 is
  accepted.
* tollstream's :class:`RemoteFacilitator` (and the gateway in remote mode) against a
  facilitator service built here from the SDK's ``x402Facilitator`` with its exact/EVM
  mechanism and ``FacilitatorWeb3Signer``, settling on the dev chain: auth headers per
  endpoint, a redirect, ``settlement_pending`` on the first ``/settle``, v1 sent as v1.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, RedirectResponse, Response

from gateway.chain.devchain import DevChain
from gateway.errors import PaymentRejected, ServiceUnavailable
from gateway.rails import x402 as wire
from gateway.rails import x402_challenge as challenge_wire
from gateway.rails.evm import EvmNetwork, EvmSettler
from gateway.rails.facilitator import create_facilitator_app
from gateway.rails.facilitator_client import RemoteFacilitator
from gateway.rails.x402 import PaymentPayloadV1
from gateway.rails.x402_challenge import exact_requirements
from tests.chain_fixtures import *  # noqa: F403  (session fixtures: chain, evm_network, settler)
from tests.chain_fixtures import PAY_TO, make_auth, new_account, new_payer, payment
from tests.conftest import RunningGateway
from tests.servers import serve

pytestmark = [pytest.mark.timeout(120), pytest.mark.asyncio(loop_scope="session")]

TOKEN = "s3cret-facilitator-token"
LIST_KEY = "s3cret-list-key"


# --------------------------------------------------------------------------- SDK -> tollstream


def _sdk(payload: Any, requirements: Any, *, version: int = 2) -> tuple[Any, Any]:
    from x402.schemas import PaymentPayload, PaymentRequirements
    from x402.schemas.v1 import PaymentPayloadV1 as SdkPayloadV1
    from x402.schemas.v1 import PaymentRequirementsV1

    if version == 1:
        return (SdkPayloadV1.model_validate(payload), PaymentRequirementsV1.model_validate(
            requirements))
    return PaymentPayload.model_validate(payload), PaymentRequirements.model_validate(
        requirements)


def _dump(model: Any) -> dict[str, Any]:
    return dict(model.model_dump(mode="json", by_alias=True, exclude_none=True))


@pytest.fixture(scope="module")
def tollstream_facilitator(evm_network: EvmNetwork) -> Iterator[str]:
    with serve(create_facilitator_app(EvmSettler(), [evm_network])) as url:
        yield url


async def test_sdk_client_against_tollstream_facilitator(
        tollstream_facilitator: str, chain: DevChain, evm_network: EvmNetwork,
        settler: EvmSettler) -> None:
    from x402.http import FacilitatorConfig, HTTPFacilitatorClient

    sdk = HTTPFacilitatorClient(FacilitatorConfig(url=tollstream_facilitator, timeout=30))
    requirements = exact_requirements(evm_network, amount=4_000, pay_to=PAY_TO)
    key = new_payer(chain, 10_000)
    try:
        # Invalid payments: 200 with isValid false and the SDK's reason, never an exception.
        short = payment(make_auth(evm_network, key, value=3_999), requirements)
        result = await sdk.verify(*_sdk(_dump(short), _dump(requirements)))
        assert not result.is_valid
        assert result.invalid_reason == "invalid_exact_evm_payload_authorization_value_mismatch"
        good = payment(make_auth(evm_network, key, value=4_000), requirements)
        no_domain = {**_dump(requirements), "extra": {"version": "2"}}
        result = await sdk.verify(*_sdk({**_dump(good), "accepted": no_domain}, no_domain))
        assert not result.is_valid and result.invalid_reason == "missing_eip712_domain"
        other_net = {**_dump(requirements), "network": "eip155:1"}
        result = await sdk.verify(*_sdk(_dump(good), other_net))
        assert not result.is_valid and result.invalid_reason == "network_mismatch"
        upto = {**_dump(requirements), "scheme": "upto"}
        settled = await sdk.settle(*_sdk({**_dump(good), "accepted": upto}, upto))
        assert not settled.success and settled.error_reason == "unsupported_scheme"

        # A valid v2 payment verifies and settles.
        result = await sdk.verify(*_sdk(_dump(good), _dump(requirements)))
        assert result.is_valid and result.payer == good.payload.authorization.from_
        before = await settler.balance_of(PAY_TO, evm_network)
        settled = await sdk.settle(*_sdk(_dump(good), _dump(requirements)))
        assert settled.success and settled.network == evm_network.network
        assert await settler.balance_of(PAY_TO, evm_network) == before + 4_000
        replay = await sdk.settle(*_sdk(_dump(good), _dump(requirements)))
        assert not replay.success
        assert replay.error_reason == "invalid_exact_evm_nonce_already_used"

        # v1: top-level scheme/network, maxAmountRequired; a chain v1 has no name for is
        # named by its CAIP-2 id.
        v1_payload = {"x402Version": 1, "scheme": "exact", "network": evm_network.network,
                      "payload": _dump(payment(make_auth(evm_network, key, value=4_000),
                                               requirements).payload)}
        v1_requirements = {"scheme": "exact", "network": evm_network.network,
                           "maxAmountRequired": "4000", "resource": "http://gw/v1/chat",
                           "payTo": PAY_TO, "maxTimeoutSeconds": 300,
                           "asset": evm_network.asset,
                           "extra": {"name": evm_network.token_name,
                                     "version": evm_network.token_version}}
        result = await sdk.verify(*_sdk(v1_payload, v1_requirements, version=1))
        assert result.is_valid, result
        settled = await sdk.settle(*_sdk(v1_payload, v1_requirements, version=1))
        assert settled.success and settled.network == evm_network.network
        assert await settler.balance_of(PAY_TO, evm_network) == before + 8_000
        supported = sdk.get_supported()
        assert {(k.x402_version, k.scheme, k.network) for k in supported.kinds} == {
            (2, "exact", evm_network.network)}
    finally:
        await sdk.aclose()


# --------------------------------------------------------------------------- tollstream -> SDK


V1_NAME = "tollstream-local"


def sdk_facilitator_app(facilitator: Any, *, required: dict[str, dict[str, str]]) -> FastAPI:
    """A facilitator service around the SDK's ``x402Facilitator``: its models parse the
    requests, its mechanism answers; ``required[endpoint]`` are headers it insists on (401
    without them). ``/old/...`` redirects (308) to ``/...``. ``seen`` records requests."""
    from x402.schemas import PaymentPayload, PaymentRequirements
    from x402.schemas.v1 import PaymentPayloadV1 as SdkPayloadV1
    from x402.schemas.v1 import PaymentRequirementsV1

    app = FastAPI()
    app.state.seen = []

    def denied(request: Request, endpoint: str) -> Response | None:
        app.state.seen.append((endpoint, dict(request.headers)))
        for name, value in required.get(endpoint, {}).items():
            if request.headers.get(name) != value:
                return JSONResponse({"error": "unauthorized"}, status_code=401)
        return None

    def parse(data: dict[str, Any]) -> tuple[Any, Any]:
        app.state.seen.append(("version", data["x402Version"]))
        if data["x402Version"] == 1:
            return (SdkPayloadV1.model_validate(data["paymentPayload"]),
                    PaymentRequirementsV1.model_validate(data["paymentRequirements"]))
        return (PaymentPayload.model_validate(data["paymentPayload"]),
                PaymentRequirements.model_validate(data["paymentRequirements"]))

    @app.post("/verify")
    async def verify(request: Request) -> Response:
        if (refused := denied(request, "verify")) is not None:
            return refused
        result = await facilitator.verify(*parse(await request.json()))
        return JSONResponse(result.model_dump(mode="json", by_alias=True, exclude_none=True))

    @app.post("/settle")
    async def settle(request: Request) -> Response:
        if (refused := denied(request, "settle")) is not None:
            return refused
        result = await facilitator.settle(*parse(await request.json()))
        return JSONResponse(result.model_dump(mode="json", by_alias=True, exclude_none=True))

    @app.get("/supported")
    async def supported(request: Request) -> Response:
        if (refused := denied(request, "supported")) is not None:
            return refused
        return JSONResponse(facilitator.get_supported().model_dump(
            mode="json", by_alias=True, exclude_none=True))

    @app.api_route("/old/{path}", methods=["GET", "POST"])
    async def moved(path: str) -> Response:
        return RedirectResponse(f"/{path}", status_code=308)

    return app


@contextlib.contextmanager
def sdk_facilitator(chain: DevChain, evm_network: EvmNetwork, *,
                    pending_first: int = 0) -> Iterator[tuple[str, FastAPI]]:
    """The SDK facilitator on the dev chain with its own funded signer; the first
    ``pending_first`` receipt waits fail (the SDK then answers ``settlement_pending``)."""
    from x402 import x402Facilitator
    from x402.mechanisms.evm.exact.facilitator import ExactEvmScheme
    from x402.mechanisms.evm.exact.v1.facilitator import ExactEvmSchemeV1
    from x402.mechanisms.evm.signers import FacilitatorWeb3Signer

    relayer = new_account(chain, eth=10**18)
    failures = [pending_first]

    class Signer(FacilitatorWeb3Signer):
        def wait_for_transaction_receipt(self, tx_hash: str) -> Any:
            if failures[0] > 0:
                failures[0] -= 1
                raise TimeoutError("receipt not seen yet")
            return super().wait_for_transaction_receipt(tx_hash)

    signer = Signer(relayer.key.to_0x_hex(), evm_network.rpc_url)
    facilitator = x402Facilitator()
    facilitator.register([evm_network.network], ExactEvmScheme(signer))
    facilitator.register_v1([V1_NAME], ExactEvmSchemeV1(signer))
    app = sdk_facilitator_app(facilitator, required={
        "verify": {"Authorization": f"Bearer {TOKEN}"},
        "settle": {"Authorization": f"Bearer {TOKEN}"},
        "supported": {"X-List-Key": LIST_KEY}})
    with serve(app) as url:
        yield url, app


def _remote(url: str, **kwargs: Any) -> RemoteFacilitator:
    return RemoteFacilitator(url, timeout=30, pending_delay=0, **kwargs)


AUTH = {"headers": {"Authorization": f"Bearer {TOKEN}"},
        "endpoint_headers": {"supported": {"X-List-Key": LIST_KEY}}}


async def test_remote_mode_against_sdk_facilitator_with_auth_and_redirect(
        chain: DevChain, evm_network: EvmNetwork, settler: EvmSettler) -> None:
    requirements = exact_requirements(evm_network, amount=5_000, pay_to=PAY_TO)
    key = new_payer(chain, 20_000)
    with sdk_facilitator(chain, evm_network) as (url, app):
        anonymous = _remote(url)
        try:
            with pytest.raises(ServiceUnavailable, match="credentials"):
                await anonymous.verify(payment(make_auth(evm_network, key, value=5_000),
                                               requirements), requirements)
        finally:
            await anonymous.aclose()
        # Through a redirect (308 from /old/*), with the headers each endpoint requires.
        remote = _remote(f"{url}/old", headers=AUTH["headers"],
                         endpoint_headers=AUTH["endpoint_headers"])
        try:
            supported = await remote.supported()
            assert (2, "exact", evm_network.network) in {
                (k.x402_version, k.scheme, k.network) for k in supported.kinds}
            short = payment(make_auth(evm_network, key, value=4_999), requirements)
            with pytest.raises(PaymentRejected) as info:
                await remote.verify(short, requirements)
            assert info.value.code == "invalid_exact_evm_payload_authorization_value_mismatch"
            good = payment(make_auth(evm_network, key, value=5_000), requirements)
            payer = good.payload.authorization.from_
            assert await remote.verify(good, requirements) == payer
            before = await settler.balance_of(PAY_TO, evm_network)
            result = await remote.settle(good, requirements)
            assert result.payer == payer and result.amount == 5_000
            assert (await settler.transaction_status(result.tx_hash, evm_network)).state \
                == "success"
            assert await settler.balance_of(PAY_TO, evm_network) == before + 5_000
        finally:
            await remote.aclose()
        # The supported-only header went to /supported only; the token everywhere.
        sent = [(endpoint, headers) for endpoint, headers in app.state.seen
                if endpoint != "version"]
        assert all(("x-list-key" in h) == (e == "supported") for e, h in sent)
        assert all(h.get("authorization") == f"Bearer {TOKEN}" for e, h in sent[1:])


async def test_settlement_pending_is_retried_not_a_rejection(
        chain: DevChain, evm_network: EvmNetwork, settler: EvmSettler) -> None:
    requirements = exact_requirements(evm_network, amount=6_000, pay_to=PAY_TO)
    key = new_payer(chain, 6_000)
    with sdk_facilitator(chain, evm_network, pending_first=1) as (url, app):
        remote = _remote(url, **AUTH)
        try:
            good = payment(make_auth(evm_network, key, value=6_000), requirements)
            before = await settler.balance_of(PAY_TO, evm_network)
            result = await remote.settle(good, requirements)
            assert await settler.balance_of(PAY_TO, evm_network) == before + 6_000
            assert (await settler.transaction_status(result.tx_hash, evm_network)).state \
                == "success"
        finally:
            await remote.aclose()
        assert [e for e, _ in app.state.seen if e == "settle"] == ["settle", "settle"]
    # Pending past the bound: not a rejection (the deposit stays open), the transaction named.
    key = new_payer(chain, 6_000)
    with sdk_facilitator(chain, evm_network, pending_first=3) as (url, app):
        remote = _remote(url, pending_retries=2, **AUTH)
        try:
            good = payment(make_auth(evm_network, key, value=6_000), requirements)
            with pytest.raises(ServiceUnavailable, match="still pending") as info:
                await remote.settle(good, requirements)
        finally:
            await remote.aclose()
        assert [e for e, _ in app.state.seen if e == "settle"] == ["settle"] * 3
    status = await settler.transaction_status(info.value.extra["transaction"], evm_network)
    assert status.state == "success"


async def test_v1_payment_is_sent_as_v1(chain: DevChain, evm_network: EvmNetwork,
                                        settler: EvmSettler,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """A v1 payment reaches the facilitator as v1 (the SDK routes it to its v1 mechanism).
    v1 names no local chain, so both sides are taught a name for the dev chain here."""
    from x402.mechanisms.evm.v1 import constants as sdk_v1

    monkeypatch.setitem(wire.V1_NETWORKS, V1_NAME, evm_network.chain_id)
    monkeypatch.setitem(sdk_v1.V1_NETWORK_CHAIN_IDS, V1_NAME, evm_network.chain_id)
    requirements = exact_requirements(evm_network, amount=7_000, pay_to=PAY_TO)
    key = new_payer(chain, 7_000)
    signed = payment(make_auth(evm_network, key, value=7_000), requirements)
    v1 = PaymentPayloadV1(scheme="exact", network=V1_NAME, payload=signed.payload)
    with sdk_facilitator(chain, evm_network) as (url, app):
        remote = _remote(url, **AUTH)
        try:
            assert await remote.verify(v1, requirements) == signed.payload.authorization.from_
            before = await settler.balance_of(PAY_TO, evm_network)
            result = await remote.settle(v1, requirements)
            assert result.amount == 7_000 and result.network == evm_network.network
            assert await settler.balance_of(PAY_TO, evm_network) == before + 7_000
        finally:
            await remote.aclose()
        assert [v for e, v in app.state.seen if e == "version"] == [1, 1]


async def test_gateway_remote_mode_sends_headers_from_env(
        gateway_factory: Callable[..., contextlib.AbstractContextManager[RunningGateway]],
        chain: DevChain, evm_network: EvmNetwork, settler: EvmSettler,
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """The gateway in remote mode, configured with [x402.facilitator] headers whose values
    come from the environment, pays through the SDK facilitator; the value is never logged
    nor printed with the configuration."""
    from gateway.summary import effective
    from tests.test_x402_gateway import BODY, header_for, offered, pay, x402_config

    monkeypatch.setenv("TEST_FACILITATOR_TOKEN", f"Bearer {TOKEN}")
    monkeypatch.setenv("TEST_FACILITATOR_LIST_KEY", LIST_KEY)
    caplog.set_level("DEBUG")
    with sdk_facilitator(chain, evm_network, pending_first=1) as (url, _app), \
            gateway_factory(x402=x402_config(chain, mode="remote", facilitator_url=url,
                                             facilitator={
                "headers_env": {"Authorization": "TEST_FACILITATOR_TOKEN"},
                "supported_headers_env": {"X-List-Key": "TEST_FACILITATOR_LIST_KEY"},
                "settle_pending_delay_seconds": 0})) as gw:
        req = offered(gw)
        wallet = new_account(chain, tokens=req.amount)
        before = await settler.balance_of(PAY_TO, evm_network)
        paid = pay(gw, header_for(make_auth(evm_network, wallet.key.to_0x_hex(),
                                            value=req.amount), req))
        assert paid.status_code == 200, paid.text
        assert await settler.balance_of(PAY_TO, evm_network) == before + req.amount
        assert BODY["model"] == "exact"
        printed = effective(gw.settings)
    assert TOKEN not in printed and LIST_KEY not in printed
    assert TOKEN not in caplog.text and LIST_KEY not in caplog.text


async def test_facilitator_header_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    from pydantic import ValidationError

    from gateway.rail_settings import X402FacilitatorSettings, X402Settings

    base = {"enabled": True, "mode": "remote", "facilitator_url": "http://f.example",
            "pay_to": PAY_TO, "networks": {"b": {"preset": "base-sepolia",
                                                  "rpc_url": "http://127.0.0.1:9"}}}
    monkeypatch.delenv("TEST_UNSET_TOKEN", raising=False)
    with pytest.raises(ValidationError, match="TEST_UNSET_TOKEN"):
        X402Settings.model_validate({**base, "facilitator": {
            "headers_env": {"Authorization": "TEST_UNSET_TOKEN"}}})
    with pytest.raises(ValidationError, match="header name"):
        X402FacilitatorSettings.model_validate({"headers_env": {"Bad Header": "X"}})
    monkeypatch.setenv("TEST_SET_TOKEN", "value-1")
    monkeypatch.setenv("TEST_SETTLE_TOKEN", "value-2")
    cfg = X402Settings.model_validate({**base, "facilitator": {
        "headers_env": {"Authorization": "TEST_SET_TOKEN"},
        "settle_headers_env": {"Authorization": "TEST_SETTLE_TOKEN", "X-Extra": "TEST_SET_TOKEN"}}})
    headers = cfg.facilitator.endpoint_headers()
    assert headers["verify"] == {"Authorization": "value-1"}
    assert headers["settle"] == {"Authorization": "value-2", "X-Extra": "value-1"}
    assert "value-1" not in repr(cfg) and "value-2" not in cfg.model_dump_json()


async def test_redirect_elsewhere_drops_the_headers() -> None:
    """Configured headers are secrets for the facilitator's origin only: a redirect to
    another origin is followed without them."""
    seen: list[dict[str, str]] = []
    target = FastAPI()

    @target.post("/verify")
    async def verify(request: Request) -> JSONResponse:
        seen.append(dict(request.headers))
        return JSONResponse({"isValid": False, "invalidReason": "invalid_payload"})

    with serve(target) as elsewhere:
        front = FastAPI()

        @front.post("/verify")
        async def moved() -> Response:
            return RedirectResponse(f"{elsewhere}/verify", status_code=307)

        with serve(front) as url:
            remote = _remote(url, headers={"Authorization": f"Bearer {TOKEN}"})
            requirements = exact_requirements(
                EvmNetwork(network="eip155:31337", chain_id=31337, rpc_url="http://127.0.0.1:9",
                           asset=PAY_TO, token_name="USD Coin", token_version="2",
                           relayer_key=""), amount=1, pay_to=PAY_TO)
            paid = payment(make_auth_offline(requirements), requirements)
            try:
                result = await remote.verify_result(paid, requirements)
            finally:
                await remote.aclose()
    assert result.invalid_reason == "invalid_payload"
    assert len(seen) == 1 and "authorization" not in seen[0]


def make_auth_offline(requirements: Any) -> Any:
    network = EvmNetwork(network="eip155:31337", chain_id=31337, rpc_url="http://127.0.0.1:9",
                         asset=requirements.asset, token_name="USD Coin", token_version="2",
                         relayer_key="")
    return make_auth(network, "0x" + "11" * 32, value=1)


async def test_redirect_loop_is_bounded() -> None:
    loop = FastAPI()

    @loop.api_route("/{path:path}", methods=["GET", "POST"])
    async def again(path: str) -> Response:
        return RedirectResponse(f"/{path}", status_code=308)

    with serve(loop) as url:
        remote = _remote(url, max_redirects=3)
        try:
            with pytest.raises(Exception, match="redirected more than 3"):
                await remote.supported()
        finally:
            await remote.aclose()



async def test_v1_body_says_which_networks_v1_cannot_name(evm_network: EvmNetwork) -> None:
    """Offers on a chain v1 has no name for: the v1 body says so (error text and
    ``v2OnlyNetworks``) instead of a bare empty ``accepts``; the SDK still parses it."""
    from x402.schemas.v1 import PaymentRequiredV1

    offer = exact_requirements(evm_network, amount=1_000, pay_to=PAY_TO)
    challenge = challenge_wire.build_payment_required(
        resource=wire.ResourceInfo(url="http://gw/v1/chat/completions"), accepts=[offer])
    body = challenge.body
    assert body["accepts"] == [] and body[challenge_wire.V2_ONLY_FIELD] == [evm_network.network]
    assert evm_network.network in body["error"] and "x402 v2" in body["error"]
    parsed = PaymentRequiredV1.model_validate(body)
    assert parsed.accepts == [] and evm_network.network in (parsed.error or "")
    named = challenge_wire.build_payment_required(resource=wire.ResourceInfo(url="http://gw"),
                                        accepts=[offer.model_copy(
                                            update={"network": "eip155:84532"})])
    assert challenge_wire.V2_ONLY_FIELD not in named.body and len(named.body["accepts"]) == 1
