"""The gateway's HTTP/1.1 client (gateway/http_client.py, gateway/http_connection.py), against
real servers on loopback: the simulator (uvicorn) for keep-alive, and raw asyncio servers for
what a well-behaved server does not do (TLS with a test CA, a close mid-body, a
close-delimited or gzip body, a writer the reader cannot keep up with, bytes that are not
HTTP).

Each test runs in its own event loop under a time bound (``asyncio.wait_for``).
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import ssl
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from gateway.errors import BadRequest, UpstreamError
from gateway.http_client import HIGH_WATER, Pool
from gateway.upstream import Upstreams, UpstreamStreamError
from tests.conftest import SIM_KEY, make_settings

BOUND = 30.0

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


def run(coro: Awaitable[Any]) -> Any:
    return asyncio.run(asyncio.wait_for(coro, BOUND))  # type: ignore[arg-type]


async def read_request(reader: asyncio.StreamReader) -> bytes:
    """The request's head and its Content-Length body."""
    head = await reader.readuntil(b"\r\n\r\n")
    length = next((int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                   if line.lower().startswith(b"content-length:")), 0)
    return head + await reader.readexactly(length)


async def raw_server(handler: Handler, ssl_context: ssl.SSLContext | None = None
                     ) -> tuple[asyncio.Server, int]:
    server = await asyncio.start_server(handler, "127.0.0.1", 0, ssl=ssl_context)
    return server, server.sockets[0].getsockname()[1]


def upstreams_for(base_url: str, ssl_context: ssl.SSLContext | None = None) -> Upstreams:
    return Upstreams(make_settings("http://unused", upstreams={"sim": {
        "base_url": base_url, "api_key": SIM_KEY, "read_timeout": 5}}), ssl_context)


@contextlib.asynccontextmanager
async def raw_upstreams(handler: Handler) -> AsyncIterator[Upstreams]:
    """An upstream "sim" served by ``handler`` on a free loopback port (plain HTTP)."""
    server, port = await raw_server(handler)
    upstreams = upstreams_for(f"http://127.0.0.1:{port}/v1")
    try:
        yield upstreams
    finally:
        await upstreams.aclose()
        server.close()


def sim_upstreams(sim: str) -> Upstreams:
    return Upstreams(make_settings(sim, upstreams={"sim": {
        "base_url": f"{sim}/v1", "api_key": SIM_KEY, "forward_headers": ["x-sim-"]}}))


BODY = {"model": "gpt-6-luna", "stream": True, "max_tokens": 5,
        "messages": [{"role": "user", "content": "hi"}]}
HEADERS = {"authorization": f"Bearer {SIM_KEY}", "content-type": "application/json"}


def test_connections_are_reused_after_a_complete_answer_only(sim: str) -> None:
    async def main() -> tuple[int, int, bytes]:
        upstreams = sim_upstreams(sim)
        try:
            for _ in range(3):  # read to the end, closed: back to the pool
                response = await upstreams.open("sim", "/chat/completions", BODY, HEADERS)
                body = await response.read(1 << 20)
                response.close()
                response.close()  # idempotent: the connection is not released twice
            reused = upstreams.pool.connections_made
            # Abandoned mid-stream: that connection is closed, the next request needs one.
            response = await upstreams.open("sim", "/chat/completions",
                                            {**BODY, "max_tokens": 200},
                                            {**HEADERS, "x-sim-tokens-per-second": "50"})
            async for _ in response.chunks():
                break
            response.close()
            response = await upstreams.open("sim", "/chat/completions", BODY, HEADERS)
            await response.read(1 << 20)
            response.close()
            return reused, upstreams.pool.connections_made, body
        finally:
            await upstreams.aclose()

    reused, after, body = run(main())
    assert reused == 1
    assert after == 2
    assert body.rstrip().endswith(b"data: [DONE]")


def test_tls_with_the_upstreams_ca(tmp_path: Path) -> None:
    """An https upstream is verified against the given trust store (the system's when none):
    a certificate it does not trust fails as unreachable, the trusted one streams."""
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-keyout", str(key), "-out", str(cert), "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"],
                   check=True, capture_output=True, timeout=60)
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(cert, key)

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        request = await read_request(reader)
        assert request.startswith(b"POST /v1/chat/completions?beta=true HTTP/1.1\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
                     b"transfer-encoding: chunked\r\n\r\n"
                     b"6\r\ndata: \r\n3\r\n1\n\n\r\n0\r\n\r\n")
        await writer.drain()
        await reader.read()  # until the client closes

    async def main() -> tuple[bytes, str]:
        server, port = await raw_server(handler, server_ctx)
        trusted = ssl.create_default_context(cafile=str(cert))
        good, bad = (upstreams_for(f"https://127.0.0.1:{port}/v1", ctx)
                     for ctx in (trusted, None))
        try:
            response = await good.open("sim", "/chat/completions", BODY, HEADERS,
                                       query="beta=true")
            body = await response.read(1 << 20)
            response.close()
            with pytest.raises(UpstreamError) as info:
                await bad.open("sim", "/chat/completions", BODY, HEADERS)
            assert isinstance(info.value.__cause__, ssl.SSLCertVerificationError)
            return body, info.value.code
        finally:
            await good.aclose()
            await bad.aclose()
            server.close()

    body, code = run(main())
    assert body == b"data: 1\n\n"
    assert code == "upstream_unreachable"


@pytest.mark.parametrize("answer", ["close-delimited", "gzip", "content-length",
                                    "early-hints"])
def test_bodies_framed_every_way_arrive_whole(answer: str) -> None:
    payload = b"".join(b"data: {\"n\": %d}\n\n" % i for i in range(2000))

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        if answer == "close-delimited":
            writer.write(b"HTTP/1.1 200 OK\r\nconnection: close\r\n\r\n")
            for i in range(0, len(payload), 1000):  # several reads
                writer.write(payload[i:i + 1000])
                await writer.drain()
            writer.close()
            return
        if answer == "early-hints":  # an interim answer first: the real one follows
            writer.write(b"HTTP/1.1 103 Early Hints\r\nlink: </a>; rel=preload\r\n\r\n")
        body = gzip.compress(payload) if answer == "gzip" else payload
        coding = b"content-encoding: gzip\r\n" if answer == "gzip" else b""
        writer.write(b"HTTP/1.1 200 OK\r\n%bcontent-length: %d\r\n\r\n%b"
                     % (coding, len(body), body))
        await writer.drain()
        await reader.read()

    async def main() -> bytes:
        async with raw_upstreams(handler) as upstreams:
            response = await upstreams.open("sim", "/chat/completions", BODY, HEADERS)
            body = await response.read(1 << 22)
            response.close()
            return body

    assert run(main()) == payload


def test_a_close_mid_body_fails_the_read_after_what_arrived() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n"
                     b"9\r\ndata: 1\n\n\r\n")
        await writer.drain()
        writer.transport.abort()

    async def main() -> tuple[list[bytes], str]:
        got: list[bytes] = []
        async with raw_upstreams(handler) as upstreams:
            response = await upstreams.open("sim", "/chat/completions", BODY, HEADERS)
            with pytest.raises(UpstreamStreamError) as info:
                async for chunk in response.chunks():
                    got.append(chunk)
            response.close()
            return got, str(info.value)

    got, error = run(main())
    assert got == [b"data: 1\n\n"]
    assert error == "Disconnected"


@pytest.mark.parametrize(("answer", "code"), [
    (b"SMTP ready\r\n\r\n", "upstream_error"),
    (b"", "upstream_unreachable"),
    (b"HTTP/1.1 200 OK\r\ncontent-encoding: br\r\ncontent-length: 1\r\n\r\nx",
     "upstream_error"),
], ids=["not-http", "closed", "brotli"])
def test_an_answer_that_cannot_be_read_is_a_502(answer: bytes, code: str) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(answer)
        await writer.drain()
        writer.close()

    async def main() -> str:
        async with raw_upstreams(handler) as upstreams:
            with pytest.raises(UpstreamError) as info:
                response = await upstreams.open("sim", "/chat/completions", BODY, HEADERS)
                await response.read(1 << 20)  # not reached when open raises, as it must
            return info.value.code

    assert run(main()) == code


def test_a_header_with_a_line_break_is_refused_before_anything_is_sent() -> None:
    seen: list[bytes] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        seen.append(await reader.read())

    async def main() -> str:
        async with raw_upstreams(handler) as upstreams:
            with pytest.raises(BadRequest) as info:
                await upstreams.open("sim", "/chat/completions", BODY,
                                     {**HEADERS, "x-sim-a": "b\r\nx-injected: 1"})
            return info.value.code

    assert run(main()) == "invalid_header"
    assert seen == []  # no connection was even made


def test_a_reader_that_stops_reading_stops_the_socket() -> None:
    """Flow control: a paused stream holds its upstream by TCP, not by buffering it all."""
    total = 64 * HIGH_WATER
    held = asyncio.Event()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n" % total)
        sent = 0
        block = b"x" * 65536
        while sent < total:
            writer.write(block)
            sent += len(block)
            try:
                await asyncio.wait_for(writer.drain(), 1.0)
            except TimeoutError:
                held.set()  # the client stopped taking: its socket is paused
                await writer.drain()
        await reader.read()

    async def main() -> tuple[int, int]:
        async with raw_upstreams(handler) as upstreams:
            response = await upstreams.open("sim", "/chat/completions", BODY, HEADERS)
            chunks = response.chunks()
            first = await anext(chunks)
            await asyncio.wait_for(held.wait(), 20)  # the server is held while unread
            connection = response._conn
            assert connection is not None
            buffered = connection._size
            rest = len(first)
            async for chunk in chunks:
                rest += len(chunk)
            response.close()
            return buffered, rest

    buffered, received = run(main())
    assert buffered <= 2 * HIGH_WATER  # at most the high water and one read past it
    assert received == total


def test_an_idle_connection_the_server_closed_is_not_reused() -> None:
    requests: list[int] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        requests.append(1)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
        await writer.drain()
        writer.close()  # no "connection: close" said: the client learns by the close

    async def main() -> int:
        server, port = await raw_server(handler)
        pool = Pool()
        try:
            for _ in range(3):
                conn = await pool.request(f"http://127.0.0.1:{port}/", [], b"{}",
                                          connect_timeout=5, head_timeout=5)
                while not conn.complete:
                    await conn.wait()
                assert conn.take() == b"ok"
                pool.done(conn)
                while conn.transport is not None and not conn.transport.is_closing():
                    await asyncio.sleep(0.01)  # until the server's close arrives
            return pool.connections_made
        finally:
            pool.close()
            server.close()

    assert run(main()) == 3
    assert len(requests) == 3


def test_connections_idle_past_the_keepalive_are_closed() -> None:
    """A burst's connections do not stay open once the load is gone (a descriptor each)."""
    closed = 0
    all_closed = asyncio.Event()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal closed
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
        await writer.drain()
        await reader.read()  # kept open until the client closes it
        closed += 1
        if closed == 3:
            all_closed.set()

    async def one(pool: Pool, port: int) -> None:
        conn = await pool.request(f"http://127.0.0.1:{port}/", [], b"{}",
                                  connect_timeout=5, head_timeout=5)
        while not conn.complete:
            await conn.wait()
        conn.take()
        pool.done(conn)

    async def main() -> tuple[int, int, int]:
        server, port = await raw_server(handler)
        pool = Pool(keepalive=0.3)
        try:
            await asyncio.gather(*(one(pool, port) for _ in range(3)))
            idle_after_burst = pool.idle()
            pool.prune()  # not yet expired: kept
            kept = pool.idle()
            await asyncio.sleep(0.4)  # past the keep-alive (the condition is time itself)
            pool.prune()
            await asyncio.wait_for(all_closed.wait(), 10)
            return idle_after_burst, kept, pool.idle()
        finally:
            pool.close()
            server.close()

    assert run(main()) == (3, 3, 0)


def test_a_corrupt_compressed_body_fails_the_read() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        body = gzip.compress(b"data: 1\n\n")[:12] + b"not deflate at all"
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-encoding: gzip\r\ncontent-length: %d\r\n"
                     b"\r\n%b" % (len(body), body))
        await writer.drain()
        await reader.read()

    async def main() -> str:
        async with raw_upstreams(handler) as upstreams:
            response = await upstreams.open("sim", "/chat/completions", BODY, HEADERS)
            with pytest.raises(UpstreamStreamError) as info:
                await response.read(1 << 20)
            response.close()
            return str(info.value)

    assert run(main()) == "MalformedResponse"
