"""Shared chain fixtures: one dev chain per test session.

Import the fixtures into a test module (``from tests.chain_fixtures import *``) — the lead
owns ``conftest.py``. The chain is anvil when ``npm install`` put it under node_modules,
otherwise the in-process eth-tester chain; ``TOLLSTREAM_CHAIN_BACKEND`` forces one.
"""

from __future__ import annotations

import os
import secrets
import time
from collections.abc import AsyncIterator, Iterator

import pytest
import pytest_asyncio
from eth_account import Account

from gateway.chain.devchain import DevChain, start_chain
from gateway.rails.evm import Eip3009Authorization, EvmNetwork, EvmSettler, sign_authorization

__all__ = ["chain", "evm_network", "settler"]

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
              nonce: str | None = None) -> Eip3009Authorization:
    """Sign a fresh authorization with ``key`` (valid from 60 s ago for 5 min by default)."""
    now = int(time.time())
    return sign_authorization(
        key, network, to=to, value=value,
        valid_after=now - 60 if valid_after is None else valid_after,
        valid_before=now + 300 if valid_before is None else valid_before,
        nonce=nonce or new_nonce())


def chain_backend() -> str:
    return os.environ.get("TOLLSTREAM_CHAIN_BACKEND", "auto")
