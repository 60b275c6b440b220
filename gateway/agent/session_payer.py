"""The agent's side of one MPP session, without I/O: what to sign and send when, from what the
gateway said (402s, ``payment-need-voucher`` events, receipts). The transports of
:mod:`gateway.agent.session_client` do the I/O (specs/mpp/draft-evm-session-00.md)."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson

from gateway.agent.events import is_payment_control, payment_event
from gateway.agent.session import SessionCapExceeded, SessionWallet, session_challenge
from gateway.agent.x402 import httpx
from gateway.rails.mpp.scheme import b64url_decode

__all__ = ["SessionCapExceeded", "SessionPayer", "SessionRefused", "Step"]


@dataclass(frozen=True, slots=True)
class Step:
    """One payment action to send on ``HEAD``: ``build`` signs it with the payer's current
    challenge (again after a fresh one replaced an expired one)."""

    build: Callable[[], str]
    kind: str     # "open" (amount: the deposit), "topUp" (amount added), "voucher" (cumulative)
    amount: int

    @property
    def opens(self) -> bool:
        return self.kind == "open"


class SessionRefused(RuntimeError):
    """The gateway refused a payment action (open, top-up, voucher) of the session."""

    def __init__(self, status: int) -> None:
        super().__init__(f"the gateway refused a session payment (HTTP {status})")
        self.status = status


class SessionPayer:
    """The agent's side of one session (shared by the sync and async transports): what to
    sign when, from what the gateway said. No I/O here."""

    def __init__(self, wallet: SessionWallet, *, increment: int, top_up: int | None = None,
                 observer: Callable[[str, dict[str, Any]], None] | None = None) -> None:
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
        #: Told of each payment event: ``open``, ``topUp``, ``voucher`` (sent and taken),
        #: ``need`` (a stream paused), ``receipt`` (a stream's final receipt).
        self.observer = observer
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
                return [Step(lambda: self.wallet.open(challenge), "open",
                             self.wallet.deposit)]
            if kind in ("payment-expired", "invalid-challenge"):
                return []  # signed again with the fresh challenge
            required = int(problem.get("requiredCumulative") or 0)
            if not required:
                return None  # refused for another reason: the agent sees the 402
            return self._pay_up_to(required, problem)

    def _tell(self, kind: str, data: dict[str, Any]) -> None:
        if self.observer is not None:
            self.observer(kind, data)

    def on_need(self, data: dict[str, Any]) -> list[Step]:
        """A stream paused (``payment-need-voucher``): the top-up and voucher to send."""
        self._tell("need", data)
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
            steps.append(Step(lambda: wallet.top_up(more), "topUp", more))
            amount = min(amount, wallet.channel_deposit + more)
        steps.append(Step(lambda: wallet.voucher(amount), "voucher", amount))
        return steps

    def done(self, step: Step, headers: Any) -> None:
        """A step the gateway answered 200."""
        with self._lock:
            if step.kind == "topUp":
                self.wallet.channel_deposit += step.amount
            elif step.opens:
                self.wallet.channel_deposit = step.amount
                self.opened = True
        self.receipt_header(headers)
        self._tell(step.kind, {"amount": step.amount, "channelId": self.channel_id})

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
            self._tell("receipt", data)
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
