"""Resource limits: the open-file soft limit raised at start-up, a bounded Redis pool, and a
503 with a code (never a 500) when a connection or a file descriptor cannot be had."""

from __future__ import annotations

import asyncio
import resource
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from gateway.embedded import start_valkey
from tests.conftest import RunningGateway, assert_money_invariant, new_prefix
from tests.test_workers import ADMIN, MESSAGES, serve_process, write_config

pytestmark = pytest.mark.timeout(120)


def nofile(soft: int, hard: int | None = None) -> Callable[[], None]:
    """A preexec function setting the child's open-file limits."""
    def apply() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, soft if hard is None else hard))
    return apply


async def paced(url: str, key: str, count: int, *, tokens: int = 20, per_second: int = 10
                ) -> list[tuple[int, str, bool]]:
    """``count`` concurrent paced streams: (status, error code, saw [DONE]) each."""
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=0)
    async with httpx.AsyncClient(timeout=60, limits=limits) as http:
        async def one() -> tuple[int, str, bool]:
            async with http.stream(
                    "POST", f"{url}/v1/chat/completions",
                    headers={"authorization": f"Bearer {key}",
                             "x-sim-tokens-per-second": str(per_second)},
                    json={"model": "exact", "messages": MESSAGES, "stream": True,
                          "max_tokens": tokens}) as response:
                body = await response.aread()
                code = "" if response.status_code == 200 else response.json()["error"]["code"]
                return response.status_code, code, b"[DONE]" in body
        return list(await asyncio.gather(*(one() for _ in range(count))))


def check(results: list[tuple[int, str, bool]], codes: set[str]) -> int:
    """Every answer a complete 200 or a 503 with one of ``codes``; returns the 503s."""
    refused = 0
    for status, code, done in results:
        assert status in (200, 503), (status, code)
        if status == 200:
            assert done
        else:
            assert code in codes
            refused += 1
    assert refused < len(results)  # the gateway kept serving
    return refused


def proc_limits(pid: int) -> tuple[int, int]:
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            soft, hard = line.split()[3:5]
            return int(soft), int(hard)
    raise AssertionError("no open-file limit in /proc")


@pytest.fixture
def prefix() -> str:
    return new_prefix()


def test_the_soft_open_file_limit_is_raised_to_the_hard_limit(
        sim: str, redis_url: str, prefix: str, tmp_path: Path) -> None:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard <= 512:
        pytest.skip("needs a finite hard limit above 512")
    config = write_config(tmp_path / "c.toml", sim, redis_url=redis_url, key_prefix=prefix)
    with serve_process(config, preexec=nofile(512, hard)) as (_, proc, err):
        assert proc_limits(proc.pid) == (hard, hard)
        assert f"open files: soft limit raised from 512 to {hard}" in err.read_text()


def test_a_tiny_fd_limit_gives_503_overloaded_never_500(
        sim: str, redis_url: str, prefix: str, tmp_path: Path) -> None:
    # 96 descriptors, a pool of 4: (96 - 64 reserved - 4) / 2 = 14 streams at once.
    config = write_config(tmp_path / "c.toml", sim, redis_url=redis_url, key_prefix=prefix,
                          redis_max_connections=4)
    with serve_process(config, preexec=nofile(96)) as (url, proc, err):
        assert proc_limits(proc.pid) == (96, 96)
        key = httpx.post(f"{url}/admin/accounts", headers=ADMIN,
                         json={"balance": "100000"}).json()["api_key"]
        results = asyncio.run(paced(url, key, 60))
        # Most are refused (only 14 fit); how many exactly depends on how fast the
        # connections arrive, and on accept() itself running out of descriptors meanwhile.
        assert check(results, {"overloaded"}) >= 1
        log = err.read_text()
    assert "at most 14 concurrent requests" in log
    assert "Exception in ASGI application" not in log
    with redis.Redis.from_url(redis_url) as client:
        assert_money_invariant(client, [prefix], grace=5)
        assert not list(client.scan_iter(f"{prefix}res:*"))


def test_a_tiny_redis_pool_gives_503_ledger_unavailable_never_500(
        sim: str, tmp_path: Path) -> None:
    """Two connections (one is the credit notices' subscription) and a 50 ms wait for one:
    while Redis is paused, every request but the one holding the connection fails closed."""
    server = start_valkey(Path(tempfile.mkdtemp(prefix="tollstream-pool-")))
    try:
        prefix = "pool:"
        config = write_config(tmp_path / "c.toml", sim, redis_url=server.connection_url,
                              key_prefix=prefix, redis_max_connections=2,
                              redis_pool_timeout_seconds=0.05, key_cache_seconds=0,
                              reservation_ttl_seconds=8.0)
        with serve_process(config) as (url, _, err), \
                redis.Redis.from_url(server.connection_url) as client:
            key = httpx.post(f"{url}/admin/accounts", headers=ADMIN,
                             json={"balance": "100000"}).json()["api_key"]
            client.execute_command("CLIENT", "PAUSE", "2000", "ALL")
            results = asyncio.run(paced(url, key, 10, tokens=5, per_second=50))
            assert check(results, {"ledger_unavailable"}) >= 1
            assert "Exception in ASGI application" not in err.read_text()
            assert_money_invariant(client, [prefix], grace=5)
    finally:
        server.stop()


@pytest.fixture
def capped(gateway_factory: Callable[..., Any]) -> Iterator[RunningGateway]:
    with gateway_factory(max_concurrent_requests=2) as running:
        yield running


def test_past_max_concurrent_requests_a_request_gets_503_overloaded(
        capped: RunningGateway) -> None:
    account, key = capped.create_account(10_000)

    async def main() -> tuple[list[tuple[int, str, bool]], list[httpx.Response]]:
        started = [asyncio.Event(), asyncio.Event()]
        async with httpx.AsyncClient(timeout=30) as http:
            async def running(i: int) -> tuple[int, str, bool]:
                async with http.stream(
                        "POST", f"{capped.url}/v1/chat/completions",
                        headers={"authorization": f"Bearer {key}",
                                 "x-sim-tokens-per-second": "20"},
                        json={"model": "exact", "messages": MESSAGES, "stream": True,
                              "max_tokens": 30}) as response:
                    body = b""
                    async for chunk in response.aiter_bytes():
                        body += chunk
                        started[i].set()
                    return response.status_code, "", b"[DONE]" in body
            streams = [asyncio.create_task(running(i)) for i in range(2)]
            await asyncio.wait_for(asyncio.gather(*(e.wait() for e in started)), 20)
            refused = [await http.get(f"{capped.url}/v1/models") for _ in range(3)]
            return list(await asyncio.gather(*streams)), refused

    done, refused = asyncio.run(main())
    assert done == [(200, "", True)] * 2
    for response in refused:
        assert response.status_code == 503
        assert response.json()["error"]["code"] == "overloaded"
        assert response.headers["retry-after"] == "1"
    # Once the streams are done, requests are admitted again.
    assert httpx.get(f"{capped.url}/v1/models", timeout=10).status_code == 200
    assert capped.balance(account)["spent"] == "60"
