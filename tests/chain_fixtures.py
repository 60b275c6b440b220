"""Shared chain fixtures: one dev chain per test session.

Import the fixtures into a test module (``from tests.chain_fixtures import *``) — the lead
owns ``conftest.py``. The chain is anvil when ``npm install`` put it under node_modules,
otherwise the in-process eth-tester chain; ``TOLLSTREAM_CHAIN_BACKEND`` forces one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import secrets
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest
import pytest_asyncio
from eth_account import Account
from eth_account.signers.local import LocalAccount
from hexbytes import HexBytes
from web3 import HTTPProvider, Web3

from gateway.chain.build import load_artifact
from gateway.chain.devchain import DevChain, start_chain
from gateway.rails.evm import (
    Eip3009Authorization,
    EvmNetwork,
    EvmSettler,
    sign_authorization,
    typed_data,
)
from gateway.rails.x402 import PaymentPayload, PaymentRequirements

__all__ = ["chain", "evm_network", "fresh_settler", "front_runner", "rpc_proxy", "settler"]

# A merchant address (payTo) that is none of the funded wallets.
PAY_TO = Account.from_key("0x" + "42" * 32).address


@pytest.fixture(scope="session")
def chain() -> Iterator[DevChain]:
    """One dev chain (token deployed, 12 funded wallets) for the whole session."""
    with start_chain(wallets=12) as running:
        yield running


@pytest.fixture(scope="session")
def evm_network(chain: DevChain) -> EvmNetwork:
    return EvmNetwork(network=chain.network, chain_id=chain.chain_id, rpc_url=chain.rpc_url,
                      asset=chain.token, token_name=chain.token_name,
                      token_version=chain.token_version, relayer_key=chain.relayer_key,
                      confirmations=1, rpc_timeout=10.0, receipt_timeout=30.0)


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def settler() -> AsyncIterator[EvmSettler]:
    s = EvmSettler()
    yield s
    await s.aclose()


def new_nonce() -> str:
    return "0x" + secrets.token_hex(32)


def make_auth(network: EvmNetwork, key: str, *, to: str = PAY_TO, value: int = 10_000,
              valid_after: int | None = None, valid_before: int | None = None,
              nonce: str | None = None, clock: Callable[[], float] = time.time,
              signature_override: str | None = None) -> Eip3009Authorization:
    """Sign a fresh authorization with ``key`` (valid from 60 s ago for 5 min by default, by
    ``clock``); ``signature_override`` replaces the signature (65 bytes of hex)."""
    now = int(clock())
    auth = sign_authorization(
        key, network, to=to, value=value,
        valid_after=now - 60 if valid_after is None else valid_after,
        valid_before=now + 300 if valid_before is None else valid_before,
        nonce=nonce or new_nonce())
    if signature_override is not None:
        auth = dataclasses.replace(auth, signature=signature_override)
    return auth


def chain_backend() -> str:
    return os.environ.get("TOLLSTREAM_CHAIN_BACKEND", "auto")


# --------------------------------------------------------------------------- chain actions
# Synchronous helpers that act on the real chain as other parties would (the token's owner
# minting, a third party relaying an authorization, the payer cancelling one).


def _w3(chain: DevChain) -> Web3:
    return Web3(HTTPProvider(chain.rpc_url, request_kwargs={"timeout": 30}))


def full_token(chain: DevChain) -> Any:
    """The TestUSDC contract with its whole ABI (mint, cancelAuthorization, ...)."""
    return _w3(chain).eth.contract(address=Web3.to_checksum_address(chain.token),
                                   abi=load_artifact()["abi"])


def send_as(chain: DevChain, key: str, tx: dict[str, Any], *, gas: int = 300_000,
            wait: bool = True) -> dict[str, Any]:
    """Sign ``tx`` with ``key`` (next pending nonce unless given), send it, return its receipt
    (or ``{"transactionHash": ...}`` when not waiting)."""
    w3 = _w3(chain)
    sender = Account.from_key(key)
    # Twice the base fee, not twice eth_gasPrice: anvil suggests a price from recent
    # transactions' tips, so paying 2x its suggestion doubled the suggestion with every send
    # (hundreds of gwei after a few dozen), and test accounts ran out of gas money.
    base_fee = int(w3.eth.get_block("latest").get("baseFeePerGas") or 10**9)
    full = {"from": sender.address, "gas": gas, "chainId": chain.chain_id,
            "gasPrice": 2 * base_fee + 10**9,
            "nonce": w3.eth.get_transaction_count(sender.address, "pending"), **tx}
    tx_hash = w3.eth.send_raw_transaction(sender.sign_transaction(full).raw_transaction)
    if not wait:
        return {"transactionHash": tx_hash}
    return dict(w3.eth.wait_for_transaction_receipt(tx_hash, timeout=30))


def call_tx(fn: Any) -> dict[str, Any]:
    """A contract call as transaction fields (to + data), for :func:`send_as`."""
    return {"to": fn.address, "data": fn._encode_transaction_data()}


def mint(chain: DevChain, to: str, amount: int) -> None:
    fn = full_token(chain).functions.mint(Web3.to_checksum_address(to), amount)
    assert send_as(chain, chain.relayer_key, call_tx(fn))["status"] == 1


def new_account(chain: DevChain, *, tokens: int = 0, eth: int = 0) -> LocalAccount:
    """A fresh account holding ``tokens`` (atomic units) and ``eth`` (wei)."""
    account: LocalAccount = Account.create()
    if tokens:
        mint(chain, account.address, tokens)
    if eth:
        receipt = send_as(chain, chain.relayer_key, {"to": account.address, "value": eth},
                          gas=21_000)
        assert receipt["status"] == 1
    return account


def relay_authorization(chain: DevChain, auth: Eip3009Authorization, sender_key: str,
                        *, gas: int = 300_000) -> dict[str, Any]:
    """Submit ``auth`` with ``transferWithAuthorization`` from ``sender_key`` (anyone may);
    a fixed gas limit, so a doomed one is mined and reverts instead of failing to estimate."""
    v, r, s = auth.vrs()
    fn = full_token(chain).functions.transferWithAuthorization(
        Web3.to_checksum_address(auth.from_), Web3.to_checksum_address(auth.to), auth.value,
        auth.valid_after, auth.valid_before, HexBytes(auth.nonce), v, r, s)
    return send_as(chain, sender_key, call_tx(fn), gas=gas)


def cancel_authorization(chain: DevChain, network: EvmNetwork, payer_key: str, nonce: str,
                         sender_key: str) -> dict[str, Any]:
    """The payer cancels an unused authorization (EIP-3009 ``cancelAuthorization``)."""
    payer = Account.from_key(payer_key)
    domain_types = typed_data(make_auth(network, payer_key), network)["types"]["EIP712Domain"]
    signed = payer.sign_typed_data(full_message={
        "types": {"EIP712Domain": domain_types, "CancelAuthorization": [
            {"name": "authorizer", "type": "address"}, {"name": "nonce", "type": "bytes32"}]},
        "primaryType": "CancelAuthorization",
        "domain": {"name": network.token_name, "version": network.token_version,
                   "chainId": network.chain_id,
                   "verifyingContract": Web3.to_checksum_address(network.asset)},
        "message": {"authorizer": payer.address, "nonce": HexBytes(nonce)}})
    fn = full_token(chain).functions.cancelAuthorization(
        payer.address, HexBytes(nonce), signed.v, signed.r.to_bytes(32, "big"),
        signed.s.to_bytes(32, "big"))
    return send_as(chain, sender_key, call_tx(fn))


# --------------------------------------------------------------------------- fault proxy


@dataclass
class Raw:
    """An HTTP-level answer from :class:`RpcProxy` (not a JSON-RPC one): a node's 5xx, 429,
    or a body that is not JSON-RPC."""

    status: int
    body: bytes = b""
    content_type: str = "application/json"
    headers: dict[str, str] = dataclasses.field(default_factory=dict)


def reply(handler: BaseHTTPRequestHandler, answer: Raw) -> None:
    """Send ``answer`` from an http.server handler (the client may have given up: fine)."""
    handler.send_response(answer.status)
    handler.send_header("Content-Type", answer.content_type)
    for name, value in answer.headers.items():
        handler.send_header(name, value)
    handler.send_header("Content-Length", str(len(answer.body)))
    handler.end_headers()
    with contextlib.suppress(OSError):
        handler.wfile.write(answer.body)


Forward = Callable[[dict[str, Any]], dict[str, Any]]
Hook = Callable[[dict[str, Any], Forward], "dict[str, Any] | Raw"]


class RpcProxy:
    """A JSON-RPC proxy on loopback in front of the real dev chain, for fault injection.

    Every request is forwarded to the chain unless ``hooks[method]`` exists: the hook gets the
    request and a ``forward`` function, and answers instead (it may forward and alter the
    answer, act on the chain first, or stall). ``seen`` lists the methods received.
    """

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream
        self.hooks: dict[str, Hook] = {}
        self.seen: list[str] = []
        self.errors: list[BaseException] = []  # hooks that failed (a broken test, not a fault)
        self._released = threading.Event()  # set on stop: ends any stalled hook
        self._client = httpx.Client(timeout=30)
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                req = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)))
                answer = proxy.answer(req)
                if not isinstance(answer, Raw):
                    answer = Raw(200, json.dumps(answer).encode())
                reply(self, answer)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,),
                                        daemon=True)  # 0.05: the shutdown poll interval
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"

    def forward(self, req: dict[str, Any]) -> dict[str, Any]:
        return dict(self._client.post(self.upstream, json=req).json())

    def answer(self, req: dict[str, Any]) -> dict[str, Any] | Raw:
        method = str(req.get("method"))
        self.seen.append(method)
        hook = self.hooks.get(method)
        try:
            return hook(req, self.forward) if hook else self.forward(req)
        except Exception as exc:
            self.errors.append(exc)
            return Raw(599, repr(exc).encode(), "text/plain")

    def stall(self, seconds: float) -> None:
        """Hold a request (a node that stopped answering) until ``seconds`` pass or the proxy
        stops, whichever is first."""
        self._released.wait(seconds)

    def __enter__(self) -> RpcProxy:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._released.set()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)
        self._client.close()


def rpc_result(req: dict[str, Any], result: Any) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": req.get("id"), "result": result}


def rpc_error(req: dict[str, Any], code: int, message: str) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": req.get("id"), "error": {"code": code, "message": message}}


@pytest.fixture
def rpc_proxy(chain: DevChain) -> Iterator[RpcProxy]:
    with RpcProxy(chain.rpc_url) as proxy:
        yield proxy
    assert not proxy.errors, f"a proxy hook failed: {proxy.errors!r}"


def via(proxy: RpcProxy, network: EvmNetwork, **changes: Any) -> EvmNetwork:
    """``network`` reached through ``proxy`` (short timeouts: faults should fail fast)."""
    return dataclasses.replace(network, rpc_url=proxy.url, **{
        "rpc_timeout": 5.0, "receipt_timeout": 5.0, **changes})


# --------------------------------------------------------------------------- fault helpers


@pytest.fixture(scope="module")
def front_runner(chain: DevChain) -> str:
    """A third party with gas money, relaying authorizations it has seen."""
    return str(new_account(chain, eth=10**18).key.to_0x_hex())


@pytest_asyncio.fixture
async def fresh_settler() -> AsyncIterator[EvmSettler]:
    """A settler of its own (a proxy has its own URL, so its own HTTP session)."""
    settler = EvmSettler(poll_interval=0.02)
    yield settler
    await settler.aclose()


def new_payer(chain: DevChain, tokens: int) -> str:
    """Private key of a fresh payer holding ``tokens`` (atomic units) and no ETH."""
    return str(new_account(chain, tokens=tokens).key.to_0x_hex())


def once(action: Callable[[], None]) -> Hook:
    """A hook that runs ``action`` on the chain before forwarding the first request only."""
    done: list[bool] = []

    def hook(req: dict[str, Any], forward: Forward) -> dict[str, Any]:
        if not done:
            done.append(True)
            action()
        return forward(req)
    return hook


def payment(auth: Eip3009Authorization, requirements: PaymentRequirements) -> PaymentPayload:
    """The v2 payment carrying ``auth`` for ``requirements``."""
    return PaymentPayload.model_validate({
        "x402Version": 2, "accepted": requirements.model_dump(by_alias=True),
        "payload": {"signature": auth.signature, "authorization": {
            "from": auth.from_, "to": auth.to, "value": str(auth.value),
            "validAfter": str(auth.valid_after), "validBefore": str(auth.valid_before),
            "nonce": auth.nonce}}})
