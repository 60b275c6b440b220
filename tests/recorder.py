"""A recording HTTP proxy for tests: forwards every request to a target, streams the answer
back, and remembers (method, path, status) of each, so a test can count what an agent sent."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field

import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from tests.servers import serve

_SKIP = {"host", "content-length", "transfer-encoding", "connection", "accept-encoding"}


@dataclass
class Recorder:
    url: str = ""
    requests: list[tuple[str, str, int]] = field(default_factory=list)
    bodies: list[bytes] = field(default_factory=list)

    def count(self, path: str, status: int | None = None) -> int:
        return sum(1 for _, p, s in self.requests
                   if p == path and (status is None or s == status))


@contextlib.contextmanager
def recording_proxy(target: str) -> Iterator[Recorder]:
    recorder = Recorder()

    async def forward(request: Request) -> Response:
        client = httpx.AsyncClient(timeout=120)
        content = await request.body()
        recorder.bodies.append(content)
        outgoing = client.build_request(
            request.method, target + request.url.path
            + (f"?{request.url.query}" if request.url.query else ""),
            headers=[(k, v) for k, v in request.headers.items() if k not in _SKIP],
            content=content)
        response = await client.send(outgoing, stream=True)
        recorder.requests.append((request.method, request.url.path, response.status_code))

        async def body() -> AsyncIterator[bytes]:
            try:
                async for chunk in response.aiter_raw():
                    yield chunk
            finally:
                await response.aclose()
                await client.aclose()

        return StreamingResponse(body(), status_code=response.status_code, headers={
            k: v for k, v in response.headers.items()
            if k not in _SKIP and k != "content-encoding"})

    app = Starlette(routes=[Route("/{path:path}", forward,
                                  methods=["GET", "POST", "HEAD", "OPTIONS"])])
    with serve(app) as url:
        recorder.url = url
        yield recorder
