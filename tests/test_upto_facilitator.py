"""tollstream's facilitator app serving ``upto`` to the official x402 SDK's
``HTTPFacilitatorClient``: /supported announces the facilitator address, /verify checks the
maximum, /settle moves the amount asked (at most the maximum) once, zero moves nothing, and
every refusal is HTTP 200 with the SDK's reason code."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from eth_account import Account

from gateway.chain.devchain import DevChain
from gateway.rails.evm import EvmNetwork, EvmSettler
from gateway.rails.facilitator import create_facilitator_app
from gateway.rails.upto import upto_requirements
from gateway.rails.upto_facilitator import UptoFacilitator
from gateway.rails.x402 import PaymentRequirements
from tests.chain_fixtures import *  # noqa: F403  (session fixtures: chain, evm_network, settler)
from tests.chain_fixtures import PAY_TO, new_account
from tests.servers import serve

pytestmark = [pytest.mark.timeout(120), pytest.mark.asyncio(loop_scope="session")]


@pytest.fixture(scope="module")
def facilitator(evm_network: EvmNetwork) -> Iterator[str]:
    settler = EvmSettler()
    app = create_facilitator_app(settler, [evm_network],
                                 schemes=[UptoFacilitator(settler.rpc, [evm_network])])
    with serve(app) as url:
        yield url


def signed(key: str, requirements: PaymentRequirements) -> tuple[Any, Any]:
    """The SDK's models of an upto payment its client signs for ``requirements``."""
    from x402.mechanisms.evm.upto.client import UptoEvmScheme
    from x402.schemas import PaymentPayload
    from x402.schemas import PaymentRequirements as SdkRequirements

    req = SdkRequirements.model_validate(requirements.model_dump(mode="json", by_alias=True))
    inner = UptoEvmScheme(Account.from_key(key)).create_payment_payload(req)
    return PaymentPayload(x402_version=2, accepted=req, payload=inner), req


async def test_the_sdk_client_verifies_and_settles_upto_through_tollstream(
        facilitator: str, chain: DevChain, evm_network: EvmNetwork,
        settler: EvmSettler) -> None:
    from x402.http import FacilitatorConfig, HTTPFacilitatorClient

    sdk = HTTPFacilitatorClient(FacilitatorConfig(url=facilitator, timeout=30))
    try:
        supported = sdk.get_supported()
        upto = [k for k in supported.kinds if k.scheme == "upto"]
        assert [(k.x402_version, k.network) for k in upto] == [(2, evm_network.network)]
        address = upto[0].extra["facilitatorAddress"] if upto[0].extra else None
        assert address == chain.relayer_address
        requirements = upto_requirements(evm_network, amount=5_000, pay_to=PAY_TO,
                                         facilitator=address, max_timeout_seconds=300)
        wallet = chain.wallets[3]
        payload, req = signed(wallet.private_key, requirements)
        verified = await sdk.verify(payload, req)
        assert verified.is_valid and verified.payer == wallet.address

        # Another facilitator named in the witness: refused, 200, the SDK's reason.
        other = upto_requirements(evm_network, amount=5_000, pay_to=PAY_TO,
                                  facilitator=new_account(chain).address,
                                  max_timeout_seconds=300)
        foreign, foreign_req = signed(wallet.private_key, other)
        refused = await sdk.verify(foreign, foreign_req)
        assert not refused.is_valid and refused.invalid_reason == "upto_facilitator_mismatch"

        # Settling: the amount asked at settlement, never above the maximum.
        over = req.model_copy(update={"amount": "5001"})
        result = await sdk.settle(payload, over)
        assert not result.success
        assert result.error_reason == "invalid_upto_evm_payload_settlement_exceeds_amount"
        payer_before = await settler.balance_of(wallet.address, evm_network)
        merchant_before = await settler.balance_of(PAY_TO, evm_network)
        result = await sdk.settle(payload, req.model_copy(update={"amount": "1234"}))
        assert result.success and result.amount == "1234" and result.transaction
        assert await settler.balance_of(wallet.address, evm_network) == payer_before - 1234
        assert await settler.balance_of(PAY_TO, evm_network) == merchant_before + 1234
        again = await sdk.settle(payload, req.model_copy(update={"amount": "1"}))
        assert not again.success and again.error_reason == "permit2_invalid_nonce"

        # Zero: success, no transaction, nothing moves; the authorization stays unused.
        unused, unused_req = signed(wallet.private_key, requirements)
        zero = await sdk.settle(unused, unused_req.model_copy(update={"amount": "0"}))
        assert zero.success and zero.amount == "0" and zero.transaction == ""
        assert await settler.balance_of(wallet.address, evm_network) == payer_before - 1234
    finally:
        await sdk.aclose()


async def test_upto_requests_the_facilitator_cannot_serve_are_200_with_a_reason(
        facilitator: str, chain: DevChain, evm_network: EvmNetwork) -> None:
    """v1 (upto has no v1 form), malformed requirements, another network, another asset:
    each answered 200 with isValid false and a reason, never an error status."""
    import httpx

    requirements = upto_requirements(evm_network, amount=5_000, pay_to=PAY_TO,
                                     facilitator=chain.relayer_address,
                                     max_timeout_seconds=300)
    payload, req = signed(chain.wallets[3].private_key, requirements)
    good_payload = payload.model_dump(mode="json", by_alias=True, exclude_none=True)
    good_req = req.model_dump(mode="json", by_alias=True, exclude_none=True)
    cases = {
        "invalid_x402_version": (1, good_payload, good_req),
        "invalid_payment_requirements": (2, good_payload, {**good_req, "amount": "lots"}),
        "invalid_upto_evm_network_mismatch": (2, good_payload,
                                              {**good_req, "network": "eip155:8453"}),
    }
    other_asset = {**good_req, "asset": new_account(chain).address}
    cases["invalid_payment_requirements (asset)"] = (2, good_payload, other_asset)
    with httpx.Client(base_url=facilitator, timeout=30) as http:
        for reason, (version, sent_payload, sent_req) in cases.items():
            answer = http.post("/verify", json={"x402Version": version,
                                                "paymentPayload": sent_payload,
                                                "paymentRequirements": sent_req})
            assert answer.status_code == 200, (reason, answer.text)
            body = answer.json()
            assert body["isValid"] is False
            assert body["invalidReason"] == reason.split(" ")[0], (reason, body)
