"""Which event loop runs what (gateway/background.py): the gateway on uvloop, as `tollstream
serve` runs it; the helpers sharing a test's or the demo's process on asyncio's loop, because
a busy uvloop thread keeps the GIL through its socket calls and starves its neighbours."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from typing import Any

import httpx
import pytest

from gateway.background import default_loop, serve
from gateway.summary import startup
from tests.conftest import make_settings

pytestmark = pytest.mark.timeout(60)


async def _report_loop(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """An ASGI app answering with the module of the loop serving it."""
    if scope["type"] == "lifespan":
        while (message := await receive())["type"] != "lifespan.shutdown":
            await send({"type": message["type"] + ".complete"})
        await send({"type": "lifespan.shutdown.complete"})
        return
    body = type(asyncio.get_running_loop()).__module__.encode()
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": body})


class _GatewayLike:
    """The same app, marked as the gateway is (``GatewayApp.production_loop``)."""

    production_loop = True

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        await _report_loop(scope, receive, send)


@pytest.mark.skipif(sys.platform == "win32", reason="uvloop is not a dependency on Windows")
def test_uvloop_is_installed_and_the_default() -> None:
    assert default_loop() == "uvloop"


def test_the_gateway_runs_on_the_default_loop_and_helpers_on_asyncio() -> None:
    with serve(_GatewayLike()) as url:
        assert httpx.get(url, timeout=5).text.startswith(default_loop())
    with serve(_report_loop) as url:
        assert httpx.get(url, timeout=5).text == "asyncio.unix_events"


def test_serve_names_its_loop_and_accepts_another() -> None:
    lines = startup(make_settings("http://unused"), address="http://h:1", redis_url="r",
                    embedded=False, loop="uvloop")
    assert "(one worker, uvloop loop)" in lines[0]
    result = subprocess.run([sys.executable, "-m", "gateway.cli", "serve", "--loop", "trio"],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 2 and "--loop" in result.stderr
