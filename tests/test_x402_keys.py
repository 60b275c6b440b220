"""API keys issued by payments do not pile up: at most ``keep`` live per account (the oldest
revoked), each expiring after an idle TTL that every use restarts; operator keys untouched;
the key cache never trusts a key past its TTL. Ledger-level against a real Redis-compatible
server, then end to end through x402 deposits on the dev chain."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable

import httpx
import pytest

from gateway.chain.devchain import DevChain
from gateway.rails.evm import EvmNetwork
from meters.apikeys import hash_key
from meters.connection import connect
from meters.errors import AccountNotFound
from meters.ledger import Ledger
from tests.chain_fixtures import *  # noqa: F403  (session fixtures: chain, evm_network, settler)
from tests.chain_fixtures import make_auth, new_account
from tests.conftest import RunningGateway, new_prefix

pytestmark = [pytest.mark.timeout(90), pytest.mark.asyncio(loop_scope="session")]

DAY = 86400


def make_ledger(redis_url: str, prefix: str | None = None) -> Ledger:
    return Ledger(connect(redis_url), prefix=prefix or new_prefix())


async def _wait_gone(ledger: Ledger, key: str, timeout: float = 5.0) -> None:
    """Until Redis expired ``key`` (bounded)."""
    deadline = time.monotonic() + timeout
    redis_key = f"{ledger.prefix}key:{hash_key(key)}"
    while await ledger.redis.exists(redis_key):
        assert time.monotonic() < deadline, "the key did not expire"
        await asyncio.sleep(0.02)


async def test_payment_keys_are_bounded_oldest_dropped(redis_url: str) -> None:
    ledger = make_ledger(redis_url)
    account, operator_key = await ledger.create_account(0)
    keys = [await ledger.issue_payment_key(account.id, keep=3, idle_seconds=DAY)
            for _ in range(5)]
    assert [await ledger.authenticate(k) for k in keys] == [None, None] + [account.id] * 3
    assert await ledger.authenticate(operator_key) == account.id  # operator keys unaffected
    members = await ledger.redis.smembers(f"{ledger.prefix}acct:{{{account.id}}}:keys")
    assert len(members) == 1 + 3  # the key set does not grow with dropped keys
    assert await ledger.redis.zcard(f"{ledger.prefix}paykeys:{{{account.id}}}") == 3
    # Payment keys expire (idle TTL); operator keys do not.
    ttl = await ledger.redis.pttl(f"{ledger.prefix}key:{hash_key(keys[-1])}")
    assert DAY * 1000 - 60_000 < ttl <= DAY * 1000
    assert await ledger.redis.pttl(f"{ledger.prefix}key:{hash_key(operator_key)}") == -1
    # Rotation revokes payment keys too and forgets them.
    fresh = await ledger.rotate_key(account.id)
    assert all([await ledger.authenticate(k) is None for k in keys])
    assert await ledger.authenticate(fresh) == account.id
    assert not await ledger.redis.exists(f"{ledger.prefix}paykeys:{{{account.id}}}")
    with pytest.raises(AccountNotFound):
        await ledger.issue_payment_key("x402_missing", keep=3, idle_seconds=DAY)
    await ledger.redis.aclose()


async def test_use_restarts_the_idle_clock_and_expiry_is_final(redis_url: str) -> None:
    ledger = make_ledger(redis_url)
    account, _ = await ledger.create_account(0)
    key = await ledger.issue_payment_key(account.id, keep=5, idle_seconds=DAY)
    redis_key = f"{ledger.prefix}key:{hash_key(key)}"
    await ledger.redis.pexpire(redis_key, 60_000)  # as if it sat unused for almost a day
    assert await ledger.authenticate(key) == account.id
    assert await ledger.redis.pttl(redis_key) > DAY * 1000 - 60_000  # restarted
    # Left unused past its TTL it is gone; the next payment prunes its hash.
    short = await ledger.issue_payment_key(account.id, keep=5, idle_seconds=0.2)
    await _wait_gone(ledger, short)
    assert await ledger.authenticate(short) is None
    await ledger.issue_payment_key(account.id, keep=5, idle_seconds=DAY)
    members = {m.decode() for m in await ledger.redis.smembers(
        f"{ledger.prefix}acct:{{{account.id}}}:keys")}
    assert hash_key(short) not in members and hash_key(key) in members
    await ledger.redis.aclose()


async def test_key_cache_does_not_outlive_expiry_or_dropping(redis_url: str) -> None:
    prefix = new_prefix()
    here = make_ledger(redis_url, prefix)
    here.key_cache_seconds = 60.0  # far longer than the keys live
    there = make_ledger(redis_url, prefix)
    account, _ = await here.create_account(0)
    # Expiry: the cached lookup is trusted no longer than the key's TTL.
    key = await here.issue_payment_key(account.id, keep=5, idle_seconds=0.3)
    assert await here.authenticate(key) == account.id  # cached, TTL restarted
    await _wait_gone(here, key)
    assert await here.authenticate(key) is None
    # Dropped by a payment in this process: out of the cache at once.
    first = await here.issue_payment_key(account.id, keep=1, idle_seconds=DAY)
    assert await here.authenticate(first) == account.id
    await here.issue_payment_key(account.id, keep=1, idle_seconds=DAY)
    assert await here.authenticate(first) is None
    # Dropped by another process: trusted here at most key_cache_seconds (as revocation).
    here.key_cache_seconds = 0.3
    second = await there.issue_payment_key(account.id, keep=1, idle_seconds=DAY)
    assert await here.authenticate(second) == account.id
    cached_at = time.monotonic()
    await there.issue_payment_key(account.id, keep=1, idle_seconds=DAY)
    deadline = cached_at + 5
    while await here.authenticate(second) is not None:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.02)
    await here.redis.aclose()
    await there.redis.aclose()


async def test_x402_payments_rotate_keys(
        gateway_factory: Callable[..., contextlib.AbstractContextManager[RunningGateway]],
        chain: DevChain, evm_network: EvmNetwork, redis_url: str) -> None:
    """Three deposits from one payer with ``api_keys_kept = 2``: the first key stops working,
    the last two work, and each expires after ``api_key_idle_seconds`` unused."""
    from tests.test_x402_gateway import BODY, header_for, offered, pay, x402_config

    with gateway_factory(x402=x402_config(chain, api_keys_kept=2,
                                          api_key_idle_seconds=3600)) as gw:
        wallet = new_account(chain, tokens=10**6)
        keys = []
        for _ in range(3):
            req = offered(gw)
            paid = pay(gw, header_for(make_auth(evm_network, wallet.key.to_0x_hex(),
                                                value=req.amount), req))
            assert paid.status_code == 200, paid.text
            keys.append(paid.headers["Tollstream-Api-Key"])
        answers = [httpx.post(f"{gw.url}/v1/chat/completions", json=BODY, timeout=30,
                              headers={"authorization": f"Bearer {key}"}) for key in keys]
        assert [r.status_code for r in answers] == [402, 200, 200]  # 402: pay for a new one
        assert answers[0].json()["code"] == "invalid_api_key"
        redis = connect(redis_url)  # the gateway's own client lives on its server's loop
        try:
            ttl = await redis.pttl(f"{gw.settings.key_prefix}key:{hash_key(keys[-1])}")
        finally:
            await redis.aclose()
        assert 3_500_000 < ttl <= 3_600_000


async def test_key_settings_defaults_and_bounds() -> None:
    from pydantic import ValidationError

    from gateway.rail_settings import X402Settings

    cfg = X402Settings()
    assert (cfg.api_keys_kept, cfg.api_key_idle_seconds) == (5, 30 * DAY)
    with pytest.raises(ValidationError):
        X402Settings(api_keys_kept=0)
    with pytest.raises(ValidationError):
        X402Settings(api_key_idle_seconds=10)
