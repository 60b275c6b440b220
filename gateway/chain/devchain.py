"""A local EVM dev chain with the TestUSDC token, the MPP session escrow, Permit2 and the x402
``upto`` proxy deployed and test wallets funded.

Permit2 (``Permit2.vy``) and the x402UptoPermit2Proxy (``X402UptoPermit2Proxy.vy``) live at
their canonical addresses (:data:`~gateway.chain.permit2.PERMIT2_ADDRESS`,
:data:`~gateway.chain.permit2.UPTO_PROXY_ADDRESS`): each is deployed normally, then its runtime
code is copied there with ``anvil_setCode`` (the eth-tester backend answers that method too).
Every test wallet has approved Permit2 on TestUSDC for the maximum (the one-time approval of
scheme_upto_evm.md, "Option A"), so x402 ``upto`` payers can sign at once; the approval's gas
comes from a balance set with ``anvil_setBalance`` and taken back, so wallets still hold no ETH.

Two backends, same interface (a JSON-RPC URL on loopback):

* ``anvil`` -- the Foundry binary from the npm package ``@foundry-rs/anvil`` (``npm install`` at
  the repo root puts it under ``node_modules``) or on ``PATH``. Preferred: fast, a real node.
* ``eth-tester`` -- py-evm in this process behind a minimal JSON-RPC HTTP server on 127.0.0.1
  (:mod:`gateway.chain.ethtester`), so other processes (the gateway, a CLI) can reach it too.
  Used when anvil is not installed.

Both mine each transaction at once and an empty block every ``block_time`` seconds, so the
head's timestamp follows the wall clock even when nobody transacts.

``TOLLSTREAM_CHAIN_BACKEND`` (``auto`` | ``anvil`` | ``eth-tester``) overrides the choice and
``TOLLSTREAM_ANVIL`` names an anvil binary (:mod:`gateway.chain.anvil` runs it). All keys here
are public test keys: the relayer is anvil's first default account, the wallets derive from
fixed strings. Never use them elsewhere.

Usage::

    with start_chain(wallets=3) as chain:
        chain.rpc_url, chain.token, chain.escrow, chain.permit2, chain.upto_proxy,
        chain.wallets[0].private_key
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from types import FrameType, TracebackType
from typing import Any, Literal, cast

from eth_account import Account
from eth_utils import keccak
from hexbytes import HexBytes
from web3 import HTTPProvider, Web3
from web3.types import RPCEndpoint, TxParams

from gateway.chain.anvil import find_anvil, start_anvil
from gateway.chain.build import (
    ESCROW_ARTIFACT,
    PERMIT2_ARTIFACT,
    UPTO_PROXY_ARTIFACT,
    load_artifact,
)
from gateway.chain.ethtester import start_tester
from gateway.chain.permit2 import PERMIT2_ADDRESS, UPTO_PROXY_ADDRESS

CHAIN_ID = 31337
DEFAULT_FUNDING = 1_000 * 10**6  # 1,000 USDC in atomic units (6 decimals)
DEFAULT_TOKEN_NAME = "USD Coin"  # Base mainnet USDC's EIP-712 domain name/version
DEFAULT_TOKEN_VERSION = "2"
# The escrow's CLOSE_GRACE_PERIOD: the spec's reference value, 15 minutes (draft-evm-session-00,
# "Forced Close"; the contract refuses less than 10). Tests move the chain's clock past it.
ESCROW_GRACE_PERIOD = 900
# Anvil's first default account (mnemonic "test test ... junk"); public, test-only.
RELAYER_KEY = "0xac0974bec39a17e36ba4a6b4d238ff944bacb478cbed5efcae784d7bf4f2ff80"
MAX_UINT256 = 2**256 - 1
# Gas limit of a wallet's approve(Permit2) (TestUSDC uses about 46k for a fresh allowance).
APPROVE_GAS = 100_000

Backend = Literal["auto", "anvil", "eth-tester"]


@dataclass(frozen=True)
class Wallet:
    """A funded test wallet: holds USDC, no ETH (EIP-3009 payers never pay gas), and has approved
    Permit2 on the token for the maximum (x402 ``upto`` payers sign Permit2 permits)."""

    address: str
    private_key: str
    balance: int


def wallet_key(index: int) -> str:
    """Deterministic test private key for wallet ``index`` (public; test-only)."""
    return "0x" + keccak(text=f"tollstream devchain wallet {index}").hex()


@dataclass
class DevChain:
    """A running dev chain; stop it with :meth:`stop` or use it as a context manager."""

    rpc_url: str
    chain_id: int
    token: str
    token_name: str
    token_version: str
    escrow: str  # the MPP session escrow (gateway/chain/Escrow.vy)
    relayer_key: str
    wallets: list[Wallet]
    backend: str
    _stopper: Callable[[], None] = field(repr=False)
    _stopped: bool = field(default=False, repr=False)
    block_time: float | None = 1.0  # seconds between empty blocks; None: transactions only
    escrow_grace_period: int = ESCROW_GRACE_PERIOD
    permit2: str = PERMIT2_ADDRESS  # Permit2 (gateway/chain/Permit2.vy), canonical address
    upto_proxy: str = UPTO_PROXY_ADDRESS  # x402UptoPermit2Proxy (X402UptoPermit2Proxy.vy)

    @property
    def network(self) -> str:
        """CAIP-2 network id (``eip155:<chainId>``)."""
        return f"eip155:{self.chain_id}"

    @property
    def relayer_address(self) -> str:
        return str(Account.from_key(self.relayer_key).address)

    def to_json(self) -> str:
        """One-line JSON description (includes the public test keys)."""
        return json.dumps({
            "rpc_url": self.rpc_url,
            "chain_id": self.chain_id,
            "network": self.network,
            "backend": self.backend,
            "token": self.token,
            "token_name": self.token_name,
            "token_version": self.token_version,
            "escrow": self.escrow,
            "escrow_grace_period": self.escrow_grace_period,
            "permit2": self.permit2,
            "upto_proxy": self.upto_proxy,
            "relayer_key": self.relayer_key,
            "relayer_address": self.relayer_address,
            "wallets": [{"address": w.address, "private_key": w.private_key,
                         "balance": w.balance} for w in self.wallets],
        }, separators=(",", ":"))

    def stop(self) -> None:
        """Stop the chain (idempotent)."""
        if not self._stopped:
            self._stopped = True
            self._stopper()

    def __enter__(self) -> DevChain:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


# --------------------------------------------------------------------------- deploy


def _send(w3: Web3, key: str, tx: Any) -> HexBytes:
    signed = Account.sign_transaction(tx, key)
    return w3.eth.send_raw_transaction(signed.raw_transaction)


def _rpc(w3: Web3, method: str, params: list[Any]) -> Any:
    """A raw JSON-RPC call (the node's own methods: anvil_setCode, ...); raises on an error."""
    response = w3.provider.make_request(RPCEndpoint(method), params)
    if "error" in response:
        raise RuntimeError(f"{method} failed: {response['error']}")
    return response.get("result")


def _deploy(rpc_url: str, *, wallets: int, funding: int, token_name: str,
            token_version: str) -> tuple[str, str, list[Wallet]]:
    """Deploy TestUSDC, the escrow, Permit2 and the upto proxy (the last two moved to their
    canonical addresses), mint to the wallets and approve Permit2 from each:
    (token, escrow, wallets)."""
    w3 = Web3(HTTPProvider(rpc_url, request_kwargs={"timeout": 30}))
    relayer = Account.from_key(RELAYER_KEY)
    artifact = load_artifact()
    nonce = int(w3.eth.get_transaction_count(relayer.address, "pending"))
    gas_price = w3.eth.gas_price
    base: Any = {"from": relayer.address, "chainId": CHAIN_ID, "gasPrice": gas_price * 2}
    sent: list[tuple[str, HexBytes]] = []
    for art, args in ((artifact, (token_name, token_version)),
                      (load_artifact(ESCROW_ARTIFACT), (ESCROW_GRACE_PERIOD,)),
                      (load_artifact(PERMIT2_ARTIFACT), ()),
                      (load_artifact(UPTO_PROXY_ARTIFACT), ())):
        factory = w3.eth.contract(abi=art["abi"], bytecode=art["bytecode"])
        tx = factory.constructor(*args).build_transaction(
            cast(TxParams, {**base, "nonce": nonce, "gas": 3_000_000}))
        nonce += 1
        sent.append((art["contractName"], _send(w3, RELAYER_KEY, tx)))
    deployed: list[str] = []
    for name, tx_hash in sent:
        receipt = w3.eth.wait_for_transaction_receipt(tx_hash, timeout=30)
        if receipt["status"] != 1 or not receipt["contractAddress"]:
            raise RuntimeError(f"{name} deployment failed")
        deployed.append(Web3.to_checksum_address(receipt["contractAddress"]))
    # The runtime code of Permit2 and the proxy at their canonical addresses (neither keeps
    # constructor-set state, so the code alone is the contract).
    for source, canonical in ((deployed[2], PERMIT2_ADDRESS), (deployed[3], UPTO_PROXY_ADDRESS)):
        code = w3.eth.get_code(Web3.to_checksum_address(source))
        _rpc(w3, "anvil_setCode", [canonical, code.to_0x_hex()])
        if w3.eth.get_code(Web3.to_checksum_address(canonical)) != code:
            raise RuntimeError(f"placing the code at {canonical} failed")
    token = w3.eth.contract(address=Web3.to_checksum_address(deployed[0]), abi=artifact["abi"])
    out: list[Wallet] = []
    hashes: list[HexBytes] = []
    gas_money = APPROVE_GAS * base["gasPrice"]
    for i in range(wallets):
        key = wallet_key(i)
        address = Account.from_key(key).address
        tx = token.functions.mint(address, funding).build_transaction(
            cast(TxParams, {**base, "nonce": nonce, "gas": 200_000}))
        nonce += 1
        hashes.append(_send(w3, RELAYER_KEY, tx))
        # The one-time approve(Permit2, max), paid from a balance given and taken back.
        _rpc(w3, "anvil_setBalance", [address, hex(gas_money)])
        approve = token.functions.approve(PERMIT2_ADDRESS, MAX_UINT256).build_transaction(
            cast(TxParams, {**base, "from": address, "nonce": 0, "gas": APPROVE_GAS}))
        hashes.append(_send(w3, key, approve))
        out.append(Wallet(address=address, private_key=key, balance=funding))
    for h in hashes:
        if w3.eth.wait_for_transaction_receipt(h, timeout=30)["status"] != 1:
            raise RuntimeError("funding a wallet (mint, approve Permit2) failed")
    for wallet in out:
        _rpc(w3, "anvil_setBalance", [wallet.address, "0x0"])
    return deployed[0], deployed[1], out


def start_chain(*, wallets: int = 3, funding: int = DEFAULT_FUNDING, port: int | None = None,
                backend: Backend | None = None, token_name: str = DEFAULT_TOKEN_NAME,
                token_version: str = DEFAULT_TOKEN_VERSION,
                block_time: float | None = 1.0) -> DevChain:
    """Start a dev chain on 127.0.0.1, deploy TestUSDC and the MPP session escrow (grace
    period :data:`ESCROW_GRACE_PERIOD`), place Permit2 and the x402 upto proxy at their
    canonical addresses, mint ``funding`` to each test wallet and approve Permit2 from it.

    ``backend`` defaults to ``$TOLLSTREAM_CHAIN_BACKEND`` or ``auto`` (anvil when found, else
    eth-tester). ``funding`` is in atomic units. The relayer (token owner) holds ETH for gas.
    Transactions are mined at once, and an empty block every ``block_time`` seconds keeps the
    head on the wall clock (None: only transactions mine blocks, as a plain anvil). The
    JSON-RPC method ``evm_setTime`` moves the chain's clock on both backends (tests).
    """
    if funding < 0 or wallets < 0:
        raise ValueError("wallets and funding must be >= 0")
    choice = backend or os.environ.get("TOLLSTREAM_CHAIN_BACKEND", "auto")
    anvil = find_anvil() if choice in ("auto", "anvil") else None
    if choice == "anvil" and anvil is None:
        raise RuntimeError("anvil not found: run `npm install` at the repo root")
    if anvil is not None:
        url, stopper = start_anvil(anvil, port, chain_id=CHAIN_ID, block_time=block_time)
        used = "anvil"
    elif choice in ("auto", "eth-tester"):
        url, stopper = start_tester(port, chain_id=CHAIN_ID, block_time=block_time,
                                    fund=Account.from_key(RELAYER_KEY).address)
        used = "eth-tester"
    else:
        raise ValueError(f"unknown chain backend {choice!r}")
    try:
        token, escrow, funded = _deploy(url, wallets=wallets, funding=funding,
                                        token_name=token_name, token_version=token_version)
    except BaseException:
        stopper()
        raise
    return DevChain(rpc_url=url, chain_id=CHAIN_ID, token=token, token_name=token_name,
                    token_version=token_version, escrow=escrow, relayer_key=RELAYER_KEY,
                    wallets=funded,
                    backend=used, _stopper=stopper, block_time=block_time)


def run_chain_cli(wallets: int, port: int | None) -> None:
    """``tollstream chain``: start a chain, print its JSON on one line, block until SIGINT/TERM."""
    done = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        done.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        with start_chain(wallets=wallets, port=port) as chain:
            print(chain.to_json(), flush=True)
            while not done.wait(0.5):
                pass
    finally:
        for sig, handler in previous.items():
            with contextlib.suppress(ValueError, TypeError):
                signal.signal(sig, handler)


def main() -> None:
    """``python -m gateway.chain.devchain [--wallets N] [--port P]``."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m gateway.chain.devchain")
    parser.add_argument("--wallets", type=int, default=3)
    parser.add_argument("--port", type=int, default=None)
    args = parser.parse_args()
    run_chain_cli(args.wallets, args.port)


if __name__ == "__main__":
    main()
