"""JSON-RPC access to EVM chains, and the one place web3/aiohttp failures become gateway errors.

:class:`ChainRpc` keeps one ``AsyncWeb3`` per RPC URL, runs each call under the network's
timeout, sends signed transactions (one nonce lock per sender), and answers the chain-generic
questions settlement asks (a transaction's status, its receipt once confirmed). Every call goes
through :meth:`ChainRpc.call`, which lets only reverts
(``ContractLogicError``) and ``TransactionNotFound`` through (the caller gives them meaning)
and translates the rest with ``raise ... from exc``:

* unreachable, timed out, rate-limited -> :class:`~gateway.errors.ServiceUnavailable` (503);
* a JSON-RPC error, or an answer web3 cannot use -> :class:`~gateway.errors.UpstreamError`
  (502).
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

import aiohttp
from eth_account import Account
from eth_utils import to_checksum_address
from hexbytes import HexBytes
from web3 import AsyncHTTPProvider, AsyncWeb3
from web3.exceptions import (
    ContractLogicError,
    ProviderConnectionError,
    RequestTimedOut,
    TimeExhausted,
    TooManyRequests,
    TransactionNotFound,
    Web3Exception,
    Web3RPCError,
)

from gateway.errors import ServiceUnavailable, UpstreamError
from gateway.rails.eip3009 import EIP3009_ABI, EvmNetwork

# The node is down, unreachable, slow or rate-limiting us -> 503 (retry later). An HTTP error
# status from the node is an aiohttp.ClientResponseError, so it lands here too.
RPC_DOWN: tuple[type[BaseException], ...] = (
    aiohttp.ClientError, OSError, asyncio.TimeoutError, ProviderConnectionError, TimeExhausted,
    TooManyRequests, RequestTimedOut,
)
# The node answered something web3 could not turn into a result (a bad JSON-RPC envelope, a
# result of the wrong shape: web3's formatters raise ValueError/TypeError/KeyError) -> 502.
# Only web3's own request and formatting code runs inside ChainRpc.call, so nothing of ours
# is hidden by catching these there.
RPC_GARBAGE: tuple[type[BaseException], ...] = (Web3Exception, ValueError, TypeError, KeyError)

_HEX32 = re.compile(r"^0x[0-9a-fA-F]{64}$")
# A node refusing our transaction because another sender (another gateway process using the
# same key) took its nonce; retried with a fresh nonce. anvil/geth/reth wording.
_NONCE_CONFLICT = ("nonce too low", "replacement transaction underpriced")
_SEND_ATTEMPTS = 3

T = TypeVar("T")


class TransactionNotSent(ServiceUnavailable):
    """A transaction was never broadcast: preparing it failed, or the node refused it. Nothing
    happened on-chain; it may be sent again. ``refusal`` is the node's JSON-RPC error message
    when the node refused it (a node that executes transactions first may refuse a reverting
    one: "execution reverted: ..."), else empty."""

    code = "transaction_not_sent"

    def __init__(self, message: str, *, refusal: str = "", **kwargs: Any) -> None:
        super().__init__(message, **kwargs)
        self.refusal = refusal


@dataclass(frozen=True)
class TransactionStatus:
    """What the chain says about a transaction hash (for crash recovery)."""

    state: Literal["unknown", "pending", "success", "reverted"]
    block_number: int | None = None
    confirmations: int = 0


class ChainRpc:
    """Shared ``AsyncWeb3`` clients (one per RPC URL) and error translation."""

    def __init__(self) -> None:
        self._w3: dict[str, AsyncWeb3[AsyncHTTPProvider]] = {}
        self._locks: dict[tuple[str, str], asyncio.Lock] = {}

    def web3(self, network: EvmNetwork) -> AsyncWeb3[AsyncHTTPProvider]:
        """The shared ``AsyncWeb3`` for ``network.rpc_url``."""
        w3 = self._w3.get(network.rpc_url)
        if w3 is None:
            provider = AsyncHTTPProvider(
                network.rpc_url,
                request_kwargs={"timeout": aiohttp.ClientTimeout(total=network.rpc_timeout)},
                exception_retry_configuration=None,  # fail fast; the caller decides on retry
            )
            w3 = AsyncWeb3(provider)
            self._w3[network.rpc_url] = w3
        return w3

    def token(self, network: EvmNetwork) -> Any:
        """The network's EIP-3009 token contract (only the functions settlement uses)."""
        return self.web3(network).eth.contract(address=to_checksum_address(network.asset),
                                               abi=EIP3009_ABI)

    async def call(self, network: EvmNetwork, call: Callable[[], Awaitable[T]]) -> T:
        """Run one RPC call, translating failures (reverts and not-found pass through)."""
        try:
            # asyncio.timeout, not wait_for: on Python 3.11 wait_for can swallow the
            # caller's cancellation (meters/connection.py).
            async with asyncio.timeout(network.rpc_timeout):
                return await call()
        except (ContractLogicError, TransactionNotFound):
            raise
        except RPC_DOWN as exc:
            raise ServiceUnavailable(f"{network.network} RPC unreachable: {exc!r}") from exc
        except Web3RPCError as exc:
            raise UpstreamError(f"{network.network} RPC error: {exc}") from exc
        except RPC_GARBAGE as exc:
            raise UpstreamError(f"{network.network} RPC answered garbage: {exc!r}") from exc

    async def quantity(self, network: EvmNetwork, call: Callable[[], Awaitable[Any]],
                       what: str) -> int:
        """:meth:`call` for a result that must be a non-negative integer (a balance, a block
        number, gas): web3 passes some wrong-typed results through unformatted."""
        return as_quantity(await self.call(network, call), what, network)

    async def send(self, fn: Any, *, key: str, gas: int, network: EvmNetwork) -> HexBytes:
        """Sign the contract call ``fn`` as a transaction from ``key`` (gas limit ``gas`` plus
        a quarter) and broadcast it; returns its hash.

        Nonce allocation and broadcast happen under one lock per (RPC, sender), so concurrent
        sends never take the same nonce; a nonce another process took is retried. Raises
        :class:`TransactionNotSent` when nothing was broadcast, and ServiceUnavailable /
        UpstreamError carrying ``extra["transaction"]`` when the node may have taken it (no
        answer, or one we cannot read): the outcome is then unknown.
        """
        sender = to_checksum_address(Account.from_key(key).address)
        lock = self._locks.setdefault((network.rpc_url, sender), asyncio.Lock())
        async with lock:
            for attempt in range(1, _SEND_ATTEMPTS + 1):
                try:
                    return await self._send_once(fn, key, sender, gas, network)
                except TransactionNotSent as exc:
                    if attempt == _SEND_ATTEMPTS or not any(
                            needle in exc.refusal.lower() for needle in _NONCE_CONFLICT):
                        raise
                    # Another sender (a process on the same key) took the nonce.
        raise AssertionError("unreachable")  # the loop returns or raises

    async def _send_once(self, fn: Any, key: str, sender: str, gas: int,
                         network: EvmNetwork) -> HexBytes:
        w3 = self.web3(network)
        try:
            nonce = await self.quantity(network, lambda: w3.eth.get_transaction_count(
                to_checksum_address(sender), "pending"), "eth_getTransactionCount")
            gas_price = await self.quantity(network, lambda: w3.eth.gas_price, "eth_gasPrice")
            tx = await self.call(network, lambda: fn.build_transaction({
                "from": sender, "nonce": nonce, "gas": gas * 5 // 4, "gasPrice": gas_price,
                "chainId": network.chain_id}))
        except (ServiceUnavailable, UpstreamError) as exc:
            raise TransactionNotSent(f"could not prepare the transaction: {exc.message}"
                                     ) from exc
        signed = Account.sign_transaction(tx, key)
        tx_hash = HexBytes(signed.hash)
        try:
            await self.call(network, lambda: w3.eth.send_raw_transaction(signed.raw_transaction))
        except (ServiceUnavailable, UpstreamError) as exc:
            if isinstance(exc, UpstreamError) and isinstance(exc.__cause__, Web3RPCError):
                # A JSON-RPC error: the node did not take the transaction.
                refusal = str(exc.__cause__)
                raise TransactionNotSent(f"{network.network} node refused the transaction: "
                                         f"{refusal}", refusal=refusal) from exc
            # No answer, or one we cannot read: the node may have taken it; outcome unknown.
            exc.extra.setdefault("transaction", tx_hash.to_0x_hex())
            raise
        return tx_hash

    async def transaction_status(self, tx_hash: str, network: EvmNetwork) -> TransactionStatus:
        """Receipt state of ``tx_hash``: unknown, pending, success or reverted.

        A string that is not a 32-byte hash names no transaction: "unknown".
        """
        if not isinstance(tx_hash, str) or not _HEX32.match(tx_hash):
            return TransactionStatus("unknown")
        eth = self.web3(network).eth
        try:
            receipt = await self.call(network, lambda: eth.get_transaction_receipt(
                HexBytes(tx_hash)))
        except TransactionNotFound:
            receipt = None
        if receipt is None or receipt.get("blockNumber") is None:
            try:
                await self.call(network, lambda: eth.get_transaction(HexBytes(tx_hash)))
            except TransactionNotFound:
                return TransactionStatus("unknown")
            return TransactionStatus("pending")
        head = await self.quantity(network, lambda: eth.block_number, "eth_blockNumber")
        block = as_quantity(receipt["blockNumber"], "receipt.blockNumber", network)
        return TransactionStatus("success" if receipt.get("status") == 1 else "reverted",
                                 block_number=block, confirmations=head - block + 1)

    async def wait_receipt(self, tx_hash: HexBytes, network: EvmNetwork, *,
                           poll: float) -> Mapping[str, Any]:
        """The receipt of ``tx_hash`` once it has ``network.confirmations`` confirmations;
        :class:`ServiceUnavailable` naming the hash after ``network.receipt_timeout``."""
        eth = self.web3(network).eth
        deadline = time.monotonic() + network.receipt_timeout
        while True:
            try:
                receipt = await self.call(network, lambda: eth.get_transaction_receipt(tx_hash))
            except TransactionNotFound:
                receipt = None
            if receipt is not None and receipt.get("blockNumber") is not None:
                block = as_quantity(receipt["blockNumber"], "receipt.blockNumber", network)
                head = await self.quantity(network, lambda: eth.block_number,
                                           "eth_blockNumber")
                if head - block + 1 >= network.confirmations:
                    return receipt
            if time.monotonic() > deadline:
                # The transaction may still land: the caller must reconcile via
                # transaction_status / authorization_used before crediting or retrying.
                raise ServiceUnavailable(
                    f"no receipt for {tx_hash.to_0x_hex()} after {network.receipt_timeout}s",
                    extra={"transaction": tx_hash.to_0x_hex()})
            await asyncio.sleep(poll)

    async def aclose(self) -> None:
        """Close the HTTP sessions held by the providers."""
        for w3 in self._w3.values():
            await w3.provider.disconnect()
        self._w3.clear()


def as_quantity(value: Any, what: str, network: EvmNetwork) -> int:
    """``value`` if it is a non-negative int, else :class:`UpstreamError` naming ``what``."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    raise UpstreamError(f"{network.network} RPC answered {value!r:.80} for {what}")


__all__ = ["RPC_DOWN", "RPC_GARBAGE", "ChainRpc", "TransactionNotSent", "TransactionStatus",
           "as_quantity"]
