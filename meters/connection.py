"""The ledger's connection to Redis: the client, its connections, and Redis failures as
:class:`~meters.errors.LedgerUnavailable` (fail closed).

:func:`connect` makes a single-node client over a bounded, blocking pool, or redis-py's cluster
client (:class:`BoundedCluster`) when the URL names a Redis / Valkey Cluster. Both use
:class:`CancelSafeConnection`, redis-py's asyncio connection with one fix: a cancelled caller
stays cancelled.

On Python 3.11, ``asyncio.wait_for`` returns the inner result instead of raising when its
caller is cancelled in the loop iteration in which the inner task finishes (CPython gh-86296;
3.12 rebuilt ``wait_for`` on ``asyncio.timeout`` and fixed it). redis-py 8.1 bounds every
socket write with ``wait_for`` when ``socket_timeout`` is set, and a write to Redis finishes in
one iteration, so a cancellation that landed on a command's send was lost more often than not
(measured: 45 to 51 of 60 cancellations of a task looping on ledger commands, one at each loop
iteration). The task then carried on as if nothing had happened: a background pass never
stopped (a gateway's shutdown hung), a stream cancelled because its client left ran on to its
next send, an ``asyncio.timeout`` around a ledger call did not fire.
:class:`CancelSafeConnection` bounds the write with ``asyncio.timeout`` (which propagates the
cancellation on 3.11) and otherwise does what redis-py's ``send_packed_command`` does: connect
if needed, the health check, and a connection closed after any failed or interrupted write
(half a command on the wire cannot be resumed).
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
from collections.abc import Iterable, Iterator
from typing import Any, cast

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.driver_info import DriverInfo
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.utils import get_lib_version

from meters.errors import LedgerUnavailable

#: Where ``asyncio.wait_for`` is sound, redis-py's own write path is used unchanged.
WAIT_FOR_LOSES_CANCELLATION = sys.version_info < (3, 12)


class CancelSafeConnection(aioredis.Connection):
    """A TCP connection to Redis whose writes never swallow a cancellation."""

    async def send_packed_command(self, command: str | bytes | Iterable[bytes],
                                  check_health: bool = True) -> None:
        if not WAIT_FOR_LOSES_CANCELLATION or not self.socket_timeout:
            await super().send_packed_command(command, check_health)
            return
        if not self.is_connected:
            await self.connect_check_health(check_health=False)
        if check_health:
            await self.check_health()
        if isinstance(command, str):
            command = command.encode()
        chunks = [command] if isinstance(command, bytes) else command
        writer: Any = self._writer
        try:
            writer.writelines(chunks)
            if writer.transport.get_write_buffer_size():
                # Part of the command waits for the socket: the drain may wait, bounded.
                async with asyncio.timeout(self.socket_timeout):
                    await writer.drain()
            else:
                # All of it went out: the drain cannot wait (it raises only a connection's
                # error), so no deadline is armed (one per command, 1.5% of a request's CPU).
                await writer.drain()
        except TimeoutError:
            await self.disconnect(nowait=True)
            raise RedisTimeoutError("Timeout writing to socket") from None
        except OSError as exc:
            await self.disconnect(nowait=True)
            raise RedisConnectionError(f"Error while writing to socket: {exc}") from exc
        except BaseException:
            # Cancelled mid-write: part of the command may be on the wire, so the
            # connection cannot carry another one.
            await self.disconnect(nowait=True)
            raise


@contextlib.contextmanager
def redis_errors() -> Iterator[None]:
    """Translate any Redis failure into :class:`LedgerUnavailable` (fail closed)."""
    try:
        yield
    except RedisError as exc:
        raise LedgerUnavailable("the ledger (Redis) is unreachable") from exc


#: Named once: without it redis-py reads its package metadata (a file) for every new
#: connection, which fails as an ``OSError`` when the process is out of file descriptors.
_DRIVER = DriverInfo(name="redis-py", lib_version=get_lib_version())


def connect(url: str, *, cluster: bool = False, max_connections: int = 64,
            pool_timeout: float = 5.0) -> aioredis.Redis:
    """A client whose pool of at most ``max_connections`` waits up to ``pool_timeout``
    seconds for a free connection (then raises ``ConnectionError``: fail closed) instead of
    opening more, and whose short timeouts make an unreachable Redis fail closed within a
    second or two.

    ``cluster``: ``url`` names any node of a Redis / Valkey Cluster, and the client is
    redis-py's cluster client (it learns the others and routes each command, script and
    key-slot by key). Its type is the single-node client's as far as the ledger is concerned:
    it offers the same commands (the few places that differ check ``is_cluster``)."""
    if cluster:
        return cast(aioredis.Redis, BoundedCluster.from_url(
            url, max_in_flight=max_connections, pool_timeout=pool_timeout,
            # Per node. The cluster client opens one when none is free, up to this, and
            # fails at once past it: BoundedCluster keeps commands below it (waiting, like
            # the single-node pool), the headroom is for pipelines and the pub/sub connection.
            max_connections=max_connections + 16, socket_connect_timeout=1, socket_timeout=3,
            driver_info=_DRIVER))
    pool = aioredis.BlockingConnectionPool.from_url(
        url, max_connections=max_connections, timeout=pool_timeout, socket_connect_timeout=1,
        socket_timeout=3, driver_info=_DRIVER, connection_class=CancelSafeConnection)
    return aioredis.Redis(connection_pool=pool)


class BoundedCluster(RedisCluster):
    """redis-py's asyncio cluster client, bounded like the single-node pool: at most
    ``max_in_flight`` commands at once (so no node's pool is ever exhausted), a command
    waiting up to ``pool_timeout`` seconds for its turn, then ``ConnectionError`` (fail
    closed). redis-py's own cluster pool raises at once when a node's connections are all in
    use, which under a burst of streams would refuse what a short wait serves."""

    def __init__(self, *args: Any, max_in_flight: int = 64, pool_timeout: float = 5.0,
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # redis-py's cluster client takes no connection class (it names its own): every node
        # it has or learns later is built from these kwargs, and none has connected yet.
        if not kwargs.get("ssl"):
            self.connection_kwargs["connection_class"] = CancelSafeConnection
            for node in self.startup_nodes:
                node.connection_class = CancelSafeConnection
        self._in_flight = asyncio.Semaphore(max_in_flight)
        self._pool_timeout = pool_timeout

    async def execute_command(self, *args: Any, **kwargs: Any) -> Any:
        try:
            # Not asyncio.wait_for: on Python 3.11 it can swallow a cancellation (above).
            async with asyncio.timeout(self._pool_timeout):
                await self._in_flight.acquire()
        except TimeoutError as exc:
            raise RedisConnectionError("no free Redis connection within "
                                       f"{self._pool_timeout:g} s") from exc
        try:
            return await super().execute_command(*args, **kwargs)
        finally:
            self._in_flight.release()


def is_cluster(client: aioredis.Redis) -> bool:
    return isinstance(client, RedisCluster)


def as_text(value: bytes | str) -> str:
    """Redis replies are bytes; keys and ids are ASCII text."""
    return value.decode() if isinstance(value, bytes) else value
