"""Per-client rate limits on failed authentication and on 402 challenges (#7 item 13)."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from tests.conftest import RunningGateway

pytestmark = pytest.mark.timeout(60)

Factory = Callable[..., contextlib.AbstractContextManager[RunningGateway]]
BODY = {"model": "exact", "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]}
#: Small limits so a test meets them: 3 failures at once, then one every 5 s (slow enough
#: that a busy machine never refills a bucket between one test's requests).
TIGHT = {"auth_failures_burst": 3, "auth_failures_per_second": 0.2,
         "challenges_burst": 3, "challenges_per_second": 0.2}


def chat(gw: RunningGateway, key: str, **headers: str) -> httpx.Response:
    return httpx.post(f"{gw.url}/v1/chat/completions", json=BODY, timeout=10,
                      headers={"authorization": f"Bearer {key}", **headers})


def wait_until_allowed(call: Callable[[], httpx.Response], timeout: float = 5.0
                       ) -> httpx.Response:
    deadline = time.monotonic() + timeout
    while True:
        response = call()
        if response.status_code != 429 or time.monotonic() > deadline:
            return response
        time.sleep(0.05)


def test_key_guessing_is_stopped_before_the_key_is_looked_at(gateway_factory: Factory
                                                              ) -> None:
    # One failure back every 2 s: the checks below run well within it, even on a busy machine.
    with gateway_factory(rate_limit={**TIGHT, "auth_failures_per_second": 0.5}) as gw:
        _, good = gw.create_account(100)
        statuses = [chat(gw, f"tsk_guess{i}").status_code for i in range(4)]
        assert statuses == [401, 401, 401, 429]
        limited = chat(gw, "tsk_guess-more")
        assert limited.status_code == 429
        assert limited.json()["error"]["code"] == "rate_limited"
        assert int(limited.headers["Retry-After"]) >= 1
        # While limited, even a valid key gets no answer that tells it apart from a wrong one.
        assert chat(gw, good).status_code == 429
        # The bucket refills: the valid key works again without any wait in this test.
        assert wait_until_allowed(lambda: chat(gw, good)).status_code == 200


def test_limits_are_per_client(gateway_factory: Factory) -> None:
    settings: dict[str, Any] = {**TIGHT, "client_header": "x-forwarded-for"}
    with gateway_factory(rate_limit=settings) as gw:
        _, good = gw.create_account(100)
        for i in range(4):
            chat(gw, f"tsk_bad{i}", **{"x-forwarded-for": "203.0.113.7"})
        assert chat(gw, "tsk_bad", **{"x-forwarded-for": "203.0.113.7"}).status_code == 429
        assert chat(gw, good, **{"x-forwarded-for": "198.51.100.1, 10.0.0.1"}
                    ).status_code == 200


def test_limits_are_shared_by_gateway_processes_on_one_redis(gateway_factory: Factory
                                                             ) -> None:
    with gateway_factory(rate_limit=TIGHT) as first, \
            gateway_factory(rate_limit=TIGHT, key_prefix=first.settings.key_prefix) as second:
        assert [chat(first, f"tsk_x{i}").status_code for i in range(3)] == [401] * 3
        assert chat(second, "tsk_y").status_code == 429  # the bucket is in Redis


def test_challenge_floods_are_limited(gateway_factory: Factory) -> None:
    with gateway_factory(rate_limit=TIGHT) as gw:
        account, broke = gw.create_account(0)
        statuses = [chat(gw, broke).status_code for _ in range(4)]
        assert statuses == [402, 402, 402, 429]
        assert gw.balance(account)["spent"] == "0"


def test_admin_token_guessing_is_limited(gateway_factory: Factory) -> None:
    with gateway_factory(rate_limit=TIGHT) as gw:
        statuses = [httpx.post(f"{gw.url}/admin/accounts", json={"balance": "1"}, timeout=10,
                               headers={"authorization": f"Bearer guess-{i}"}).status_code
                    for i in range(4)]
        assert statuses == [401, 401, 401, 429]


def test_well_behaved_clients_never_meet_the_default_limits(gateway_factory: Factory) -> None:
    with gateway_factory() as gw:
        _, good = gw.create_account(1_000)
        assert all(chat(gw, good).status_code == 200 for _ in range(40))
        # A few typos in a key are not an attack.
        assert all(chat(gw, "tsk_typo").status_code == 401 for _ in range(10))


def test_rate_limits_can_be_turned_off(gateway_factory: Factory) -> None:
    with gateway_factory(rate_limit={**TIGHT, "enabled": False}) as gw:
        assert all(chat(gw, f"tsk_{i}").status_code == 401 for i in range(10))
