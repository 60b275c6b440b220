"""EIP-3009 verification and settlement against a real dev chain."""

from __future__ import annotations

import asyncio
import dataclasses
import time

import pytest
from eth_account import Account

from gateway.chain.devchain import DevChain
from gateway.errors import InvalidPayment, PaymentRejected, ServiceUnavailable
from gateway.rails.evm import (
    ERR_INSUFFICIENT_BALANCE,
    ERR_NONCE_USED,
    ERR_RECIPIENT_MISMATCH,
    ERR_SIGNATURE,
    ERR_VALID_AFTER,
    ERR_VALID_BEFORE,
    ERR_VALUE_MISMATCH,
    Eip3009Authorization,
    EvmNetwork,
    EvmSettler,
)
from tests.chain_fixtures import *  # noqa: F403  (session fixtures: chain, evm_network, settler)
from tests.chain_fixtures import PAY_TO, cancel_authorization, make_auth, new_account

pytestmark = pytest.mark.asyncio(loop_scope="session")


async def test_verify_and_settle_moves_exactly_the_amount(
        chain: DevChain, evm_network: EvmNetwork, settler: EvmSettler) -> None:
    wallet = chain.wallets[0]
    auth = make_auth(evm_network, wallet.private_key, value=12_345)
    payer_before = await settler.balance_of(wallet.address, evm_network)
    merchant_before = await settler.balance_of(PAY_TO, evm_network)
    await settler.verify(auth, pay_to=PAY_TO, amount=12_345, network=evm_network)
    result = await settler.settle(auth, evm_network)
    assert result.payer == wallet.address
    assert result.amount == 12_345
    assert result.block_number > 0 and result.tx_hash.startswith("0x")
    assert await settler.balance_of(wallet.address, evm_network) == payer_before - 12_345
    assert await settler.balance_of(PAY_TO, evm_network) == merchant_before + 12_345
    assert await settler.authorization_used(auth.from_, auth.nonce, evm_network)
    status = await settler.transaction_status(result.tx_hash, evm_network)
    assert status.state == "success" and status.block_number == result.block_number

    # Replay: verification and settlement both refuse the used nonce.
    with pytest.raises(PaymentRejected) as info:
        await settler.verify(auth, pay_to=PAY_TO, amount=12_345, network=evm_network)
    assert info.value.code == ERR_NONCE_USED
    with pytest.raises(PaymentRejected) as info:
        await settler.settle(auth, evm_network)
    assert info.value.code == ERR_NONCE_USED


async def test_unknown_transaction_status(evm_network: EvmNetwork, settler: EvmSettler) -> None:
    status = await settler.transaction_status("0x" + "ab" * 32, evm_network)
    assert status.state == "unknown"


async def _rejected(settler: EvmSettler, auth: Eip3009Authorization, network: EvmNetwork,
                    *, amount: int = 10_000) -> str:
    with pytest.raises(PaymentRejected) as info:
        await settler.verify(auth, pay_to=PAY_TO, amount=amount, network=network)
    assert info.value.status == 402
    return str(info.value.code)


async def test_forged_signature(chain: DevChain, evm_network: EvmNetwork,
                                settler: EvmSettler) -> None:
    # Signed by wallet 2 but claims to be from wallet 1.
    signed = make_auth(evm_network, chain.wallets[2].private_key)
    forged = dataclasses.replace(signed, from_=chain.wallets[1].address)
    assert await _rejected(settler, forged, evm_network) == ERR_SIGNATURE
    # And the chain agrees if it is submitted anyway.
    with pytest.raises(PaymentRejected) as info:
        await settler.settle(forged, evm_network)
    assert info.value.code == ERR_SIGNATURE
    # A signature for another token's domain does not verify here either.
    other = dataclasses.replace(evm_network, token_name="Other")
    wrong_domain = make_auth(other, chain.wallets[1].private_key)
    assert await _rejected(settler, wrong_domain, evm_network) == ERR_SIGNATURE
    # High-s (malleable) twin of a valid signature is refused like FiatToken does.
    good = make_auth(evm_network, chain.wallets[1].private_key)
    raw = bytes.fromhex(good.signature[2:])
    n = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141
    s_twin = (n - int.from_bytes(raw[32:64], "big")).to_bytes(32, "big")
    twin = raw[:32] + s_twin + bytes([55 - raw[64]])
    malleable = dataclasses.replace(good, signature="0x" + twin.hex())
    assert await _rejected(settler, malleable, evm_network) == ERR_SIGNATURE


async def test_wrong_recipient(chain: DevChain, evm_network: EvmNetwork,
                               settler: EvmSettler) -> None:
    auth = make_auth(evm_network, chain.wallets[1].private_key, to=chain.wallets[2].address)
    assert await _rejected(settler, auth, evm_network) == ERR_RECIPIENT_MISMATCH


async def test_wrong_amount(chain: DevChain, evm_network: EvmNetwork,
                            settler: EvmSettler) -> None:
    auth = make_auth(evm_network, chain.wallets[1].private_key, value=9_999)
    assert await _rejected(settler, auth, evm_network) == ERR_VALUE_MISMATCH
    # Overpaying is a mismatch too: exact means exact.
    auth = make_auth(evm_network, chain.wallets[1].private_key, value=10_001)
    assert await _rejected(settler, auth, evm_network) == ERR_VALUE_MISMATCH


async def test_time_window(chain: DevChain, evm_network: EvmNetwork,
                           settler: EvmSettler) -> None:
    now = int(time.time())
    key = chain.wallets[1].private_key
    expired = make_auth(evm_network, key, valid_after=now - 600, valid_before=now - 1)
    assert await _rejected(settler, expired, evm_network) == ERR_VALID_BEFORE
    # Inside the safety margin counts as expired: settlement could land after it.
    too_soon = make_auth(evm_network, key, valid_before=now + 2)
    assert await _rejected(settler, too_soon, evm_network) == ERR_VALID_BEFORE
    future = make_auth(evm_network, key, valid_after=now + 600, valid_before=now + 900)
    assert await _rejected(settler, future, evm_network) == ERR_VALID_AFTER
    # The chain refuses the expired one too, with the mapped code.
    with pytest.raises(PaymentRejected) as info:
        await settler.settle(expired, evm_network)
    assert info.value.code == ERR_VALID_BEFORE


async def test_unfunded_payer(evm_network: EvmNetwork, settler: EvmSettler) -> None:
    pauper = Account.create()
    auth = make_auth(evm_network, pauper.key.to_0x_hex())
    assert await _rejected(settler, auth, evm_network) == ERR_INSUFFICIENT_BALANCE
    with pytest.raises(PaymentRejected) as info:
        await settler.settle(auth, evm_network)
    assert info.value.code == ERR_INSUFFICIENT_BALANCE


async def test_malformed_authorization_is_invalid_payment() -> None:
    with pytest.raises(InvalidPayment, match="nonce"):
        Eip3009Authorization(from_=PAY_TO, to=PAY_TO, value=1, valid_after=0, valid_before=1,
                             nonce="0x1234", signature="0x" + "00" * 65)
    with pytest.raises(InvalidPayment, match="value"):
        Eip3009Authorization(from_=PAY_TO, to=PAY_TO, value=-1, valid_after=0, valid_before=1,
                             nonce="0x" + "00" * 32, signature="0x" + "00" * 65)
    # Wrong types (the regexes would raise TypeError on them) are InvalidPayment too.
    fields = {"from_": PAY_TO, "to": PAY_TO, "value": 1, "valid_after": 0, "valid_before": 1,
              "nonce": "0x" + "00" * 32, "signature": "0x" + "00" * 65}
    for name, bad in (("from_", 123), ("to", None), ("nonce", b"\0" * 32), ("signature", 5),
                      ("value", "1"), ("valid_before", True)):
        with pytest.raises(InvalidPayment):
            Eip3009Authorization(**{**fields, name: bad})  # type: ignore[arg-type]


async def test_ten_concurrent_settlements(chain: DevChain, evm_network: EvmNetwork,
                                          settler: EvmSettler) -> None:
    wallets = chain.wallets[2:12]
    auths = [make_auth(evm_network, w.private_key, value=1_000 + i)
             for i, w in enumerate(wallets)]
    before = await settler.balance_of(PAY_TO, evm_network)
    results = await asyncio.wait_for(
        asyncio.gather(*(settler.settle(a, evm_network) for a in auths)), 60)
    assert len({r.tx_hash for r in results}) == 10
    assert [r.amount for r in results] == [a.value for a in auths]
    assert await settler.balance_of(PAY_TO, evm_network) == before + sum(a.value for a in auths)


async def test_same_authorization_settled_twice_concurrently(
        chain: DevChain, evm_network: EvmNetwork, settler: EvmSettler) -> None:
    auth = make_auth(evm_network, chain.wallets[0].private_key, value=777)
    outcomes = await asyncio.gather(settler.settle(auth, evm_network),
                                    settler.settle(auth, evm_network), return_exceptions=True)
    wins = [o for o in outcomes if not isinstance(o, BaseException)]
    losses = [o for o in outcomes if isinstance(o, PaymentRejected)]
    assert len(wins) == 1 and len(losses) == 1
    assert losses[0].code == ERR_NONCE_USED


async def test_rpc_down_is_service_unavailable(chain: DevChain,
                                               evm_network: EvmNetwork) -> None:
    from tests.servers import free_port

    down = dataclasses.replace(evm_network, rpc_url=f"http://127.0.0.1:{free_port()}",
                               rpc_timeout=2.0)
    isolated = EvmSettler()
    try:
        auth = make_auth(down, chain.wallets[0].private_key)
        with pytest.raises(ServiceUnavailable):
            await isolated.verify(auth, pay_to=PAY_TO, amount=10_000, network=down)
        with pytest.raises(ServiceUnavailable):
            await isolated.settle(auth, down)
        with pytest.raises(ServiceUnavailable):
            await isolated.authorization_used(auth.from_, auth.nonce, down)
    finally:
        await isolated.aclose()


async def test_authorization_canceled_tells_a_cancel_from_a_use(
        chain: DevChain, evm_network: EvmNetwork, settler: EvmSettler) -> None:
    """authorizationState is true after a transfer and after a cancel alike; the log tells."""
    key = new_account(chain, tokens=300).key.to_0x_hex()
    used, canceled, unused = (make_auth(evm_network, key, value=300) for _ in range(3))
    await settler.settle(used, evm_network)
    assert cancel_authorization(chain, evm_network, key, canceled.nonce,
                                chain.relayer_key)["status"] == 1
    for auth, is_used, is_canceled in ((used, True, False), (canceled, True, True),
                                       (unused, False, False)):
        assert await settler.authorization_used(auth.from_, auth.nonce,
                                                 evm_network) is is_used
        assert await settler.authorization_canceled(auth.from_, auth.nonce, evm_network,
                                                    from_block=0) is is_canceled
