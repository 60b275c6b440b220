"""Well-shaped but unusable EIP-3009 signatures are x402 rejections, never a foreign exception.

Each case goes through the real eth_account/eth_keys code: the tests first show what those
libraries raise for the input (so the case really reaches the translation), then that the
gateway answers ``invalid_exact_evm_payload_signature``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import httpx
import pytest
from eth_account import Account
from eth_account.messages import encode_defunct, encode_typed_data
from eth_keys.exceptions import BadSignature
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.chain.devchain import DevChain
from gateway.errors import PaymentRejected
from gateway.rails.evm import (
    ERR_SIGNATURE,
    Eip3009Authorization,
    EvmNetwork,
    EvmSettler,
    SettlementNotSubmitted,
    recover_signer,
    typed_data,
)
from gateway.rails.facilitator import LocalSettlement, create_facilitator_app
from gateway.rails.x402 import PaymentPayload
from gateway.rails.x402_challenge import exact_requirements
from tests.chain_fixtures import *  # noqa: F403  (session fixtures: chain, evm_network, settler)
from tests.chain_fixtures import PAY_TO, make_auth
from tests.servers import serve

N = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141


def _sig(r: int, s: int, v: int) -> str:
    return "0x" + r.to_bytes(32, "big").hex() + s.to_bytes(32, "big").hex() + bytes([v]).hex()


def _off_curve_r() -> int:
    """The smallest r that is not the x-coordinate of a secp256k1 point (so no public key can
    be recovered from it, whatever the message, s and v)."""
    digest = encode_defunct(text="any message")
    for r in range(1, 100):
        try:
            Account.recover_message(digest, vrs=(27, r.to_bytes(32, "big"), b"\0" * 31 + b"\1"))
        except BadSignature:
            return r
    raise AssertionError("no off-curve r below 100")


OFF_CURVE_R = _off_curve_r()

# (label, signature): each is 65 bytes of valid hex, none is a usable signature.
BAD_SIGNATURES = [
    ("all zero", "0x" + "00" * 65),
    ("r zero", _sig(0, 5, 27)),
    ("s zero", _sig(5, 0, 27)),
    ("r = curve order", _sig(N, 5, 27)),
    ("r = 2**256-1", _sig(2**256 - 1, 5, 28)),
    ("r off the curve", _sig(OFF_CURVE_R, 1, 27)),
    ("v = 2", _sig(5, 5, 2)),
    ("v = 26", _sig(5, 5, 26)),
    ("v = 29", _sig(5, 5, 29)),
    ("v = 255", _sig(5, 5, 255)),
    ("s high", _sig(5, N - 5, 27)),
]


def test_the_cases_reach_eth_keys_failures(evm_network: EvmNetwork) -> None:
    """Without translation the first six would escape as eth_keys' BadSignature, which is not
    a ValueError (the old code's assumption) and not a gateway error: a 500."""
    auth = make_auth(evm_network, "0x" + "11" * 32)
    message = encode_typed_data(full_message=typed_data(auth, evm_network))
    assert not issubclass(BadSignature, ValueError)
    for label, signature in BAD_SIGNATURES[:6]:
        raw = bytes.fromhex(signature[2:])
        v = raw[64] + 27 if raw[64] < 27 else raw[64]
        with pytest.raises(BadSignature):
            Account.recover_message(message, vrs=(v, raw[:32], raw[32:64]))
            pytest.fail(f"{label}: eth_keys recovered an address")


@pytest.mark.parametrize(("label", "signature"), BAD_SIGNATURES,
                         ids=[label for label, _ in BAD_SIGNATURES])
async def test_bad_signature_is_rejected_with_the_x402_code(
        label: str, signature: str, chain: DevChain, evm_network: EvmNetwork,
        settler: EvmSettler) -> None:
    auth = make_auth(evm_network, chain.wallets[1].private_key, signature_override=signature)
    with pytest.raises(PaymentRejected) as info:
        recover_signer(auth, evm_network)
    assert info.value.code == ERR_SIGNATURE and info.value.status == 402
    with pytest.raises(PaymentRejected) as info:
        await settler.verify(auth, pay_to=PAY_TO, amount=auth.value, network=evm_network)
    assert info.value.code == ERR_SIGNATURE


async def test_off_curve_r_is_translated_at_the_boundary(evm_network: EvmNetwork) -> None:
    auth = make_auth(evm_network, "0x" + "11" * 32, signature_override=_sig(OFF_CURVE_R, 1, 27))
    with pytest.raises(PaymentRejected) as info:
        recover_signer(auth, evm_network)
    assert isinstance(info.value.__cause__, BadSignature)  # raise ... from exc


@settings(max_examples=300, derandomize=True, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(raw=st.binary(min_size=65, max_size=65))
def test_any_65_bytes_recover_or_reject(raw: bytes) -> None:
    """Property: for any 65 bytes the answer is an address or the x402 signature code. About
    half of all random r values are off the curve, so this hits eth_keys' BadSignature."""
    network = EvmNetwork(network="eip155:31337", chain_id=31337, rpc_url="http://127.0.0.1:9",
                         asset=PAY_TO, token_name="USD Coin", token_version="2",
                         relayer_key="")
    auth = Eip3009Authorization(from_=PAY_TO, to=PAY_TO, value=1, valid_after=0,
                                valid_before=2**40, nonce="0x" + "00" * 32,
                                signature="0x" + raw.hex())
    try:
        assert recover_signer(auth, network).startswith("0x")
    except PaymentRejected as exc:
        assert exc.code == ERR_SIGNATURE


async def test_v_zero_or_one_is_normalised(chain: DevChain, evm_network: EvmNetwork,
                                           settler: EvmSettler) -> None:
    """Signers that emit v as 0/1 (recovery id) instead of 27/28 are accepted."""
    good = make_auth(evm_network, chain.wallets[1].private_key)
    raw = bytes.fromhex(good.signature[2:])
    low_v = dataclasses.replace(good, signature="0x" + (raw[:64] + bytes([raw[64] - 27])).hex())
    assert recover_signer(low_v, evm_network) == chain.wallets[1].address
    await settler.verify(low_v, pay_to=PAY_TO, amount=good.value, network=evm_network)


async def test_address_case_does_not_matter(chain: DevChain, evm_network: EvmNetwork,
                                            settler: EvmSettler) -> None:
    """Addresses in lower case or with a wrong EIP-55 checksum are the same address: verified,
    settled, and reported checksummed (a checksum is a typo check for humans, and the
    signature covers the 20 bytes, not their spelling)."""
    wallet = chain.wallets[1]
    good = make_auth(evm_network, wallet.private_key, value=4_242)
    address = wallet.address
    flipped = "0x" + "".join(c.swapcase() if c.isalpha() else c for c in address[2:])
    assert flipped != address and flipped.lower() == address.lower()
    for spelling in (address.lower(), flipped):
        auth = dataclasses.replace(good, from_=spelling, to=PAY_TO.lower())
        await settler.verify(auth, pay_to=PAY_TO.upper().replace("0X", "0x"),
                             amount=4_242, network=evm_network)
    result = await settler.settle(dataclasses.replace(good, from_=flipped), evm_network)
    assert result.payer == address and result.amount == 4_242


async def test_settling_a_bad_signature_without_verify(chain: DevChain,
                                                       evm_network: EvmNetwork,
                                                       settler: EvmSettler) -> None:
    """settle() alone (the chain's own check): the simulation reverts, same code, no gas."""
    auth = make_auth(evm_network, chain.wallets[1].private_key,
                     signature_override="0x" + "00" * 65)
    with pytest.raises(PaymentRejected) as info:
        await settler.settle(auth, evm_network)
    assert info.value.code == ERR_SIGNATURE and "transaction" not in info.value.extra


@pytest.fixture(scope="module")
def facilitator_url(evm_network: EvmNetwork) -> Iterator[str]:
    with serve(create_facilitator_app(EvmSettler(), [evm_network])) as url:
        yield url


async def test_facilitator_server_answers_bad_signatures(
        facilitator_url: str, chain: DevChain, evm_network: EvmNetwork,
        settler: EvmSettler) -> None:
    """Over HTTP: isValid/success false with the code (was a 500 for the all-zero one)."""
    requirements = exact_requirements(evm_network, amount=10_000, pay_to=PAY_TO)
    local = LocalSettlement(settler, [evm_network])
    async with httpx.AsyncClient(timeout=30) as client:
        for _label, signature in BAD_SIGNATURES:
            auth = make_auth(evm_network, chain.wallets[1].private_key,
                             signature_override=signature)
            payload = PaymentPayload.model_validate({
                "x402Version": 2, "accepted": requirements.model_dump(by_alias=True),
                "payload": {"signature": signature, "authorization": {
                    "from": auth.from_, "to": auth.to, "value": str(auth.value),
                    "validAfter": str(auth.valid_after), "validBefore": str(auth.valid_before),
                    "nonce": auth.nonce}}})
            body = {"x402Version": 2,
                    "paymentPayload": payload.model_dump(mode="json", by_alias=True,
                                                         exclude_none=True),
                    "paymentRequirements": requirements.model_dump(mode="json", by_alias=True)}
            verify = await client.post(f"{facilitator_url}/verify", json=body)
            assert verify.status_code == 200, (_label, verify.text)
            assert verify.json()["invalidReason"] == ERR_SIGNATURE, _label
            settle = await client.post(f"{facilitator_url}/settle", json=body)
            assert settle.status_code == 200, (_label, settle.text)
            assert settle.json()["errorReason"] == ERR_SIGNATURE, _label
            with pytest.raises(PaymentRejected) as info:
                await local.verify(payload, requirements)
            assert info.value.code == ERR_SIGNATURE


def test_relayer_key_is_checked_at_construction(evm_network: EvmNetwork) -> None:
    """A malformed relayer key fails where the network is configured (start-up), without
    echoing the key; eth_keys' own error is not a ValueError."""
    for bad in ("0x1234", "0x" + "00" * 32, "not hex at all"):
        with pytest.raises(ValueError, match="relayer key is not a private key") as info:
            dataclasses.replace(evm_network, relayer_key=bad)
        assert bad not in str(info.value) and info.value.__cause__ is None


async def test_no_relayer_key_cannot_settle(chain: DevChain, evm_network: EvmNetwork,
                                            settler: EvmSettler) -> None:
    keyless = dataclasses.replace(evm_network, relayer_key="")  # remote-mode configuration
    auth = make_auth(keyless, chain.wallets[1].private_key)
    with pytest.raises(SettlementNotSubmitted, match="no relayer key"):
        await settler.settle(auth, keyless)
