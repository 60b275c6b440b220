"""Lua scripts: their sources, and how one runs (by SHA, loaded when the server lacks it).

The ledger's scripts are its hot path: two calls per request (open, close) and one per
lease. redis-py's ``evalsha`` costs about 180 us of CPU per call on the 2-core benchmark
machine, of which about 75 us are its command wrapper (retries, observability hooks) and its
blocking pool (a condition, a timer and a socket check per checkout); the command itself on a
connection at hand costs about 110 us (benchmarks/RESULTS.md, #13 item 4). So a single-node
client's scripts run on connections the scripts keep at hand (:class:`ScriptConnections`),
borrowed from the client's own pool: ``redis_max_connections`` still bounds them all. Their
commands are packed by hiredis (C; redis-py's asyncio connection packs in Python), and
redis-py reads the replies with hiredis's parser when it is installed (a dependency): one
lease and one settle ~200 us of CPU instead of ~250 us (benchmarks/RESULTS.md, session 19).
"""

from __future__ import annotations

import asyncio
import hashlib
import weakref
from collections.abc import Iterable, Sequence
from importlib import resources
from typing import Any

import redis.asyncio as aioredis
from hiredis import pack_command
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.connection import AbstractConnection
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError


def script(name: str) -> str:
    """The source of one of the Lua scripts in ``meters/lua``."""
    return resources.files("meters").joinpath("lua", name).read_text(encoding="utf-8")


class ScriptConnections:
    """Connections borrowed from a client's pool and kept for the scripts.

    A call takes an idle one (no lock, no timer: the common case), else borrows one from the
    pool (its bounded wait: ``ConnectionError`` when none is free in time, the ledger fails
    closed). At most an eighth of the pool (at most 16, none of a pool under 8) is kept
    idle; the others go back to the pool, so the scripts never sit on the connections other
    commands (the credit notices' subscription, idempotency records, the admin API) need.

    A connection is kept only clean: any failure or cancellation between sending a command
    and reading its whole answer disconnects it first (its next use connects again). A
    connection that sat idle may have been closed by the server (a restart): a call failing
    to reach Redis on one is made once more on a fresh connection, as redis-py's own retry
    would (every script is safe to repeat: charges are cumulative targets, credits are
    recorded once).
    """

    def __init__(self, client: aioredis.Redis) -> None:
        self.pool = client.connection_pool
        self._idle: list[AbstractConnection] = []
        #: Idle connections kept at most (more are returned to the pool).
        self.keep = min(16, int(getattr(self.pool, "max_connections", 0) or 0) // 8)

    async def run(self, *args: Any) -> Any:
        """Send the command ``args`` and return its answer, unparsed (``EVALSHA``'s)."""
        reused = bool(self._idle)
        connection = self._idle.pop() if reused else await self._borrow()
        try:
            try:
                return await self._once(connection, args)
            except RedisConnectionError:
                if not reused:
                    raise
                return await self._once(connection, args)  # connects anew
        finally:
            if len(self._idle) < self.keep:
                self._idle.append(connection)
            else:
                # Shielded: a cancellation arriving meanwhile must not leave the pool
                # counting it as in use for ever.
                await asyncio.shield(self.pool.release(connection))

    async def _borrow(self) -> AbstractConnection:
        try:
            return await self.pool.get_connection()
        except RedisTimeoutError:
            # Opening a connection took longer than socket_connect_timeout: on a loaded
            # machine a burst of streams opening at once can do that (seen: 512 leases at
            # once under coverage). Nothing was sent yet: once more. (A refused connection or
            # a pool with none free is not retried: the ledger fails closed at once.)
            return await self.pool.get_connection()

    @staticmethod
    async def _once(connection: AbstractConnection, args: tuple[Any, ...]) -> Any:
        try:
            await connection.send_packed_command(pack_command(args))
            return await connection.read_response()
        except ResponseError:
            raise  # an error answer, read in full: the connection is clean
        except BaseException:
            await connection.disconnect(nowait=True)
            raise


#: Per single-node client, the connections its scripts keep (see :class:`ScriptConnections`).
_CONNECTIONS: weakref.WeakKeyDictionary[aioredis.Redis, ScriptConnections] = (
    weakref.WeakKeyDictionary())


def script_connections(client: aioredis.Redis | RedisCluster) -> ScriptConnections | None:
    """The connections ``client``'s scripts run on; None for a cluster client (it routes
    each script to its key's node itself)."""
    if not isinstance(client, aioredis.Redis) or client.single_connection_client:
        return None
    connections = _CONNECTIONS.get(client)
    if connections is None:
        connections = _CONNECTIONS[client] = ScriptConnections(client)
    return connections


class LuaScript:
    """A Lua script bound to a client: ``EVALSHA``, and ``SCRIPT LOAD`` then again when the
    server does not know it yet (a new or restarted server, a cluster node after a failover).

    What redis-py's ``register_script`` does, on :class:`ScriptConnections` (a single-node
    client) and without its per-call ``isinstance`` check against its pipeline class (whose
    metaclass is ``typing``'s protocol one: that check alone was about 3% of the gateway's
    CPU per request). No script here runs in a pipeline.
    """

    __slots__ = ("client", "connections", "sha", "source")

    def __init__(self, client: aioredis.Redis | RedisCluster, source: str) -> None:
        self.client, self.source = client, source
        self.sha = hashlib.sha1(source.encode("utf-8")).hexdigest()  # how Redis names it
        self.connections = script_connections(client)

    async def __call__(self, keys: Sequence[Any] = (),
                       args: Iterable[Any] = ()) -> Any:
        """Run the script with ``keys`` and ``args``; what it returns."""
        try:
            return await self._evalsha(keys, args)
        except NoScriptError:
            if self.connections is None:
                self.sha = await self.client.script_load(self.source)
            else:
                await self.connections.run("SCRIPT", "LOAD", self.source)  # names it self.sha
            return await self._evalsha(keys, args)

    async def _evalsha(self, keys: Sequence[Any], args: Iterable[Any]) -> Any:
        if self.connections is None:
            return await self.client.evalsha(self.sha, len(keys), *keys, *args)
        return await self.connections.run("EVALSHA", self.sha, len(keys), *keys, *args)


__all__ = ["LuaScript", "ScriptConnections", "script", "script_connections"]
