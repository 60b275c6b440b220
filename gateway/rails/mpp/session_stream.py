"""A stream paid from an MPP session channel: how it asks for the next voucher and how it ends
(specs/mpp/draft-evm-session-00.md, "Insufficient Balance During Streaming" and "Receipt
Generation").

The stream is metered by the ordinary :class:`~meters.meter.StreamMeter` against the channel's
ledger account (``acceptedCumulative - spent``). When the vouchers run out it does not cut: it
sends a ``payment-need-voucher`` event and pauses until a voucher arriving on another request
(``HEAD`` or any method on the model route) credits the channel, which wakes it through
:mod:`meters.notices`. It asks again, for what it needs then, when the voucher fell short or
went to another stream on the same channel (they share its balance and race for each
credit). With no voucher within the pause timeout it ends, billed what was delivered. A
stream that ended well sends a last ``payment-receipt`` event after its final charge. Only
clients that presented a session credential ever get these events.
"""

from __future__ import annotations

from typing import Any

import orjson

from gateway.rails.mpp.session import EvmSession
from meters.meter import Bill, StreamMeter

NEED_VOUCHER = b"payment-need-voucher"
RECEIPT = b"payment-receipt"


def sse_event(name: bytes, data: dict[str, Any]) -> bytes:
    return b"event: " + name + b"\ndata: " + orjson.dumps(data) + b"\n\n"


class SessionStream:
    """:class:`~gateway.rails.base.StreamPayment` for one request on one channel."""

    pauses = True

    def __init__(self, session: EvmSession, channel_id: str, challenge_id: str) -> None:
        self.session = session
        self.channel_id = channel_id
        self.challenge_id = challenge_id
        self.pause_timeout = session.pause_timeout

    async def _required(self, more: int) -> dict[str, Any]:
        """The voucher the client must sign next: ``more`` atomic units beyond what the
        channel's account can still give (and never less than ``minVoucherDelta``)."""
        found = await self.session.channels.snapshot(self.channel_id)
        assert found is not None  # a channel is never forgotten while a stream runs on it
        state, account = found
        step = max(more - account.balance, self.session.min_voucher_delta, 1)
        required = state.accepted + step
        fields: dict[str, Any] = {"channelId": self.channel_id,
                                  "requiredCumulative": str(required),
                                  "acceptedCumulative": str(state.accepted),
                                  "deposit": str(state.deposit)}
        if required > state.deposit:
            # "When requiredCumulative > deposit, the client MUST submit a topUp before
            # sending a new voucher": said outright, with the least top-up that allows it.
            fields["topUpRequired"] = True
            fields["minimumTopUp"] = str(required - state.deposit)
        return fields

    async def need(self, meter: StreamMeter, tokens: int) -> list[bytes]:
        # What the next ``tokens`` output tokens cost beyond what this stream holds.
        more = meter.rate.charge(meter.prompt, meter.covered + tokens) - meter.held_total
        return [sse_event(NEED_VOUCHER, await self._required(more))]

    async def receipt(self, meter: StreamMeter, bill: Bill) -> list[bytes]:
        fields = await self.session.receipt_fields(self.channel_id, self.challenge_id,
                                                   units=bill.output_tokens)
        return [sse_event(RECEIPT, fields)]

    async def shortfall(self, meter: StreamMeter, needed: int) -> dict[str, Any]:
        fields = await self._required(needed)
        # In a 402 body "deposit" is the x402 offer's: the channel's goes by another name.
        fields["channelDeposit"] = fields.pop("deposit")
        return fields
