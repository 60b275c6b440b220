"""x402 settlement, local or through a facilitator (specs/x402/x402-specification-v2.md §7).

One protocol, two implementations, chosen by configuration:

* :class:`LocalSettlement` -- verify and settle ourselves with :class:`EvmSettler` (our relayer
  pays gas);
* :class:`RemoteFacilitator` -- delegate to an x402 facilitator over HTTP
  (``POST /verify``, ``POST /settle``, ``GET /supported``).

:func:`create_facilitator_app` (:mod:`gateway.rails.facilitator_server`) serves the facilitator
API on top of :class:`LocalSettlement`, so tollstream can be its own (self-hosted)
facilitator, and tests get a real remote one.

Both raise :class:`PaymentRejected` (``code`` = x402 reason), :class:`ServiceUnavailable`
(chain RPC or facilitator unreachable) or :class:`UpstreamError` (garbage answer).
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import httpx
import orjson
from fastapi import FastAPI
from pydantic import BaseModel, Field, ValidationError

from gateway.errors import (
    InvalidPayment,
    PaymentRejected,
    ServiceUnavailable,
    UpstreamError,
)
from gateway.rails.evm import EvmNetwork, EvmSettler, SettlementResult
from gateway.rails.upto import UptoPaymentPayload
from gateway.rails.x402 import (
    SCHEME_EXACT,
    AnyPaymentPayload,
    PaymentPayloadV1,
    PaymentRequirements,
    PaymentRequirementsV1,
    ResourceInfo,
    SettlementResponse,
    _Wire,
    as_v2,
    caip2,
    from_v1,
    match_requirements,
    parse_payment_payload,
    to_authorization,
    to_v1,
    v1_network_name,
)

# Reason codes of the x402 SDK's exact/EVM facilitator (x402.mechanisms.evm.constants).
ERR_NETWORK_MISMATCH = "network_mismatch"
ERR_MISSING_EIP712_DOMAIN = "missing_eip712_domain"

_TX_HASH = re.compile(r"^0x[0-9a-fA-F]{64}$")


def _transaction_of(body: bytes) -> dict[str, str]:
    """``{"transaction": hash}`` if an error body names a well-formed one, else ``{}``."""
    try:
        data = orjson.loads(body)
    except ValueError:
        return {}
    tx = data.get("transaction") if isinstance(data, dict) else None
    return {"transaction": tx} if isinstance(tx, str) and _TX_HASH.match(tx) else {}


class Settlement(Protocol):
    """How the gateway turns a decoded x402 payment into money (local or remote)."""

    async def verify(self, payload: AnyPaymentPayload,
                     requirements: PaymentRequirements) -> str:
        """Check the payment pays ``requirements``; return the payer address."""
        ...

    async def settle(self, payload: AnyPaymentPayload,
                     requirements: PaymentRequirements) -> SettlementResult:
        """Verify, then move the money on-chain; return the settled transfer."""
        ...


class VerifyResult(_Wire):
    """Facilitator ``/verify`` answer (``VerifyResponse``)."""

    is_valid: bool
    invalid_reason: str | None = None
    invalid_message: str | None = None
    payer: str | None = None


class SupportedKind(_Wire):
    x402_version: int
    scheme: str
    network: str
    extra: dict[str, Any] | None = None


class SupportedResult(_Wire):
    """Facilitator ``/supported`` answer."""

    kinds: list[SupportedKind]
    extensions: list[str] = Field(default_factory=list)
    signers: dict[str, list[str]] = Field(default_factory=dict)


SettleResult = SettlementResponse
"""Facilitator ``/settle`` answer (same schema as ``PAYMENT-RESPONSE``)."""


# --------------------------------------------------------------------------- local


class SchemeSettlement(Protocol):
    """One payment scheme's verifier and settler: what :class:`LocalSettlement` and the
    facilitator app (:mod:`gateway.rails.facilitator_server`) dispatch to by scheme name.
    A scheme is added by registering one more of these (:meth:`LocalSettlement.register`)."""

    scheme: str

    def kinds(self) -> list[SupportedKind]:
        """What ``GET /supported`` lists for this scheme (one entry per version/network)."""
        ...

    def signers(self) -> list[str]:
        """The facilitator's addresses that send this scheme's settlements."""
        ...

    def parse(self, payload: Any, requirements: Any, *, version: int
              ) -> tuple[Any, PaymentRequirements]:
        """A facilitator request's ``paymentPayload`` and ``paymentRequirements`` (JSON, the
        request's ``x402Version``), validated; requirements in their v2 form. Raises
        :class:`InvalidPayment` / :class:`PaymentRejected` with the x402 reason."""
        ...

    # The payload is the scheme's own model (what its ``parse`` returned).
    async def verify(self, payload: Any, requirements: PaymentRequirements) -> str:
        ...

    async def settle(self, payload: Any, requirements: PaymentRequirements
                     ) -> SettlementResult:
        ...


class ExactEvm:
    """The ``exact`` scheme on EVM (EIP-3009 ``transferWithAuthorization``), settled by
    :class:`EvmSettler` from our relayer on the configured networks; v1 and v2."""

    scheme = SCHEME_EXACT

    def __init__(self, settler: EvmSettler, networks: Sequence[EvmNetwork]) -> None:
        self.settler = settler
        self.networks = {n.network: n for n in networks}
        #: Settlements sent but not confirmed, by network, payer and nonce: their
        #: transaction. In memory (as the x402 SDK's default store): a retry that reaches
        #: another process finds the nonce used instead.
        self._pending: dict[str, str] = {}

    def kinds(self) -> list[SupportedKind]:
        kinds = [SupportedKind(x402_version=2, scheme=self.scheme, network=n)
                 for n in self.networks]
        kinds += [SupportedKind(x402_version=1, scheme=self.scheme, network=name)
                  for name in (v1_network_name(n) for n in self.networks) if name is not None]
        return kinds

    def signers(self) -> list[str]:
        return sorted({n.relayer_address for n in self.networks.values()})

    def network_for(self, requirements: PaymentRequirements) -> EvmNetwork:
        """The configured network ``requirements`` are for (checks scheme, network, asset)."""
        if requirements.scheme != self.scheme:
            raise PaymentRejected(f"scheme {requirements.scheme!r} is not supported",
                                  code="unsupported_scheme")
        network = self.networks.get(requirements.network)
        if network is None:
            raise PaymentRejected(f"network {requirements.network!r} is not supported",
                                  code="invalid_network")
        if network.asset.lower() != requirements.asset.lower():
            raise PaymentRejected("asset is not this network's token",
                                  code="invalid_payment_requirements")
        return network

    def parse(self, payload: Any, requirements: Any, *, version: int
              ) -> tuple[AnyPaymentPayload, PaymentRequirements]:
        # The checks the x402 SDK's exact/EVM facilitator makes before the signature, with
        # its reason codes: scheme, network mismatch, the EIP-712 domain in extra.
        if not isinstance(payload, dict):
            raise InvalidPayment("paymentPayload is not a JSON object", param="paymentPayload",
                                 code="invalid_payload")
        if not isinstance(requirements, dict):
            raise InvalidPayment("paymentRequirements is not a JSON object",
                                 param="paymentRequirements",
                                 code="invalid_payment_requirements")
        accepted = payload.get("accepted") if version == 2 else payload
        paid_network = accepted.get("network") if isinstance(accepted, dict) else None
        if isinstance(paid_network, str) and isinstance(requirements.get("network"), str) \
                and caip2(paid_network) != caip2(requirements["network"]):
            raise PaymentRejected("the payment is for another network than the requirements",
                                  code=ERR_NETWORK_MISMATCH)
        extra = requirements.get("extra")
        if not (isinstance(extra, dict) and isinstance(extra.get("name"), str)
                and isinstance(extra.get("version"), str)):
            raise PaymentRejected("paymentRequirements.extra lacks the token's EIP-712 domain "
                                  "(name and version)", code=ERR_MISSING_EIP712_DOMAIN)
        parsed = parse_payment_payload(payload, version=version, where="paymentPayload")
        model: type[PaymentRequirements] | type[PaymentRequirementsV1] = (
            PaymentRequirements if version == 2 else PaymentRequirementsV1)
        try:
            req = model.model_validate(requirements)
        except ValidationError as exc:
            raise InvalidPayment("paymentRequirements is malformed",
                                 param="paymentRequirements",
                                 code="invalid_payment_requirements") from exc
        return parsed, (from_v1(req) if isinstance(req, PaymentRequirementsV1) else req)

    async def verify(self, payload: AnyPaymentPayload,
                     requirements: PaymentRequirements) -> str:
        network = self.network_for(requirements)
        match_requirements(payload, [requirements])
        auth = to_authorization(payload)
        await self.settler.verify(auth, pay_to=requirements.pay_to, amount=requirements.amount,
                                  network=network)
        return auth.payer

    async def settle(self, payload: AnyPaymentPayload,
                     requirements: PaymentRequirements) -> SettlementResult:
        network = self.network_for(requirements)
        auth = to_authorization(payload)
        key = f"{network.network}:{auth.payer.lower()}:{auth.nonce}"
        sent = self._pending.get(key)
        if sent is not None:
            return await self._reconcile(key, sent, payload, requirements, network)
        # Re-verify: a caller may settle without a prior verify, and state may have changed.
        await self.verify(payload, requirements)
        try:
            return await self.settler.settle(auth, network)
        except ServiceUnavailable as exc:
            # Sent but not confirmed: remember the transaction, so the same request sent
            # again (the settlement_pending retry) reconciles with it instead of failing on
            # the nonce it used.
            if exc.extra.get("transaction"):
                self._remember(key, str(exc.extra["transaction"]))
            raise

    def _remember(self, key: str, tx_hash: str) -> None:
        if len(self._pending) >= 10_000:  # bound memory: the oldest is forgotten first
            del self._pending[next(iter(self._pending))]
        self._pending[key] = tx_hash

    async def _reconcile(self, key: str, sent: str, payload: AnyPaymentPayload,
                         requirements: PaymentRequirements,
                         network: EvmNetwork) -> SettlementResult:
        """The outcome of the settlement transaction ``sent`` earlier for this payment."""
        match_requirements(payload, [requirements])
        auth = to_authorization(payload)
        status = await self.settler.transaction_status(sent, network)
        if status.state == "success" and await self.settler.authorization_used(
                auth.from_, auth.nonce, network):
            del self._pending[key]
            return SettlementResult(tx_hash=sent, payer=auth.payer, amount=auth.value,
                                    block_number=status.block_number,
                                    network=network.network)
        if status.state in ("success", "reverted"):
            del self._pending[key]
            raise PaymentRejected(f"settlement transaction {sent} did not transfer",
                                  code="transaction_failed", extra={"transaction": sent})
        raise ServiceUnavailable(f"settlement transaction {sent} is not confirmed yet",
                                 extra={"transaction": sent})


class LocalSettlement:
    """:class:`Settlement` done in-process, dispatched by scheme name to a
    :class:`SchemeSettlement` (``exact``: :class:`ExactEvm` on the configured networks)."""

    def __init__(self, settler: EvmSettler, networks: Sequence[EvmNetwork], *,
                 schemes: Sequence[SchemeSettlement] = ()) -> None:
        self.settler = settler
        self.exact = ExactEvm(settler, networks)
        self.networks = self.exact.networks
        self.schemes: dict[str, SchemeSettlement] = {self.exact.scheme: self.exact}
        for handler in schemes:
            self.register(handler)

    def register(self, handler: SchemeSettlement) -> None:
        """Serve ``handler.scheme`` with ``handler`` (replacing any earlier one)."""
        self.schemes[handler.scheme] = handler

    def scheme(self, name: Any) -> SchemeSettlement:
        """The handler of scheme ``name``; :class:`PaymentRejected` ``unsupported_scheme``."""
        handler = self.schemes.get(name) if isinstance(name, str) else None
        if handler is None:
            raise PaymentRejected(f"scheme {str(name)[:40]!r} is not supported",
                                  code="unsupported_scheme")
        return handler

    def network_for(self, requirements: PaymentRequirements) -> EvmNetwork:
        """The configured network of ``exact`` requirements (see :meth:`ExactEvm.network_for`)."""
        return self.exact.network_for(requirements)

    async def verify(self, payload: AnyPaymentPayload,
                     requirements: PaymentRequirements) -> str:
        return await self.scheme(requirements.scheme).verify(payload, requirements)

    async def settle(self, payload: AnyPaymentPayload,
                     requirements: PaymentRequirements) -> SettlementResult:
        return await self.scheme(requirements.scheme).settle(payload, requirements)


# --------------------------------------------------------------------------- remote

SETTLEMENT_PENDING = "settlement_pending"
"""``/settle`` reason for a transaction sent but not yet confirmed (the x402 SDK's): not a
failure; the same request sent again reconciles with that transaction."""

ENDPOINTS = ("verify", "settle", "supported")
_REDIRECTS = (301, 302, 303, 307, 308)


def _origin(url: httpx.URL) -> tuple[str, str, int | None]:
    return url.scheme, url.host, url.port


class RemoteFacilitator:
    """:class:`Settlement` through an x402 facilitator's HTTP API, as the x402 SDK's
    ``HTTPFacilitatorClient`` talks to one:

    * a payment travels in its own version (``x402Version`` 1 with v1 requirements for a
      v1 payment, 2 for v2). A v1 payment on a chain v1 has no name for cannot be stated in
      v1 and is restated as v2;
    * ``headers`` go to every endpoint, ``endpoint_headers[name]`` (``verify``, ``settle``,
      ``supported``) to one, over them: hosted facilitators authenticate this way. They are
      secrets: sent only to the facilitator's own origin (never after a redirect elsewhere),
      never logged nor put in an error;
    * redirects are followed (at most ``max_redirects``; 303 turns into a GET, the others
      repeat the request);
    * a ``/settle`` answered ``settlement_pending`` (sent, not yet confirmed) is sent again,
      up to ``pending_retries`` times ``pending_delay`` seconds apart, as the SDK's resource
      server does; still pending after that is :class:`ServiceUnavailable` carrying the
      transaction (the deposit stays open and is reconciled on-chain), never a rejection.
    """

    def __init__(self, url: str, timeout: float = 30.0, *,
                 headers: Mapping[str, str] | None = None,
                 endpoint_headers: Mapping[str, Mapping[str, str]] | None = None,
                 pending_retries: int = 3, pending_delay: float = 1.0,
                 max_redirects: int = 5,
                 client: httpx.AsyncClient | None = None) -> None:
        self.url = url.rstrip("/")
        self._origin = _origin(httpx.URL(self.url))
        unknown = set(endpoint_headers or {}) - set(ENDPOINTS)
        if unknown:
            raise ValueError(f"unknown facilitator endpoints {sorted(unknown)}")
        self._headers = {name: {**(headers or {}), **(endpoint_headers or {}).get(name, {})}
                         for name in ENDPOINTS}
        self.pending_retries = pending_retries
        self.pending_delay = pending_delay
        self.max_redirects = max_redirects
        self._own_client = client is None
        self._client = client or httpx.AsyncClient(timeout=timeout, follow_redirects=False)

    def __repr__(self) -> str:  # no headers: they hold secrets
        return f"RemoteFacilitator({self.url!r})"

    async def aclose(self) -> None:
        if self._own_client:
            await self._client.aclose()

    async def _send(self, method: str, path: str, body: dict[str, Any] | None
                    ) -> httpx.Response:
        url = httpx.URL(f"{self.url}{path}")
        secret = self._headers[path.strip("/")]
        for _ in range(self.max_redirects + 1):
            headers = secret if _origin(url) == self._origin else {}
            response = await self._client.request(method, url, json=body, headers=headers)
            if response.status_code not in _REDIRECTS or "location" not in response.headers:
                return response
            url = response.url.join(response.headers["location"])
            if response.status_code == 303:
                method, body = "GET", None
        raise UpstreamError(f"facilitator {path} redirected more than {self.max_redirects} "
                            "times")

    async def _call(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        try:
            response = await self._send(method, path, body)
        except httpx.TimeoutException as exc:
            raise ServiceUnavailable(f"facilitator {path} timed out") from exc
        except httpx.TransportError as exc:
            raise ServiceUnavailable(f"facilitator unreachable: {exc}") from exc
        except httpx.HTTPError as exc:  # undecodable body (bad gzip), a bad Location
            raise UpstreamError(f"facilitator {path} answered garbage: {exc!r}") from exc
        if response.status_code in (502, 503, 504):
            # It, or a proxy in front of it, is down or overloaded: retry later. A /settle
            # whose outcome is unknown this way must be reconciled on-chain before a retry;
            # a facilitator that sent a transaction may name it (tollstream's does).
            raise ServiceUnavailable(
                f"facilitator {path} unavailable (HTTP {response.status_code})",
                extra=_transaction_of(response.content))
        if response.status_code in (401, 403):
            raise ServiceUnavailable(f"facilitator {path} refused our credentials (HTTP "
                                     f"{response.status_code}): check [x402.facilitator] "
                                     "headers")
        # Some facilitators answer an invalid payment with 400 + a proper body; accept that
        # body if it parses (checked by the caller), anything else is garbage.
        if response.status_code not in (200, 400):
            raise UpstreamError(f"facilitator {path} answered HTTP {response.status_code}")
        try:
            # orjson, not json: web3 (py_ecc) raises the recursion limit to 100000, so the
            # stdlib parser overflows the C stack on deeply nested input (a segfault, not a
            # RecursionError); orjson refuses nesting past 1024 with a ValueError.
            return orjson.loads(response.content)
        except ValueError as exc:
            raise UpstreamError(f"facilitator {path} answered non-JSON") from exc

    @staticmethod
    def _body(payload: AnyPaymentPayload | UptoPaymentPayload,
              requirements: PaymentRequirements) -> dict[str, Any]:
        if isinstance(payload, UptoPaymentPayload):  # upto exists in v2 only
            return {"x402Version": 2,
                    "paymentPayload": payload.model_dump(mode="json", by_alias=True,
                                                         exclude_none=True),
                    "paymentRequirements": requirements.model_dump(
                        mode="json", by_alias=True, exclude_none=True)}
        wire: BaseModel = as_v2(payload, requirements)
        sent: BaseModel = requirements
        version = 2
        v1 = to_v1(requirements, ResourceInfo(url="")) \
            if isinstance(payload, PaymentPayloadV1) else None
        if isinstance(payload, PaymentPayloadV1) and v1 is not None:
            # Sent as v1 (a chain v1 has no name for stays v2), the v1 name on both sides (a
            # payer may have written the CAIP-2 id; the signature does not cover it).
            version, sent, wire = 1, v1, payload.model_copy(update={"network": v1.network})
        return {"x402Version": version,
                "paymentPayload": wire.model_dump(mode="json", by_alias=True, exclude_none=True),
                "paymentRequirements": sent.model_dump(mode="json", by_alias=True,
                                                       exclude_none=True)}

    async def verify_result(self, payload: AnyPaymentPayload | UptoPaymentPayload,
                            requirements: PaymentRequirements) -> VerifyResult:
        """Raw ``/verify`` answer (does not raise on ``isValid: false``)."""
        data = await self._call("POST", "/verify", self._body(payload, requirements))
        try:
            return VerifyResult.model_validate(data)
        except ValidationError as exc:
            raise UpstreamError("facilitator /verify answered an unexpected shape") from exc

    async def verify(self, payload: AnyPaymentPayload | UptoPaymentPayload,
                     requirements: PaymentRequirements) -> str:
        result = await self.verify_result(payload, requirements)
        if not result.is_valid:
            raise PaymentRejected(result.invalid_message or "facilitator rejected the payment",
                                  code=result.invalid_reason or "invalid_payload")
        payer = _payer(payload)
        if result.payer is not None and result.payer.lower() != payer.lower():
            raise UpstreamError("facilitator /verify reported a different payer")
        return payer

    async def settle_result(self, payload: AnyPaymentPayload | UptoPaymentPayload,
                            requirements: PaymentRequirements) -> SettleResult:
        """Raw ``/settle`` answer (does not raise on ``success: false``)."""
        data = await self._call("POST", "/settle", self._body(payload, requirements))
        try:
            return SettlementResponse.model_validate(data)
        except ValidationError as exc:
            raise UpstreamError("facilitator /settle answered an unexpected shape") from exc

    async def settle(self, payload: AnyPaymentPayload | UptoPaymentPayload,
                     requirements: PaymentRequirements) -> SettlementResult:
        """Settle ``requirements.amount`` (for ``upto``: what to charge, at most the
        authorized maximum; zero moves nothing and has no transaction)."""
        result = await self.settle_result(payload, requirements)
        for _ in range(self.pending_retries):
            if result.success or result.error_reason != SETTLEMENT_PENDING:
                break
            # Sent, not yet confirmed: the same request again lets the facilitator reconcile
            # with its transaction (it must not send a second one).
            await asyncio.sleep(self.pending_delay)
            result = await self.settle_result(payload, requirements)
        if not result.success and result.error_reason == SETTLEMENT_PENDING:
            raise ServiceUnavailable(
                f"facilitator settlement still pending after {self.pending_retries + 1} "
                "attempts", extra={"transaction": result.transaction}
                if _TX_HASH.match(result.transaction) else {})
        if not result.success:
            raise PaymentRejected("facilitator could not settle the payment",
                                  code=result.error_reason or "unexpected_settle_error")
        # Success claims money moved: anything inconsistent is an UpstreamError carrying the
        # transaction (when it looks like one), so the caller reconciles on-chain, never
        # credits on the facilitator's word alone.
        payer = _payer(payload)
        if isinstance(payload, UptoPaymentPayload) and requirements.amount == 0:
            return SettlementResult(tx_hash="", payer=payer, amount=0, block_number=None,
                                    network=requirements.network)
        if not _TX_HASH.match(result.transaction):
            raise UpstreamError("facilitator /settle reported success without a transaction "
                                f"hash ({result.transaction[:80]!r})")
        extra = {"transaction": result.transaction}
        if result.amount is not None and result.amount != str(requirements.amount):
            raise UpstreamError(f"facilitator /settle reported {result.amount[:40]!r}, not "
                                f"the {requirements.amount} asked", extra=extra)
        if result.payer is not None and result.payer.lower() != payer.lower():
            raise UpstreamError("facilitator /settle reported a different payer", extra=extra)
        if result.network and caip2(result.network) != requirements.network:
            raise UpstreamError(f"facilitator /settle reported network {result.network!r}, "
                                f"not {requirements.network!r}", extra=extra)
        # The facilitator does not report the block; the amount is the one asked (exact: the
        # required one; upto: the charge).
        return SettlementResult(tx_hash=result.transaction, payer=payer,
                                amount=requirements.amount, block_number=None,
                                network=requirements.network)

    async def supported(self) -> SupportedResult:
        """``GET /supported``."""
        data = await self._call("GET", "/supported")
        try:
            return SupportedResult.model_validate(data)
        except ValidationError as exc:
            raise UpstreamError("facilitator /supported answered an unexpected shape") from exc


def _payer(payload: AnyPaymentPayload | UptoPaymentPayload) -> str:
    if isinstance(payload, UptoPaymentPayload):
        return payload.payer
    return to_authorization(payload).payer


# --------------------------------------------------------------------------- server


def create_facilitator_app(settler: EvmSettler, networks: Sequence[EvmNetwork], *,
                           schemes: Sequence[SchemeSettlement] = ()) -> FastAPI:
    """The facilitator API (``/verify``, ``/settle``, ``/supported``) on ``networks``; see
    :mod:`gateway.rails.facilitator_server` (imported here, where it was first defined)."""
    from gateway.rails.facilitator_server import create_app

    return create_app(settler, networks, schemes=schemes)


__all__ = [
    "ENDPOINTS",
    "SETTLEMENT_PENDING",
    "ExactEvm",
    "LocalSettlement",
    "RemoteFacilitator",
    "SchemeSettlement",
    "SettleResult",
    "Settlement",
    "SupportedKind",
    "SupportedResult",
    "VerifyResult",
    "create_facilitator_app",
]
