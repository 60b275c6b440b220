"""Lua scripts: their sources, and how one runs (by SHA, loaded when the server lacks it)."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from importlib import resources
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import NoScriptError


def script(name: str) -> str:
    """The source of one of the Lua scripts in ``meters/lua``."""
    return resources.files("meters").joinpath("lua", name).read_text(encoding="utf-8")


class LuaScript:
    """A Lua script bound to a client: ``EVALSHA``, and ``SCRIPT LOAD`` then again when the
    server does not know it yet (a new or restarted server, a cluster node after a failover).

    What redis-py's ``register_script`` does, without its per-call ``isinstance`` check
    against its pipeline class: that class' metaclass is ``typing``'s protocol one, whose
    ``isinstance`` cost about 3% of the gateway's CPU per request (py-spy, one-token
    requests; benchmarks/RESULTS.md, #13 item 4). No script here runs in a pipeline.
    """

    __slots__ = ("client", "sha", "source")

    def __init__(self, client: aioredis.Redis | RedisCluster, source: str) -> None:
        self.client, self.source = client, source
        self.sha = hashlib.sha1(source.encode("utf-8")).hexdigest()  # how Redis names it

    async def __call__(self, keys: Sequence[Any] = (),
                       args: Iterable[Any] = ()) -> Any:
        """Run the script with ``keys`` and ``args``; what it returns."""
        try:
            return await self.client.evalsha(self.sha, len(keys), *keys, *args)
        except NoScriptError:
            self.sha = await self.client.script_load(self.source)
            return await self.client.evalsha(self.sha, len(keys), *keys, *args)
