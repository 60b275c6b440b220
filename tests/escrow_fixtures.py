"""Shared fixtures and helpers for the MPP session escrow tests (on the real dev chain).

Import into a test module with ``from tests.escrow_fixtures import *``. Every test makes its own
payer (fresh account, tokens minted, no ETH unless it must send a transaction itself) and its
own channel (random salt), so tests share the session chain without sharing state.

Two ways to reach the contract: :class:`EscrowClient` (the code under test), and raw web3 from
other parties (:func:`simulate`: what ``eth_call`` says; :func:`mined`: a transaction with a
fixed gas limit, so a doomed one is mined and reverts on-chain instead of failing to estimate).
"""

from __future__ import annotations

import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
import pytest_asyncio
from eth_account import Account
from eth_account.signers.local import LocalAccount
from web3 import HTTPProvider, Web3
from web3.exceptions import ContractLogicError

from gateway.chain.build import ESCROW_ARTIFACT, load_artifact
from gateway.chain.devchain import DevChain
from gateway.rails.eip3009 import EvmNetwork
from gateway.rails.mpp.channel import (
    ZERO_ADDRESS,
    Voucher,
    compute_channel_id,
    sign_open_authorization,
    sign_top_up_authorization,
    sign_voucher,
)
from gateway.rails.mpp.escrow import EscrowClient, EscrowOutcome
from tests.chain_fixtures import call_tx, full_token, mint, new_account, send_as

__all__ = ["escrow_client", "payee"]


def new_salt() -> str:
    return "0x" + secrets.token_hex(32)


def w3(chain: DevChain) -> Web3:
    return Web3(HTTPProvider(chain.rpc_url, request_kwargs={"timeout": 30}))


def escrow_contract(chain: DevChain, address: str | None = None) -> Any:
    """The escrow (or another deployment at ``address``) with its whole ABI, for raw calls."""
    return w3(chain).eth.contract(address=Web3.to_checksum_address(address or chain.escrow),
                                  abi=load_artifact(ESCROW_ARTIFACT)["abi"])


def deploy(chain: DevChain, abi: list[dict[str, Any]], bytecode: str, *args: Any) -> str:
    """Deploy a contract from the relayer; its address."""
    factory = w3(chain).eth.contract(abi=abi, bytecode=bytecode)
    receipt = send_as(chain, chain.relayer_key,
                      {"data": factory.constructor(*args).data_in_transaction},
                      gas=3_000_000)
    assert receipt["status"] == 1
    return str(receipt["contractAddress"])


def deploy_escrow(chain: DevChain, grace: int = 900) -> str:
    """A second escrow deployment (another verifying contract)."""
    artifact = load_artifact(ESCROW_ARTIFACT)
    return deploy(chain, artifact["abi"], artifact["bytecode"], grace)


def balance(chain: DevChain, address: str) -> int:
    return int(full_token(chain).functions.balanceOf(Web3.to_checksum_address(address)).call())


def simulate(fn: Any, sender: str) -> str | None:
    """What ``eth_call`` of ``fn`` from ``sender`` says: None when it succeeds, else the revert
    reason ("" when the revert carried none)."""
    try:
        fn.call({"from": Web3.to_checksum_address(sender)})
    except ContractLogicError as exc:
        return str(exc.message or "").removeprefix("execution reverted").lstrip(": ")
    return None


def mined(chain: DevChain, key: str, fn: Any, *, gas: int = 500_000) -> dict[str, Any]:
    """Send ``fn`` from ``key`` with a fixed gas limit; the receipt (status 0 when reverted)."""
    return send_as(chain, key, call_tx(fn), gas=gas)


def rpc(chain: DevChain, method: str, *params: Any) -> Any:
    body = httpx.post(chain.rpc_url, json={"jsonrpc": "2.0", "id": 1, "method": method,
                                           "params": list(params)}, timeout=10).json()
    assert "error" not in body, body
    return body["result"]


def chain_now(chain: DevChain) -> int:
    """Timestamp of the latest block."""
    return int(rpc(chain, "eth_getBlockByNumber", "latest", False)["timestamp"], 16)


def network_of(chain: DevChain) -> EvmNetwork:
    return EvmNetwork(network=chain.network, chain_id=chain.chain_id, rpc_url=chain.rpc_url,
                      asset=chain.token, token_name=chain.token_name,
                      token_version=chain.token_version, relayer_key=chain.relayer_key,
                      confirmations=1, rpc_timeout=10.0, receipt_timeout=30.0)


@pytest.fixture(scope="module")
def payee(chain: DevChain) -> LocalAccount:
    """The merchant: holds ETH for settle/close gas, no tokens."""
    return new_account(chain, eth=10**18)


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def escrow_client(chain: DevChain) -> AsyncIterator[EscrowClient]:
    client = EscrowClient(network_of(chain), chain.escrow, poll_interval=0.02)
    yield client
    await client.aclose()


@dataclass(frozen=True)
class Opened:
    """A channel a test opened: its id, the payer's key, and the open's outcome."""

    channel_id: str
    payer_key: str
    outcome: EscrowOutcome

    @property
    def payer(self) -> str:
        return str(Account.from_key(self.payer_key).address)


async def open_channel(client: EscrowClient, chain: DevChain, payee: str, *, deposit: int,
                       funding: int | None = None, authorized_signer: str = ZERO_ADDRESS,
                       payer_key: str | None = None, valid_for: int = 600) -> Opened:
    """Open a channel by ``openWithAuthorization`` (relayer pays gas). The payer is
    ``payer_key`` (given ``funding`` tokens, default none) or a fresh account holding
    ``funding`` (default: the deposit) and no ETH. The authorization is valid ``valid_for``
    seconds."""
    if payer_key is None:
        payer_key = new_account(chain, tokens=deposit if funding is None else funding
                                ).key.to_0x_hex()
    elif funding:
        mint(chain, Account.from_key(payer_key).address, funding)
    salt = new_salt()
    auth = sign_open_authorization(payer_key, client.network, escrow=client.escrow,
                                   payee=payee, deposit=deposit, salt=salt,
                                   authorized_signer=authorized_signer,
                                   **validity(valid_for))
    outcome = await client.open_with_authorization(auth, payee=payee, salt=salt,
                                                   authorized_signer=authorized_signer)
    channel_id = compute_channel_id(payer=auth.payer, payee=payee, token=chain.token,
                                    salt=salt, authorized_signer=authorized_signer,
                                    escrow=client.escrow, chain_id=chain.chain_id)
    assert outcome.args["channelId"] == channel_id
    return Opened(channel_id, payer_key, outcome)


def validity(seconds: int = 600) -> dict[str, int]:
    """An EIP-3009 validity window around the wall clock."""
    now = int(time.time())
    return {"valid_after": now - 60, "valid_before": now + seconds}


def top_up_auth(client: EscrowClient, funder_key: str, channel_id: str, amount: int,
                salt: str | None = None, valid_for: int = 600) -> tuple[Any, str]:
    """A top-up authorization by ``funder_key`` and its salt."""
    salt = salt or new_salt()
    return sign_top_up_authorization(funder_key, client.network, escrow=client.escrow,
                                     channel_id=channel_id, additional_deposit=amount,
                                     top_up_salt=salt, **validity(valid_for)), salt


def voucher(client: EscrowClient, key: str, channel_id: str, amount: int, **domain: Any
            ) -> Voucher:
    """A voucher signed by ``key`` (for this escrow and chain unless ``domain`` says
    otherwise: ``chain_id``, ``escrow``)."""
    return sign_voucher(key, channel_id=channel_id, cumulative_amount=amount,
                        chain_id=domain.get("chain_id", client.network.chain_id),
                        escrow=domain.get("escrow", client.escrow))


def deploy_source(chain: DevChain, source: str, *args: Any) -> str:
    """Compile a Vyper ``source`` in-process (a test-only contract) and deploy it."""
    import vyper

    out = vyper.compile_code(source, output_formats=["abi", "bytecode"])
    return deploy(chain, out["abi"], out["bytecode"], *args)
