"""The Payment scheme's wire format, checked against the spec's rules and against pympp
(the reference Python client), which must read what tollstream writes and vice versa."""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
from typing import Any

import mpp
import pytest
from mpp import _parsing as pympp_parsing

from gateway.rails.mpp.scheme import (
    Challenge,
    ChallengeEcho,
    ChallengeSigner,
    Problem,
    b64url,
    canonical_b64url,
    credential_value,
    encode_receipt,
    order_challenges,
    parse_accept_payment,
    parse_credential,
)

SECRET = b"challenge-secret-0123456789"
REQUEST: dict[str, Any] = {"amount": "100",
                           "currency": "0x5FbDB2315678afecb367f032d93F642f64180aa3",
                           "recipient": "0x742d35cc6634c0532925a3b844bc9e7595f8fe00",
                           "methodDetails": {"chainId": 31337, "feePayer": True},
                           "unitType": "llm_token"}


def issue(**kwargs: Any) -> Challenge:
    signer = ChallengeSigner([SECRET])
    return signer.issue(realm="tollstream.test", method="evm", intent="session",
                        request=REQUEST, **kwargs)


def test_request_is_jcs_then_base64url_without_padding() -> None:
    challenge = issue()
    assert "=" not in challenge.request_b64
    decoded = pympp_parsing._b64_decode(challenge.request_b64)
    assert decoded == REQUEST
    # JCS: keys sorted, no whitespace.
    assert canonical_b64url({"b": 1, "a": {"d": 2, "c": 3}}) == b64url(
        b'{"a":{"c":3,"d":2},"b":1}')


def test_id_is_the_hmac_of_the_seven_slots_and_pympp_agrees() -> None:
    challenge = issue(description="a test")
    assert challenge.opaque is not None and challenge.opaque["nonce"]  # distinct ids
    expected = hmac.new(SECRET, "|".join([
        "tollstream.test", "evm", "session", challenge.request_b64, challenge.expires or "",
        "", challenge.opaque_b64 or ""]).encode(), hashlib.sha256).digest()
    assert challenge.id == b64url(expected)
    parsed = mpp.Challenge.from_www_authenticate(challenge.header())
    assert parsed.id == challenge.id and parsed.request == REQUEST
    assert parsed.verify(SECRET.decode(), "tollstream.test")


def test_two_challenges_for_the_same_request_differ() -> None:
    assert issue().id != issue().id


def test_rotation_and_tampering() -> None:
    old = ChallengeSigner([SECRET])
    challenge = old.issue(realm="r", method="evm", intent="charge", request=REQUEST)
    echo = ChallengeEcho.model_validate(challenge.params())
    rotated = ChallengeSigner([b"new-secret-0123456789ab", SECRET])
    assert rotated.verify(echo)
    assert not ChallengeSigner([b"new-secret-0123456789ab"]).verify(echo)
    tampered = echo.model_copy(update={"request": canonical_b64url({**REQUEST, "amount": "1"})})
    assert not rotated.verify(tampered)
    with pytest.raises(ValueError):
        ChallengeSigner([b"short"])


def test_a_pympp_credential_is_read() -> None:
    challenge = mpp.Challenge.from_www_authenticate(issue().header())
    credential = mpp.Credential(challenge=challenge.to_echo(),
                                payload={"action": "voucher", "channelId": "0x" + "ab" * 32},
                                source="did:pkh:eip155:31337:0x" + "11" * 20)
    header = credential.to_authorization()
    token = credential_value({"authorization": header})
    assert token is not None
    parsed = parse_credential(token)
    assert parsed.challenge.id == challenge.id and parsed.payload["action"] == "voucher"
    assert ChallengeSigner([SECRET]).verify(parsed.challenge)
    assert credential_value({"payment-authorization": header}) == token
    assert credential_value({"authorization": "Bearer tsk_x"}) is None


@pytest.mark.parametrize("token", ["!!!", "e30=", "W10", b64url(b"not json"),
                                   b64url(b'{"challenge": {}, "payload": {}}'),
                                   b64url(b'{"challenge": {"id": "x", "realm": "r", '
                                          b'"method": "EVM", "intent": "charge", '
                                          b'"request": "e30"}, "payload": {}}'),
                                   "A" * 70_000])
def test_malformed_credentials(token: str) -> None:
    with pytest.raises(Problem) as info:
        parse_credential(token)
    assert info.value.kind == "malformed-credential" and info.value.status == 402
    assert info.value.problem()["type"] == "https://paymentauth.org/problems/malformed-credential"


def test_receipt_is_read_by_pympp() -> None:
    value = encode_receipt({"method": "evm", "reference": "0x" + "cd" * 32,
                            "challengeId": "abc"})
    receipt = mpp.Receipt.from_payment_receipt(value)
    assert receipt.status == "success" and receipt.reference == "0x" + "cd" * 32
    assert abs(receipt.timestamp - dt.datetime.now(dt.UTC)) < dt.timedelta(minutes=1)


def test_accept_payment_orders_and_filters() -> None:
    charge = issue()
    charge = Challenge(charge.id, charge.realm, "evm", "charge", charge.request, charge.expires)
    session = issue()
    other = Challenge("x", "r", "stripe", "charge", {})
    offered = [charge, session, other]
    assert order_challenges(offered, None) == offered
    ranges = parse_accept_payment("evm/session, stripe/*;q=0.5, evm/charge;q=0")
    assert order_challenges(offered, ranges) == [session, other]
    assert order_challenges(offered, parse_accept_payment("*/*;q=0.2, evm/*")) == [
        charge, session, other]
    assert parse_accept_payment("not a range") is None
    assert order_challenges(offered, parse_accept_payment("solana/charge")) == offered
