"""The money invariant check that runs after every test cannot pass vacuously: it finds the
accounts, and it catches a corrupted account, a negative amount and a leaked hold, naming the
account and its fields. The check is called directly here; every corruption is undone before
the test ends, so the autouse check after this test passes too."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator

import pytest
import redis

from meters.connection import connect
from meters.ledger import Ledger
from meters.meter import Outcome, StreamMeter
from meters.money import Asset
from meters.rates import Rate
from tests.conftest import (
    MoneyInvariantError,
    account_keys,
    assert_money_invariant,
    new_prefix,
)

pytestmark = pytest.mark.timeout(30)

ONE_PER_TOKEN = Rate.parse(Asset(), input_per_mtok="0", output_per_mtok="1")


@pytest.fixture
def sync_redis(redis_url: str) -> Iterator[redis.Redis]:
    with redis.Redis.from_url(redis_url) as client:
        yield client


async def test_the_check_finds_accounts_and_catches_corruption(redis_url: str,
                                                              sync_redis: redis.Redis) -> None:
    prefix = new_prefix()
    ledger = Ledger(connect(redis_url), prefix=prefix)
    try:
        account, _ = await ledger.create_account(100)
        other, _ = await ledger.create_account(7)
        key = f"{prefix}acct:{{{account.id}}}"
        # Found under its prefix; the set of API key hashes next to it is not an account.
        assert account_keys(sync_redis, [prefix]) == {key, f"{prefix}acct:{{{other.id}}}"}
        assert sync_redis.exists(f"{key}:keys")
        assert_money_invariant(sync_redis, [prefix])

        # Money appears from nowhere: balance + held + spent != credited.
        sync_redis.hincrby(key, "balance", 5)
        with pytest.raises(MoneyInvariantError) as info:
            assert_money_invariant(sync_redis, [prefix])
        message = str(info.value)
        assert account.id in message and other.id not in message
        assert "balance + held + spent = 105 != credited 100" in message
        assert "balance=105, held=0, spent=0, credited=100, shortfall=0" in message
        # Also caught when the account is only named, not found under a prefix.
        with pytest.raises(MoneyInvariantError):
            assert_money_invariant(sync_redis, [], [key])
        sync_redis.hincrby(key, "balance", -5)

        # Money moved out of the balance into nowhere.
        sync_redis.hincrby(key, "spent", 3)
        with pytest.raises(MoneyInvariantError, match=r"= 103 != credited 100"):
            assert_money_invariant(sync_redis, [prefix])
        sync_redis.hincrby(key, "spent", -3)

        # A negative balance balanced by an inflated hold keeps the sum but is still wrong.
        sync_redis.hincrby(key, "balance", -150)
        sync_redis.hincrby(key, "held", 150)
        with pytest.raises(MoneyInvariantError, match="a negative amount"):
            assert_money_invariant(sync_redis, [prefix], allow_holds=True)
        sync_redis.hincrby(key, "balance", 150)
        sync_redis.hincrby(key, "held", -150)

        # A field that is not a number is reported, not crashed on.
        sync_redis.hset(key, "spent", "lots")
        with pytest.raises(MoneyInvariantError, match="not an integer"):
            assert_money_invariant(sync_redis, [prefix])
        sync_redis.hset(key, "spent", 0)
        assert_money_invariant(sync_redis, [prefix])
    finally:
        await ledger.redis.aclose()


async def test_the_check_catches_a_hold_left_behind(redis_url: str,
                                                   sync_redis: redis.Redis) -> None:
    prefix = new_prefix()
    ledger = Ledger(connect(redis_url), prefix=prefix)
    await ledger.heartbeat()
    account, _ = await ledger.create_account(50)
    meter = StreamMeter(ledger, account.id, ONE_PER_TOKEN, lease_tokens=8)
    try:
        await meter.open(0)
        meter.delivered_tokens(meter.take(3))
        # The sum is right, so a crash test may leave this ...
        assert_money_invariant(sync_redis, [prefix], allow_holds=True)
        # ... but any other test is told which account and which reservation hold money,
        # after waiting out the grace period for a final charge still on its way.
        started = time.monotonic()
        with pytest.raises(MoneyInvariantError) as info:
            assert_money_invariant(sync_redis, [prefix], grace=0.3)
        assert time.monotonic() - started >= 0.3
        assert f"{prefix}acct:{{{account.id}}}: still holds 8" in str(info.value)
        assert "held=8" in str(info.value)
        # The reservation itself is named once the account-level check is clean.
        sync_redis.hincrby(f"{prefix}acct:{{{account.id}}}", "held", -8)
        sync_redis.hincrby(f"{prefix}acct:{{{account.id}}}", "balance", 8)
        with pytest.raises(MoneyInvariantError, match=re.escape(
                f"res:{{{account.id}}}:{meter.rid}: reservation of {account.id} still "
                "holds 8")):
            assert_money_invariant(sync_redis, [prefix])
        sync_redis.hincrby(f"{prefix}acct:{{{account.id}}}", "held", 8)
        sync_redis.hincrby(f"{prefix}acct:{{{account.id}}}", "balance", -8)
    finally:
        bill = await meter.close(Outcome.DISCONNECTED)
        await ledger.redis.aclose()
    assert bill.charged == 3
    assert_money_invariant(sync_redis, [prefix])


def test_every_test_runs_the_check(request: pytest.FixtureRequest) -> None:
    assert "money_invariant" in request.fixturenames
