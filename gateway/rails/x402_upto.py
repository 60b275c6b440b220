"""x402 ``upto`` on the model routes: one request, one authorization, settled to the token.

A request paying with ``upto`` (``PAYMENT-SIGNATURE`` whose ``accepted.scheme`` is ``upto``)
authorizes a maximum: the 402 asked for the request's prompt plus its ``max_tokens`` at the
model's price, capped by ``[x402.upto] max``. The flow of one request:

1. verify the Permit2 authorization (:class:`gateway.rails.upto.UptoEvm`: signature, spender,
   recipient, facilitator, time window, Permit2 allowance, balance, nonce unused);
2. open a *hold* (:class:`meters.holds.Holds`, kind ``upto``): an account of its own
   (``upto_…``) credited with the maximum, recorded once per authorization (a second request
   with the same authorization is refused ``permit2_invalid_nonce``). No money moved yet;
3. the ordinary :class:`~meters.meter.StreamMeter` meters the stream against that account and
   cuts it at the maximum, like any balance;
4. after the final charge the hold is closed (``hold_close.lua``: the amount is fixed to what
   the account spent, atomically, before the chain is called) and settled on-chain once for
   exactly that amount; zero sends no transaction and the authorization expires unused. The
   settlement goes to the client as ``PAYMENT-RESPONSE`` (a header on a non-streaming answer;
   on a stream, whose headers left before the end, an SSE comment ``: payment-response
   <base64>`` just before the dialect's end marker: every SDK ignores comments);
5. the account is deleted; the hold's record stays until a day past the deadline, so the same
   authorization cannot be replayed meanwhile.

A process that dies anywhere leaves the hold open (or closing); the keeper of every process
closes holds that are closing, idle (no stream holding money on them for ``idle_seconds``,
which after a crash is once the ledger's sweep returned the dead stream's lease) or near their
deadline, and settles what their account spent, once (a Redis lock per hold; a settlement whose
outcome was unknown is reconciled against Permit2's nonce bitmap).
"""

from __future__ import annotations

import hashlib
import logging
import time
from typing import Any

from starlette.requests import Request

from gateway.errors import GatewayError, PaymentRejected, ServiceUnavailable, UpstreamError
from gateway.rails.base import Paid
from gateway.rails.eip3009 import EvmNetwork
from gateway.rails.evm import SettlementNotSubmitted, SettlementResult
from gateway.rails.evm_rpc import ChainRpc
from gateway.rails.facilitator_client import RemoteFacilitator
from gateway.rails.upto import (
    ERR_NONCE_USED,
    SCHEME_UPTO,
    UptoEvm,
    UptoPaymentPayload,
    parse_upto_payload,
    upto_requirements,
)
from gateway.rails.x402 import PAYMENT_RESPONSE_HEADER, PaymentRequirements
from gateway.rails.x402_challenge import settlement_headers
from meters.connection import redis_errors
from meters.errors import MeterError
from meters.holds import Hold, HoldBusy, Holds
from meters.ledger import Ledger
from meters.meter import Bill, StreamMeter
from meters.periodic import Periodic

log = logging.getLogger("tollstream.x402.upto")

#: Hold states after ``closing``.
SETTLED, EXPIRED, FAILED = "settled", "expired", "failed"
#: How long a closed hold's record outlives its deadline (replays are refused meanwhile;
#: after the deadline Permit2 refuses them).
RECORD_GRACE_SECONDS = 86400


def upto_account_id(hold_id: str) -> str:
    return "upto_" + hashlib.sha256(hold_id.encode()).hexdigest()[:24]


class UptoStream:
    """:class:`~gateway.rails.base.StreamPayment` of an ``upto`` request: it never pauses
    (the maximum is all there is: the stream is cut there), and its end settles."""

    pauses = False
    pause_timeout = 0.0

    def __init__(self, payments: UptoPayments, hold_id: str) -> None:
        self.payments = payments
        self.hold_id = hold_id

    async def need(self, meter: StreamMeter, tokens: int) -> list[bytes]:
        return []  # never asked: the stream does not pause

    async def receipt(self, meter: StreamMeter, bill: Bill) -> list[bytes]:
        headers = await self.payments.finish(self.hold_id)
        value = headers.get(PAYMENT_RESPONSE_HEADER)
        return [] if value is None else [b": payment-response " + value.encode() + b"\n\n"]

    async def shortfall(self, meter: StreamMeter, needed: int) -> dict[str, Any]:
        return {"upto": "the authorized maximum does not cover this request's prompt"}


class UptoPayments:
    """The ``upto`` half of the x402 rail (see the module docstring)."""

    def __init__(self, *, ledger: Ledger, networks: dict[str, EvmNetwork], rpc: ChainRpc,
                 pay_to: str, max_amount: int, timeout_seconds: int, idle_seconds: float,
                 sweep_seconds: float, deadline_margin: float = 30.0,
                 remote: RemoteFacilitator | None = None) -> None:
        self.ledger = ledger
        self.networks = networks
        self.pay_to = pay_to
        self.max_amount = max_amount
        self.timeout_seconds = timeout_seconds
        self.idle_seconds = idle_seconds
        #: A hold is settled this long before its authorization's deadline, whatever else
        #: (settling after it would revert): a stream still running then is cut at the end
        #: of its lease.
        self.deadline_margin = deadline_margin
        self.evm = UptoEvm(rpc)  # local verification and settlement; chain reads always
        #: A facilitator that verifies and settles instead (remote mode): the payer's
        #: witness names its address, which its /supported announces.
        self.remote = remote
        self._facilitators: dict[str, str] = {}
        self.holds = Holds(ledger, kind="upto")
        self._loop = Periodic("x402-upto", sweep_seconds, self.sweep,
                              outages=(GatewayError, MeterError), log=log)

    async def start(self) -> None:
        if self.remote is not None:
            try:
                await self._discover()
            except GatewayError as exc:  # offered once the facilitator answers
                log.warning("the facilitator's upto address is unknown (%s)", exc.code)
        await self._loop.start()

    async def _discover(self) -> None:
        """Learn each network's upto facilitator address from the facilitator's
        ``/supported`` (``extra.facilitatorAddress``)."""
        assert self.remote is not None
        for kind in (await self.remote.supported()).kinds:
            address = (kind.extra or {}).get("facilitatorAddress")
            if kind.scheme == SCHEME_UPTO and kind.x402_version == 2 \
                    and isinstance(address, str):
                self._facilitators[kind.network] = address

    def facilitator(self, network: EvmNetwork) -> str | None:
        """Who settles ``network``'s upto payments: our relayer, or the remote facilitator's
        announced address (None until it is known)."""
        if self.remote is None:
            return network.relayer_address
        return self._facilitators.get(network.network)

    async def aclose(self) -> None:
        await self._loop.stop()

    # -- the 402 -------------------------------------------------------------------------------
    def accepts(self, needed: int, max_charge: int) -> list[PaymentRequirements]:
        """One ``upto`` offer per network for at most ``max_charge`` (the prompt and
        ``max_tokens`` at the model's price), capped; none when the cap cannot cover even the
        prompt and the first output tokens (``needed``)."""
        amount = min(max(max_charge, needed), self.max_amount)
        if amount < needed or amount <= 0:
            return []
        return [upto_requirements(net, amount=amount, pay_to=self.pay_to,
                                  facilitator=facilitator,
                                  max_timeout_seconds=self.timeout_seconds)
                for net in self.networks.values()
                if (facilitator := self.facilitator(net)) is not None]

    # -- paying --------------------------------------------------------------------------------
    async def authorize(self, request: Request, data: Any, *, needed: int) -> Paid:
        """Verify an ``upto`` payment and open its hold; the request then streams against
        it. :class:`PaymentRejected` / :class:`InvalidPayment` when it cannot pay."""
        payload = parse_upto_payload(data)
        accepted = payload.accepted
        network = self.networks.get(accepted.network)
        if network is None:
            raise PaymentRejected(f"network {accepted.network!r} is not offered",
                                  code="invalid_network")
        amount = accepted.amount
        if amount < needed:
            raise PaymentRejected(f"the authorized maximum {amount} does not cover this "
                                  f"request's prompt and first output tokens ({needed})",
                                  code="invalid_payment_requirements")
        if amount > self.max_amount:
            raise PaymentRejected(f"the authorized maximum {amount} exceeds what one request "
                                  f"may authorize ({self.max_amount})",
                                  code="invalid_payment_requirements")
        facilitator = self.facilitator(network)
        if facilitator is None and self.remote is not None:
            await self._discover()
            facilitator = self.facilitator(network)
        if facilitator is None:
            raise PaymentRejected("the facilitator does not settle upto on this network",
                                  code="unsupported_scheme")
        offered = upto_requirements(network, amount=amount, pay_to=self.pay_to,
                                    facilitator=facilitator,
                                    max_timeout_seconds=self.timeout_seconds)
        if (accepted.asset.lower() != offered.asset.lower()
                or accepted.pay_to.lower() != offered.pay_to.lower()):
            raise PaymentRejected("accepted does not match the offered payment requirements",
                                  code="invalid_payment_requirements")
        if self.remote is None:
            await self.evm.verify(payload, offered, network, facilitator=facilitator)
        else:
            await self.remote.verify(payload, offered)
        auth = payload.payload.permit2_authorization
        if auth.deadline <= time.time() + self.deadline_margin:
            raise PaymentRejected(f"the authorization's deadline leaves less than "
                                  f"{self.deadline_margin:g} s to stream and settle",
                                  code="permit2_deadline_expired")
        hold_id = f"{network.network}:{network.asset.lower()}:{auth.from_.lower()}:{auth.nonce}"
        account_id = upto_account_id(hold_id)
        now = int(time.time())
        keep = max(auth.deadline - now, 0) + RECORD_GRACE_SECONDS
        await self.ledger.ensure_account(account_id, label=f"x402 upto {payload.payer}")
        await self.ledger.credit(account_id, amount, idempotency_key=str(auth.nonce),
                                 purpose="upto", idempotency_ttl_seconds=keep)
        opened = await self.holds.open(hold_id, account_id=account_id, amount=amount,
                                       expires=auth.deadline, now=now, network=network.network,
                                       payload=payload.model_dump_json(by_alias=True,
                                                                       exclude_none=True))
        if not opened:
            raise PaymentRejected("this authorization was already used for a request",
                                  code=ERR_NONCE_USED)
        log.info("upto hold %s opened for at most %d", account_id, amount)
        stream = UptoStream(self, hold_id)
        return Paid(account_id, {}, stream=stream,
                    finish=lambda: self.finish(hold_id))

    # -- settling ------------------------------------------------------------------------------
    async def finish(self, hold_id: str) -> dict[str, str]:
        """Close the hold and settle what its account spent, once; the ``PAYMENT-RESPONSE``
        header of the settlement (empty when it is not settled here: another process has it,
        a stream still holds money on it, or the chain is unreachable; the keeper finishes
        it)."""
        lock = f"{self.ledger.prefix}upto:{hold_id}:closing"
        with redis_errors():
            if not await self.ledger.redis.set(lock, "1", nx=True, px=120_000):
                return {}
        try:
            result = await self._close(hold_id)
        finally:
            with redis_errors():
                await self.ledger.redis.delete(lock)
        if result is None:
            return {}
        return settlement_headers(result, version=2)

    async def _close(self, hold_id: str) -> SettlementResult | None:
        hold = await self.holds.get(hold_id)
        if hold is None or hold.state not in ("open", "closing"):
            return None
        resumed = hold.state == "closing"
        try:
            amount = await self.holds.begin_close(hold_id, hold.account_id)
        except HoldBusy:
            return None  # a stream still runs (or its final charge awaits the ledger)
        if amount is None:
            return None
        raw = await self.holds.field(hold_id, "payload")
        payload = UptoPaymentPayload.model_validate_json(raw or "{}")
        network = self.networks[payload.accepted.network]
        auth = payload.payload.permit2_authorization
        if resumed and amount and await self.evm.nonce_used(network, auth.from_, auth.nonce):
            # An earlier attempt's transaction landed (only our facilitator address can
            # spend this authorization through the proxy).
            result = SettlementResult(tx_hash="", payer=payload.payer, amount=amount,
                                      block_number=None, network=network.network)
            await self._done(hold, SETTLED, result, note="settled by an earlier attempt")
            return result
        try:
            if self.remote is None:
                result = await self.evm.settle(payload, amount, network)
            else:  # at settlement the requirements' amount is the charge (scheme_upto.md)
                result = await self.remote.settle(
                    payload, payload.accepted.model_copy(update={"amount": amount}))
        except PaymentRejected as exc:
            # Refused on-chain: nothing moved. The payer revoked the approval, spent the
            # balance or invalidated the nonce while the request ran.
            log.error("upto hold %s: settling %d was refused (%s); the tokens were delivered "
                      "unpaid", hold.account_id, amount, exc.code)
            await self._done(hold, FAILED, None, note=exc.code)
            return None
        except (SettlementNotSubmitted, ServiceUnavailable, UpstreamError) as exc:
            log.warning("upto hold %s: settlement of %d not done (%s); retried", hold.account_id,
                        amount, exc.code)
            return None
        await self._done(hold, SETTLED if amount else EXPIRED, result)
        log.info("upto hold %s settled %d of %d (tx %s)", hold.account_id, amount, hold.amount,
                 result.tx_hash or "none")
        return result

    async def _done(self, hold: Hold, state: str, result: SettlementResult | None, *,
                    note: str = "") -> None:
        await self.holds.finish(hold.hold_id, hold.account_id, state)
        keep = max(hold.expires - int(time.time()), 0) + RECORD_GRACE_SECONDS
        key = self.holds.record_key(hold.account_id)
        with redis_errors():
            # The record and the account share the account's slot: one transaction.
            async with self.ledger.redis.pipeline(transaction=True) as pipe:
                pipe.hset(key, mapping={"transaction": result.tx_hash if result else "",
                                        "note": note})
                pipe.expire(key, keep)
                # The account was the request's alone: nothing is left in it (hold_close.lua
                # took the unspent part out), so it goes.
                pipe.delete(self.ledger.account_key(hold.account_id))
                await pipe.execute()
        await self.holds.keep_until(hold.hold_id, keep)

    async def sweep(self, now: float | None = None) -> int:
        """One pass of the keeper; returns how many holds it settled or expired."""
        moment = int(time.time() if now is None else now)
        closed = 0
        for hold_id in await self.holds.open_ids():
            hold = await self.holds.get(hold_id)
            if hold is None or not await self._due(hold, moment):
                continue
            closed += bool(await self.finish(hold_id))
        return closed

    async def _due(self, hold: Hold, now: int) -> bool:
        if hold.state == "closing":
            return True
        account = await self.ledger.get_account(hold.account_id)
        if now >= hold.expires - self.deadline_margin:
            if account.held:
                # A stream outlives its authorization: it spends the lease it holds, and is
                # then cut (nothing funds another); the next pass settles.
                if await self.holds.freeze(hold.hold_id, hold.account_id):
                    log.warning("upto hold %s nears its deadline mid-stream: frozen",
                                hold.account_id)
                return False
            return True
        if account.spent != hold.last_spent or account.held:
            await self.holds.seen(hold.hold_id, spent=account.spent, now=now)
            return False
        return now - hold.quiet_since >= self.idle_seconds

    async def status(self) -> dict[str, str]:
        return {"x402 upto authorizations open": str(len(await self.holds.open_ids()))}
