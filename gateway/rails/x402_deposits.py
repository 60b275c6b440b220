"""The x402 deposit rail: agents pay a USDC deposit over HTTP 402 and then stream against it.

Flow of one deposit (the request carries ``PAYMENT-SIGNATURE`` (v2) or ``X-PAYMENT`` (v1)):

1. decode strictly (400 ``invalid_payment`` naming the field, with a fresh challenge);
2. match it to what this request is offered (deposit, or the prompt's price if higher) and
   verify it (signature, recipient, amount, validity window, nonce unused, payer balance);
3. claim the deposit record in Redis (:class:`meters.deposits.Deposits`): one claim per
   authorization, so the same payment sent on concurrent requests settles once; the others
   get 402 ``invalid_exact_evm_nonce_already_used``;
4. settle: locally (our relayer sends ``transferWithAuthorization``) or through a remote
   facilitator, as configured;
5. credit the payer's account (one per network + asset + payer address) exactly once, issue an
   API key and answer with ``PAYMENT-RESPONSE`` and ``Tollstream-Api-Key``.

A request that does not get from 3 to 5 (its process died, the chain did not confirm in time)
leaves the record ``settling``/``settled``; the rail's recovery (:mod:`.x402_recovery`), at
start and then periodically, asks the chain whether the authorization was used and finishes
the credit.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Mapping
from typing import Any

from starlette.requests import Request

from gateway.errors import (
    GatewayError,
    InvalidPayment,
    PaymentRejected,
    ServiceUnavailable,
)
from gateway.rail_settings import X402NetworkSettings
from gateway.rails.base import Offer, Paid, PaymentRail, render
from gateway.rails.evm import EvmNetwork, EvmSettler, SettlementNotSubmitted, SettlementResult
from gateway.rails.facilitator import LocalSettlement, Settlement
from gateway.rails.facilitator_client import RemoteFacilitator
from gateway.rails.upto import SCHEME_UPTO
from gateway.rails.x402 import (
    PAYMENT_SIGNATURE_HEADER,
    X_PAYMENT_HEADER,
    AnyPaymentPayload,
    PaymentPayload,
    PaymentRequirements,
    ResourceInfo,
    decode_header_json,
    encode_header,
    parse_payment_payload,
    to_authorization,
)
from gateway.rails.x402_challenge import (
    build_payment_required,
    exact_requirements,
    match_requirements,
    settlement_headers,
    settlement_response,
)
from gateway.rails.x402_recovery import DepositRecovery, settle_bound
from gateway.rails.x402_upto import UptoPayments
from gateway.settings import Settings
from meters.deposits import CREDITED, UNCONFIRMED, Deposit, DepositRecord, Deposits
from meters.ledger import Ledger
from meters.money import Asset
from meters.rates import Rate

log = logging.getLogger("tollstream.x402")

API_KEY_HEADER = "Tollstream-Api-Key"


def evm_network(net: X402NetworkSettings) -> EvmNetwork:
    """The chain and token a network's settings describe, with its relayer."""
    return EvmNetwork(network=net.network, chain_id=net.chain_id, rpc_url=net.rpc_url,
                      asset=net.asset, token_name=net.token_name,
                      token_version=net.token_version, relayer_key=net.relayer() or "",
                      confirmations=net.confirmations, rpc_timeout=net.rpc_timeout_seconds,
                      receipt_timeout=net.receipt_timeout_seconds)


class SettlementFailed(PaymentRejected):
    """The chain refused a verified payment's settlement (nothing moved; claim released)."""

    def __init__(self, cause: PaymentRejected, *, network: str, payer: str) -> None:
        super().__init__(cause.message, code=cause.code, param=cause.param)
        self.cause = cause
        self.network = network
        self.payer = payer


def payer_account_id(network: str, asset: str, payer: str) -> str:
    """Accounts of x402 payers are keyed by network, asset and payer address."""
    digest = hashlib.sha256(f"{network}|{asset.lower()}|{payer.lower()}".encode()).hexdigest()
    return f"x402_{digest[:24]}"


class X402Deposits(PaymentRail):
    """The x402 rail (see the module docstring)."""

    name = "x402"

    def __init__(self, settings: Settings, ledger: Ledger) -> None:
        cfg = settings.x402
        self.asset: Asset = settings.asset_obj()
        self.deposit = self.asset.parse(cfg.deposit, field="x402.deposit")
        self.max_deposit = max(self.asset.parse(cfg.max_deposit, field="x402.max_deposit"),
                               self.deposit)
        self.min_output_tokens = cfg.min_output_tokens
        self.pay_to = cfg.pay_to
        self.max_timeout_seconds = cfg.max_timeout_seconds
        self.api_keys_kept = cfg.api_keys_kept
        self.api_key_idle_seconds = cfg.api_key_idle_seconds
        self.networks = {net.network: evm_network(net) for net in cfg.networks.values()}
        self.settler = EvmSettler()
        self.settlement: Settlement
        if cfg.mode == "remote" and cfg.facilitator_url:
            self.remote: RemoteFacilitator | None = RemoteFacilitator(
                cfg.facilitator_url, timeout=cfg.facilitator_timeout_seconds,
                endpoint_headers=cfg.facilitator.endpoint_headers(),
                pending_retries=cfg.facilitator.settle_pending_retries,
                pending_delay=cfg.facilitator.settle_pending_delay_seconds,
                max_redirects=cfg.facilitator.max_redirects)
            self.settlement = self.remote
        else:
            self.remote = None
            self.settlement = LocalSettlement(self.settler, list(self.networks.values()))
        self.deposits = Deposits(ledger)
        self.ledger = ledger
        #: Finishes deposits requests left unfinished: at start, then every
        #: ``recovery_interval_seconds``.
        self.recovery = DepositRecovery(
            deposits=self.deposits, settler=self.settler, settlement=self.settlement,
            networks=self.networks, min_age=settle_bound(cfg),
            interval=cfg.recovery_interval_seconds)
        #: The ``upto`` scheme, when offered (:mod:`gateway.rails.x402_upto`).
        self.upto: UptoPayments | None = None
        if cfg.upto.enabled:
            self.upto = UptoPayments(
                ledger=ledger, networks=self.networks, rpc=self.settler.rpc, pay_to=self.pay_to,
                max_amount=self.asset.parse(cfg.upto.max, field="x402.upto.max"),
                timeout_seconds=cfg.upto.timeout_seconds, idle_seconds=cfg.upto.idle_seconds,
                sweep_seconds=cfg.upto.sweep_seconds,
                deadline_margin=cfg.upto.deadline_margin_seconds, remote=self.remote)

    # -- lifecycle ----------------------------------------------------------------------------
    async def start(self) -> None:
        await self.recovery.start()
        if self.upto is not None:
            await self.upto.start()

    async def aclose(self) -> None:
        await self.recovery.aclose()
        if self.upto is not None:
            await self.upto.aclose()
        if self.remote is not None:
            await self.remote.aclose()
        await self.settler.aclose()

    async def recover(self, *, min_age: float = 0.0) -> int:
        """Finish the deposits left between claim and credit whose claim is older than
        ``min_age`` seconds; returns how many were credited (:mod:`.x402_recovery`)."""
        return await self.recovery.recover(min_age=min_age)

    # -- challenge ----------------------------------------------------------------------------
    def accepts(self, needed: int) -> list[PaymentRequirements]:
        amount = max(self.deposit, needed)
        return [exact_requirements(net, amount=amount, pay_to=self.pay_to,
                                   max_timeout_seconds=self.max_timeout_seconds)
                for net in self.networks.values()]

    def _resource(self, request: Request) -> ResourceInfo:
        return ResourceInfo(url=str(request.url), description="tollstream prepaid allowance "
                            "(deposit, billed per token)", mime_type="text/event-stream")

    def offer(self, request: Request, *, needed: int, reason: str, code: str,
              rate: Rate | None = None) -> Offer:
        accepts = self.accepts(needed)
        amount = accepts[0].amount
        if self.upto is not None:
            # Beside the deposit: authorize this request's most (prompt and max_tokens).
            accepts += self.upto.accepts(needed, getattr(request.state, "max_charge", needed))
        challenge = build_payment_required(resource=self._resource(request), accepts=accepts,
                                           error=reason)
        return Offer(headers=list(challenge.headers.items()),
                     body={**challenge.body, "deposit": str(amount), "asset": self.asset.symbol,
                           "deposit_decimal": self.asset.format(amount)})

    async def top_up_hint(self, account_id: str, request: Request) -> Mapping[str, Any]:
        accepts = self.accepts(0)
        required = build_payment_required(resource=self._resource(request), accepts=accepts,
                                          error="top up to continue")
        return {"method": "x402", "header": "PAYMENT-REQUIRED", "payment_required":
                required.header, "accepts": [a.model_dump(mode="json", by_alias=True)
                                             for a in accepts]}

    async def status(self) -> dict[str, str]:
        pending = await self.deposits.unfinished()
        status = {"x402 deposits settling or awaiting credit": str(len(pending))}
        if self.upto is not None:
            status.update(await self.upto.status())
        return status

    # -- paying -------------------------------------------------------------------------------
    def claims(self, request: Request) -> bool:
        headers = request.headers
        return PAYMENT_SIGNATURE_HEADER in headers or X_PAYMENT_HEADER in headers

    async def authenticate(self, request: Request, *, needed: int, rate: Rate | None = None
                           ) -> Paid | None:
        header = request.headers.get(PAYMENT_SIGNATURE_HEADER)
        version = 2
        if header is None:
            header = request.headers.get(X_PAYMENT_HEADER)
            version = 1
        if header is None:
            return None
        try:
            where = PAYMENT_SIGNATURE_HEADER if version == 2 else X_PAYMENT_HEADER
            data = decode_header_json(header, header=where)
            if self.upto is not None and version == 2 and _scheme(data) == SCHEME_UPTO:
                return await self.upto.authorize(request, data, needed=needed)
            payload = parse_payment_payload(data, version=version, where=where)
        except InvalidPayment as exc:
            raise self._fresh(request, needed, exc, InvalidPayment) from exc
        except PaymentRejected as exc:
            raise self._fresh(request, needed, exc, PaymentRejected) from exc
        result, account_id = await self.pay(request, payload, needed)
        # A new key per payment, at most api_keys_kept live per account, each expiring
        # after api_key_idle_seconds unused (Ledger.issue_payment_key).
        api_key = await self.ledger.issue_payment_key(
            account_id, keep=self.api_keys_kept, idle_seconds=self.api_key_idle_seconds)
        return Paid(account_id, {**settlement_headers(result, version=version),
                                 API_KEY_HEADER: api_key})

    async def pay(self, request: Request, payload: AnyPaymentPayload, needed: int
                  ) -> tuple[SettlementResult, str]:
        """Verify, claim, settle and credit one payment; returns the settlement and account.
        Rejections come back with a fresh challenge."""
        offered = self.accepts(needed)
        if isinstance(payload, PaymentPayload) and \
                offered[0].amount < payload.accepted.amount <= self.max_deposit:
            # More than asked is a larger deposit, welcome: the amount a 402 asks depends on
            # the request that got it (its prompt, the balance then), and the paid retry
            # must not be refused for having paid what that 402 said.
            offered = self.accepts(payload.accepted.amount)
        try:
            requirements = match_requirements(payload, offered)
        except (InvalidPayment, PaymentRejected) as exc:
            raise self._fresh(request, needed, exc, type(exc)) from exc
        try:
            return await self.collect(payload, requirements)
        except SettlementFailed as exc:
            raise self._fresh(request, needed, exc.cause, PaymentRejected, failed=True,
                              network=exc.network, payer=exc.payer) from exc
        except (InvalidPayment, PaymentRejected) as exc:
            raise self._fresh(request, needed, exc, type(exc)) from exc

    async def collect(self, payload: AnyPaymentPayload, requirements: PaymentRequirements,
                      *, label: str = "x402") -> tuple[SettlementResult, str]:
        """Take one EIP-3009 payment exactly once: verify it, claim its record, settle it
        on-chain, credit the payer's account. Shared by every rail that takes EIP-3009
        authorizations (x402 ``exact``, MPP's ``evm`` charge), so their deposits are recorded,
        recovered and credited alike. Raises :class:`InvalidPayment` / :class:`PaymentRejected`
        (nothing moved), :class:`SettlementFailed` (the chain refused the settlement) or
        :class:`ServiceUnavailable` (outcome unknown, recovery finishes it)."""
        auth = to_authorization(payload)
        network = self.networks[requirements.network]
        key = f"{network.network}:{network.asset.lower()}:{auth.payer.lower()}:{auth.nonce}"
        # A payment sent again: said as what became of it, before the chain (which only
        # knows the authorization is used) is asked.
        existing = await self.deposits.get(key)
        if existing is not None:
            raise _taken(existing)
        await self.settlement.verify(payload, requirements)
        account_id = payer_account_id(network.network, network.asset, auth.payer)
        # Where recovery starts looking for a cancellation of this authorization.
        block = await self.settler.head_block(network)
        deposit = Deposit(
            key=key, account_id=account_id, amount=requirements.amount, payer=auth.payer,
            network=network.network, asset=network.asset,
            payload=_dumps(payload), requirements=_dumps(requirements), block=block)
        claimed, record = await self.deposits.begin(deposit)
        if not claimed:
            raise _taken(record)
        try:
            result = await self.settlement.settle(payload, requirements)
        except PaymentRejected as exc:
            await self.deposits.abandon(deposit.key)
            raise SettlementFailed(exc, network=network.network, payer=auth.payer) from exc
        except SettlementNotSubmitted:
            # Nothing was broadcast: the authorization is untouched, release the claim so
            # the payer's retry is not refused as "already used".
            await self.deposits.abandon(deposit.key)
            raise
        except ServiceUnavailable as exc:
            # Outcome unknown (the transfer may be in flight): the record stays open, marked
            # so that the payment sent again is told so, and the recovery (x402_recovery.py)
            # asks the chain once no request can still be on it.
            await self.deposits.mark_unconfirmed(deposit.key,
                                                 str(exc.extra.get("transaction", "")))
            raise
        await self.deposits.mark_settled(deposit.key, result.tx_hash)
        await self.deposits.credit(record, label=f"{label} {auth.payer}")
        log.info("deposit of %d credited to %s (tx %s)", requirements.amount, account_id,
                 result.tx_hash)
        return result, account_id

    def _fresh(self, request: Request, needed: int, exc: GatewayError,
               kind: type[GatewayError], *, failed: bool = False,
               network: str = "", payer: str | None = None) -> GatewayError:
        """The rejection with a fresh challenge (and a failed PAYMENT-RESPONSE if settling
        failed), keeping the x402 error code."""
        headers = {}
        if failed:
            headers["PAYMENT-RESPONSE"] = encode_header(settlement_response(
                success=False, transaction="", network=network, payer=payer,
                error_reason=exc.code))
        err = kind(exc.message, code=exc.code, param=exc.param, headers=headers)
        offer = self.offer(request, needed=needed, reason=exc.message, code=exc.code)
        return render(err, [offer], needed=needed)


def _taken(record: DepositRecord) -> GatewayError:
    """The answer to a payment whose authorization already has a deposit record. A key is
    never handed out here: a settled authorization is public on-chain, so presenting it again
    proves nothing about who presents it. The payer's next payment brings a key to the same
    account (one per payer), whose balance includes this deposit."""
    if record.status != CREDITED and record.error == UNCONFIRMED:
        # Its request ended with a 503: no key went out, and the transfer may land.
        return ServiceUnavailable(
            "this payment's settlement was not confirmed when it was sent; once the chain "
            "confirms it, it is credited to the payer's account (a new payment returns a key "
            "to that balance)", code="settlement_pending",
            extra={"transaction": record.transaction} if record.transaction else None)
    # Credited, or being settled by the request that claimed it (which returns its key).
    return PaymentRejected(
        "this authorization was already used for a deposit; its API key goes with the "
        "response of the request that settled it", code="invalid_exact_evm_nonce_already_used")


def _scheme(data: Any) -> Any:
    """``accepted.scheme`` of a decoded v2 payment, if it has one."""
    accepted = data.get("accepted") if isinstance(data, dict) else None
    return accepted.get("scheme") if isinstance(accepted, dict) else None


def _dumps(model: Any) -> str:
    return str(model.model_dump_json(by_alias=True, exclude_none=True))
