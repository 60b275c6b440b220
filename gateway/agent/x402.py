"""Agent side: an httpx transport that pays tollstream's x402 deposits by itself.

Give it to the OpenAI or Anthropic SDK as its HTTP client and the agent pays the first 402 with
its wallet, keeps the API key tollstream issues (``Tollstream-Api-Key``), continues with plain
``Authorization: Bearer`` and pays again only when its deposit is spent, never past a cap::

    from eth_account import Account
    import openai
    from gateway.agent import Wallet, paying_client

    wallet = Wallet(Account.from_key(PRIVATE_KEY), spend_cap=5_000_000)   # 5 USDC at most
    client = openai.OpenAI(base_url="http://127.0.0.1:8402/v1", api_key="unused",
                           http_client=paying_client(wallet))

The wallet signs EIP-3009 ``transferWithAuthorization`` for exactly the amount asked (the x402
``exact`` scheme); it needs USDC, no ETH. It pays only networks and assets it was told to
trust (``allowed``), by default any ``eip155`` network with any asset the server names: set
``allowed`` in production.
"""

from __future__ import annotations

import secrets
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from eth_account.signers.local import LocalAccount

from gateway.errors import GatewayError
from gateway.rails.evm import EvmNetwork, sign_authorization
from gateway.rails.x402 import (
    PAYMENT_REQUIRED_HEADER,
    PAYMENT_RESPONSE_HEADER,
    PAYMENT_SIGNATURE_HEADER,
    Authorization,
    ExactEvmPayload,
    PaymentPayload,
    PaymentRequired,
    PaymentRequirements,
    SettlementResponse,
    decode_model,
    encode_header,
)

try:  # The openai (3.x) and anthropic (2.x) SDKs are built on httpx2, the successor of httpx.
    import httpx2 as httpx
except ImportError:  # pragma: no cover - older SDKs use httpx itself
    import httpx  # type: ignore[no-redef]

API_KEY_HEADER = "tollstream-api-key"


class SpendCapExceeded(RuntimeError):
    """Paying this 402 would take the wallet past its spending cap."""


@dataclass
class Wallet:
    """An agent's wallet and spending policy (amounts in atomic units)."""

    account: LocalAccount
    spend_cap: int
    allowed: Sequence[tuple[str, str]] = ()  # (network, asset) pairs; empty: any eip155
    spent: int = 0
    api_key: str | None = None
    payments: list[dict[str, Any]] = field(default_factory=list)
    #: Called with each payment once the gateway answered it (amount, network, transaction).
    on_payment: Callable[[dict[str, Any]], None] | None = None
    #: Called with what a 402 asks, before it is paid (the requirements chosen).
    on_required: Callable[[PaymentRequirements], None] | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def choose(self, required: PaymentRequired) -> PaymentRequirements:
        for req in required.accepts:
            if req.scheme != "exact" or not req.network.startswith("eip155:"):
                continue
            if self.allowed and (req.network, req.asset.lower()) not in {
                    (n, a.lower()) for n, a in self.allowed}:
                continue
            return req
        raise SpendCapExceeded("no offered payment is on an allowed network and asset")

    def pay(self, required: PaymentRequired) -> str:
        """Sign a payment for ``required``; returns the ``PAYMENT-SIGNATURE`` header value."""
        req = self.choose(required)
        if self.on_required is not None:
            self.on_required(req)
        with self._lock:
            if self.spent + req.amount > self.spend_cap:
                raise SpendCapExceeded(f"paying {req.amount} would exceed the spending cap "
                                       f"({self.spent} of {self.spend_cap} spent)")
            self.spent += req.amount
        extra = req.extra
        network = EvmNetwork(network=req.network, chain_id=int(req.network.split(":")[1]),
                             rpc_url="", asset=req.asset,
                             token_name=extra.name if extra else "",
                             token_version=extra.version if extra else "", relayer_key="")
        now = int(time.time())
        auth = sign_authorization(self.account.key.hex(), network, to=req.pay_to,
                                  value=req.amount, valid_after=now - 30,
                                  valid_before=now + req.max_timeout_seconds,
                                  nonce="0x" + secrets.token_hex(32))
        authorization = Authorization.model_validate({
            "from": auth.from_, "to": auth.to, "value": auth.value,
            "validAfter": auth.valid_after, "validBefore": auth.valid_before,
            "nonce": auth.nonce})
        payload = PaymentPayload(accepted=req, payload=ExactEvmPayload(
            signature=auth.signature, authorization=authorization))
        self.payments.append({"amount": req.amount, "network": req.network,
                              "nonce": auth.nonce})
        return encode_header(payload)


def _with_key(request: httpx.Request, wallet: Wallet) -> None:
    if wallet.api_key:
        request.headers["authorization"] = f"Bearer {wallet.api_key}"
        request.headers.pop("x-api-key", None)


def _payment_retry(request: httpx.Request, response: httpx.Response,
                   wallet: Wallet) -> httpx.Request | None:
    header = response.headers.get(PAYMENT_REQUIRED_HEADER)
    if response.status_code != 402 or header is None:
        return None
    try:
        required = decode_model(header, PaymentRequired, header=PAYMENT_REQUIRED_HEADER)
    except GatewayError:
        return None
    retry = httpx.Request(request.method, request.url, headers=request.headers,
                          content=request.content, extensions=request.extensions)
    retry.headers[PAYMENT_SIGNATURE_HEADER] = wallet.pay(required)
    return retry


def _remember_key(response: httpx.Response, wallet: Wallet) -> None:
    key = response.headers.get(API_KEY_HEADER)
    if key:
        wallet.api_key = key
    receipt = response.headers.get(PAYMENT_RESPONSE_HEADER)
    if receipt and wallet.payments:
        try:
            settled = decode_model(receipt, SettlementResponse, header=PAYMENT_RESPONSE_HEADER)
        except GatewayError:
            return
        payment = wallet.payments[-1]
        payment["success"] = settled.success
        payment["transaction"] = settled.transaction
        if wallet.on_payment is not None:
            wallet.on_payment(payment)


class PayingTransport(httpx.BaseTransport):
    """Synchronous transport (for ``openai.OpenAI`` / ``anthropic.Anthropic``)."""

    def __init__(self, wallet: Wallet, transport: httpx.BaseTransport | None = None) -> None:
        self.wallet = wallet
        self.inner = transport or httpx.HTTPTransport()

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        request.read()  # buffered, so a paid retry can resend the same body
        _with_key(request, self.wallet)
        response = self.inner.handle_request(request)
        retry = _payment_retry(request, response, self.wallet)
        if retry is None:
            return response
        response.read()
        response.close()
        paid = self.inner.handle_request(retry)
        _remember_key(paid, self.wallet)
        return paid

    def close(self) -> None:
        self.inner.close()


class AsyncPayingTransport(httpx.AsyncBaseTransport):
    """Asynchronous transport (for ``openai.AsyncOpenAI`` / ``anthropic.AsyncAnthropic``)."""

    def __init__(self, wallet: Wallet,
                 transport: httpx.AsyncBaseTransport | None = None) -> None:
        self.wallet = wallet
        self.inner = transport or httpx.AsyncHTTPTransport()

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        await request.aread()
        _with_key(request, self.wallet)
        response = await self.inner.handle_async_request(request)
        retry = _payment_retry(request, response, self.wallet)
        if retry is None:
            return response
        await response.aread()
        await response.aclose()
        paid = await self.inner.handle_async_request(retry)
        _remember_key(paid, self.wallet)
        return paid

    async def aclose(self) -> None:
        await self.inner.aclose()


def paying_client(wallet: Wallet, **kwargs: Any) -> httpx.Client:
    """A synchronous HTTP client for the SDKs (``http_client=``) that pays with ``wallet``."""
    return httpx.Client(transport=PayingTransport(wallet), **kwargs)


def async_paying_client(wallet: Wallet, **kwargs: Any) -> httpx.AsyncClient:
    """The asynchronous counterpart of :func:`paying_client`."""
    return httpx.AsyncClient(transport=AsyncPayingTransport(wallet), **kwargs)
