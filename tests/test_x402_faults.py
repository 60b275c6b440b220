"""Fault injection into x402 settlement: the remote facilitator client, and deposits.

* :class:`RemoteFacilitator` in front of a real facilitator (tollstream's own, on uvicorn,
  settling on the dev chain) through an HTTP proxy that alters or replaces its answers: another
  payer, garbage, 5xx, no answer. Each is the right gateway error, never a raw exception.
* :class:`X402Deposits` built from ``Settings`` on a real Valkey and the dev chain: recovery at
  start-up of claims left unfinished, and settlement failing after the claim (the chain faults
  come from :class:`~tests.chain_fixtures.RpcProxy`).
"""

from __future__ import annotations

import base64
import dataclasses
import json
import secrets
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest
import pytest_asyncio
from starlette.requests import Request

from gateway.chain.devchain import DevChain
from gateway.errors import PaymentRejected, ServiceUnavailable, UpstreamError
from gateway.rails.evm import (
    ERR_INSUFFICIENT_BALANCE,
    Eip3009Authorization,
    EvmNetwork,
    EvmSettler,
    SettlementNotSubmitted,
)
from gateway.rails.facilitator import LocalSettlement, RemoteFacilitator, create_facilitator_app
from gateway.rails.x402 import PaymentPayload, PaymentRequirements, exact_requirements
from gateway.rails.x402_deposits import X402Deposits, payer_account_id
from gateway.settings import Settings
from meters.deposits import Deposit
from meters.errors import AccountNotFound
from meters.ledger import Ledger, connect
from tests.chain_fixtures import *  # noqa: F403  (session fixtures: chain, evm_network, settler)
from tests.chain_fixtures import (
    PAY_TO,
    Raw,
    RpcProxy,
    cancel_authorization,
    make_auth,
    mint,
    new_account,
    relay_authorization,
    reply,
    rpc_error,
    rpc_result,
)
from tests.servers import serve

pytestmark = pytest.mark.timeout(60)

DEPOSIT = 200  # atomic units ("0.0002")


def payment(network: EvmNetwork, auth: Eip3009Authorization,
            requirements: PaymentRequirements) -> PaymentPayload:
    return PaymentPayload.model_validate({
        "x402Version": 2, "accepted": requirements.model_dump(by_alias=True),
        "payload": {"signature": auth.signature, "authorization": {
            "from": auth.from_, "to": auth.to, "value": str(auth.value),
            "validAfter": str(auth.valid_after), "validBefore": str(auth.valid_before),
            "nonce": auth.nonce}}})


def new_payer(chain: DevChain, tokens: int) -> str:
    return str(new_account(chain, tokens=tokens).key.to_0x_hex())


# =========================================================================== remote facilitator

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
    paid = payment(evm_network, make_auth(evm_network, key, value=3_000), requirements)
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
    paid = payment(evm_network, make_auth(evm_network, chain.wallets[0].private_key,
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
    paid = payment(evm_network, make_auth(evm_network, chain.wallets[0].private_key,
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
    paid = payment(evm_network, make_auth(evm_network, chain.wallets[0].private_key,
                                          value=1_000), requirements)
    for call in (client.verify, client.settle):
        with pytest.raises(ServiceUnavailable, match="timed out"):
            await call(paid, requirements)


# =========================================================================== deposits


def rail_settings(chain: DevChain, rpc_url: str) -> Settings:
    return Settings.from_mapping({
        "key_prefix": f"xf{secrets.token_hex(4)}:",
        "x402": {"enabled": True, "pay_to": PAY_TO, "deposit": "0.0002",
                 "networks": {"local": {
                     "network": chain.network, "chain_id": chain.chain_id, "rpc_url": rpc_url,
                     "asset": chain.token, "token_name": chain.token_name,
                     "token_version": chain.token_version,
                     "relayer_key": chain.relayer_key}}}})


@pytest_asyncio.fixture
async def ledger_for(redis_url: str) -> AsyncIterator[Callable[[Settings], Ledger]]:
    ledgers: list[Ledger] = []

    def make(settings: Settings) -> Ledger:
        ledgers.append(Ledger(connect(redis_url), prefix=settings.key_prefix))
        return ledgers[-1]
    yield make
    for ledger in ledgers:
        await ledger.redis.aclose()


def http_request() -> Request:
    """The request a deposit arrives with (pay() only reads its URL for the challenge)."""
    return Request({"type": "http", "method": "POST", "path": "/v1/chat/completions",
                    "raw_path": b"/v1/chat/completions", "query_string": b"", "root_path": "",
                    "headers": [(b"host", b"127.0.0.1:8402")], "scheme": "http",
                    "server": ("127.0.0.1", 8402)})


def short_timeouts(rail: X402Deposits, **timeouts: float) -> None:
    """Settings cannot set the RPC/receipt timeouts (see the report); rebuild the rail's
    networks and local settlement with ``timeouts`` so a fault fails within the test."""
    rail.networks = {k: dataclasses.replace(n, **timeouts) for k, n in rail.networks.items()}
    rail.settlement = LocalSettlement(rail.settler, list(rail.networks.values()))


async def claim(rail: X402Deposits, network: EvmNetwork, auth: Eip3009Authorization) -> str:
    """What a process does before settling (verify passed, claim written), then dies."""
    req = rail.accepts(0)[0]
    paid = payment(network, auth, req)
    deposit = Deposit(key=f"{network.network}:{network.asset.lower()}:"
                          f"{auth.payer.lower()}:{auth.nonce}",
                      account_id=payer_account_id(network.network, network.asset, auth.payer),
                      amount=req.amount, payer=auth.payer, network=network.network,
                      asset=network.asset,
                      payload=paid.model_dump_json(by_alias=True, exclude_none=True),
                      requirements=req.model_dump_json(by_alias=True))
    claimed, _ = await rail.deposits.begin(deposit)
    assert claimed
    return deposit.key


async def credited(ledger: Ledger, network: EvmNetwork, payer: str) -> int:
    try:
        account = await ledger.get_account(payer_account_id(network.network, network.asset,
                                                            payer))
    except AccountNotFound:
        return 0
    return account.credited


async def test_recovery_settles_a_still_valid_unused_claim(
        chain: DevChain, evm_network: EvmNetwork, settler: EvmSettler,
        ledger_for: Callable[[Settings], Ledger]) -> None:
    settings = rail_settings(chain, chain.rpc_url)
    ledger = ledger_for(settings)
    key = new_payer(chain, DEPOSIT)
    auth = make_auth(evm_network, key, value=DEPOSIT)
    dead = X402Deposits(settings, ledger)
    await claim(dead, evm_network, auth)
    await dead.aclose()  # died before settling
    restarted = X402Deposits(settings, ledger)
    try:
        assert await restarted.recover() == 1
        assert await restarted.recover() == 0
        assert await restarted.deposits.unfinished() == []
    finally:
        await restarted.aclose()
    assert await credited(ledger, evm_network, auth.payer) == DEPOSIT
    assert await settler.balance_of(auth.payer, evm_network) == 0
    assert await settler.authorization_used(auth.from_, auth.nonce, evm_network)


async def test_recovery_abandons_an_expired_unused_claim(
        chain: DevChain, evm_network: EvmNetwork, settler: EvmSettler,
        ledger_for: Callable[[Settings], Ledger]) -> None:
    settings = rail_settings(chain, chain.rpc_url)
    ledger = ledger_for(settings)
    key = new_payer(chain, DEPOSIT)
    now = int(time.time())
    auth = make_auth(evm_network, key, value=DEPOSIT, valid_after=now - 600,
                     valid_before=now - 1)
    rail = X402Deposits(settings, ledger)
    try:
        deposit_key = await claim(rail, evm_network, auth)
        assert await rail.recover() == 0
        assert await rail.deposits.get(deposit_key) is None
        assert await rail.deposits.unfinished() == []
    finally:
        await rail.aclose()
    assert await credited(ledger, evm_network, auth.payer) == 0
    assert await settler.balance_of(auth.payer, evm_network) == DEPOSIT
    assert not await settler.authorization_used(auth.from_, auth.nonce, evm_network)


async def test_settlement_failing_after_the_claim_abandons_it(
        chain: DevChain, evm_network: EvmNetwork, settler: EvmSettler, rpc_proxy: RpcProxy,
        ledger_for: Callable[[Settings], Ledger]) -> None:
    """Verified and claimed, then the payer's balance moves away before the simulation: 402
    with the code and a failed PAYMENT-RESPONSE, nothing credited, the claim released; once
    the wallet is funded again the same payment goes through, credited once."""
    settings = rail_settings(chain, rpc_proxy.url)
    ledger = ledger_for(settings)
    front_runner = str(new_account(chain, eth=10**17).key.to_0x_hex())
    key = new_payer(chain, DEPOSIT)
    auth = make_auth(evm_network, key, value=DEPOSIT)
    drained: list[bool] = []

    def drain_first(req: dict[str, Any], forward: Any) -> dict[str, Any]:
        if not drained:
            drained.append(True)
            away = make_auth(evm_network, key, to=new_account(chain).address, value=DEPOSIT)
            assert relay_authorization(chain, away, front_runner)["status"] == 1
        return dict(forward(req))
    rpc_proxy.hooks["eth_estimateGas"] = drain_first
    rail = X402Deposits(settings, ledger)
    try:
        paid = payment(evm_network, auth, rail.accepts(0)[0])
        with pytest.raises(PaymentRejected) as info:
            await rail.pay(http_request(), paid, 0)
        assert info.value.code == ERR_INSUFFICIENT_BALANCE and info.value.status == 402
        response = json.loads(base64.b64decode(info.value.headers["PAYMENT-RESPONSE"]))
        assert response["success"] is False
        assert response["errorReason"] == ERR_INSUFFICIENT_BALANCE
        assert await rail.deposits.unfinished() == []
        assert await credited(ledger, evm_network, auth.payer) == 0
        mint(chain, auth.payer, DEPOSIT)
        result, _ = await rail.pay(http_request(), paid, 0)
        assert result.amount == DEPOSIT
    finally:
        await rail.aclose()
    assert await credited(ledger, evm_network, auth.payer) == DEPOSIT
    assert await settler.authorization_used(auth.from_, auth.nonce, evm_network)


async def test_unknown_outcome_keeps_the_claim_for_recovery(
        chain: DevChain, evm_network: EvmNetwork, settler: EvmSettler, rpc_proxy: RpcProxy,
        ledger_for: Callable[[Settings], Ledger]) -> None:
    """No receipt in time: 503 naming the transaction, the claim stays open (the transfer may
    land), and the next start's recovery asks the chain and credits it once."""
    settings = rail_settings(chain, rpc_proxy.url)
    ledger = ledger_for(settings)
    rpc_proxy.hooks["eth_getTransactionReceipt"] = lambda req, fwd: rpc_result(req, None)
    key = new_payer(chain, DEPOSIT)
    auth = make_auth(evm_network, key, value=DEPOSIT)
    rail = X402Deposits(settings, ledger)
    short_timeouts(rail, receipt_timeout=1.0)
    try:
        with pytest.raises(ServiceUnavailable) as info:
            await rail.pay(http_request(), payment(evm_network, auth, rail.accepts(0)[0]), 0)
        tx = info.value.extra["transaction"]
        assert [r.deposit.payer for r in await rail.deposits.unfinished()] == [auth.payer]
        assert await credited(ledger, evm_network, auth.payer) == 0
    finally:
        await rail.aclose()
    assert (await settler.transaction_status(tx, evm_network)).state == "success"
    restarted = X402Deposits(settings.model_copy(update={"x402": rail_settings(
        chain, chain.rpc_url).x402}), ledger)
    try:
        assert await restarted.recover() == 1
    finally:
        await restarted.aclose()
    assert await credited(ledger, evm_network, auth.payer) == DEPOSIT


@pytest.mark.xfail(strict=True, reason=(
    "x402_deposits.pay keeps the claim when the node refused the settlement transaction "
    "(SettlementNotSubmitted is a ServiceUnavailable); nothing was sent, so it should "
    "abandon it like a PaymentRejected and let the payer retry (see the report)"))
async def test_refused_settlement_releases_the_claim(
        chain: DevChain, evm_network: EvmNetwork, settler: EvmSettler, rpc_proxy: RpcProxy,
        ledger_for: Callable[[Settings], Ledger]) -> None:
    settings = rail_settings(chain, rpc_proxy.url)
    ledger = ledger_for(settings)
    rpc_proxy.hooks["eth_sendRawTransaction"] = lambda req, fwd: rpc_error(
        req, -32003, "insufficient funds for gas * price + value")
    key = new_payer(chain, DEPOSIT)
    auth = make_auth(evm_network, key, value=DEPOSIT)
    rail = X402Deposits(settings, ledger)
    try:
        paid = payment(evm_network, auth, rail.accepts(0)[0])
        with pytest.raises(SettlementNotSubmitted):
            await rail.pay(http_request(), paid, 0)
        assert not await settler.authorization_used(auth.from_, auth.nonce, evm_network)
        assert await rail.deposits.unfinished() == []  # fails today: the claim stays
        del rpc_proxy.hooks["eth_sendRawTransaction"]  # the relayer is funded again
        result, _ = await rail.pay(http_request(), paid, 0)
        assert result.amount == DEPOSIT
    finally:
        await rail.aclose()
    assert await credited(ledger, evm_network, auth.payer) == DEPOSIT


@pytest.mark.xfail(strict=True, reason=(
    "X402Deposits.recover treats authorizationState == true as settled, but the payer may "
    "have cancelled the authorization (cancelAuthorization): nothing moved, yet it credits; "
    "EvmSettler.authorization_canceled tells the two apart (see the report)"))
async def test_recovery_does_not_credit_a_cancelled_authorization(
        chain: DevChain, evm_network: EvmNetwork, settler: EvmSettler,
        ledger_for: Callable[[Settings], Ledger]) -> None:
    settings = rail_settings(chain, chain.rpc_url)
    ledger = ledger_for(settings)
    key = new_payer(chain, DEPOSIT)
    auth = make_auth(evm_network, key, value=DEPOSIT)
    rail = X402Deposits(settings, ledger)
    try:
        await claim(rail, evm_network, auth)  # the process dies after claiming...
        receipt = cancel_authorization(chain, evm_network, key, auth.nonce, chain.relayer_key)
        assert receipt["status"] == 1  # ...and the payer cancels before anyone settles
        assert await settler.authorization_used(auth.from_, auth.nonce, evm_network)
        assert await settler.balance_of(auth.payer, evm_network) == DEPOSIT  # nothing moved
        assert await rail.recover() == 0  # fails today: credited
    finally:
        await rail.aclose()
    assert await credited(ledger, evm_network, auth.payer) == 0
