"""Fault injection into the remote facilitator client (:class:`RemoteFacilitator`).

The facilitator is real (tollstream's own, on uvicorn, settling on the dev chain); an HTTP
proxy in front of it alters or replaces its answers: another payer, garbage, 5xx, no answer.
Each is the right gateway error, never a raw exception.
"""

from __future__ import annotations

import json
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest
import pytest_asyncio

from gateway.chain.devchain import DevChain
from gateway.errors import ServiceUnavailable, UpstreamError
from gateway.rails.evm import EvmNetwork, EvmSettler
from gateway.rails.facilitator import create_facilitator_app
from gateway.rails.facilitator_client import RemoteFacilitator
from gateway.rails.x402_challenge import exact_requirements
from tests.chain_fixtures import *  # noqa: F403  (session fixtures: chain, evm_network, settler)
from tests.chain_fixtures import PAY_TO, Raw, make_auth, new_account, new_payer, payment, reply
from tests.servers import serve

pytestmark = pytest.mark.timeout(60)


ProxyHook = Callable[[bytes, Callable[[], Raw]], Raw]


class HttpProxy:
    """An HTTP proxy on loopback in front of a facilitator: ``hooks[path]`` gets the request
    body and a ``forward`` function and returns the answer (forwarded, altered, replaced)."""

    def __init__(self, upstream: str) -> None:
        self.hooks: dict[str, ProxyHook] = {}
        self.released = threading.Event()
        client = httpx.Client(timeout=60)
        self._client = client
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def _any(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))

                def forward() -> Raw:
                    r = client.request(self.command, upstream + self.path, content=body,
                                       headers={"content-type": "application/json"})
                    return Raw(r.status_code, r.content, r.headers.get("content-type", ""))
                hook = proxy.hooks.get(self.path)
                reply(self, hook(body, forward) if hook else forward())

            do_GET = do_POST = _any

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,),
                                        daemon=True)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"

    def __enter__(self) -> HttpProxy:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.released.set()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)
        self._client.close()


@pytest.fixture(scope="module")
def facilitator_url(evm_network: EvmNetwork) -> Iterator[str]:
    with serve(create_facilitator_app(EvmSettler(), [evm_network])) as url:
        yield url


@pytest_asyncio.fixture
async def remote(facilitator_url: str) -> AsyncIterator[tuple[HttpProxy, RemoteFacilitator]]:
    with HttpProxy(facilitator_url) as proxy:
        client = RemoteFacilitator(proxy.url, timeout=2.0)
        yield proxy, client
        await client.aclose()


def _json_hook(change: Callable[[dict[str, Any]], None]) -> ProxyHook:
    def hook(body: bytes, forward: Callable[[], Raw]) -> Raw:
        answer = forward()
        data = json.loads(answer.body)
        change(data)
        return Raw(answer.status, json.dumps(data).encode())
    return hook


async def test_remote_reports_a_different_payer(
        remote: tuple[HttpProxy, RemoteFacilitator], chain: DevChain,
        evm_network: EvmNetwork, settler: EvmSettler) -> None:
    """A facilitator naming another payer is not believed. After /settle the money did move
    (the real facilitator settled): the error carries the transaction to reconcile."""
    proxy, client = remote
    other = new_account(chain).address
    proxy.hooks["/verify"] = proxy.hooks["/settle"] = _json_hook(
        lambda data: data.update(payer=other))
    requirements = exact_requirements(evm_network, amount=3_000, pay_to=PAY_TO)
    key = new_payer(chain, 3_000)
    paid = payment(make_auth(evm_network, key, value=3_000), requirements)
    with pytest.raises(UpstreamError, match="different payer"):
        await client.verify(paid, requirements)
    with pytest.raises(UpstreamError, match="different payer") as info:
        await client.settle(paid, requirements)
    status = await settler.transaction_status(info.value.extra["transaction"], evm_network)
    assert status.state == "success"


HASH = "0x" + "ab" * 32
GARBAGE: list[tuple[str, str, Raw]] = [
    ("html", "/verify", Raw(200, b"<html>oops</html>", "text/html")),
    ("json-list", "/verify", Raw(200, b"[1, 2]")),
    ("wrong-types", "/verify", Raw(200, b'{"isValid": "maybe"}')),
    ("bad-gzip", "/verify", Raw(200, b"definitely not gzip", headers={
        "Content-Encoding": "gzip"})),
    ("nested", "/verify", Raw(200, b"[" * 100_000 + b"]" * 100_000)),
    ("no-hash", "/settle", Raw(200, b'{"success": true, "transaction": "", "network": ""}')),
    ("short-hash", "/settle", Raw(200, b'{"success": true, "transaction": "0x1234", '
                                       b'"network": "eip155:31337"}')),
    ("other-network", "/settle", Raw(200, json.dumps({
        "success": True, "transaction": HASH, "network": "eip155:1"}).encode())),
    ("http-500", "/settle", Raw(500, b"internal error", "text/plain")),
    ("http-501", "/verify", Raw(501, b"")),
]


@pytest.mark.parametrize(("name", "path", "answer"), GARBAGE, ids=[g[0] for g in GARBAGE])
async def test_remote_garbage_is_upstream_error(
        name: str, path: str, answer: Raw, remote: tuple[HttpProxy, RemoteFacilitator],
        chain: DevChain, evm_network: EvmNetwork) -> None:
    proxy, client = remote
    proxy.hooks[path] = lambda body, forward: answer
    requirements = exact_requirements(evm_network, amount=1_000, pay_to=PAY_TO)
    paid = payment(make_auth(evm_network, chain.wallets[0].private_key,
                                          value=1_000), requirements)
    call = client.verify if path == "/verify" else client.settle
    with pytest.raises(UpstreamError) as info:
        await call(paid, requirements)
    assert type(info.value) is UpstreamError and info.value.status == 502


@pytest.mark.parametrize("status", [502, 503, 504])
async def test_remote_unavailable(status: int, remote: tuple[HttpProxy, RemoteFacilitator],
                                  chain: DevChain, evm_network: EvmNetwork) -> None:
    """The facilitator, or a proxy in front of it, is down: retry later (503)."""
    proxy, client = remote
    proxy.hooks["/verify"] = proxy.hooks["/settle"] = lambda body, forward: Raw(status)
    requirements = exact_requirements(evm_network, amount=1_000, pay_to=PAY_TO)
    paid = payment(make_auth(evm_network, chain.wallets[0].private_key,
                                          value=1_000), requirements)
    for call in (client.verify, client.settle):
        with pytest.raises(ServiceUnavailable):
            await call(paid, requirements)


async def test_remote_timeout(remote: tuple[HttpProxy, RemoteFacilitator], chain: DevChain,
                              evm_network: EvmNetwork) -> None:
    proxy, client = remote

    def stall(body: bytes, forward: Callable[[], Raw]) -> Raw:
        proxy.released.wait(10)  # past the client's 2 s timeout
        return Raw(504)
    proxy.hooks["/verify"] = proxy.hooks["/settle"] = stall
    requirements = exact_requirements(evm_network, amount=1_000, pay_to=PAY_TO)
    paid = payment(make_auth(evm_network, chain.wallets[0].private_key,
                                          value=1_000), requirements)
    for call in (client.verify, client.settle):
        with pytest.raises(ServiceUnavailable, match="timed out"):
            await call(paid, requirements)
