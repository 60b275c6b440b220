"""Exact delivery accounting: the gateway notices a gone client at the first send that does
not reach it (a defect found by the fault tests: under Starlette the check never engaged,
because the ``send`` a response gets is wrapped and no longer knows its connection)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from fastapi import Request
from starlette.types import Message

from gateway.app import GatewayApp
from gateway.sse_response import CONNECTION_KEY, EventStreamResponse
from tests.servers import serve

pytestmark = pytest.mark.timeout(30)


def test_the_server_connection_reaches_the_response() -> None:
    app = GatewayApp()

    @app.get("/probe")
    async def probe(request: Request) -> dict[str, Any]:
        connection = request.scope.get(CONNECTION_KEY)
        return {"found": connection is not None,
                "knows_disconnect": hasattr(connection, "disconnected")}

    with serve(app) as url:
        assert httpx.get(f"{url}/probe", timeout=10).json() == {
            "found": True, "knows_disconnect": True}


async def test_a_send_after_the_disconnect_stops_the_stream_at_once() -> None:
    class Connection:
        disconnected = False

    connection = Connection()
    written: list[bytes] = []
    produced = 0

    async def events() -> AsyncIterator[bytes]:
        nonlocal produced
        for i in range(1000):
            produced += 1
            yield f"data: {i}\n\n".encode()

    async def send(message: Message) -> None:
        if message["type"] == "http.response.body" and message.get("body"):
            if connection.disconnected:
                return  # what uvicorn does: the message is silently dropped
            written.append(message["body"])
            if len(written) == 3:
                connection.disconnected = True  # the client goes away after 3 events

    async def receive() -> Message:
        await asyncio.sleep(3600)  # no disconnect message: only the send check can tell
        return {"type": "http.disconnect"}

    scope = {"type": "http", "method": "GET", "path": "/", "headers": [],
             CONNECTION_KEY: connection}
    response = EventStreamResponse(events(), ping=0)
    with pytest.raises(BaseException):  # noqa: B017 (ClientGone, maybe in a group)
        await asyncio.wait_for(response(scope, receive, send), 10)
    # Events are produced one send ahead at most: the stream stopped at the first send that
    # did not reach the client, it did not run on into the void.
    assert len(written) == 3 and produced <= 5


async def test_a_client_gone_after_the_last_event_is_not_an_error() -> None:
    """The SDKs stop reading at ``[DONE]`` and close: only the end of the body (which carries
    no event) is dropped, and the answer completes without an error for the server to log."""
    class Connection:
        disconnected = False

    connection = Connection()
    written: list[bytes] = []

    async def events() -> AsyncIterator[bytes]:
        yield b"data: 1\n\n"
        yield b"data: [DONE]\n\n"

    async def send(message: Message) -> None:
        if message["type"] != "http.response.body":
            return
        if written[-1:] == [b"data: [DONE]\n\n"]:
            # The client closed on [DONE]; the server learns it before the next write,
            # which it drops (as uvicorn does).
            connection.disconnected = True
            return
        written.append(message["body"])

    async def receive() -> Message:
        await asyncio.sleep(3600)
        return {"type": "http.disconnect"}

    scope = {"type": "http", "method": "GET", "path": "/", "headers": [],
             CONNECTION_KEY: connection}
    async with asyncio.timeout(10):
        await EventStreamResponse(events(), ping=0)(scope, receive, send)
    assert written == [b"data: 1\n\n", b"data: [DONE]\n\n"]
