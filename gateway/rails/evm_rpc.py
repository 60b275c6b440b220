"""JSON-RPC access to EVM chains, and the one place web3/aiohttp failures become gateway errors.

:class:`ChainRpc` keeps one ``AsyncWeb3`` per RPC URL, runs each call under the network's
timeout, and answers the chain-generic questions settlement asks (a transaction's status, its
receipt once confirmed). Every call goes through :meth:`ChainRpc.call`, which lets only reverts
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

T = TypeVar("T")


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
            return await asyncio.wait_for(call(), network.rpc_timeout)
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


__all__ = ["RPC_DOWN", "RPC_GARBAGE", "ChainRpc", "TransactionStatus", "as_quantity"]
