"""What the escrow's transactions mean: its reverts as the spec's problem types, its events as
plain values.

The seam between driving the contract (:mod:`gateway.rails.mpp.escrow`) and interpreting what
came back: :class:`EscrowError` maps a revert (the escrow's error name, or the token's revert
string under it) to draft-evm-session-00's problem type and HTTP status ("Error Responses");
:func:`decode_outcome` finds the escrow's event in a receipt (Transaction Outcome Checks: the
right event, from the right contract).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from eth_utils import to_checksum_address
from hexbytes import HexBytes
from web3.exceptions import ContractLogicError

from gateway.errors import GatewayError, PaymentRejected
from gateway.rails.mpp.channel import (
    ERR_AMOUNT_EXCEEDS_DEPOSIT,
    ERR_CHANNEL_FINALIZED,
    ERR_CHANNEL_NOT_FOUND,
    ERR_INSUFFICIENT_BALANCE,
    ERR_INVALID_SIGNATURE,
    ERR_TRANSACTION_REVERTED,
    ERR_VERIFICATION_FAILED,
)

# "Error Responses": the escrow's revert -> (problem type, HTTP status). Anything else the
# escrow raises is transaction-reverted (409); a token's own revert (a failed pull) is
# insufficient-balance.
_PROBLEMS: dict[str, tuple[str, int]] = {
    "AmountExceedsDeposit": (ERR_AMOUNT_EXCEEDS_DEPOSIT, 402),
    "ChannelNotFound": (ERR_CHANNEL_NOT_FOUND, 410),
    "ChannelFinalized": (ERR_CHANNEL_FINALIZED, 410),
    "InvalidSignature": (ERR_INVALID_SIGNATURE, 402),
    "TransferFailed": (ERR_INSUFFICIENT_BALANCE, 402),
}
#: Every name the escrow reverts with (spec "Contract Errors" plus our four additions).
ESCROW_ERRORS = frozenset({
    "ChannelAlreadyExists", "ChannelNotFound", "ChannelFinalized", "NotPayee", "NotPayer",
    "AmountNotIncreasing", "AmountExceedsDeposit", "InvalidSignature", "NonceMismatch",
    "CloseNotReady", "ZeroDeposit", "DepositOverflow", "InvalidPayee", "InvalidPayer",
    "TransferFailed", "GracePeriodTooShort",
})


class EscrowError(GatewayError):
    """The escrow (or its token) reverted. ``error``: the contract's error name, the token's
    revert string, or "" when the revert carried no reason (e.g. a uint128 argument out of
    range fails ABI decoding); ``mined``: whether a mined transaction reverted (then
    ``extra["transaction"]`` is its hash) or only its simulation."""

    status = 409
    code = ERR_TRANSACTION_REVERTED

    def __init__(self, error: str, *, mined: bool, extra: dict[str, Any] | None = None) -> None:
        problem, status = _PROBLEMS.get(error, (None, None))
        if problem is None and error and error not in ESCROW_ERRORS:
            problem, status = ERR_INSUFFICIENT_BALANCE, 402  # the token refused the pull
        super().__init__(f"escrow reverted: {error or 'no reason given'}",
                         code=problem or ERR_TRANSACTION_REVERTED, extra=extra)
        self.status = status or 409
        self.error = error
        self.mined = mined


def revert_reason(exc: ContractLogicError) -> str:
    """The revert string of ``exc`` ("execution reverted: NotPayee" -> "NotPayee")."""
    message = str(exc.message or exc)
    return message.removeprefix("execution reverted").removeprefix(":").strip()


@dataclass(frozen=True)
class EscrowOutcome:
    """A successful escrow transaction and its main event (``ChannelOpened``, ``TopUp``,
    ``Settled``, ``ChannelClosed``, ``CloseRequested``): ``args`` as plain values (addresses
    checksummed, bytes32 as lowercase hex, amounts int); None when it emitted none (a repeated
    ``requestClose``)."""

    tx_hash: str
    block_number: int
    event: str | None
    args: Mapping[str, Any]


def _plain(value: Any) -> Any:
    if isinstance(value, bytes):
        return "0x" + value.hex()
    if isinstance(value, str) and value.startswith("0x") and len(value) == 42:
        return to_checksum_address(value)
    return value


def decode_outcome(contract: Any, receipt: Mapping[str, Any], event: str | None,
                   tx_hash: str) -> EscrowOutcome:
    """The first ``event`` that ``contract`` (the escrow, a web3 contract object) emitted in
    ``receipt``. The same event from any other address does not count. Raises
    :class:`PaymentRejected` (``verification-failed``) when there is none."""
    block = int(receipt["blockNumber"])
    if event is None:
        return EscrowOutcome(tx_hash, block, None, {})
    decoder = getattr(contract.events, event)()
    topic = HexBytes(decoder.topic)
    escrow = to_checksum_address(contract.address)
    for log in receipt.get("logs") or ():
        topics = log.get("topics") or ()
        if to_checksum_address(log["address"]) == escrow and topics \
                and HexBytes(topics[0]) == topic:
            args = decoder.process_log(log)["args"]
            return EscrowOutcome(tx_hash, block, event,
                                 {k: _plain(v) for k, v in dict(args).items()})
    raise PaymentRejected(f"the transaction emitted no {event} from the escrow",
                          code=ERR_VERIFICATION_FAILED)


__all__ = ["ESCROW_ERRORS", "EscrowError", "EscrowOutcome", "decode_outcome", "revert_reason"]
