"""Credit notices: money entering an account wakes the streams paused on it, in any process,
through Redis pub/sub (not by polling), and a lost subscription only delays the wake-up."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest

from meters.channels import Channels, account_of
from meters.ledger import Ledger
from meters.meter import Outcome, Policy, StreamMeter
from meters.notices import CreditNotices
from tests.test_ledger import ONE_PER_TOKEN, make_ledger

pytestmark = pytest.mark.timeout(30)


async def waiting_on(notices: CreditNotices, account_id: str) -> None:
    """Until a meter waits on ``account_id`` (bounded)."""
    deadline = time.monotonic() + 5
    while account_id not in notices._waiters:
        assert time.monotonic() < deadline, "the meter never waited"
        await asyncio.sleep(0.01)


async def exhausted(ledger: Ledger, account_id: str, notices: CreditNotices | None,
                    poll_interval: float = 60.0) -> StreamMeter:
    """A paused-policy meter that has spent its whole balance."""
    meter = StreamMeter(ledger, account_id, ONE_PER_TOKEN, lease_tokens=4,
                        policy=Policy.PAUSE, pause_timeout=30, poll_interval=poll_interval,
                        notices=notices)
    await meter.open(0)
    while await meter.acquire(1) == 1:
        meter.delivered_tokens(1)
    return meter


@pytest.fixture
async def pair(redis_url: str) -> AsyncIterator[tuple[Ledger, Ledger, CreditNotices]]:
    """Two ledgers on one prefix, as two gateway processes; the first one listens (its
    re-check period is far beyond the test's bound, so only a message can wake it)."""
    here = make_ledger(redis_url)
    there = make_ledger(redis_url, prefix=here.prefix)
    await here.heartbeat()
    notices = CreditNotices(here, recheck_seconds=600)
    await notices.start()
    yield here, there, notices
    await notices.stop()
    await here.redis.aclose()
    await there.redis.aclose()


async def test_a_credit_in_another_process_wakes_the_paused_meter(
        pair: tuple[Ledger, Ledger, CreditNotices]) -> None:
    here, there, notices = pair
    account, _ = await here.create_account(3)
    meter = await exhausted(here, account.id, notices)
    waiting = asyncio.create_task(meter.wait_for(2, until=time.monotonic() + 20))
    await waiting_on(notices, account.id)
    before = notices.received
    await there.credit(account.id, 5)
    started = time.monotonic()
    assert await asyncio.wait_for(waiting, 10) == 2
    assert time.monotonic() - started < 2.0 and notices.received > before
    meter.delivered_tokens(2)
    assert account.id not in notices._waiters  # the watch is gone with the wait
    bill = await meter.close(Outcome.CUT)
    assert bill.charged == 5


async def test_a_voucher_wakes_the_paused_meter(
        pair: tuple[Ledger, Ledger, CreditNotices]) -> None:
    here, there, notices = pair
    channel_id = "0x" + "ab" * 32
    channels = Channels(there)
    await channels.open(channel_id, payer="0x1", signer="0x1", token="0x2", deposit=100)
    assert (await channels.accept(channel_id, 3, "0xsig3", min_delta=1))[1] == 3
    meter = await exhausted(here, account_of(channel_id), notices)
    waiting = asyncio.create_task(meter.wait_for(1, until=time.monotonic() + 20))
    await waiting_on(notices, account_of(channel_id))
    await channels.accept(channel_id, 10, "0xsig10", min_delta=1)
    assert await asyncio.wait_for(waiting, 10) == 1
    meter.delivered_tokens(1)
    await meter.close(Outcome.CUT)
    assert (await here.get_account(account_of(channel_id))).spent == 4


async def test_other_accounts_credits_do_not_wake_it(
        pair: tuple[Ledger, Ledger, CreditNotices]) -> None:
    here, there, notices = pair
    account, _ = await here.create_account(1)
    other, _ = await here.create_account(0)
    meter = await exhausted(here, account.id, notices)
    waiting = asyncio.create_task(meter.wait_for(1, until=time.monotonic() + 20))
    await waiting_on(notices, account.id)
    before = notices.received
    await there.credit(other.id, 5)
    deadline = time.monotonic() + 5
    while notices.received == before:  # the other account's notice arrived here ...
        assert time.monotonic() < deadline
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.1)
    assert not waiting.done()  # ... and woke nothing
    await there.credit(account.id, 1)
    assert await asyncio.wait_for(waiting, 10) == 1
    meter.delivered_tokens(1)
    await meter.close(Outcome.CUT)


async def test_without_a_subscription_the_recheck_finds_the_credit(redis_url: str) -> None:
    ledger = make_ledger(redis_url)
    await ledger.heartbeat()
    notices = CreditNotices(ledger, recheck_seconds=0.2)  # never started: no messages
    account, _ = await ledger.create_account(1)
    meter = await exhausted(ledger, account.id, notices)
    waiting = asyncio.create_task(meter.wait_for(1, until=time.monotonic() + 20))
    await waiting_on(notices, account.id)
    await ledger.credit(account.id, 1)
    assert await asyncio.wait_for(waiting, 5) == 1
    meter.delivered_tokens(1)
    await meter.close(Outcome.CUT)
    await ledger.redis.aclose()


async def test_a_credit_another_stream_took_ends_the_wait_to_ask_again(
        pair: tuple[Ledger, Ledger, CreditNotices]) -> None:
    """Two streams paused on one account, one credit that pays one lease: one stream takes
    it, and the other's wait returns at once with nothing, so that its relay asks again for
    what is needed now. Waiting on silently until its pause timeout, it starved: nothing else
    would ask the payer for more (seen: an MPP session stream among four on one channel cut
    after its first voucher's worth, the client never asked again)."""
    here, there, notices = pair
    account, _ = await here.create_account(8)
    meters = [StreamMeter(here, account.id, ONE_PER_TOKEN, lease_tokens=4,
                          policy=Policy.PAUSE, pause_timeout=30, poll_interval=60,
                          notices=notices) for _ in range(2)]
    for meter in meters:
        await meter.open(0)
    for meter in meters:
        while await meter.acquire(1) == 1:
            meter.delivered_tokens(1)
    until = time.monotonic() + 30
    waits = [asyncio.create_task(meter.wait_for(1, until=until)) for meter in meters]
    deadline = time.monotonic() + 5
    while len(notices._waiters.get(account.id, ())) < 2:
        assert time.monotonic() < deadline, "the meters never waited"
        await asyncio.sleep(0.01)
    await there.credit(account.id, 4)  # one lease's worth
    got = await asyncio.wait_for(asyncio.gather(*waits), 10)
    assert sorted(got) == [0, 1]
    assert time.monotonic() < until - 15  # the one left out did not sit out its deadline
    for meter, granted in zip(meters, got, strict=True):
        meter.delivered_tokens(granted)
        await meter.close(Outcome.CUT)
    state = await here.get_account(account.id)
    assert (state.spent, state.held, state.balance) == (9, 0, 3)
