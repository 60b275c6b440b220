"""Permit2 and the x402 ``upto`` proxy on the dev chain, paid by the official x402 SDK's upto
client (scheme_upto_evm.md): the payer signs a maximum, the facilitator named in the witness
settles what was used, once, to the signed recipient.

Times are chosen relative to the chain's head (no clock moves, no sleeps): an expired
deadline is one before the head, a future validAfter one an hour after it.
"""

from __future__ import annotations

import json
import secrets
from typing import Any

import pytest
from eth_account import Account
from eth_account.messages import _hash_eip191_message, encode_typed_data
from eth_account.signers.local import LocalAccount
from eth_keys import keys
from eth_utils import function_abi_to_4byte_selector
from web3 import HTTPProvider, Web3
from web3.exceptions import ContractLogicError
from web3.logs import DISCARD
from x402.mechanisms.evm.constants import (
    PERMIT2_ADDRESS as SDK_PERMIT2_ADDRESS,
)
from x402.mechanisms.evm.constants import (
    UPTO_PERMIT2_WITNESS_TYPES,
    X402_UPTO_PERMIT2_PROXY_ABI,
    X402_UPTO_PERMIT2_PROXY_ADDRESS,
)
from x402.mechanisms.evm.upto.client import UptoEvmScheme
from x402.mechanisms.evm.upto.permit2_utils import _map_upto_settle_error
from x402.schemas import PaymentRequirements

from gateway.chain.build import PERMIT2_ARTIFACT, UPTO_PROXY_ARTIFACT, load_artifact
from gateway.chain.devchain import DevChain, start_chain
from gateway.chain.permit2 import (
    PERMIT2_ADDRESS,
    UPTO_PROXY_ADDRESS,
    UPTO_PROXY_SETTLE_ABI,
    WITNESS_TYPE_STRING,
    domain_separator,
    nonce_used,
    permit2_digest,
    witness_hash,
)
from tests.chain_fixtures import *  # noqa: F403  (session fixtures: chain, ...)
from tests.chain_fixtures import PAY_TO, call_tx, full_token, new_account, send_as

MAX = 1_000_000  # 1 USDC: the maximum each payer signs
SECP256K1_N = 115792089237316195423570985008687907852837564279074904382605163141518161494337


def _w3(chain: DevChain) -> Web3:
    return Web3(HTTPProvider(chain.rpc_url, request_kwargs={"timeout": 10}))


def _proxy(chain: DevChain) -> Any:
    return _w3(chain).eth.contract(address=Web3.to_checksum_address(chain.upto_proxy),
                                   abi=load_artifact(UPTO_PROXY_ARTIFACT)["abi"])


def _permit2(chain: DevChain) -> Any:
    return _w3(chain).eth.contract(address=Web3.to_checksum_address(chain.permit2),
                                   abi=load_artifact(PERMIT2_ARTIFACT)["abi"])


def _head_time(chain: DevChain) -> int:
    return int(_w3(chain).eth.get_block("latest")["timestamp"])


@pytest.fixture(scope="module")
def facilitator(chain: DevChain) -> LocalAccount:
    """The facilitator: named in every witness, pays the settle gas."""
    return new_account(chain, eth=10**18)


def requirements(chain: DevChain, facilitator: str, *, amount: int = MAX,
                 pay_to: str = PAY_TO) -> PaymentRequirements:
    return PaymentRequirements(
        scheme="upto", network=chain.network, asset=chain.token, amount=str(amount),
        pay_to=pay_to, max_timeout_seconds=3600,
        extra={"name": chain.token_name, "version": chain.token_version,
               "facilitatorAddress": facilitator})


def sdk_payload(chain: DevChain, key: str, facilitator: str, **kw: Any) -> dict[str, Any]:
    """What the official SDK's upto client puts in PAYMENT-SIGNATURE's ``payload``."""
    payload: dict[str, Any] = UptoEvmScheme(Account.from_key(key)).create_payment_payload(
        requirements(chain, facilitator, **kw))
    return payload


def signed_payload(chain: DevChain, key: str, facilitator: str, *, deadline: int,
                   valid_after: int = 0, amount: int = MAX, to: str = PAY_TO) -> dict[str, Any]:
    """A payload in the SDK's shape signed over the SDK's typed data with chosen times."""
    account = Account.from_key(key)
    auth = {"from": account.address,
            "permitted": {"token": chain.token, "amount": str(amount)},
            "spender": X402_UPTO_PERMIT2_PROXY_ADDRESS,
            "nonce": str(secrets.randbits(256)), "deadline": str(deadline),
            "witness": {"to": to, "facilitator": facilitator, "validAfter": str(valid_after)}}
    signed = account.sign_typed_data(
        {"name": "Permit2", "chainId": chain.chain_id, "verifyingContract": SDK_PERMIT2_ADDRESS},
        UPTO_PERMIT2_WITNESS_TYPES, _typed_message(auth))
    return {"permit2Authorization": auth, "signature": signed.signature.to_0x_hex()}


def _typed_message(auth: dict[str, Any]) -> dict[str, Any]:
    return {"permitted": {"token": auth["permitted"]["token"],
                          "amount": int(auth["permitted"]["amount"])},
            "spender": auth["spender"], "nonce": int(auth["nonce"]),
            "deadline": int(auth["deadline"]),
            "witness": {"to": auth["witness"]["to"], "facilitator": auth["witness"]["facilitator"],
                        "validAfter": int(auth["witness"]["validAfter"])}}


def settle_args(payload: dict[str, Any], amount: int, **witness: Any) -> tuple[Any, ...]:
    """The proxy's settle arguments for ``payload`` (``witness`` overrides its fields)."""
    auth = payload["permit2Authorization"]
    w = {**auth["witness"], **witness}
    return (((Web3.to_checksum_address(auth["permitted"]["token"]),
              int(auth["permitted"]["amount"])), int(auth["nonce"]), int(auth["deadline"])),
            amount, Web3.to_checksum_address(auth["from"]),
            (Web3.to_checksum_address(w["to"]), Web3.to_checksum_address(w["facilitator"]),
             int(w["validAfter"])),
            bytes.fromhex(payload["signature"].removeprefix("0x")))


def settle(chain: DevChain, sender: LocalAccount, args: tuple[Any, ...]) -> dict[str, Any]:
    """Mine the proxy's settle from ``sender`` (fixed gas: a doomed call is mined and fails)."""
    fn = _proxy(chain).functions.settle(*args)
    return send_as(chain, sender.key.to_0x_hex(), call_tx(fn), gas=300_000)


def reverts(chain: DevChain, sender: str, args: tuple[Any, ...], reason: str) -> None:
    """Simulating settle from ``sender`` reverts with Error(``reason``)."""
    with pytest.raises(ContractLogicError) as info:
        _proxy(chain).functions.settle(*args).call({"from": sender})
    assert info.value.message == f"execution reverted: {reason}", info.value.message


def approved_payer(chain: DevChain, tokens: int = 5 * MAX) -> str:
    """A fresh payer holding ``tokens`` that has approved Permit2 (as the dev wallets have)."""
    payer = new_account(chain, tokens=tokens, eth=10**16)
    fn = full_token(chain).functions.approve(PERMIT2_ADDRESS, 2**256 - 1)
    assert send_as(chain, payer.key.to_0x_hex(), call_tx(fn), gas=100_000)["status"] == 1
    return str(payer.key.to_0x_hex())


# --------------------------------------------------------------------------- placement


def test_contracts_at_canonical_addresses(chain: DevChain) -> None:
    assert chain.permit2 == PERMIT2_ADDRESS == SDK_PERMIT2_ADDRESS
    assert chain.upto_proxy == UPTO_PROXY_ADDRESS == X402_UPTO_PERMIT2_PROXY_ADDRESS
    w3 = _w3(chain)
    assert len(w3.eth.get_code(PERMIT2_ADDRESS)) > 0
    assert len(w3.eth.get_code(UPTO_PROXY_ADDRESS)) > 0
    # The domain separator is computed at the canonical address, not the deploy address.
    separator = bytes(_permit2(chain).functions.DOMAIN_SEPARATOR().call())
    assert separator == domain_separator(chain.chain_id, PERMIT2_ADDRESS)
    proxy = _proxy(chain)
    assert proxy.functions.PERMIT2().call() == PERMIT2_ADDRESS
    assert proxy.functions.WITNESS_TYPE_STRING().call() == WITNESS_TYPE_STRING
    # The SDK's settle ABI is ours: same selector.
    artifact = load_artifact(UPTO_PROXY_ARTIFACT)["abi"]
    selectors = {function_abi_to_4byte_selector(next(f for f in abi if f.get("name") == "settle"))
                 for abi in (X402_UPTO_PERMIT2_PROXY_ABI, UPTO_PROXY_SETTLE_ABI, artifact)}
    assert selectors == {bytes.fromhex("ff11e7b4")}
    token = full_token(chain)
    for wallet in chain.wallets:  # Option A: every dev wallet approved Permit2 once
        assert token.functions.allowance(wallet.address, PERMIT2_ADDRESS).call() == 2**256 - 1
        assert w3.eth.get_balance(wallet.address) == 0
    info = json.loads(chain.to_json())
    assert info["permit2"] == PERMIT2_ADDRESS and info["upto_proxy"] == UPTO_PROXY_ADDRESS


def test_digest_matches_the_sdk_typed_data(chain: DevChain, facilitator: LocalAccount) -> None:
    wallet = chain.wallets[3]
    payload = sdk_payload(chain, wallet.private_key, facilitator.address)
    auth = payload["permit2Authorization"]
    assert auth["spender"] == UPTO_PROXY_ADDRESS and auth["from"] == wallet.address
    domain = {"name": "Permit2", "chainId": chain.chain_id,
              "verifyingContract": SDK_PERMIT2_ADDRESS}
    encoded = encode_typed_data(domain, UPTO_PERMIT2_WITNESS_TYPES, _typed_message(auth))
    expected = _hash_eip191_message(encoded)
    assert encoded.header == domain_separator(chain.chain_id)
    ours = permit2_digest(chain.chain_id, PERMIT2_ADDRESS, auth["permitted"]["token"],
                          int(auth["permitted"]["amount"]), auth["spender"], int(auth["nonce"]),
                          int(auth["deadline"]), auth["witness"]["to"],
                          auth["witness"]["facilitator"], int(auth["witness"]["validAfter"]))
    assert ours == expected
    # And the SDK's signature over it recovers to the payer.
    assert Account._recover_hash(ours, signature=bytes.fromhex(
        payload["signature"].removeprefix("0x"))) == wallet.address
    # The witness hash the proxy computes, through the digest: another recipient changes it.
    assert witness_hash(PAY_TO, facilitator.address, 0) != witness_hash(
        facilitator.address, facilitator.address, 0)


# --------------------------------------------------------------------------- settlement


def test_settle_moves_the_used_amount_once(chain: DevChain, facilitator: LocalAccount) -> None:
    wallet = chain.wallets[9]  # a dev wallet: approved Permit2 at chain start
    payload = sdk_payload(chain, wallet.private_key, facilitator.address)
    nonce = int(payload["permit2Authorization"]["nonce"])
    token = full_token(chain)
    before = (token.functions.balanceOf(wallet.address).call(),
              token.functions.balanceOf(PAY_TO).call())
    assert not nonce_used(_w3(chain), wallet.address, nonce)
    used = 350_000
    receipt = settle(chain, facilitator, settle_args(payload, used))
    assert receipt["status"] == 1
    assert token.functions.balanceOf(wallet.address).call() == before[0] - used
    assert token.functions.balanceOf(PAY_TO).call() == before[1] + used
    assert _proxy(chain).events.Settled().process_receipt(receipt, errors=DISCARD)
    assert nonce_used(_w3(chain), wallet.address, nonce)
    # Single use: the same authorization again, even for less, is refused.
    args = settle_args(payload, 1)
    reverts(chain, facilitator.address, args, "InvalidNonce")
    mined = settle(chain, facilitator, args)
    assert mined["status"] == 0
    assert token.functions.balanceOf(wallet.address).call() == before[0] - used
    assert _map_upto_settle_error(Exception("execution reverted: InvalidNonce"), chain.network,
                                  wallet.address).error_reason == "permit2_invalid_nonce"


def test_the_maximum_is_enforced(chain: DevChain, facilitator: LocalAccount) -> None:
    key = approved_payer(chain)
    payload = sdk_payload(chain, key, facilitator.address)
    reverts(chain, facilitator.address, settle_args(payload, MAX + 1), "AmountExceedsPermitted")
    # The full maximum is fine (simulated only).
    _proxy(chain).functions.settle(*settle_args(payload, MAX)).call(
        {"from": facilitator.address})
    # Permit2 itself refuses more than permitted, before it looks at the signature (which
    # binds the proxy as spender: called by anyone else it would not match anyway).
    auth = payload["permit2Authorization"]
    with pytest.raises(ContractLogicError, match="InvalidAmount"):
        _permit2(chain).functions.permitWitnessTransferFrom(
            settle_args(payload, 0)[0], (PAY_TO, MAX + 1), auth["from"],
            witness_hash(PAY_TO, facilitator.address, 0), WITNESS_TYPE_STRING,
            bytes.fromhex(payload["signature"][2:])).call({"from": facilitator.address})


def test_the_recipient_is_bound(chain: DevChain, facilitator: LocalAccount) -> None:
    key = approved_payer(chain)
    payload = sdk_payload(chain, key, facilitator.address)
    thief = facilitator.address  # the facilitator redirecting the money to itself
    reverts(chain, facilitator.address, settle_args(payload, 1_000, to=thief),
            "InvalidSignature")
    assert _map_upto_settle_error(Exception("execution reverted: InvalidSignature"),
                                  chain.network, thief).error_reason == "invalid_permit2_signature"
    # Nor may the facilitator lift the maximum, move validAfter or the deadline.
    args = list(settle_args(payload, 1_000))
    (token, amount), nonce, deadline = args[0]
    for permit in (((token, amount + 1), nonce, deadline), ((token, amount), nonce, deadline + 1)):
        reverts(chain, facilitator.address, (permit, *args[1:]), "InvalidSignature")
    reverts(chain, facilitator.address, settle_args(payload, 1_000, validAfter=1),
            "InvalidSignature")


def test_only_the_named_facilitator_settles(chain: DevChain, facilitator: LocalAccount) -> None:
    key = approved_payer(chain)
    payload = sdk_payload(chain, key, facilitator.address)
    other = new_account(chain, eth=10**18)
    args = settle_args(payload, 1_000)
    reverts(chain, other.address, args, "UnauthorizedFacilitator")
    assert settle(chain, other, args)["status"] == 0
    # Naming the other account in the witness breaks the signature instead.
    reverts(chain, other.address, settle_args(payload, 1_000, facilitator=other.address),
            "InvalidSignature")
    assert not nonce_used(_w3(chain), Account.from_key(key).address,
                          int(payload["permit2Authorization"]["nonce"]))
    assert settle(chain, facilitator, args)["status"] == 1  # still good for the facilitator


def test_expired_deadline(chain: DevChain, facilitator: LocalAccount) -> None:
    key = approved_payer(chain)
    head = _head_time(chain)
    expired = signed_payload(chain, key, facilitator.address, deadline=head - 1)
    reverts(chain, facilitator.address, settle_args(expired, 1_000), "SignatureExpired")
    # The same signing path with a live deadline settles: the deadline is what failed.
    live = signed_payload(chain, key, facilitator.address, deadline=head + 600)
    assert settle(chain, facilitator, settle_args(live, 1_000))["status"] == 1


def test_payment_too_early(chain: DevChain, facilitator: LocalAccount) -> None:
    key = approved_payer(chain)
    head = _head_time(chain)
    early = signed_payload(chain, key, facilitator.address, deadline=head + 7200,
                           valid_after=head + 3600)
    reverts(chain, facilitator.address, settle_args(early, 1_000), "PaymentTooEarly")
    assert _map_upto_settle_error(Exception("execution reverted: PaymentTooEarly"),
                                  chain.network, "").error_reason == "permit2_payment_too_early"


def test_wallet_without_permit2_approval(chain: DevChain, facilitator: LocalAccount) -> None:
    payer = new_account(chain, tokens=5 * MAX)  # holds the tokens, never approved Permit2
    payload = sdk_payload(chain, payer.key.to_0x_hex(), facilitator.address)
    reverts(chain, facilitator.address, settle_args(payload, 1_000),
            "ERC20: transfer amount exceeds allowance")
    assert settle(chain, facilitator, settle_args(payload, 1_000))["status"] == 0
    assert full_token(chain).functions.balanceOf(payer.address).call() == 5 * MAX
    # The failed transaction spent nothing: the nonce is still unused.
    assert not nonce_used(_w3(chain), payer.address,
                          int(payload["permit2Authorization"]["nonce"]))


def test_invalid_arguments(chain: DevChain, facilitator: LocalAccount) -> None:
    key = approved_payer(chain)
    payload = sdk_payload(chain, key, facilitator.address)
    zero = "0x" + "00" * 20
    reverts(chain, facilitator.address, settle_args(payload, 0), "InvalidAmount")
    args = list(settle_args(payload, 1_000))
    reverts(chain, facilitator.address, (*args[:2], zero, *args[3:]), "InvalidOwner")
    reverts(chain, facilitator.address, settle_args(payload, 1_000, to=zero),
            "InvalidDestination")
    # Another owner than the signer.
    reverts(chain, facilitator.address, (*args[:2], chain.wallets[0].address, *args[3:]),
            "InvalidSignature")
    # The malleable twin of the payer's signature (s -> n - s, v flipped) is refused.
    sig = args[4]
    r, s, v = sig[:32], int.from_bytes(sig[32:64], "big"), sig[64]
    twin = r + (SECP256K1_N - s).to_bytes(32, "big") + bytes([55 - v])
    digest = permit2_digest(chain.chain_id, PERMIT2_ADDRESS, chain.token, MAX,
                            UPTO_PROXY_ADDRESS, int(payload["permit2Authorization"]["nonce"]),
                            int(payload["permit2Authorization"]["deadline"]), PAY_TO,
                            facilitator.address, 0)
    signer = keys.Signature(vrs=(twin[64] - 27, int.from_bytes(r, "big"), SECP256K1_N - s))
    assert signer.recover_public_key_from_msg_hash(digest).to_checksum_address() == \
        Account.from_key(key).address  # a valid ECDSA signature, only high-s
    reverts(chain, facilitator.address, (*args[:4], twin), "InvalidSignature")
    reverts(chain, facilitator.address, (*args[:4], sig[:64]), "InvalidSignatureLength")


def test_invalidated_nonce_is_refused(chain: DevChain, facilitator: LocalAccount) -> None:
    key = approved_payer(chain)
    payload = sdk_payload(chain, key, facilitator.address)
    nonce = int(payload["permit2Authorization"]["nonce"])
    fn = _permit2(chain).functions.invalidateUnorderedNonces(nonce >> 8, 1 << (nonce & 255))
    receipt = send_as(chain, key, call_tx(fn), gas=100_000)
    assert receipt["status"] == 1
    owner = Account.from_key(key).address
    assert nonce_used(_w3(chain), owner, nonce)
    assert not nonce_used(_w3(chain), owner, nonce ^ 1)  # the neighbouring bit is untouched
    reverts(chain, facilitator.address, settle_args(payload, 1_000), "InvalidNonce")


def test_upto_on_the_eth_tester_backend() -> None:
    """The in-process backend places Permit2 and the proxy too (anvil_setCode there)."""
    with start_chain(wallets=1, backend="eth-tester", block_time=None) as tester:
        assert tester.backend == "eth-tester"
        facilitator = new_account(tester, eth=10**17)
        wallet = tester.wallets[0]
        payload = sdk_payload(tester, wallet.private_key, facilitator.address)
        assert settle(tester, facilitator, settle_args(payload, 123_456))["status"] == 1
        token = full_token(tester)
        assert token.functions.balanceOf(PAY_TO).call() == 123_456
        assert token.functions.balanceOf(wallet.address).call() == wallet.balance - 123_456
        reverts(tester, facilitator.address, settle_args(payload, 1), "InvalidNonce")
