"""x402 wire formats: round trips, strict decoding, and interop with the official x402 SDK."""

from __future__ import annotations

import base64
import json
import time

import pytest

from gateway.chain.devchain import DevChain
from gateway.errors import InvalidPayment, PaymentRejected
from gateway.rails.evm import EvmNetwork, EvmSettler, SettlementResult
from gateway.rails.x402 import (
    PAYMENT_REQUIRED_HEADER,
    PAYMENT_RESPONSE_HEADER,
    X_PAYMENT_RESPONSE_HEADER,
    PaymentPayload,
    PaymentPayloadV1,
    PaymentRequired,
    PaymentRequirements,
    ResourceInfo,
    decode_payment_header,
    encode_header,
    to_authorization,
)
from gateway.rails.x402_challenge import (
    build_payment_required,
    exact_requirements,
    match_requirements,
    settlement_headers,
)
from tests.chain_fixtures import *  # noqa: F403  (session fixtures: chain, evm_network, settler)
from tests.chain_fixtures import PAY_TO, make_auth, new_nonce

TOKEN = "0x036CbD53842c5426634e7929541eC2318f3dCF7e"
OFFLINE = EvmNetwork(network="eip155:84532", chain_id=84532, rpc_url="http://127.0.0.1:9",
                     asset=TOKEN, token_name="USDC", token_version="2",
                     relayer_key="0x" + "11" * 32)


def _b64(obj: object) -> str:
    return base64.b64encode(json.dumps(obj).encode()).decode()


def _v2_payload(network: EvmNetwork = OFFLINE, amount: int = 10_000) -> PaymentPayload:
    auth = make_auth(network, "0x" + "22" * 32, value=amount)
    return PaymentPayload.model_validate({
        "x402Version": 2,
        "resource": {"url": "https://gw.example/v1/chat/completions"},
        "accepted": exact_requirements(network, amount=amount, pay_to=PAY_TO)
        .model_dump(by_alias=True),
        "payload": {"signature": auth.signature, "authorization": {
            "from": auth.from_, "to": auth.to, "value": str(auth.value),
            "validAfter": str(auth.valid_after), "validBefore": str(auth.valid_before),
            "nonce": auth.nonce}},
    })


def test_round_trip_v2() -> None:
    payload = _v2_payload()
    header = encode_header(payload)
    raw = json.loads(base64.b64decode(header, validate=True))
    # camelCase, amounts as strings, exactly the spec's field names
    assert set(raw) == {"x402Version", "resource", "accepted", "payload"}
    assert set(raw["accepted"]) == {"scheme", "network", "amount", "asset", "payTo",
                                    "maxTimeoutSeconds", "extra"}
    assert set(raw["payload"]["authorization"]) == {"from", "to", "value", "validAfter",
                                                    "validBefore", "nonce"}
    assert raw["payload"]["authorization"]["value"] == "10000"
    assert raw["accepted"]["amount"] == "10000"
    decoded = decode_payment_header(header, version=2)
    assert decoded == payload
    auth = to_authorization(decoded)
    assert auth.value == 10_000 and auth.to == PAY_TO


def test_round_trip_v1() -> None:
    inner = _v2_payload().payload
    v1 = PaymentPayloadV1(scheme="exact", network="base-sepolia", payload=inner)
    decoded = decode_payment_header(encode_header(v1), version=1)
    assert isinstance(decoded, PaymentPayloadV1)
    assert decoded.network == "base-sepolia"
    assert to_authorization(decoded).value == 10_000


@pytest.mark.parametrize(("value", "needle"), [
    ("not base64!!!", "not valid base64"),
    (base64.b64encode(b"\xff\xfe not json").decode(), "not base64-encoded JSON"),
    (base64.b64encode(b"{\"x402Version\": 2,").decode(), "not base64-encoded JSON"),
    (_b64([1, 2]), "not a JSON object"),
    (_b64({"accepted": {}}), "x402Version"),
    (_b64({"x402Version": 3}), "x402Version"),
    ("A" * 20_000, "exceeds 8192"),
])
def test_undecodable_headers(value: str, needle: str) -> None:
    with pytest.raises(InvalidPayment, match=needle) as info:
        decode_payment_header(value, version=2)
    assert info.value.status == 400


def _mutated(path: list[str], new: object = None, *, delete: bool = False) -> str:
    data = json.loads(base64.b64decode(encode_header(_v2_payload())))
    node = data
    for key in path[:-1]:
        node = node[key]
    if delete:
        del node[path[-1]]
    else:
        node[path[-1]] = new
    return _b64(data)


@pytest.mark.parametrize(("path", "new", "delete", "field"), [
    (["payload", "authorization", "nonce"], None, True, "payload.authorization.nonce"),
    (["payload", "signature"], None, True, "payload.signature"),
    (["accepted"], None, True, "accepted"),
    (["accepted", "payTo"], None, True, "accepted.payTo"),
    (["payload", "authorization", "nonce"], "0x1234", False, "payload.authorization.nonce"),
    (["payload", "authorization", "nonce"], "0x" + "zz" * 32, False,
     "payload.authorization.nonce"),
    (["payload", "signature"], "0xabc", False, "payload.signature"),
    (["payload", "authorization", "from"], "0x12", False, "payload.authorization.from"),
    (["payload", "authorization", "value"], "1.5", False, "payload.authorization.value"),
    (["payload", "authorization", "value"], "-1", False, "payload.authorization.value"),
    (["payload", "authorization", "validBefore"], 1.5, False,
     "payload.authorization.validBefore"),
    (["payload", "authorization"], "nope", False, "payload.authorization"),
])
def test_wrong_shapes_name_the_field(path: list[str], new: object, delete: bool,
                                     field: str) -> None:
    with pytest.raises(InvalidPayment) as info:
        decode_payment_header(_mutated(path, new, delete=delete), version=2)
    assert field in info.value.message
    assert info.value.param == field


def test_version_mismatch_and_other_schemes() -> None:
    header = encode_header(_v2_payload())
    with pytest.raises(InvalidPayment, match="x402Version must be 1"):
        decode_payment_header(header, version=1)
    with pytest.raises(PaymentRejected) as info:
        decode_payment_header(_mutated(["accepted", "scheme"], "upto"), version=2)
    assert info.value.code == "unsupported_scheme"


def test_payment_required_v2_header_and_v1_body() -> None:
    resource = ResourceInfo(url="https://gw.example/v1/chat/completions",
                            description="deposit", mime_type="application/json")
    local = EvmNetwork(network="eip155:31337", chain_id=31337, rpc_url="http://127.0.0.1:9",
                       asset=TOKEN, token_name="USD Coin", token_version="2",
                       relayer_key="0x" + "11" * 32)
    accepts = [exact_requirements(OFFLINE, amount=1_000_000, pay_to=PAY_TO),
               exact_requirements(local, amount=1_000_000, pay_to=PAY_TO)]
    challenge = build_payment_required(resource=resource, accepts=accepts)
    v2 = json.loads(base64.b64decode(challenge.headers[PAYMENT_REQUIRED_HEADER]))
    assert v2["x402Version"] == 2 and v2["resource"]["mimeType"] == "application/json"
    assert v2["accepts"][0] == {
        "scheme": "exact", "network": "eip155:84532", "amount": "1000000", "asset": TOKEN,
        "payTo": PAY_TO, "maxTimeoutSeconds": 300, "extra": {"name": "USDC", "version": "2"}}
    body = challenge.body
    assert body["x402Version"] == 1
    # v1 has no name for chain 31337: only the Base Sepolia offer is in the v1 body.
    assert body["accepts"] == [{
        "scheme": "exact", "network": "base-sepolia", "maxAmountRequired": "1000000",
        "resource": resource.url, "description": "deposit", "mimeType": "application/json",
        "payTo": PAY_TO, "maxTimeoutSeconds": 300, "asset": TOKEN,
        "extra": {"name": "USDC", "version": "2"}}]


def test_match_requirements() -> None:
    payload = _v2_payload()
    offers = [exact_requirements(OFFLINE, amount=5, pay_to=PAY_TO),
              exact_requirements(OFFLINE, amount=10_000, pay_to=PAY_TO)]
    assert match_requirements(payload, offers) is offers[1]
    with pytest.raises(PaymentRejected) as info:
        match_requirements(payload, offers[:1])
    assert info.value.code == "invalid_payment_requirements"
    v1 = PaymentPayloadV1(scheme="exact", network="base-sepolia", payload=payload.payload)
    assert match_requirements(v1, offers) is offers[0]


def test_settlement_headers() -> None:
    result = SettlementResult(tx_hash="0x" + "ab" * 32, payer=PAY_TO, amount=7,
                              block_number=3, network="eip155:84532")
    v2 = json.loads(base64.b64decode(settlement_headers(result, version=2)
                                     [PAYMENT_RESPONSE_HEADER]))
    assert v2 == {"success": True, "transaction": result.tx_hash, "network": "eip155:84532",
                  "payer": PAY_TO, "amount": "7"}
    v1 = json.loads(base64.b64decode(settlement_headers(result, version=1)
                                     [X_PAYMENT_RESPONSE_HEADER]))
    assert v1["network"] == "base-sepolia"


# --------------------------------------------------------------------------- official SDK


def _sdk_client(chain: DevChain, key: str) -> object:
    from eth_account import Account
    from x402 import x402ClientSync
    from x402.mechanisms.evm.exact import ExactEvmScheme
    from x402.mechanisms.evm.signers import EthAccountSigner

    client = x402ClientSync()
    client.register("eip155:*", ExactEvmScheme(EthAccountSigner(Account.from_key(key))))
    client.set_spend_controls({"allowed_assets": [{"network": chain.network,
                                                   "asset": chain.token}]})
    return client


@pytest.mark.asyncio(loop_scope="session")
async def test_official_sdk_payload_is_accepted(chain: DevChain, evm_network: EvmNetwork,
                                                settler: EvmSettler) -> None:
    from x402.http.utils import decode_payment_required_header, encode_payment_signature_header

    wallet = chain.wallets[1]
    resource = ResourceInfo(url="http://127.0.0.1/v1/deposit", description="deposit")
    offer = exact_requirements(evm_network, amount=250_000, pay_to=PAY_TO)
    challenge = build_payment_required(resource=resource, accepts=[offer])

    # The SDK parses our PAYMENT-REQUIRED header with its own models...
    sdk_required = decode_payment_required_header(challenge.header)
    assert sdk_required.accepts[0].amount == "250000"
    client = _sdk_client(chain, wallet.private_key)
    sdk_payload = client.create_payment_payload(sdk_required)  # type: ignore[attr-defined]
    header = encode_payment_signature_header(sdk_payload)

    # ...and our decoder + verifier + settler accept what it sends back.
    payload = decode_payment_header(header, version=2)
    assert isinstance(payload, PaymentPayload)
    assert match_requirements(payload, [offer]) == offer
    auth = to_authorization(payload)
    assert auth.from_.lower() == wallet.address.lower()
    assert auth.valid_before > time.time()
    await settler.verify(auth, pay_to=offer.pay_to, amount=offer.amount, network=evm_network)
    result = await settler.settle(auth, evm_network)
    assert result.amount == 250_000 and result.payer == wallet.address

    # Our PAYMENT-RESPONSE parses with the SDK too.
    from x402.http.utils import decode_payment_response_header

    sdk_response = decode_payment_response_header(
        settlement_headers(result, version=2)[PAYMENT_RESPONSE_HEADER])
    assert sdk_response.success and sdk_response.transaction == result.tx_hash


def test_sdk_models_parse_our_models() -> None:
    from x402.schemas import PaymentPayload as SdkPayload
    from x402.schemas import PaymentRequired as SdkRequired

    payload = _v2_payload()
    sdk = SdkPayload.model_validate_json(base64.b64decode(encode_header(payload)))
    assert sdk.accepted.pay_to == PAY_TO and sdk.payload["authorization"]["value"] == "10000"
    required = PaymentRequired(resource=ResourceInfo(url="http://x"),
                               accepts=[PaymentRequirements.model_validate(
                                   payload.accepted.model_dump())])
    assert SdkRequired.model_validate_json(base64.b64decode(encode_header(required))).accepts
    assert new_nonce() != new_nonce()
