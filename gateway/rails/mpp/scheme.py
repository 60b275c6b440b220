"""The ``Payment`` HTTP authentication scheme (specs/mpp/draft-httpauth-payment-00.md):
challenges, credentials, receipts and problem details, without any server around them.

* A challenge travels in ``WWW-Authenticate: Payment id="..", realm="..", method="..",
  intent="..", request="..", expires=".."``; ``request`` is the base64url (no padding) of the
  JCS-canonical JSON (RFC 8785, the ``rfc8785`` package) of the method's request object.
* Its ``id`` is the HMAC-SHA256 of the seven positional slots
  ``realm|method|intent|request|expires|digest|opaque`` (section "Recommended: HMAC-SHA256
  Binding"), under a server secret; several secrets may verify (rotation), the first signs.
* A credential is ``Authorization: Payment <base64url JSON {challenge, source?, payload}>``;
  tollstream also reads ``Payment-Authorization`` (the header pympp uses when the route's
  ``Authorization`` carries API keys, as tollstream's does).
* A receipt is ``Payment-Receipt: <base64url JSON>``, on successful responses only.
* Errors are RFC 9457 problem details under ``https://paymentauth.org/problems/``.

Parsing is strict: anything but the documented shape is a ``malformed-credential`` problem.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import hashlib
import hmac
import re
import secrets
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson
import rfc8785
from pydantic import BaseModel, ConfigDict, Field, StrictStr, ValidationError

from gateway.errors import PaymentRequired

PROBLEMS = "https://paymentauth.org/problems/"
#: Problem types of the core scheme and of the session intent (its own namespace).
PAYMENT_REQUIRED = "payment-required"
MALFORMED_CREDENTIAL = "malformed-credential"
INVALID_CHALLENGE = "invalid-challenge"
PAYMENT_EXPIRED = "payment-expired"
VERIFICATION_FAILED = "verification-failed"
PAYMENT_INSUFFICIENT = "payment-insufficient"
METHOD_UNSUPPORTED = "method-unsupported"

_TITLES = {PAYMENT_REQUIRED: "Payment Required", MALFORMED_CREDENTIAL: "Malformed Credential",
           INVALID_CHALLENGE: "Invalid Challenge", PAYMENT_EXPIRED: "Payment Expired",
           VERIFICATION_FAILED: "Verification Failed",
           PAYMENT_INSUFFICIENT: "Payment Insufficient",
           METHOD_UNSUPPORTED: "Method Unsupported"}

WWW_AUTHENTICATE = "WWW-Authenticate"
PAYMENT_RECEIPT = "Payment-Receipt"
CREDENTIAL_HEADERS = ("authorization", "payment-authorization")
MAX_CREDENTIAL_BYTES = 64 * 1024
_B64URL = re.compile(r"^[A-Za-z0-9_-]*$")
_TOKEN = re.compile(r"^[a-z][a-z0-9:_-]*$")


# -- encodings ------------------------------------------------------------------------------------

def b64url(data: bytes) -> str:
    """base64url without padding."""
    return base64.urlsafe_b64encode(data).decode("ascii").rstrip("=")


def b64url_decode(text: str) -> bytes:
    """Strict base64url without padding; ``ValueError`` otherwise."""
    if not _B64URL.match(text) or len(text) % 4 == 1:
        raise ValueError("not base64url without padding")
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except binascii.Error as exc:
        raise ValueError("not base64url") from exc


def canonical_b64url(value: Mapping[str, Any]) -> str:
    """JCS (RFC 8785) serialization, then base64url without padding."""
    return b64url(rfc8785.dumps(dict(value)))


def timestamp(moment: dt.datetime | None = None) -> str:
    """RFC 3339, UTC, second precision: ``2026-11-25T12:00:00Z``."""
    moment = moment or dt.datetime.now(dt.UTC)
    return moment.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_timestamp(text: str) -> dt.datetime:
    """An RFC 3339 timestamp; ``ValueError`` otherwise."""
    moment = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    if moment.tzinfo is None:
        raise ValueError("timestamp without a time zone")
    return moment


def _quote(value: str) -> str:
    if "\r" in value or "\n" in value:
        raise ValueError("header values cannot contain line breaks")
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


# -- challenges -----------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Challenge:
    """One Payment challenge; ``request`` and ``opaque`` as objects, encoded on the wire."""

    id: str
    realm: str
    method: str
    intent: str
    request: Mapping[str, Any]
    expires: str | None = None
    digest: str | None = None
    description: str | None = None
    opaque: Mapping[str, str] | None = None

    @property
    def request_b64(self) -> str:
        return canonical_b64url(self.request)

    @property
    def opaque_b64(self) -> str | None:
        return None if self.opaque is None else canonical_b64url(self.opaque)

    def params(self) -> dict[str, str]:
        """The auth-params as they appear on the wire (and are echoed in credentials)."""
        out = {"id": self.id, "realm": self.realm, "method": self.method,
               "intent": self.intent, "request": self.request_b64}
        for key, value in (("expires", self.expires), ("digest", self.digest),
                           ("description", self.description), ("opaque", self.opaque_b64)):
            if value is not None:
                out[key] = value
        return out

    def header(self) -> str:
        """The ``WWW-Authenticate`` field value."""
        return "Payment " + ", ".join(f"{k}={_quote(v)}" for k, v in self.params().items())


def binding_input(realm: str, method: str, intent: str, request_b64: str,
                  expires: str | None, digest: str | None, opaque_b64: str | None) -> bytes:
    """The HMAC input: seven positional slots joined by ``|``, absent ones empty."""
    return "|".join([realm, method, intent, request_b64, expires or "", digest or "",
                     opaque_b64 or ""]).encode("utf-8")


class ChallengeSigner:
    """Issues challenges whose ``id`` is bound to their parameters, and checks echoes.

    ``secrets``: the first signs new challenges; every one verifies, so a secret can be
    rotated by putting the new one first and dropping the old one once its challenges expire.
    """

    def __init__(self, keys: Sequence[bytes], *, ttl_seconds: int = 300) -> None:
        if not keys or any(len(k) < 16 for k in keys):
            raise ValueError("challenge secrets must be at least 16 bytes")
        self.secrets = list(keys)
        self.ttl_seconds = ttl_seconds

    def _mac(self, secret: bytes, data: bytes) -> str:
        return b64url(hmac.new(secret, data, hashlib.sha256).digest())

    def issue(self, *, realm: str, method: str, intent: str, request: Mapping[str, Any],
              description: str | None = None, digest: str | None = None,
              opaque: Mapping[str, str] | None = None,
              now: dt.datetime | None = None) -> Challenge:
        now = now or dt.datetime.now(dt.UTC)
        expires = timestamp(now + dt.timedelta(seconds=self.ttl_seconds))
        # A nonce in the (HMAC-bound) opaque data: two challenges issued in the same second
        # for the same request must still have distinct ids, as each id is single use.
        opaque = {**(opaque or {}), "nonce": secrets.token_urlsafe(12)}
        unsigned = Challenge("", realm, method, intent, request, expires, digest, description,
                             opaque)
        data = binding_input(realm, method, intent, unsigned.request_b64, expires, digest,
                             unsigned.opaque_b64)
        return Challenge(self._mac(self.secrets[0], data), realm, method, intent, request,
                         expires, digest, description, opaque)

    def verify(self, echo: ChallengeEcho) -> bool:
        """Whether ``echo`` is a challenge one of our secrets issued, unaltered."""
        data = binding_input(echo.realm, echo.method, echo.intent, echo.request, echo.expires,
                             echo.digest, echo.opaque)
        return any(hmac.compare_digest(self._mac(secret, data), echo.id)
                   for secret in self.secrets)


# -- credentials ----------------------------------------------------------------------------------

class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, frozen=True)


class ChallengeEcho(_Strict):
    """The challenge as the credential echoes it (``request``/``opaque`` still encoded)."""

    model_config = ConfigDict(strict=True, frozen=True, extra="ignore")
    id: StrictStr = Field(min_length=1)
    realm: StrictStr
    method: StrictStr = Field(pattern=r"^[a-z][a-z0-9:_-]*$")
    intent: StrictStr = Field(pattern=r"^[A-Za-z0-9-]+$")
    request: StrictStr = Field(pattern=r"^[A-Za-z0-9_-]+$")
    expires: StrictStr | None = None
    digest: StrictStr | None = None
    description: StrictStr | None = None
    opaque: StrictStr | None = None

    def request_object(self) -> dict[str, Any]:
        """The decoded ``request`` (``ValueError`` if it is not a JSON object)."""
        value = orjson.loads(b64url_decode(self.request))
        if not isinstance(value, dict):
            raise ValueError("request is not a JSON object")
        return value


class Credential(_Strict):
    """``{challenge, source?, payload}``: ``payload`` is the method's, validated by it."""

    challenge: ChallengeEcho
    source: StrictStr | None = None
    payload: dict[str, Any]


def credential_value(headers: Mapping[str, str]) -> str | None:
    """The base64url token of a ``Payment`` credential in the request, if there is one."""
    for name in CREDENTIAL_HEADERS:
        value = headers.get(name)
        if value is None:
            continue
        scheme, _, token = value.strip().partition(" ")
        if scheme.lower() == "payment":
            return token.strip()
    return None


def parse_credential(token: str) -> Credential:
    """Decode a credential strictly; :class:`Problem` ``malformed-credential`` otherwise."""
    if len(token) > MAX_CREDENTIAL_BYTES:
        raise Problem(MALFORMED_CREDENTIAL, "the credential is too large")
    try:
        data = orjson.loads(b64url_decode(token))
    except ValueError as exc:  # orjson.JSONDecodeError is a ValueError
        raise Problem(MALFORMED_CREDENTIAL, "the credential is not base64url (no padding) "
                      "of a JSON object") from exc
    if not isinstance(data, dict):
        raise Problem(MALFORMED_CREDENTIAL, "the credential is not a JSON object")
    try:
        return Credential.model_validate(data)
    except ValidationError as exc:
        first = exc.errors(include_url=False)[0]
        where = ".".join(str(p) for p in first["loc"]) or "credential"
        raise Problem(MALFORMED_CREDENTIAL, f"credential field {where}: {first['msg']}",
                      param=where) from exc


# -- receipts and problems ------------------------------------------------------------------------

def encode_receipt(fields: Mapping[str, Any]) -> str:
    """The ``Payment-Receipt`` value: base64url (no padding) of the receipt's JSON."""
    return b64url(orjson.dumps({"status": "success", "timestamp": timestamp(), **fields}))


class Problem(PaymentRequired):
    """A Payment problem (RFC 9457). ``kind`` is the problem type's last segment; session
    problems pass ``namespace="session/"``. The rail adds fresh challenges before it is
    answered (402s carry them; other statuses do not)."""

    def __init__(self, kind: str, detail: str, *, status: int = 402, namespace: str = "",
                 title: str | None = None, param: str | None = None,
                 fields: Mapping[str, Any] | None = None) -> None:
        super().__init__(detail, code=kind, param=param)
        self.status = status
        self.kind = kind
        self.type_uri = PROBLEMS + namespace + kind
        self.title = title or _TITLES.get(kind) or kind.replace("-", " ").title()
        self.fields = dict(fields or {})

    def problem(self) -> dict[str, Any]:
        return {"type": self.type_uri, "title": self.title, "status": self.status,
                "detail": self.message, **self.fields}


# -- client preferences ---------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class PaymentRange:
    method: str
    intent: str
    q: float = 1.0

    def matches(self, method: str, intent: str) -> int:
        """0: no; else how specific (1 = ``*/*``, 2 = one wildcard, 3 = exact)."""
        if self.method not in ("*", method) or self.intent not in ("*", intent):
            return 0
        return 1 + (self.method != "*") + (self.intent != "*")


def parse_accept_payment(value: str | None) -> list[PaymentRange] | None:
    """``Accept-Payment`` as ranges; None when absent or malformed (the spec lets a server
    ignore a malformed header)."""
    if not value:
        return None
    ranges: list[PaymentRange] = []
    for item in value.split(","):
        token, *params = [part.strip() for part in item.split(";")]
        method, slash, intent = token.partition("/")
        if not slash or not (method == "*" or _TOKEN.match(method)) \
                or not (intent == "*" or re.match(r"^[A-Za-z0-9-]+$", intent)):
            return None
        q = 1.0
        for param in params:
            name, _, number = param.partition("=")
            if name.strip() == "q":
                try:
                    q = float(number)
                except ValueError:
                    return None
        ranges.append(PaymentRange(method, intent, q))
    return ranges


@dataclass
class _Ranked:
    order: int
    q: float
    challenge: Challenge = field(compare=False)


def order_challenges(challenges: Iterable[Challenge], ranges: list[PaymentRange] | None
                     ) -> list[Challenge]:
    """The challenges to offer under the client's ``Accept-Payment`` (section "Client Payment
    Preferences"): those its ranges accept with q > 0, by descending q then server order;
    all of them when the header is absent, malformed or matches none."""
    offered = list(challenges)
    if ranges is None:
        return offered
    ranked: list[_Ranked] = []
    for order, challenge in enumerate(offered):
        best = max(((r.matches(challenge.method, challenge.intent), r.q) for r in ranges),
                   default=(0, 0.0))
        if best[0] and best[1] > 0:
            ranked.append(_Ranked(order, best[1], challenge))
    if not ranked:
        return offered
    return [r.challenge for r in sorted(ranked, key=lambda r: (-r.q, r.order))]
