"""MPP's ``evm`` session (specs/mpp/draft-evm-session-00.md): an escrow channel the agent
funds once and spends with cumulative vouchers; the gateway meters tokens against it.

The challenge (per model): ``amount`` is the output price of one token in atomic units,
**rounded up** to a whole unit when a token costs less (the spec prices whole base units per
unit; the ledger still bills the exact rate, rounded once per request, so the charge never
exceeds ``amount`` per token); ``unitType: "llm_token"``; ``suggestedDeposit``; ``currency``,
``recipient`` (the payee, whose key settles and closes), and ``methodDetails`` with the
``escrowContract``, ``chainId``, ``minVoucherDelta``, ``feePayer: true`` and the credential
types (``authorization``: we relay ``openWithAuthorization`` and pay its gas; ``hash``: the
agent opened it itself).

Actions arrive on the model route: ``open`` and ``topUp`` fund the channel (verified on-chain,
"Transaction Outcome Checks"); ``voucher`` raises ``acceptedCumulative`` (EIP-712 recovery,
low-s, the channel's signer, monotonic, ``minVoucherDelta``, not above the deposit, no close
pending; a voucher not above the accepted amount is an idempotent replay, after its signature
was checked); ``close`` closes cooperatively for exactly ``spent``. The ledger side is
:mod:`meters.channels`; settlement runs in :mod:`gateway.rails.mpp.settler`.

Departures, on purpose: voucher signers are EOAs only (ERC-1271 wallets are checked by the
escrow, not here yet); the voucher payload's ``deposit`` extension is refused (send a
``topUp`` first); the close voucher must equal ``spent`` exactly (the spec lets a server take
more: tollstream captures what it delivered and refunds the rest); "no close pending" is
what the settler last read from the chain (every ``settle_interval_seconds``), not an RPC per
voucher: a voucher costs one Lua call, and what it pays for is still settled within the
grace period.
"""

from __future__ import annotations

import collections
import datetime as dt
from dataclasses import dataclass
from typing import Any

from eth_account import Account
from eth_utils import to_checksum_address

from gateway.errors import InvalidPayment, PaymentRejected, ServiceUnavailable
from gateway.rails.evm import EvmNetwork
from gateway.rails.mpp.channel import (
    ZERO_ADDRESS,
    Voucher,
    recover_voucher_signer,
)
from gateway.rails.mpp.escrow import EscrowClient
from gateway.rails.mpp.outcomes import EscrowError
from gateway.rails.mpp.scheme import (
    MALFORMED_CREDENTIAL,
    VERIFICATION_FAILED,
    ChallengeEcho,
    Credential,
    Problem,
    encode_receipt,
)
from gateway.rails.mpp.session_wire import (
    OpenPayload,
    TopUpPayload,
    VoucherPayload,
    open_authorization,
    parse_payload,
    source_address,
    top_up_authorization,
)
from meters.channels import Channels, ChannelState, VoucherStatus
from meters.ledger import Ledger
from meters.money import Asset
from meters.rates import MTOK, Rate

S = "session/"
@dataclass(frozen=True, slots=True)
class SessionResult:
    """What a session credential stands for: the channel's account and the response
    headers; ``final`` when the action ends the exchange (close: no model call)."""

    account_id: str
    headers: dict[str, str]
    channel_id: str
    challenge_id: str = ""
    final: bool = False


def _problem(kind: str, detail: str, *, status: int = 402, channel: str | None = None
             ) -> Problem:
    return Problem(kind, detail, status=status, namespace=S,
                   fields={"channelId": channel} if channel else None)


def _from_chain(exc: EscrowError | PaymentRejected, channel: str) -> Problem:
    """A chain-side refusal as the spec's problem type ("Error Responses")."""
    kind = getattr(exc, "problem_type", None) or exc.code
    if kind == VERIFICATION_FAILED:
        return Problem(VERIFICATION_FAILED, exc.message, fields={"channelId": channel})
    status = exc.status if exc.status in (402, 409, 410) else 402
    return _problem(kind, exc.message, status=status, channel=channel)


class EvmSession:
    """The ``evm`` / ``session`` intent of the MPP rail (see the module docstring)."""

    method = "evm"
    intent = "session"

    def __init__(self, *, escrow: EscrowClient, ledger: Ledger, network: EvmNetwork,
                 payee_key: str, asset: Asset, suggested_deposit: int, min_deposit: int,
                 min_voucher_delta: int, pause_timeout: float = 60.0) -> None:
        self.escrow = escrow
        self.channels = Channels(ledger)
        self.ledger = ledger
        self.network = network
        self.payee_key = payee_key
        self.payee = str(Account.from_key(payee_key).address)
        self.asset = asset
        self.suggested_deposit = suggested_deposit
        self.min_deposit = min_deposit
        self.min_voucher_delta = min_voucher_delta
        #: How long a stream waits, paused, for a voucher (``payment-need-voucher``).
        self.pause_timeout = pause_timeout
        #: Vouchers taken since start, by result (accepted, replayed, rejected): metrics.
        self.vouchers: collections.Counter[str] = collections.Counter()
        #: Channels vouchers were taken on, for their ids and signer (see _voucher).
        self._seen: dict[str, ChannelState] = {}

    # -- the challenge ------------------------------------------------------------------------
    def request(self, rate: Rate | None) -> dict[str, Any]:
        per_token = -(-rate.output_per_mtok // MTOK) if rate is not None else 1
        return {"amount": str(max(per_token, 1)), "unitType": "llm_token",
                "suggestedDeposit": str(self.suggested_deposit),
                "currency": to_checksum_address(self.network.asset),
                "recipient": self.payee,
                "methodDetails": {"escrowContract": self.escrow.escrow,
                                  "chainId": self.network.chain_id,
                                  "minVoucherDelta": str(self.min_voucher_delta),
                                  "feePayer": True,
                                  "credentialTypes": ["authorization", "hash"]}}

    # -- credentials ----------------------------------------------------------------------------
    async def handle(self, credential: Credential, echo: ChallengeEcho) -> SessionResult:
        self._check_challenge(echo)
        payload = parse_payload(credential.payload)
        if isinstance(payload, OpenPayload):
            state = await self._open(payload, credential.source)
        elif isinstance(payload, TopUpPayload):
            state = await self._top_up(payload)
        elif isinstance(payload, VoucherPayload) and payload.action == "voucher":
            state = await self._voucher(payload)
        else:
            assert isinstance(payload, VoucherPayload)
            return await self._close(payload, echo)
        return SessionResult(state.account_id, await self._receipt(state, echo),
                             state.channel_id, echo.id)

    def _check_challenge(self, echo: ChallengeEcho) -> None:
        request = echo.request_object()
        details = request.get("methodDetails") or {}
        if (str(request.get("recipient", "")).lower() != self.payee.lower()
                or str(request.get("currency", "")).lower() != self.network.asset.lower()
                or str(details.get("escrowContract", "")).lower() != self.escrow.escrow.lower()
                or details.get("chainId") != self.network.chain_id):
            raise Problem(VERIFICATION_FAILED, "the challenge is for another payee, token, "
                          "escrow or chain than this gateway's")

    async def _open(self, payload: OpenPayload, source: str | None) -> ChannelState:
        signer = payload.authorizedSigner or ZERO_ADDRESS
        channel_id = payload.channelId.lower()
        # The initial voucher (typically 0): the server holds a signed voucher from the start.
        # Checked before anything is relayed on-chain, so a refused open moves no money.
        voucher_signature = (payload.voucherSignature if payload.type == "authorization"
                             else payload.signature)
        if voucher_signature is None:
            raise Problem(MALFORMED_CREDENTIAL, "payload.voucherSignature is required",
                          param="payload.voucherSignature")
        known = await self.channels.get(channel_id)
        if known is None:
            try:
                if payload.type == "authorization":
                    payer = await self._relay_open(payload, signer)
                else:
                    payer = source_address(source)
                    await self.escrow.check_open_transaction(
                        payload.hash or "", channel_id=channel_id, payee=self.payee)
                chain = await self.escrow.get_channel(channel_id)
            except (EscrowError, PaymentRejected) as exc:
                raise _from_chain(exc, channel_id) from exc
            if (not chain.exists or chain.finalized or chain.close_requested_at
                    or chain.payee.lower() != self.payee.lower()
                    or chain.token.lower() != self.network.asset.lower()
                    or chain.payer.lower() != payer.lower()):
                raise Problem(VERIFICATION_FAILED, "the channel on-chain is not an open "
                              "channel of this payer to this gateway in this token",
                              fields={"channelId": channel_id})
            if chain.deposit < self.min_deposit:
                raise _problem("insufficient-balance", f"the deposit is below this "
                               f"gateway's minimum of {self.min_deposit}", channel=channel_id)
            await self.channels.open(channel_id, payer=chain.payer,
                                     signer=chain.voucher_signer, token=chain.token,
                                     deposit=chain.deposit)
            known = await self.channels.get(channel_id)
            assert known is not None
        return await self._accept(known, int(payload.cumulativeAmount), voucher_signature)

    async def _relay_open(self, payload: OpenPayload, signer: str) -> str:
        auth = open_authorization(payload, signer=signer, payee=self.payee,
                                  token=self.network.asset, escrow=self.escrow.escrow,
                                  chain_id=self.network.chain_id)
        if auth.value < self.min_deposit:
            raise _problem("insufficient-balance", f"the deposit is below this gateway's "
                           f"minimum of {self.min_deposit}")
        await self.escrow.open_with_authorization(auth, payee=self.payee, salt=payload.salt,
                                                  authorized_signer=signer)
        return auth.payer

    async def _top_up(self, payload: TopUpPayload) -> ChannelState:
        channel_id = payload.channelId.lower()
        state = await self._known(channel_id)
        amount = int(payload.additionalDeposit)
        try:
            if payload.type == "authorization":
                auth, salt = top_up_authorization(payload, channel_id=channel_id,
                                                  escrow=self.escrow.escrow)
                await self.escrow.top_up_with_authorization(auth, channel_id=channel_id,
                                                            top_up_salt=salt)
            else:
                await self.escrow.check_top_up_transaction(
                    payload.hash or "", channel_id=channel_id, additional_deposit=amount)
            chain = await self.escrow.get_channel(channel_id)
        except InvalidPayment as exc:
            raise Problem(MALFORMED_CREDENTIAL, exc.message, param=exc.param) from exc
        except (EscrowError, PaymentRejected) as exc:
            raise _from_chain(exc, channel_id) from exc
        await self.channels.raise_deposit(channel_id, chain.deposit)
        if chain.close_requested_at == 0 and state.close_requested and not state.finalized:
            await self.channels.update(channel_id, close_requested=0)  # a top-up cancels it
        return await self._known(channel_id)

    async def _known(self, channel_id: str) -> ChannelState:
        state = await self.channels.get(channel_id)
        if state is None:
            raise _problem("channel-not-found", "no channel with this id is open here",
                           status=410, channel=channel_id)
        if state.finalized:
            raise _problem("channel-finalized", "the channel is closed", status=410,
                           channel=channel_id)
        return state

    def _verified(self, state: ChannelState, amount: int, signature: str) -> Voucher:
        try:
            voucher = Voucher(state.channel_id, amount, signature)
            signer = recover_voucher_signer(voucher, chain_id=self.network.chain_id,
                                            escrow=self.escrow.escrow)
        except InvalidPayment as exc:
            raise Problem(MALFORMED_CREDENTIAL, exc.message, param=exc.param) from exc
        except PaymentRejected as exc:
            raise _problem("invalid-signature", exc.message, channel=state.channel_id) from exc
        if signer.lower() != state.signer.lower():
            raise _problem("signer-mismatch", "the voucher is not signed by the channel's "
                           "authorized signer", channel=state.channel_id)
        return voucher

    async def _voucher(self, payload: VoucherPayload) -> ChannelState:
        # A channel's id and signer never change: a voucher on a channel seen here before
        # skips reading it (voucher.lua still refuses one closed or finalized meanwhile).
        channel_id = payload.channelId.lower()
        state = self._seen.get(channel_id)
        if state is None:
            state = await self._known(channel_id)
            if len(self._seen) >= 100_000:  # bound memory; a miss costs one read
                self._seen.clear()
            self._seen[channel_id] = state
        return await self._accept(state, int(payload.cumulativeAmount), payload.signature)

    async def _accept(self, state: ChannelState, amount: int, signature: str) -> ChannelState:
        try:
            return await self._take_voucher(state, amount, signature)
        except Problem:
            self.vouchers["rejected"] += 1
            raise

    async def _take_voucher(self, state: ChannelState, amount: int, signature: str
                            ) -> ChannelState:
        self._verified(state, amount, signature)  # before any idempotent short-circuit
        status, _ = await self.channels.accept(state.channel_id, amount, signature,
                                               min_delta=self.min_voucher_delta)
        if status in (VoucherStatus.ACCEPTED, VoucherStatus.REPLAY):
            self.vouchers["accepted" if status is VoucherStatus.ACCEPTED else "replayed"] += 1
        problems = {
            VoucherStatus.DELTA_TOO_SMALL: ("delta-too-small", f"a voucher must add at least "
                                            f"minVoucherDelta ({self.min_voucher_delta})"),
            VoucherStatus.EXCEEDS_DEPOSIT: ("amount-exceeds-deposit", "the voucher is above "
                                            "the channel's deposit: top up first"),
            VoucherStatus.CLOSE_PENDING: ("channel-finalized", "a close is pending on this "
                                          "channel"),
            VoucherStatus.FINALIZED: ("channel-finalized", "the channel is closed"),
            VoucherStatus.UNKNOWN: ("channel-not-found", "no channel with this id is open")}
        if status in problems:
            kind, detail = problems[status]
            raise _problem(kind, detail, channel=state.channel_id,
                           status=410 if kind.startswith("channel-") else 402)
        return state  # its ids are what callers use; amounts are read again for receipts

    async def _close(self, payload: VoucherPayload, echo: ChallengeEcho) -> SessionResult:
        state = await self._known(payload.channelId.lower())
        voucher = self._verified(state, int(payload.cumulativeAmount), payload.signature)
        account = await self.ledger.get_account(state.account_id)
        if voucher.cumulative_amount != account.spent:
            raise Problem(VERIFICATION_FAILED, f"sign the close voucher for exactly what was "
                          f"spent ({account.spent}): tollstream captures that and refunds "
                          "the rest", fields={"channelId": state.channel_id,
                                              "spent": str(account.spent)})
        if await self.channels.begin_close(state.channel_id) is None:
            raise _problem("transaction-reverted", "a stream is still running on this "
                           "channel: close it when the stream has ended", status=409,
                           channel=state.channel_id)
        try:
            outcome = await self.escrow.close(self.payee_key, voucher)
        except (EscrowError, PaymentRejected, ServiceUnavailable) as exc:
            await self.channels.abort_close(state.channel_id)
            if isinstance(exc, ServiceUnavailable):
                raise
            raise _from_chain(exc, state.channel_id) from exc
        await self.channels.finalize(state.channel_id, settled=voucher.cumulative_amount)
        final = await self.channels.get(state.channel_id)
        assert final is not None
        headers = await self._receipt(final, echo, tx_hash=outcome.tx_hash)
        return SessionResult(state.account_id, headers, state.channel_id, echo.id, final=True)

    async def _receipt(self, state: ChannelState, echo: ChallengeEcho, *,
                       tx_hash: str | None = None) -> dict[str, str]:
        fields = await self.receipt_fields(state.channel_id, echo.id, tx_hash=tx_hash)
        return {"Payment-Receipt": encode_receipt(fields), "Cache-Control": "private"}

    async def receipt_fields(self, channel_id: str, challenge_id: str, *,
                             tx_hash: str | None = None, units: int | None = None
                             ) -> dict[str, Any]:
        """A session receipt ("Receipt Generation"). ``spent`` is what was charged for
        delivered tokens, monotonic as the spec wants it; what streams in flight hold on the
        channel (reserved before delivery, returned if not delivered) is not in it."""
        found = await self.channels.snapshot(channel_id)
        assert found is not None  # a channel is never forgotten
        state, account = found
        fields: dict[str, Any] = {
            "method": self.method, "intent": self.intent, "status": "success",
            "challengeId": challenge_id, "reference": state.channel_id,
            "channelId": state.channel_id, "chainId": self.network.chain_id,
            "acceptedCumulative": str(state.accepted),
            "spent": str(account.spent),
            "timestamp": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")}
        if units is not None:
            fields["units"] = units
        if tx_hash:
            fields["txHash"] = tx_hash
        return fields
