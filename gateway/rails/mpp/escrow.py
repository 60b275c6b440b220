"""The MPP session escrow on-chain: read channels, move them, check transactions by hash.

:class:`EscrowClient` drives the escrow of draft-evm-session-00 ("Channel Escrow Contract";
ours is ``gateway/chain/Escrow.vy``) through the project's :class:`ChainRpc` (timeouts, error
translation, one nonce lock per sender). The gateway uses it as payee and relayer (it pays gas
for ``openWithAuthorization`` / ``topUpWithAuthorization``: ``feePayer: true``), an agent's
session client as payer. Every call is simulated first, so a doomed one costs no gas.

Failures raise the gateway's errors, never a web3 exception:

* :class:`~gateway.rails.mpp.outcomes.EscrowError` (re-exported here) -- the escrow (or the
  token under it) reverted, in simulation or mined:
  ``error`` is the contract's error name (``AmountNotIncreasing``, ``NotPayee``, ...) or the
  token's revert string, ``code`` the spec's problem type ("Error Responses" mapping), and
  ``extra["transaction"]`` the hash when it was mined;
* :class:`~gateway.errors.PaymentRejected` (``verification-failed``) -- a transaction that
  succeeded but did not do what the client said it did (Transaction Outcome Checks);
* :class:`~gateway.rails.evm_rpc.TransactionNotSent` / ServiceUnavailable / UpstreamError as
  for settlement (:mod:`gateway.rails.evm`): not sent, or the node failed us (then with the
  hash in ``extra["transaction"]`` once it was broadcast).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from eth_account import Account
from eth_utils import to_checksum_address
from hexbytes import HexBytes
from web3.exceptions import ContractLogicError

from gateway.chain.build import ESCROW_ARTIFACT, load_artifact
from gateway.errors import PaymentRejected, ServiceUnavailable, UpstreamError
from gateway.rails.eip3009 import HEX32, Eip3009Authorization, EvmNetwork
from gateway.rails.evm_rpc import ChainRpc
from gateway.rails.mpp.channel import (
    ERR_SIGNER_MISMATCH,
    ERR_VERIFICATION_FAILED,
    ZERO_ADDRESS,
    Channel,
    Voucher,
    verify_voucher,
    voucher_digest,
)
from gateway.rails.mpp.outcomes import (
    ESCROW_ERRORS,
    EscrowError,
    EscrowOutcome,
    decode_outcome,
    revert_reason,
)

ESCROW_ABI: list[dict[str, Any]] = load_artifact(ESCROW_ARTIFACT)["abi"]
_ERC20_ABI: list[dict[str, Any]] = [
    {"type": "function", "name": "approve", "stateMutability": "nonpayable",
     "inputs": [{"name": "spender", "type": "address"}, {"name": "amount", "type": "uint256"}],
     "outputs": [{"name": "", "type": "bool"}]},
]
_ERC1271_ABI: list[dict[str, Any]] = [
    {"type": "function", "name": "isValidSignature", "stateMutability": "view",
     "inputs": [{"name": "hash", "type": "bytes32"}, {"name": "signature", "type": "bytes"}],
     "outputs": [{"name": "", "type": "bytes4"}]},
]
_ERC1271_MAGIC = bytes.fromhex("1626ba7e")


class EscrowClient:
    """One escrow contract on one network. ``network`` gives the RPC, chain id, timeouts,
    confirmations, the token (``asset``, the default channel token) and the relayer key that
    submits relayed deposits; ``rpc`` may be shared (e.g. an :class:`EvmSettler`'s)."""

    def __init__(self, network: EvmNetwork, escrow: str, *, rpc: ChainRpc | None = None,
                 poll_interval: float = 0.05) -> None:
        self.network = network
        self.escrow = to_checksum_address(escrow)
        self.rpc = rpc or ChainRpc()
        self._owns_rpc = rpc is None
        self._poll = poll_interval

    @property
    def contract(self) -> Any:
        return self.rpc.web3(self.network).eth.contract(address=self.escrow, abi=ESCROW_ABI)

    async def aclose(self) -> None:
        """Close the HTTP sessions, if this client made its own :class:`ChainRpc`."""
        if self._owns_rpc:
            await self.rpc.aclose()

    # ------------------------------------------------------------------ reads

    async def get_channel(self, channel_id: str) -> Channel:
        """The channel's record (``exists`` false when it was never opened)."""
        fn = self.contract.functions.getChannel(HexBytes(channel_id))
        return Channel.from_record(channel_id, await self.rpc.call(self.network, fn.call))

    async def close_grace_period(self) -> int:
        """Seconds between ``requestClose`` and the earliest ``withdraw``. A server must check
        it is at least 600 before accepting channels on this escrow ("Forced Close")."""
        fn = self.contract.functions.CLOSE_GRACE_PERIOD()
        return await self.rpc.quantity(self.network, fn.call, "CLOSE_GRACE_PERIOD")

    async def verify_voucher(self, voucher: Voucher, channel: Channel) -> None:
        """:func:`~gateway.rails.mpp.channel.verify_voucher`, and for a contract-wallet signer
        ERC-1271 ``isValidSignature`` on-chain, as the escrow falls back to it."""
        try:
            verify_voucher(voucher, channel, chain_id=self.network.chain_id, escrow=self.escrow)
            return
        except PaymentRejected as exc:
            if voucher.channel_id.lower() != channel.channel_id.lower():
                raise
            rejected = exc
        eth = self.rpc.web3(self.network).eth
        signer = to_checksum_address(channel.voucher_signer)
        if not await self.rpc.call(self.network, lambda: eth.get_code(signer)):
            raise rejected  # an EOA: ECDSA was the only way
        digest = voucher_digest(voucher.channel_id, voucher.cumulative_amount,
                                chain_id=self.network.chain_id, escrow=self.escrow)
        fn = eth.contract(address=signer, abi=_ERC1271_ABI).functions.isValidSignature(
            HexBytes(digest), voucher.signature_bytes)
        try:
            answer = await self.rpc.call(self.network, fn.call)
        except (ContractLogicError, UpstreamError):  # reverted, or not a bytes4 answer
            answer = b""
        if bytes(answer) != _ERC1271_MAGIC:
            raise PaymentRejected("the signer wallet refused the voucher (ERC-1271)",
                                  code=ERR_SIGNER_MISMATCH) from rejected

    # ------------------------------------------------------------------ payer-funded

    async def open(self, key: str, *, payee: str, deposit: int, salt: str,
                   authorized_signer: str = ZERO_ADDRESS, token: str | None = None
                   ) -> EscrowOutcome:
        """``approve`` then ``open`` from the payer ``key`` (``feePayer: false``: the payer
        pays gas); returns the ``ChannelOpened`` outcome."""
        token = to_checksum_address(token or self.network.asset)
        erc20 = self.rpc.web3(self.network).eth.contract(address=token, abi=_ERC20_ABI)
        await self._transact(erc20.functions.approve(self.escrow, deposit), key, None)
        return await self._transact(self.contract.functions.open(
            to_checksum_address(payee), token, deposit, HexBytes(salt),
            to_checksum_address(authorized_signer)), key, "ChannelOpened")

    async def top_up(self, key: str, channel_id: str, additional_deposit: int) -> EscrowOutcome:
        """``approve`` then ``topUp`` from the payer ``key``; cancels a pending close."""
        channel = await self.get_channel(channel_id)
        token = channel.token if channel.exists else self.network.asset
        erc20 = self.rpc.web3(self.network).eth.contract(address=to_checksum_address(token),
                                                         abi=_ERC20_ABI)
        await self._transact(erc20.functions.approve(self.escrow, additional_deposit), key,
                             None)
        return await self._transact(self.contract.functions.topUp(
            HexBytes(channel_id), additional_deposit), key, "TopUp")

    # ------------------------------------------------------------------ relayed (we pay gas)

    async def open_with_authorization(self, auth: Eip3009Authorization, *, payee: str,
                                      salt: str, authorized_signer: str = ZERO_ADDRESS,
                                      token: str | None = None) -> EscrowOutcome:
        """Submit ``openWithAuthorization`` from the relayer (``feePayer: true``)."""
        fn = self.contract.functions.openWithAuthorization(
            to_checksum_address(payee), to_checksum_address(token or self.network.asset),
            auth.value, HexBytes(salt), to_checksum_address(authorized_signer), auth.payer,
            auth.valid_after, auth.valid_before, HexBytes(auth.nonce), self._packed(auth))
        return await self._transact(fn, self.network.relayer_secret(), "ChannelOpened")

    async def top_up_with_authorization(self, auth: Eip3009Authorization, *, channel_id: str,
                                        top_up_salt: str) -> EscrowOutcome:
        """Submit ``topUpWithAuthorization`` from the relayer."""
        fn = self.contract.functions.topUpWithAuthorization(
            HexBytes(channel_id), auth.value, auth.payer, HexBytes(top_up_salt),
            auth.valid_after, auth.valid_before, HexBytes(auth.nonce), self._packed(auth))
        return await self._transact(fn, self.network.relayer_secret(), "TopUp")

    @staticmethod
    def _packed(auth: Eip3009Authorization) -> bytes:
        v, r, s = auth.vrs()  # v as 27/28: the token's bytes overload refuses 0/1
        return r + s + bytes([v])

    # ------------------------------------------------------------------ payee

    async def settle(self, key: str, voucher: Voucher) -> EscrowOutcome:
        """``settle`` from the payee ``key``: pays the voucher's amount minus what was
        settled before."""
        fn = self.contract.functions.settle(HexBytes(voucher.channel_id),
                                            voucher.cumulative_amount, voucher.signature_bytes)
        return await self._transact(fn, key, "Settled")

    async def close(self, key: str, voucher: Voucher) -> EscrowOutcome:
        """``close`` from the payee ``key``: settles the voucher, refunds the rest, finalizes.
        A voucher at or below what was settled forfeits the rest (its signature may be 0x)."""
        fn = self.contract.functions.close(HexBytes(voucher.channel_id),
                                           voucher.cumulative_amount, voucher.signature_bytes)
        return await self._transact(fn, key, "ChannelClosed")

    # ------------------------------------------------------------------ payer (forced close)

    async def request_close(self, key: str, channel_id: str) -> EscrowOutcome:
        """``requestClose`` from the payer ``key``: starts the grace period."""
        fn = self.contract.functions.requestClose(HexBytes(channel_id))
        return await self._transact(fn, key, "CloseRequested")

    async def withdraw(self, key: str, channel_id: str) -> EscrowOutcome:
        """``withdraw`` from the payer ``key`` once the grace period is over."""
        fn = self.contract.functions.withdraw(HexBytes(channel_id))
        return await self._transact(fn, key, "ChannelClosed")

    # ------------------------------------------------------------------ by hash

    async def check_open_transaction(self, tx_hash: str, *, channel_id: str, payee: str,
                                     token: str | None = None) -> EscrowOutcome:
        """A client-broadcast open (``type="hash"``): the receipt's status is 1 and it holds
        this escrow's ``ChannelOpened`` for ``channel_id`` to ``payee`` in ``token``. Works for
        an open inside an ERC-4337 bundle too (only the escrow's log is looked at)."""
        outcome = await self._outcome(tx_hash, "ChannelOpened", channel_id)
        token = to_checksum_address(token or self.network.asset)
        if outcome.args["payee"] != to_checksum_address(payee) or outcome.args["token"] != token:
            raise PaymentRejected("the channel opened pays another payee or token",
                                  code=ERR_VERIFICATION_FAILED)
        return outcome

    async def check_top_up_transaction(self, tx_hash: str, *, channel_id: str,
                                       additional_deposit: int) -> EscrowOutcome:
        """A client-broadcast top-up: status 1 and this escrow's ``TopUp`` for ``channel_id``
        of exactly ``additional_deposit``."""
        outcome = await self._outcome(tx_hash, "TopUp", channel_id)
        if outcome.args["additionalDeposit"] != additional_deposit:
            raise PaymentRejected(f"the top-up added {outcome.args['additionalDeposit']}, "
                                  f"not {additional_deposit}", code=ERR_VERIFICATION_FAILED)
        return outcome

    async def _outcome(self, tx_hash: str, event: str, channel_id: str) -> EscrowOutcome:
        if not isinstance(tx_hash, str) or not HEX32.match(tx_hash):
            raise PaymentRejected("hash is not a transaction hash", code=ERR_VERIFICATION_FAILED)
        # Not mined yet: wait, bounded by the network's receipt timeout ("Transaction Outcome
        # Checks"); a revert is final at once.
        receipt = await self.rpc.wait_receipt(HexBytes(tx_hash), self.network, poll=self._poll)
        if receipt.get("status") != 1:
            raise EscrowError(await self._replay(tx_hash, receipt), mined=True,
                              extra={"transaction": tx_hash.lower()})
        found = self._event(receipt, event, tx_hash.lower())
        if found.args.get("channelId") != channel_id.lower():
            raise PaymentRejected(f"the transaction has no {event} for this channel",
                                  code=ERR_VERIFICATION_FAILED)
        return found

    async def _replay(self, tx_hash: str, receipt: Mapping[str, Any]) -> str:
        """Best-effort revert reason of a mined transaction: its call re-run on the state
        before its block."""
        eth = self.rpc.web3(self.network).eth
        tx = await self.rpc.call(self.network, lambda: eth.get_transaction(HexBytes(tx_hash)))
        try:
            await self.rpc.call(self.network, lambda: eth.call(
                {"from": tx["from"], "to": tx["to"], "data": tx["input"],
                 "value": tx["value"]}, receipt["blockNumber"] - 1))
        except ContractLogicError as exc:
            return revert_reason(exc)
        except (ServiceUnavailable, UpstreamError):
            return ""
        return ""

    # ------------------------------------------------------------------ plumbing

    def _event(self, receipt: Mapping[str, Any], event: str | None, tx_hash: str
               ) -> EscrowOutcome:
        return decode_outcome(self.contract, receipt, event, tx_hash)

    async def _transact(self, fn: Any, key: str, event: str | None) -> EscrowOutcome:
        """Simulate ``fn`` from ``key``'s address, send it, wait for its receipt and return its
        ``event``; a repeated requestClose emits none and returns no event."""
        sender = to_checksum_address(self._address(key))
        try:
            gas = await self.rpc.quantity(self.network, lambda: fn.estimate_gas(
                {"from": sender}, block_identifier="pending"), "eth_estimateGas")
        except ContractLogicError as exc:
            raise EscrowError(revert_reason(exc), mined=False) from exc
        tx_hash = await self.rpc.send(fn, key=key, gas=gas, network=self.network)
        sent = tx_hash.to_0x_hex()
        try:
            receipt = await self.rpc.wait_receipt(tx_hash, self.network, poll=self._poll)
        except (ServiceUnavailable, UpstreamError) as exc:
            exc.extra.setdefault("transaction", sent)
            raise
        if receipt.get("status") != 1:
            raise EscrowError(await self._replay(sent, receipt), mined=True,
                              extra={"transaction": sent})
        if event == "CloseRequested" and not receipt.get("logs"):
            event = None  # already requested: nothing changed
        return self._event(receipt, event, sent)

    @staticmethod
    def _address(key: str) -> str:
        return str(Account.from_key(key).address)


__all__ = ["ESCROW_ABI", "ESCROW_ERRORS", "EscrowClient", "EscrowError", "EscrowOutcome",
           "revert_reason"]
