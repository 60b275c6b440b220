"""The upstream body's read timeout, watched by one task per process (gateway/upstream.py).

aiohttp's ``sock_read`` moved a timer on every chunk received; the gateway watches the reads
instead. What it must keep: a read that waits on a silent upstream longer than
``read_timeout`` fails (and the connection closes), while a stream the relay is not reading
(a paused one, waiting for a payment) is not a read waiting on the upstream and is left alone.
"""

from __future__ import annotations

import asyncio
import time

import pytest

from gateway.upstream import Upstreams, UpstreamStreamError
from tests.conftest import SIM_KEY, make_settings

READ_TIMEOUT = 0.4


def _upstreams(sim: str) -> Upstreams:
    return Upstreams(make_settings(sim, upstreams={"sim": {
        "base_url": f"{sim}/v1", "api_key": SIM_KEY, "forward_headers": ["x-sim-"],
        "read_timeout": READ_TIMEOUT}}))


def _body(tokens: int) -> dict[str, object]:
    return {"model": "gpt-6-luna", "stream": True, "max_tokens": tokens,
            "messages": [{"role": "user", "content": "hi"}]}


def _headers(**extra: str) -> dict[str, str]:
    return {"authorization": f"Bearer {SIM_KEY}", **extra}


def test_a_read_waiting_past_the_timeout_fails_and_closes(sim: str) -> None:
    async def run() -> tuple[float, str]:
        upstreams = _upstreams(sim)
        try:
            response = await upstreams.open("sim", "/chat/completions", _body(20), _headers(**{
                "x-sim-stall-after": "3", "x-sim-stall-seconds": "20",
                "x-sim-tokens-per-second": "200"}))
            chunks = response.chunks()
            started = time.monotonic()
            with pytest.raises(UpstreamStreamError, match="TimeoutError"):
                async for _ in chunks:
                    started = time.monotonic()  # the last chunk before the stall
            return time.monotonic() - started, "closed"
        finally:
            await upstreams.aclose()

    waited, _ = asyncio.run(asyncio.wait_for(run(), 30))
    # Past the timeout, within the watch's period after it (and the loop's slack).
    assert READ_TIMEOUT <= waited < READ_TIMEOUT + 1.0


def test_a_stream_not_being_read_is_not_timed_out(sim: str) -> None:
    async def run() -> int:
        upstreams = _upstreams(sim)
        try:
            response = await upstreams.open("sim", "/chat/completions", _body(5), _headers())
            chunks = response.chunks()
            first = await chunks.__anext__()
            # Not reading (a paused stream): the watch runs several times meanwhile. The
            # condition under test is the passing of time itself.
            await asyncio.sleep(READ_TIMEOUT * 3)
            assert not response.timed_out
            rest = [chunk async for chunk in chunks]
            return len(first) + sum(len(c) for c in rest)
        finally:
            await upstreams.aclose()

    assert asyncio.run(asyncio.wait_for(run(), 30)) > 0
