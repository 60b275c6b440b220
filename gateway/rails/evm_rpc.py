"""JSON-RPC access to EVM chains, and the one place web3/aiohttp failures become gateway errors.

:class:`ChainRpc` keeps one ``AsyncWeb3`` per RPC URL and runs each call under the network's
timeout. Every call :mod:`gateway.rails.evm` makes goes through :meth:`ChainRpc.call`, which
lets only reverts (``ContractLogicError``) and ``TransactionNotFound`` through (the caller
gives them meaning) and translates the rest with ``raise ... from exc``:

* unreachable, timed out, rate-limited -> :class:`~gateway.errors.ServiceUnavailable` (503);
* a JSON-RPC error, or an answer web3 cannot use -> :class:`~gateway.errors.UpstreamError`
  (502).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import aiohttp
from eth_utils import to_checksum_address
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

T = TypeVar("T")


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

    async def aclose(self) -> None:
        """Close the HTTP sessions held by the providers."""
        for w3 in self._w3.values():
            await w3.provider.disconnect()
        self._w3.clear()


__all__ = ["RPC_DOWN", "RPC_GARBAGE", "ChainRpc"]
