"""The wire format of MPP ``evm`` session credentials: the ``payload`` of each action
(specs/mpp/draft-evm-session-00.md, "Credential Schema"), validated strictly (no coercion, no
unknown fields, amounts as decimal strings, hex of the exact length) into typed models, and
the funding payloads (relayed open and top-up) checked against the channel they claim."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import ConfigDict, Field, StrictStr, ValidationError

from gateway.errors import InvalidPayment
from gateway.rails.eip3009 import Eip3009Authorization
from gateway.rails.mpp.channel import compute_channel_id, open_nonce, top_up_nonce
from gateway.rails.mpp.scheme import MALFORMED_CREDENTIAL, VERIFICATION_FAILED, Problem, _Strict

HEX32 = r"^0x[0-9a-fA-F]{64}$"
ADDRESS = r"^0x[0-9a-fA-F]{40}$"
UINT = r"^[0-9]{1,39}$"
SIG = r"^0x[0-9a-fA-F]{130}$"


class _Payload(_Strict):
    model_config = ConfigDict(strict=True, frozen=True, extra="forbid", populate_by_name=True)


class Eip3009Fields(_Payload):
    from_: StrictStr = Field(alias="from", pattern=ADDRESS)
    to: StrictStr = Field(pattern=ADDRESS)
    value: StrictStr = Field(pattern=UINT)
    validAfter: StrictStr = Field(pattern=UINT)
    validBefore: StrictStr = Field(pattern=UINT)
    nonce: StrictStr = Field(pattern=HEX32)

    def signed(self, signature: str) -> Eip3009Authorization:
        return Eip3009Authorization(from_=self.from_, to=self.to, value=int(self.value),
                                    valid_after=int(self.validAfter),
                                    valid_before=int(self.validBefore), nonce=self.nonce,
                                    signature=signature)


class OpenPayload(_Payload):
    action: Literal["open"]
    type: Literal["authorization", "hash"]
    channelId: StrictStr = Field(pattern=HEX32)
    salt: StrictStr = Field(pattern=HEX32)
    cumulativeAmount: StrictStr = Field(pattern=UINT)
    authorizedSigner: StrictStr | None = Field(default=None, pattern=ADDRESS)
    # type="authorization": the deposit authorization, and the voucher's signature apart.
    authorization: Eip3009Fields | None = None
    signature: StrictStr = Field(pattern=SIG)
    voucherSignature: StrictStr | None = Field(default=None, pattern=SIG)
    # type="hash": the agent's own open transaction.
    hash: StrictStr | None = Field(default=None, pattern=HEX32)


class TopUpPayload(_Payload):
    action: Literal["topUp"]
    type: Literal["authorization", "hash"]
    channelId: StrictStr = Field(pattern=HEX32)
    additionalDeposit: StrictStr = Field(pattern=UINT)
    salt: StrictStr | None = Field(default=None, pattern=HEX32)
    authorization: Eip3009Fields | None = None
    signature: StrictStr | None = Field(default=None, pattern=SIG)
    hash: StrictStr | None = Field(default=None, pattern=HEX32)


class VoucherPayload(_Payload):
    action: Literal["voucher", "close"]
    channelId: StrictStr = Field(pattern=HEX32)
    cumulativeAmount: StrictStr = Field(pattern=UINT)
    signature: StrictStr = Field(pattern=SIG)


PAYLOADS: dict[str, type[_Payload]] = {"open": OpenPayload, "topUp": TopUpPayload,
                                       "voucher": VoucherPayload, "close": VoucherPayload}


def parse_payload(payload: dict[str, Any]) -> OpenPayload | TopUpPayload | VoucherPayload:
    """A credential's ``payload`` as its action's model; ``malformed-credential`` naming the
    first field that is missing or malformed."""
    action = payload.get("action")
    model = PAYLOADS.get(action) if isinstance(action, str) else None
    if model is None:
        raise Problem(MALFORMED_CREDENTIAL, "payload.action must be one of open, topUp, "
                      "voucher, close", param="payload.action")
    try:
        parsed = model.model_validate(payload)
    except ValidationError as exc:
        where = ".".join(str(p) for p in exc.errors(include_url=False)[0]["loc"])
        raise Problem(MALFORMED_CREDENTIAL, f"payload.{where} is missing or malformed",
                      param=f"payload.{where}") from exc
    assert isinstance(parsed, OpenPayload | TopUpPayload | VoucherPayload)
    return parsed


# -- funding payloads checked against the channel they claim ---------------------------------

def open_authorization(payload: OpenPayload, *, signer: str, payee: str, token: str,
                       escrow: str, chain_id: int) -> Eip3009Authorization:
    """The EIP-3009 authorization of a relayed open ("Open Payload (feePayer: true)"): it
    must pay the escrow, under the nonce derived from the channel's parameters, for the
    channel id those parameters give."""
    if payload.authorization is None:
        raise Problem(MALFORMED_CREDENTIAL, "payload.authorization is required",
                      param="payload.authorization")
    try:
        auth = payload.authorization.signed(payload.signature)
    except InvalidPayment as exc:
        raise Problem(MALFORMED_CREDENTIAL, exc.message, param=exc.param) from exc
    expected = compute_channel_id(payer=auth.payer, payee=payee, token=token,
                                  salt=payload.salt, authorized_signer=signer, escrow=escrow,
                                  chain_id=chain_id)
    if expected.lower() != payload.channelId.lower():
        raise Problem(VERIFICATION_FAILED, "channelId is not the id of this payer, payee, "
                      "token, salt and signer on this escrow")
    nonce = open_nonce(from_=auth.payer, payee=payee, token=token, salt=payload.salt,
                       authorized_signer=signer)
    if auth.to.lower() != escrow.lower() or auth.nonce.lower() != nonce.lower():
        raise Problem(VERIFICATION_FAILED, "the authorization must pay the escrow with the "
                      "nonce derived from the channel parameters")
    return auth


def top_up_authorization(payload: TopUpPayload, *, channel_id: str, escrow: str
                         ) -> tuple[Eip3009Authorization, str]:
    """The authorization of a relayed top-up and its salt: ``additionalDeposit`` to the
    escrow under the nonce derived from the channel, the amount and the salt."""
    if payload.authorization is None or payload.salt is None or payload.signature is None:
        raise Problem(MALFORMED_CREDENTIAL, "an authorization top-up needs authorization, "
                      "signature and salt", param="payload")
    amount = int(payload.additionalDeposit)
    auth = payload.authorization.signed(payload.signature)
    nonce = top_up_nonce(channel_id=channel_id, additional_deposit=amount, from_=auth.payer,
                         top_up_salt=payload.salt)
    if auth.value != amount or auth.nonce.lower() != nonce.lower() \
            or auth.to.lower() != escrow.lower():
        raise Problem(VERIFICATION_FAILED, "the authorization must pay additionalDeposit to "
                      "the escrow with the derived nonce")
    return auth, payload.salt


def source_address(source: str | None) -> str:
    """The payer in a credential's ``source`` (``did:pkh:eip155:<chain>:<address>``)."""
    parts = (source or "").split(":")
    if len(parts) != 5 or parts[:3] != ["did", "pkh", "eip155"]:
        raise Problem(MALFORMED_CREDENTIAL, "source must be did:pkh:eip155:<chain>:<payer> "
                      "for a hash open", param="source")
    return parts[4]
