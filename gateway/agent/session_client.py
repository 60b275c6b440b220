"""The agent's MPP session client: an ``httpx`` transport the ``openai`` and ``anthropic`` SDKs
take as their ``http_client``, paying a tollstream gateway token by token from one escrow
channel (specs/mpp/draft-evm-session-00.md)::

    wallet = SessionWallet(KEY, token_name="USD Coin", token_version="2",
                           spend_cap=5_000_000, deposit=1_000_000)       # atomic units
    payer = SessionPayer(wallet, increment=50_000)     # each voucher adds at least this
    http = session_client(payer)
    client = openai.OpenAI(base_url=URL + "/v1", api_key="unused", http_client=http)
    ... stream as usual ...
    print(close_session(http))   # cooperative close: what was spent, what comes back

What it does for the SDK:

* the first 402 carrying an ``evm``/``session`` challenge opens a channel with ``deposit``
  (``feePayer: true``: the agent signs an EIP-3009 authorization, the gateway submits it and
  pays the gas, the wallet needs no ETH), then retries the request with a voucher;
* every request carries the latest voucher (a replay authorizes nothing more); a 402 saying
  how far the next voucher must reach (``requiredCumulative``) is answered with one;
* when a stream pauses with ``payment-need-voucher`` it signs the next voucher (at least
  ``requiredCumulative``, at least ``increment`` more) and sends it on a separate ``HEAD``
  request; if the event says the deposit is too small it tops up first; the stream resumes;
* ``payment-need-voucher`` and ``payment-receipt`` events are removed from the stream, so the
  SDK sees only model events; receipts are kept (:attr:`SessionPayer.receipts`);
* it never signs past the wallet's ``spend_cap``: a stream that needs more raises
  :class:`SessionCapExceeded` from the SDK's iterator, a request gets the gateway's 402.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncIterator, Iterator
from typing import Any

from gateway.agent.events import EventSplitter, is_payment_control
from gateway.agent.session_payer import SessionCapExceeded, SessionPayer, SessionRefused, Step
from gateway.agent.x402 import httpx

__all__ = ["SessionCapExceeded", "SessionPayer", "SessionRefused", "aclose_session",
           "async_session_client", "close_session", "session_client"]

#: How many times one request is re-sent after paying (open, voucher, fresh challenge).
#: Each retry authorizes at least ``increment`` more, all of it spent on delivered tokens:
#: streams sharing the channel may take a voucher's money before this request starts.
MAX_PAID_RETRIES = 8

#: Headers the agent's SDK sets that mean nothing to the gateway (its own API key).
_AGENT_CREDENTIALS = ("authorization", "x-api-key")


def _prepare(request: httpx.Request, payer: SessionPayer) -> None:
    for name in _AGENT_CREDENTIALS:
        request.headers.pop(name, None)
    credential = payer.request_credential()
    if credential is not None:
        request.headers["authorization"] = credential


def _unpaid(request: httpx.Request, response: httpx.Response, body: bytes) -> httpx.Response:
    """A 402 this session will not pay, already read: handed to the SDK as it came."""
    headers = [(k, v) for k, v in response.headers.multi_items()
               if k.lower() not in ("content-encoding", "content-length", "transfer-encoding")]
    return httpx.Response(response.status_code, headers=headers, content=body,
                          request=request, extensions=response.extensions)


def _head(request: httpx.Request, credential: str) -> httpx.Request:
    return httpx.Request("HEAD", request.url, headers={"authorization": credential})


class SessionTransport(httpx.BaseTransport):
    """Synchronous transport (``openai.OpenAI`` / ``anthropic.Anthropic``)."""

    def __init__(self, payer: SessionPayer, transport: httpx.BaseTransport | None = None
                 ) -> None:
        self.payer = payer
        self.inner = transport or httpx.HTTPTransport()
        self._opening = threading.Lock()

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        request.read()  # buffered: a paid retry sends the same body
        for attempt in range(MAX_PAID_RETRIES + 1):
            _prepare(request, self.payer)
            response = self.inner.handle_request(request)
            self.payer.route(request, response)
            if response.status_code != 402 or attempt == MAX_PAID_RETRIES:
                return self._paid(request, response)
            body = response.read()
            response.close()
            steps = self.payer.after_402(response.headers, body)
            if steps is None:
                return _unpaid(request, response, body)
            for step in steps:
                self._send(request, step)
        raise AssertionError("unreachable: the last attempt returns")

    def _send(self, request: httpx.Request, step: Step) -> None:
        """One payment action on HEAD (no body: a 402 is retried once with the fresh
        challenge it carries, for an expired one). Opens are serialized: one channel per
        payer."""
        with self._opening if step.opens else contextlib.nullcontext():
            if step.opens and self.payer.opened:
                return  # another request opened it meanwhile
            self._send_once(request, step)

    def _send_once(self, request: httpx.Request, step: Step) -> None:
        for attempt in range(2):
            answer = self.inner.handle_request(_head(request, step.build()))
            answer.read()
            answer.close()
            if answer.status_code == 200:
                self.payer.done(step, answer.headers)
                return
            if attempt or not self.payer.refresh(answer.headers):
                break
        raise SessionRefused(answer.status_code)

    def _paid(self, request: httpx.Request, response: httpx.Response) -> httpx.Response:
        self.payer.receipt_header(response.headers)
        if not response.headers.get("content-type", "").startswith("text/event-stream"):
            return response
        return httpx.Response(response.status_code, headers=response.headers,
                              stream=_SyncEvents(self, request, response),
                              extensions=response.extensions, request=request)

    def close_session(self, url: str | None = None) -> dict[str, Any]:
        spent: int | None = None
        for _ in range(2):
            target = url or self.payer.url
            if target is None:
                raise RuntimeError("no request was made: there is no session to close")
            answer = self.inner.handle_request(httpx.Request(
                "POST", target, headers={"authorization": self.payer.close_credential(spent)}))
            body = answer.read()
            answer.close()
            spent = self.payer.closing(answer.status_code, answer.headers, body)
            if spent is None:
                assert self.payer.closed is not None
                return self.payer.closed
        raise SessionRefused(409)

    def close(self) -> None:
        self.inner.close()


class _SyncEvents(httpx.SyncByteStream):
    def __init__(self, transport: SessionTransport, request: httpx.Request,
                 response: httpx.Response) -> None:
        self.transport, self.request, self.response = transport, request, response

    def __iter__(self) -> Iterator[bytes]:
        splitter = EventSplitter()
        payer = self.transport.payer
        for chunk in self.response.iter_raw():
            out: list[bytes] = []
            for event in splitter.feed(chunk):
                forward, need = payer.filter(event)
                if forward:
                    out.append(event)
                elif need is not None:
                    if out:  # what came before the pause reaches the SDK first
                        yield b"".join(out)
                        out = []
                    for step in payer.on_need(need):
                        self.transport._send(self.request, step)
            if out:
                yield b"".join(out)
        rest = splitter.rest()
        if rest and not is_payment_control(rest):
            yield rest

    def close(self) -> None:
        self.response.close()


class AsyncSessionTransport(httpx.AsyncBaseTransport):
    """Asynchronous transport (``openai.AsyncOpenAI`` / ``anthropic.AsyncAnthropic``)."""

    def __init__(self, payer: SessionPayer,
                 transport: httpx.AsyncBaseTransport | None = None) -> None:
        self.payer = payer
        self.inner = transport or httpx.AsyncHTTPTransport()
        self._opening = asyncio.Lock()

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        await request.aread()
        for attempt in range(MAX_PAID_RETRIES + 1):
            _prepare(request, self.payer)
            response = await self.inner.handle_async_request(request)
            self.payer.route(request, response)
            if response.status_code != 402 or attempt == MAX_PAID_RETRIES:
                return self._paid(request, response)
            body = await response.aread()
            await response.aclose()
            steps = self.payer.after_402(response.headers, body)
            if steps is None:
                return _unpaid(request, response, body)
            for step in steps:
                await self._send(request, step)
        raise AssertionError("unreachable: the last attempt returns")

    async def _send(self, request: httpx.Request, step: Step) -> None:
        async with self._opening if step.opens else contextlib.nullcontext():
            if step.opens and self.payer.opened:
                return  # another request opened it meanwhile
            await self._send_once(request, step)

    async def _send_once(self, request: httpx.Request, step: Step) -> None:
        for attempt in range(2):
            answer = await self.inner.handle_async_request(_head(request, step.build()))
            await answer.aread()
            await answer.aclose()
            if answer.status_code == 200:
                self.payer.done(step, answer.headers)
                return
            if attempt or not self.payer.refresh(answer.headers):
                break
        raise SessionRefused(answer.status_code)

    def _paid(self, request: httpx.Request, response: httpx.Response) -> httpx.Response:
        self.payer.receipt_header(response.headers)
        if not response.headers.get("content-type", "").startswith("text/event-stream"):
            return response
        return httpx.Response(response.status_code, headers=response.headers,
                              stream=_AsyncEvents(self, request, response),
                              extensions=response.extensions, request=request)

    async def close_session(self, url: str | None = None) -> dict[str, Any]:
        spent: int | None = None
        for _ in range(2):
            target = url or self.payer.url
            if target is None:
                raise RuntimeError("no request was made: there is no session to close")
            answer = await self.inner.handle_async_request(httpx.Request(
                "POST", target, headers={"authorization": self.payer.close_credential(spent)}))
            body = await answer.aread()
            await answer.aclose()
            spent = self.payer.closing(answer.status_code, answer.headers, body)
            if spent is None:
                assert self.payer.closed is not None
                return self.payer.closed
        raise SessionRefused(409)

    async def aclose(self) -> None:
        await self.inner.aclose()


class _AsyncEvents(httpx.AsyncByteStream):
    def __init__(self, transport: AsyncSessionTransport, request: httpx.Request,
                 response: httpx.Response) -> None:
        self.transport, self.request, self.response = transport, request, response

    async def __aiter__(self) -> AsyncIterator[bytes]:
        splitter = EventSplitter()
        payer = self.transport.payer
        async for chunk in self.response.aiter_raw():
            out: list[bytes] = []
            for event in splitter.feed(chunk):
                forward, need = payer.filter(event)
                if forward:
                    out.append(event)
                elif need is not None:
                    if out:
                        yield b"".join(out)
                        out = []
                    for step in payer.on_need(need):
                        await self.transport._send(self.request, step)
            if out:
                yield b"".join(out)
        rest = splitter.rest()
        if rest and not is_payment_control(rest):
            yield rest

    async def aclose(self) -> None:
        await self.response.aclose()


def session_client(payer: SessionPayer, **kwargs: Any) -> httpx.Client:
    """A synchronous HTTP client for the SDKs (``http_client=``) paying from ``payer``'s
    session; :func:`close_session` closes the session."""
    return httpx.Client(transport=SessionTransport(payer), **kwargs)


def async_session_client(payer: SessionPayer, **kwargs: Any) -> httpx.AsyncClient:
    """The asynchronous counterpart of :func:`session_client`."""
    return httpx.AsyncClient(transport=AsyncSessionTransport(payer), **kwargs)


def close_session(client: httpx.Client, url: str | None = None) -> dict[str, Any]:
    """Close the session of a :func:`session_client` cooperatively: the gateway captures
    what was spent on-chain and the escrow refunds the rest to the wallet. ``url``: a model
    route of the gateway (default: the last one used). Returns ``{channelId, deposit, spent,
    refund, txHash}``."""
    transport = client._transport
    assert isinstance(transport, SessionTransport)
    return transport.close_session(url)


async def aclose_session(client: httpx.AsyncClient, url: str | None = None
                         ) -> dict[str, Any]:
    """The asynchronous counterpart of :func:`close_session`."""
    transport = client._transport
    assert isinstance(transport, AsyncSessionTransport)
    return await transport.close_session(url)
