"""The ledger's Lua scripts against a real Redis-compatible server."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
import redis.asyncio as aioredis

from meters.connection import connect
from meters.errors import AccountNotFound, DuplicateCredit, InsufficientFunds, LedgerUnavailable
from meters.ledger import Ledger
from meters.meter import Outcome, Policy, StreamMeter
from meters.money import Asset
from meters.rates import Rate
from tests.conftest import new_prefix

ONE_PER_TOKEN = Rate.parse(Asset(), input_per_mtok="0", output_per_mtok="1")


def make_ledger(redis_url: str, prefix: str | None = None, ttl: float = 3.0) -> Ledger:
    client = connect(redis_url)
    return Ledger(client, prefix=prefix or new_prefix(), owner_ttl_seconds=ttl)


async def test_accounts_keys_and_credits(redis_url: str) -> None:
    ledger = make_ledger(redis_url)
    account, key = await ledger.create_account(100, label="a")
    assert await ledger.authenticate(key) == account.id
    assert await ledger.authenticate(key + "x") is None
    stored = await ledger.redis.hgetall(f"{ledger.prefix}acct:{{{account.id}}}")
    assert key.encode() not in b"".join(stored.values())  # only the hash is stored
    assert await ledger.credit(account.id, 50, idempotency_key="k1") == (True, 150)
    assert await ledger.credit(account.id, 50, idempotency_key="k1") == (False, 150)
    with pytest.raises(DuplicateCredit):
        await ledger.credit(account.id, 51, idempotency_key="k1")
    with pytest.raises(AccountNotFound):
        await ledger.credit("acct_missing", 1)
    new_key = await ledger.rotate_key(account.id)
    assert await ledger.authenticate(key) is None
    assert await ledger.authenticate(new_key) == account.id
    await ledger.redis.aclose()


async def test_many_meters_never_overspend(redis_url: str) -> None:
    """200 concurrent meters on one balance of 1000 tokens: exactly 1000 are granted."""
    # A small pool: 200 meters share 16 connections (a gateway's pool, 512, would open 200
    # connections at once, and a loaded machine may not accept them within the 1 s connect
    # timeout that makes an unreachable Redis fail closed fast).
    ledger = Ledger(connect(redis_url, max_connections=16), prefix=new_prefix(),
                    owner_ttl_seconds=3.0)
    await ledger.heartbeat()
    account, _ = await ledger.create_account(1000)

    async def consume() -> int:
        meter = StreamMeter(ledger, account.id, ONE_PER_TOKEN, lease_tokens=7)
        try:
            await meter.open(0)
        except InsufficientFunds:
            return 0
        while True:
            granted = await meter.acquire(3)
            meter.delivered_tokens(granted)
            if granted < 3:
                break
            await asyncio.sleep(0)
        await meter.close(Outcome.CUT)
        return meter.delivered

    delivered = await asyncio.gather(*(consume() for _ in range(200)))
    state = await ledger.get_account(account.id)
    assert sum(delivered) == 1000
    assert (state.balance, state.held, state.spent) == (0, 0, 1000)
    await ledger.redis.aclose()


async def test_sweeper_returns_holds_of_dead_owner(redis_url: str) -> None:
    prefix = new_prefix()
    dead = make_ledger(redis_url, prefix, ttl=1.5)
    account, _ = await dead.create_account(100)
    meter = StreamMeter(dead, account.id, ONE_PER_TOKEN, lease_tokens=40)
    await dead.heartbeat()  # proved alive just before the grants (a loaded machine is slow)
    await meter.open(0)
    meter.delivered_tokens(meter.take(10))
    await meter.renew()  # charges the 10 delivered tokens and holds more
    state = await dead.get_account(account.id)
    assert state.spent == 10 and state.held > 0
    # The owner stops beating (it "died"); another process sweeps after the TTL.
    alive = make_ledger(redis_url, prefix)
    await alive.heartbeat()
    assert await alive.sweep() == (0, 0)
    # Poll until the dead owner's heartbeat (TTL 1.5 s) has expired and its hold is swept.
    deadline = time.monotonic() + 5
    while (swept := await alive.sweep()) == (0, 0) and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    count, amount = swept
    assert count == 1 and amount == state.held
    after = await alive.get_account(account.id)
    assert (after.balance, after.held, after.spent) == (90, 0, 10)
    # A late settle of the swept reservation charges what was delivered, from the balance.
    await dead.heartbeat()
    with pytest.raises(LedgerUnavailable):
        await dead.lease(account.id, meter.rid, charged_target=10, want=5, minimum=1)
    bill = await dead.settle(account.id, meter.rid, charged_target=12)
    assert (bill.charged, bill.returned, bill.shortfall) == (12, 0, 0)
    final = await alive.get_account(account.id)
    assert (final.balance, final.held, final.spent) == (88, 0, 12)
    await dead.redis.aclose()
    await alive.redis.aclose()


async def test_settle_takes_reported_excess_from_balance_never_negative(redis_url: str) -> None:
    ledger = make_ledger(redis_url)
    await ledger.heartbeat()
    account, _ = await ledger.create_account(20)
    meter = StreamMeter(ledger, account.id, ONE_PER_TOKEN, lease_tokens=5)
    await meter.open(0)
    meter.delivered_tokens(meter.take(5))
    bill = await meter.close(Outcome.COMPLETED, reported_input=0, reported_output=30)
    assert bill.charged == 20 and bill.shortfall == 10
    state = await ledger.get_account(account.id)
    assert (state.balance, state.held, state.spent, state.shortfall) == (0, 0, 20, 10)
    await ledger.redis.aclose()


async def test_unreachable_redis_fails_closed() -> None:
    client = aioredis.Redis.from_url("redis://127.0.0.1:1", socket_connect_timeout=0.5)
    ledger = Ledger(client, prefix="x:")
    with pytest.raises(LedgerUnavailable):
        await ledger.heartbeat()
    with pytest.raises(LedgerUnavailable):
        await ledger.lease("a", "r", charged_target=0, want=1, minimum=1)
    assert not ledger.is_alive()
    await client.aclose()


async def test_pause_policy_resumes_when_money_arrives(redis_url: str) -> None:
    """Without credit notices the paused meter re-checks the balance every poll_interval."""
    ledger = make_ledger(redis_url)
    await ledger.heartbeat()
    account, _ = await ledger.create_account(10)
    meter = StreamMeter(ledger, account.id, ONE_PER_TOKEN, lease_tokens=4,
                        policy=Policy.PAUSE, pause_timeout=5, poll_interval=0.05)
    await meter.open(0)
    while (granted := await meter.acquire(1)) == 1:
        meter.delivered_tokens(granted)
    assert meter.delivered == 10
    loop = asyncio.get_running_loop()
    waiting = asyncio.create_task(meter.wait_for(3, until=time.monotonic() + 10))
    await asyncio.sleep(0.2)
    assert not waiting.done()  # nothing to grant: it waits
    await ledger.credit(account.id, 5)
    started = loop.time()
    assert await asyncio.wait_for(waiting, 5) == 3
    assert loop.time() - started < 1.0  # found by the next re-check
    meter.delivered_tokens(3)
    # Part of what is asked can be paid: granted at once, without waiting for the rest.
    assert await meter.wait_for(5, until=time.monotonic() + 5) == 2
    meter.delivered_tokens(2)
    # Nothing more arrives: the pause ends at its deadline with nothing granted.
    started = loop.time()
    assert await meter.wait_for(1, until=time.monotonic() + 0.3) == 0
    assert loop.time() - started >= 0.3
    await meter.close(Outcome.CUT)
    state = await ledger.get_account(account.id)
    assert (state.balance, state.held, state.spent) == (0, 0, 15)
    await ledger.redis.aclose()


async def test_key_cache_bounds_revocation_delay(redis_url: str) -> None:
    prefix = new_prefix()
    here = make_ledger(redis_url, prefix)
    here.key_cache_seconds = 0.4
    there = make_ledger(redis_url, prefix)
    account, key = await here.create_account(1)
    assert await here.authenticate(key) == account.id      # looked up, now cached
    await there.rotate_key(account.id)                      # revoked by another process
    cached_at = time.monotonic()
    assert await here.authenticate(key) == account.id      # trusted until the cache expires
    deadline = cached_at + 5
    while await here.authenticate(key) is not None and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert await here.authenticate(key) is None
    assert time.monotonic() - cached_at >= 0.3  # it was trusted for (about) the cache time
    new_key = await here.rotate_key(account.id)             # revoked here: at once
    assert await here.authenticate(new_key) == account.id
    assert await here.rotate_key(account.id) and await here.authenticate(new_key) is None
    await here.redis.aclose()
    await there.redis.aclose()


async def test_a_lapsed_heartbeat_makes_meters_recheck_their_hold(redis_url: str) -> None:
    """A process whose heartbeat lapsed may have had its holds swept; once it beats again,
    its meters grant nothing from a lease before a Redis call shows the hold still stands."""
    prefix = new_prefix()
    slow = make_ledger(redis_url, prefix, ttl=1.5)
    account, _ = await slow.create_account(100)
    meter = StreamMeter(slow, account.id, ONE_PER_TOKEN, lease_tokens=40)
    await slow.heartbeat()  # just before the grants: a loaded machine is slow
    await meter.open(0)
    meter.delivered_tokens(meter.take(5))
    # The process stalls past its TTL; another process sweeps its hold.
    sweeper = make_ledger(redis_url, prefix)
    await sweeper.heartbeat()
    deadline = time.monotonic() + 5
    while (swept := await sweeper.sweep()) == (0, 0) and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert swept[0] == 1
    # The stalled process wakes up and proves liveness again: the lease it still remembers
    # (35 tokens) must not be handed out.
    await slow.heartbeat()
    assert slow.is_alive() and meter.take(5) == 0
    with pytest.raises(LedgerUnavailable):
        await meter.acquire(5)
    state = await sweeper.get_account(account.id)
    assert (state.balance, state.held, state.spent) == (100, 0, 0)
    await slow.redis.aclose()
    await sweeper.redis.aclose()


async def test_a_heartbeat_lapse_during_a_lease_call_is_no_exhausted_allowance(
        redis_url: str) -> None:
    """The keeper may prove liveness again (a new epoch) while a meter's lease call is in
    flight; the meter must confirm its hold once more, not end the stream as if broke."""
    ledger = make_ledger(redis_url)
    await ledger.heartbeat()
    account, _ = await ledger.create_account(1000)
    meter = StreamMeter(ledger, account.id, ONE_PER_TOKEN, lease_tokens=4)
    await meter.open(0)
    meter.delivered_tokens(meter.take(4))
    lease = ledger.lease
    calls = 0

    async def lapsing_lease(*args: Any, **kwargs: Any) -> Any:
        nonlocal calls
        calls += 1
        result = await lease(*args, **kwargs)
        if calls == 1:  # the heartbeat key expired and was set again meanwhile
            await ledger.redis.delete(f"{ledger.prefix}alive:{{{ledger.owner}}}")
            await ledger.heartbeat()
        return result

    ledger.lease = lapsing_lease  # type: ignore[method-assign]
    assert await meter.acquire(3) == 3 and calls == 2
    meter.delivered_tokens(3)
    await meter.close(Outcome.CUT)
    state = await ledger.get_account(account.id)
    assert (state.balance, state.held, state.spent) == (993, 0, 7)
    await ledger.redis.aclose()
