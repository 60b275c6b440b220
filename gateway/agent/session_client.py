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
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from typing import Any

import orjson

from gateway.agent.events import EventSplitter, is_payment_control, payment_event
from gateway.agent.session import SessionCapExceeded, SessionWallet, session_challenge
from gateway.agent.x402 import httpx
from gateway.rails.mpp.scheme import b64url_decode

__all__ = ["SessionCapExceeded", "SessionPayer", "SessionRefused", "aclose_session",
           "async_session_client", "close_session", "session_client"]

#: How many times one request is re-sent after paying (open, voucher, fresh challenge).
#: Each retry authorizes at least ``increment`` more, all of it spent on delivered tokens:
#: streams sharing the channel may take a voucher's money before this request starts.
MAX_PAID_RETRIES = 8
#: Headers the agent's SDK sets that mean nothing to the gateway (its own API key).
_AGENT_CREDENTIALS = ("authorization", "x-api-key")



@dataclass(frozen=True, slots=True)
class Step:
    """One payment action to send on ``HEAD``: ``build`` signs it with the payer's current
    challenge (again after a fresh one replaced an expired one)."""

    build: Callable[[], str]
    tops_up: int = 0   # what it adds to the deposit, once the gateway took it
    opens: int = 0     # the deposit of the channel it opens


class SessionRefused(RuntimeError):
    """The gateway refused a payment action (open, top-up, voucher) of the session."""

    def __init__(self, status: int) -> None:
        super().__init__(f"the gateway refused a session payment (HTTP {status})")
        self.status = status


class SessionPayer:
    """The agent's side of one session (shared by the sync and async transports): what to
    sign when, from what the gateway said. No I/O here."""

    def __init__(self, wallet: SessionWallet, *, increment: int,
                 top_up: int | None = None) -> None:
        if increment <= 0:
            raise ValueError("increment must be a positive number of atomic units")
        self.wallet = wallet
        self.increment = increment
        self.top_up_amount = top_up or wallet.deposit
        self.accepted = 0       # acceptedCumulative, as the gateway last said
        self.spent = 0          # spent, as the gateway last said
        self.receipts: list[dict[str, Any]] = []
        self.closed: dict[str, Any] | None = None
        self.url: str | None = None  # the model route, where the session is managed
        self.opened = False  # the gateway took the channel's open
        self._lock = threading.Lock()

    @property
    def channel_id(self) -> str | None:
        return self.wallet.channel_id

    # -- what to send ---------------------------------------------------------------------
    def request_credential(self) -> str | None:
        """The credential a model request carries: the highest voucher signed so far (a
        replay authorizes nothing new; right after the open, the first ``increment``), or
        None before a channel is open."""
        if not self.opened:
            return None
        with self._lock:
            amount = self.wallet.authorized or min(self.increment, self.wallet.channel_deposit)
            return self.wallet.voucher(amount)

    def after_402(self, headers: Any, body: bytes) -> list[Step] | None:
        """What to send (on ``HEAD``, in order) before the request is tried again; an empty
        list: just retry (the next voucher rides on it); None: this 402 cannot be paid."""
        challenge = session_challenge(headers)
        if challenge is None:
            return None
        problem = _json(body)
        kind = str(problem.get("type", "")).rsplit("/", 1)[-1]
        with self._lock:
            self.wallet.challenge = challenge  # a fresh one: earlier ones may have expired
            if not self.opened:  # concurrent requests open one channel (see _send)
                return [Step(lambda: self.wallet.open(challenge),
                             opens=self.wallet.deposit)]
            if kind in ("payment-expired", "invalid-challenge"):
                return []  # signed again with the fresh challenge
            required = int(problem.get("requiredCumulative") or 0)
            if not required:
                return None  # refused for another reason: the agent sees the 402
            return self._pay_up_to(required, problem)

    def on_need(self, data: dict[str, Any]) -> list[Step]:
        """A stream paused (``payment-need-voucher``): the top-up and voucher to send."""
        with self._lock:
            return self._pay_up_to(int(data["requiredCumulative"]), data)

    def _pay_up_to(self, required: int, fields: dict[str, Any]) -> list[Step]:
        wallet = self.wallet
        self.accepted = max(self.accepted, int(fields.get("acceptedCumulative") or 0))
        wallet.channel_deposit = max(wallet.channel_deposit, int(fields.get("deposit") or 0))
        if required > wallet.spend_cap:
            raise SessionCapExceeded(f"the session needs {required} authorized in all, "
                                     f"past the cap of {wallet.spend_cap}")
        amount = min(max(required, wallet.authorized + self.increment, self.accepted),
                     wallet.spend_cap)
        steps: list[Step] = []
        if amount > wallet.channel_deposit:
            more = min(max(amount - wallet.channel_deposit, self.top_up_amount),
                       wallet.spend_cap - wallet.channel_deposit)
            steps.append(Step(lambda: wallet.top_up(more), tops_up=more))
            amount = min(amount, wallet.channel_deposit + more)
        steps.append(Step(lambda: wallet.voucher(amount)))
        return steps

    def done(self, step: Step, headers: Any) -> None:
        """A step the gateway answered 200."""
        with self._lock:
            self.wallet.channel_deposit += step.tops_up
            if step.opens:
                self.wallet.channel_deposit = step.opens
                self.opened = True
        self.receipt_header(headers)

    # -- what came back -------------------------------------------------------------------
    def route(self, request: httpx.Request, response: httpx.Response) -> None:
        """Remember a route that takes session payments (it challenged for one, or gave a
        receipt): the session is managed (closed) there."""
        if "payment-receipt" in response.headers or (
                response.status_code == 402 and session_challenge(response.headers)):
            self.url = str(request.url)

    def refresh(self, headers: Any) -> bool:
        """Take the fresh session challenge of a 402; whether there was one."""
        challenge = session_challenge(headers)
        if challenge is None:
            return False
        with self._lock:
            self.wallet.challenge = challenge
        return True

    def receipt(self, fields: dict[str, Any]) -> None:
        with self._lock:
            self.receipts.append(fields)
            self.accepted = max(self.accepted, int(fields.get("acceptedCumulative") or 0))
            # The latest, not the highest: a Claude stream is charged by a conservative
            # estimate while it runs and reconciled down to the reported usage at its end.
            self.spent = int(fields.get("spent") or 0)

    def receipt_header(self, headers: Any) -> None:
        raw = headers.get("payment-receipt")
        if raw:
            fields = _json(b64url_decode(raw))
            if fields:
                self.receipt(fields)

    def filter(self, event: bytes) -> tuple[bool, dict[str, Any] | None]:
        """(forward it to the SDK?, the need-voucher data if it asks for a voucher)."""
        if not is_payment_control(event):
            return True, None
        found = payment_event(event)
        if found is None:
            return False, None
        name, data = found
        if name == "payment-receipt":
            self.receipt(data)
        elif name == "payment-need-voucher":
            return False, data
        return False, None

    def close_credential(self, spent: int | None = None) -> str:
        """The cooperative close: a final voucher for exactly what was spent."""
        return self.wallet.voucher(self.spent if spent is None else spent, action="close")

    def closing(self, status: int, headers: Any, body: bytes) -> int | None:
        """After a close attempt: None when closed, else the amount to close for instead
        (the gateway said what it counts as spent, and that is within what was signed)."""
        if status == 200:
            self.receipt_header(headers)
            fields = self.receipts[-1] if self.receipts else {}
            deposit = self.wallet.channel_deposit
            self.closed = {"channelId": self.channel_id, "deposit": deposit,
                           "spent": self.spent, "refund": deposit - self.spent,
                           "txHash": fields.get("txHash")}
            return None
        problem = _json(body)
        spent = problem.get("spent")
        if spent is not None and int(spent) <= self.wallet.authorized:
            return int(spent)
        raise SessionRefused(status)


def _json(body: bytes) -> dict[str, Any]:
    try:
        parsed = orjson.loads(body) if body else {}
    except orjson.JSONDecodeError:
        return {}
    return parsed if isinstance(parsed, dict) else {}


def _prepare(request: httpx.Request, payer: SessionPayer) -> None:
    for name in _AGENT_CREDENTIALS:
        request.headers.pop(name, None)
    credential = payer.request_credential()
    if credential is not None:
        request.headers["authorization"] = credential


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
        for _ in range(MAX_PAID_RETRIES):
            _prepare(request, self.payer)
            response = self.inner.handle_request(request)
            self.payer.route(request, response)
            if response.status_code != 402:
                return self._paid(request, response)
            body = response.read()
            response.close()
            steps = self.payer.after_402(response.headers, body)
            if steps is None:
                break
            for step in steps:
                self._send(request, step)
        _prepare(request, self.payer)
        return self._paid(request, self.inner.handle_request(request))

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
        for _ in range(MAX_PAID_RETRIES):
            _prepare(request, self.payer)
            response = await self.inner.handle_async_request(request)
            self.payer.route(request, response)
            if response.status_code != 402:
                return self._paid(request, response)
            body = await response.aread()
            await response.aclose()
            steps = self.payer.after_402(response.headers, body)
            if steps is None:
                break
            for step in steps:
                await self._send(request, step)
        _prepare(request, self.payer)
        return self._paid(request, await self.inner.handle_async_request(request))

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
