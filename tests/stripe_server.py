"""A local HTTP server speaking Stripe's API wire format, for the parts tollstream uses: Stripe
cannot be reached from here, and neither ``stripe-mock`` (a Go binary) nor ``localstripe``
(which rejects the SPT parameter) fits (../shared/NOTES.md). The real ``stripe`` SDK talks to it
through its API base address.

It checks the request shape Stripe would: form-encoded bodies, ``Authorization: Bearer
<secret key>``, the pinned preview ``Stripe-Version`` wherever a Shared Payment Token is used,
an ``Idempotency-Key`` on every POST (replayed answers carry ``Idempotent-Replayed: true``;
the same key with other parameters is an ``idempotency_error``), and Stripe's error bodies
(``{"error": {"type", "code", "message", "param", ...}}``). What a payment does depends on its
SPT, as Stripe's test tokens do:

* ``spt_ok...``: succeeds (``succeeded``, or ``requires_capture`` with
  ``capture_method=manual``);
* ``spt_decline...``: 402 ``card_error`` / ``card_declined``;
* ``spt_action...``: ``requires_action`` (3-D Secure);
* anything else: 400 ``resource_missing`` on ``shared_payment_granted_token``; an SPT used once
  is spent (a second PaymentIntent with it is refused, unless it is an idempotent replay).

Faults for tests, through ``POST /_sim/mode``: ``{"down": true}`` answers every API call 500,
``{"delay": s}`` holds each answer ``s`` seconds. ``GET /_sim/state`` returns the
PaymentIntents, the meter events and every API request seen.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import secrets
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl

import orjson
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

PREVIEW_VERSION = "2026-07-29.preview"


@dataclass
class StripeState:
    secret_key: str
    payment_intents: dict[str, dict[str, Any]] = field(default_factory=dict)
    idempotency: dict[str, tuple[str, int, bytes]] = field(default_factory=dict)
    spent_tokens: set[str] = field(default_factory=set)
    meter_events: dict[str, dict[str, Any]] = field(default_factory=dict)
    requests: list[dict[str, Any]] = field(default_factory=list)
    down: bool = False
    delay: float = 0.0
    in_flight: int = 0  # API calls being answered (a delayed one lands late)
    ids: Iterator[int] = field(default_factory=itertools.count)


def nested(form: list[tuple[str, str]]) -> dict[str, Any]:
    """Stripe's form encoding back to objects: ``a[b]=1`` and ``a[0]=x`` nest."""
    out: dict[str, Any] = {}
    for key, value in form:
        parts = key.replace("]", "").split("[")
        target = out
        for part in parts[:-1]:
            target = target.setdefault(part, {})
        target[parts[-1]] = value
    return {k: _lists(v) for k, v in out.items()}


def _lists(value: Any) -> Any:
    if isinstance(value, dict):
        if value and all(k.isdigit() for k in value):
            return [_lists(value[k]) for k in sorted(value, key=int)]
        return {k: _lists(v) for k, v in value.items()}
    return value


def error(status: int, kind: str, message: str, *, code: str | None = None,
          param: str | None = None, **extra: Any) -> Response:
    body: dict[str, Any] = {"type": kind, "message": message}
    if code:
        body["code"] = code
    if param:
        body["param"] = param
    body.update(extra)
    return Response(orjson.dumps({"error": body}), status_code=status,
                    media_type="application/json", headers={"request-id": _request_id()})


def _request_id() -> str:
    return "req_" + secrets.token_hex(7)


def ok(body: dict[str, Any], *, replayed: bool = False) -> Response:
    headers = {"request-id": _request_id()}
    if replayed:
        headers["idempotent-replayed"] = "true"
    return Response(orjson.dumps(body), media_type="application/json", headers=headers)


def create_stripe_app(secret_key: str = "sk_test_tollstream") -> Starlette:
    state = StripeState(secret_key)

    async def api(request: Request) -> Response:
        state.in_flight += 1
        try:
            return await answer(request)
        finally:
            state.in_flight -= 1

    async def answer(request: Request) -> Response:
        raw = await request.body()
        form = parse_qsl(raw.decode(), keep_blank_values=True)
        state.requests.append({"method": request.method, "path": request.url.path,
                               "headers": dict(request.headers), "form": form})
        if state.delay:
            await asyncio.sleep(state.delay)
        if state.down:
            return error(500, "api_error", "An unknown error occurred (simulated outage)")
        if request.headers.get("authorization") != f"Bearer {state.secret_key}":
            return error(401, "invalid_request_error", "Invalid API Key provided")
        if request.method == "POST" and request.headers.get("content-type", "").split(";")[0] \
                != "application/x-www-form-urlencoded":
            return error(400, "invalid_request_error", "bodies must be form-encoded")
        params = nested(form)
        key = request.headers.get("idempotency-key")
        if request.method == "POST":
            if not key:
                return error(400, "invalid_request_error", "tollstream's Stripe calls always "
                             "carry an Idempotency-Key", param="Idempotency-Key")
            fingerprint = hashlib.sha256(request.url.path.encode() + raw).hexdigest()
            seen = state.idempotency.get(key)
            if seen is not None:
                if seen[0] != fingerprint:
                    return error(400, "idempotency_error", "Keys for idempotent requests can "
                                 "only be used with the same parameters they were first used "
                                 "with.")
                response = Response(seen[2], status_code=seen[1],
                                    media_type="application/json",
                                    headers={"request-id": _request_id(),
                                             "idempotent-replayed": "true"})
                return response
        response = route(request, params)
        if request.method == "POST" and key and response.status_code != 500:
            state.idempotency[key] = (fingerprint, response.status_code, bytes(response.body))
        return response

    def route(request: Request, params: dict[str, Any]) -> Response:
        path = request.url.path
        if path == "/v1/payment_intents" and request.method == "POST":
            return create_payment_intent(request, params)
        if path == "/v1/billing/meter_events" and request.method == "POST":
            return meter_event(params)
        parts = path.strip("/").split("/")
        if len(parts) >= 3 and parts[:2] == ["v1", "payment_intents"]:
            pi = state.payment_intents.get(parts[2])
            if pi is None:
                return error(404, "invalid_request_error", f"No such payment_intent: "
                             f"'{parts[2]}'", code="resource_missing", param="intent")
            if len(parts) == 3 and request.method == "GET":
                return ok(pi)
            if len(parts) == 4 and parts[3] == "capture" and request.method == "POST":
                return capture(pi, params)
            if len(parts) == 4 and parts[3] == "cancel" and request.method == "POST":
                return cancel(pi)
        return error(404, "invalid_request_error", f"Unrecognized request URL ({path})")

    def create_payment_intent(request: Request, params: dict[str, Any]) -> Response:
        spt = params.get("shared_payment_granted_token")
        if spt is not None and request.headers.get("stripe-version") != PREVIEW_VERSION:
            return error(400, "invalid_request_error", "shared_payment_granted_token needs "
                         f"the preview API version {PREVIEW_VERSION}",
                         param="shared_payment_granted_token")
        try:
            amount = int(params["amount"])
        except (KeyError, ValueError):
            return error(400, "invalid_request_error", "Missing required param: amount.",
                         param="amount")
        if amount < 1 or not params.get("currency"):
            return error(400, "invalid_request_error", "Invalid amount or currency",
                         param="amount")
        if not spt:
            return error(400, "invalid_request_error", "Missing required param: "
                         "shared_payment_granted_token.", param="shared_payment_granted_token")
        manual = params.get("capture_method") == "manual"
        pi: dict[str, Any] = {
            "id": f"pi_{next(state.ids):06d}{secrets.token_hex(6)}", "object": "payment_intent",
            "amount": amount, "currency": params["currency"], "metadata":
            params.get("metadata", {}), "capture_method": "manual" if manual else "automatic",
            "created": int(time.time()), "amount_received": 0, "amount_capturable": 0,
            "shared_payment_granted_token": spt, "status": "requires_payment_method"}
        if spt.startswith("spt_decline"):
            pi["last_payment_error"] = {"code": "card_declined",
                                        "decline_code": "generic_decline"}
            state.payment_intents[pi["id"]] = pi
            return error(402, "card_error", "Your card was declined.", code="card_declined",
                         decline_code="generic_decline", payment_intent=pi)
        if not spt.startswith(("spt_ok", "spt_action")) or spt in state.spent_tokens:
            return error(400, "invalid_request_error", f"No such shared payment granted "
                         f"token: '{spt}' (or it was already used)", code="resource_missing",
                         param="shared_payment_granted_token")
        state.spent_tokens.add(spt)
        if spt.startswith("spt_action"):
            pi.update(status="requires_action", next_action={"type": "use_stripe_sdk"})
        elif manual:
            pi.update(status="requires_capture", amount_capturable=amount)
        else:
            pi.update(status="succeeded", amount_received=amount)
        state.payment_intents[pi["id"]] = pi
        return ok(pi)

    def capture(pi: dict[str, Any], params: dict[str, Any]) -> Response:
        if pi["status"] != "requires_capture":
            return error(400, "invalid_request_error", f"This PaymentIntent could not be "
                         f"captured because it has a status of {pi['status']}.",
                         code="payment_intent_unexpected_state")
        amount = int(params.get("amount_to_capture", pi["amount_capturable"]))
        if not 0 < amount <= pi["amount_capturable"]:
            return error(400, "invalid_request_error", "amount_to_capture must be positive "
                         "and at most amount_capturable", param="amount_to_capture")
        pi.update(status="succeeded", amount_received=amount, amount_capturable=0)
        return ok(pi)

    def cancel(pi: dict[str, Any]) -> Response:
        if pi["status"] in ("succeeded", "canceled"):
            return error(400, "invalid_request_error", f"You cannot cancel this "
                         f"PaymentIntent because it has a status of {pi['status']}.",
                         code="payment_intent_unexpected_state")
        pi.update(status="canceled", amount_capturable=0)
        return ok(pi)

    def meter_event(params: dict[str, Any]) -> Response:
        identifier = params.get("identifier") or secrets.token_hex(8)
        payload = params.get("payload") or {}
        if not params.get("event_name") or "stripe_customer_id" not in payload \
                or "value" not in payload:
            return error(400, "invalid_request_error", "event_name, payload[stripe_customer_id]"
                         " and payload[value] are required", param="payload")
        if identifier in state.meter_events:
            return error(400, "invalid_request_error", f"An event with identifier "
                         f"{identifier} already exists.", code="resource_already_exists",
                         param="identifier")
        event = {"object": "billing.meter_event", "event_name": params["event_name"],
                 "identifier": identifier, "payload": payload,
                 "timestamp": int(params.get("timestamp") or time.time())}
        state.meter_events[identifier] = event
        return ok(event)

    async def set_mode(request: Request) -> Response:
        data = orjson.loads(await request.body())
        state.down = bool(data.get("down", state.down))
        state.delay = float(data.get("delay", state.delay))
        return ok({"down": state.down, "delay": state.delay})

    async def get_state(request: Request) -> Response:
        return ok({"payment_intents": state.payment_intents,
                   "meter_events": state.meter_events, "in_flight": state.in_flight,
                   "requests": state.requests})

    app = Starlette(routes=[
        Route("/_sim/mode", set_mode, methods=["POST"]),
        Route("/_sim/state", get_state, methods=["GET"]),
        Route("/v1/{path:path}", api, methods=["GET", "POST", "DELETE"]),
    ])
    app.state.stripe = state
    return app
