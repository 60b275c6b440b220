"""EIP-3009 settlement on EVM chains: check the token's state, submit, read the receipt.

The on-chain half of x402's ``exact`` scheme on EVM (specs/x402/schemes/exact/
scheme_exact_evm.md, sections 1.2-1.3). The signed message, its EIP-712 domain and signature
recovery live in :mod:`gateway.rails.eip3009` (re-exported here, so ``gateway.rails.evm``
stays the one import for callers); our relayer key submits and pays gas.

Failures raise the gateway's errors, never a web3/aiohttp/eth_* exception:

* :class:`~gateway.errors.PaymentRejected` with ``code`` = the x402 error code (see ``ERR_*``),
* :class:`SettlementNotSubmitted` (a ServiceUnavailable: a
  :class:`~gateway.rails.evm_rpc.TransactionNotSent`) when settlement failed before our
  transaction was broadcast (the simulation could not run, the node refused the transaction,
  no relayer key): the authorization is untouched and may be settled again later,
* :class:`~gateway.errors.ServiceUnavailable` / :class:`~gateway.errors.UpstreamError` when
  the node cannot be reached, times out or rate-limits us / answers an error or garbage. After
  the broadcast they carry the hash in ``extra["transaction"]``: the transfer may still land,
  so reconcile (``transaction_status`` / ``authorization_used``) before crediting or retrying.

Money is ``int`` atomic units throughout.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from eth_utils import to_checksum_address
from hexbytes import HexBytes
from web3.exceptions import ContractLogicError

from gateway.errors import PaymentRejected, ServiceUnavailable, UpstreamError
from gateway.rails.eip3009 import (
    AUTHORIZATION_CANCELED_TOPIC,
    EIP3009_ABI,
    ERR_INSUFFICIENT_BALANCE,
    ERR_NONCE_USED,
    ERR_RECIPIENT_MISMATCH,
    ERR_SIGNATURE,
    ERR_SIMULATION_FAILED,
    ERR_TRANSACTION_STATE,
    ERR_TRANSFER_EVENT_MISMATCH,
    ERR_VALID_AFTER,
    ERR_VALID_BEFORE,
    ERR_VALUE_MISMATCH,
    Eip3009Authorization,
    EvmNetwork,
    has_transfer_log,
    recover_signer,
    revert_code,
    sign_authorization,
    typed_data,
)
from gateway.rails.evm_rpc import ChainRpc, TransactionNotSent, TransactionStatus

T = TypeVar("T")


class SettlementNotSubmitted(TransactionNotSent):
    """Settlement failed before the transaction was broadcast: the authorization is unused,
    and a claim on it can be released."""

    code = "settlement_not_submitted"


@dataclass(frozen=True)
class SettlementResult:
    """A settled authorization: the on-chain transfer of exactly ``amount`` from ``payer``.

    ``block_number`` is None when a remote facilitator settled (it does not report blocks).
    """

    tx_hash: str
    payer: str
    amount: int
    block_number: int | None
    network: str = ""


class EvmSettler:
    """Verifies and settles EIP-3009 authorizations; one instance per process.

    Holds one ``AsyncWeb3`` per RPC URL and one lock per (RPC, relayer) (in :class:`ChainRpc`)
    so concurrent settlements never allocate the same Ethereum transaction nonce.
    """

    def __init__(self, *, valid_before_margin: int = 6,
                 clock: Callable[[], float] = time.time,
                 poll_interval: float = 0.05) -> None:
        # Margin: an authorization that expires within the time settlement takes would revert
        # on-chain after we served the request (the SDK's facilitator uses 6 s too).
        self.valid_before_margin = valid_before_margin
        self._clock = clock
        self._poll = poll_interval
        self.rpc = ChainRpc()

    # ------------------------------------------------------------------ plumbing

    def _token(self, network: EvmNetwork) -> Any:
        return self.rpc.token(network)

    async def _rpc(self, network: EvmNetwork, call: Callable[[], Awaitable[T]]) -> T:
        return await self.rpc.call(network, call)

    async def aclose(self) -> None:
        """Close HTTP sessions held by the providers."""
        await self.rpc.aclose()

    # ------------------------------------------------------------------ reads

    async def balance_of(self, address: str, network: EvmNetwork) -> int:
        """Token balance of ``address`` in atomic units."""
        fn = self._token(network).functions.balanceOf(to_checksum_address(address))
        return await self.rpc.quantity(network, fn.call, "balanceOf")

    async def head_block(self, network: EvmNetwork) -> int:
        """The chain's latest block number."""
        eth = self.rpc.web3(network).eth
        return await self.rpc.quantity(network, lambda: eth.block_number, "eth_blockNumber")

    async def authorization_used(self, from_: str, nonce: str, network: EvmNetwork) -> bool:
        """Whether ``(from_, nonce)`` was already used *or canceled* on-chain (the token's
        ``authorizationState`` does not tell them apart: see :meth:`authorization_canceled`).
        """
        fn = self._token(network).functions.authorizationState(to_checksum_address(from_),
                                                                HexBytes(nonce))
        return bool(await self._rpc(network, fn.call))

    async def authorization_canceled(self, from_: str, nonce: str, network: EvmNetwork, *,
                                     from_block: int) -> bool:
        """Whether the payer canceled ``(from_, nonce)`` (EIP-3009 ``cancelAuthorization``:
        an ``AuthorizationCanceled`` log) in a block >= ``from_block``. Then nothing moved,
        though :meth:`authorization_used` is true. Providers bound eth_getLogs ranges: pass
        a block from before the authorization was claimed, not 0, on a long chain."""
        eth = self.rpc.web3(network).eth
        logs = await self._rpc(network, lambda: eth.get_logs({
            "address": to_checksum_address(network.asset), "fromBlock": from_block,
            "toBlock": "latest", "topics": [
                AUTHORIZATION_CANCELED_TOPIC, "0x" + "00" * 12 + from_.lower()[2:],
                nonce.lower()]}))
        return len(logs) > 0

    async def transaction_status(self, tx_hash: str, network: EvmNetwork) -> TransactionStatus:
        """Receipt state of ``tx_hash``: unknown, pending, success or reverted."""
        return await self.rpc.transaction_status(tx_hash, network)

    # ------------------------------------------------------------------ verify

    async def verify(self, auth: Eip3009Authorization, *, pay_to: str, amount: int,
                     network: EvmNetwork) -> None:
        """Check ``auth`` pays exactly ``amount`` to ``pay_to`` and would settle now.

        Order: recipient, value, validAfter, validBefore (+margin), signature, nonce unused,
        balance. Raises :class:`PaymentRejected` with the x402 code of the first failure.
        """
        if to_checksum_address(auth.to) != to_checksum_address(pay_to):
            raise PaymentRejected("authorization.to is not the payTo address",
                                  code=ERR_RECIPIENT_MISMATCH)
        if auth.value != amount:
            raise PaymentRejected(f"authorization.value {auth.value} != required {amount}",
                                  code=ERR_VALUE_MISMATCH)
        now = int(self._clock())
        # The token requires block.timestamp > validAfter (strictly), and our transaction's
        # block is at the earliest this second.
        if auth.valid_after >= now:
            raise PaymentRejected("authorization is not yet valid", code=ERR_VALID_AFTER)
        if auth.valid_before <= now + self.valid_before_margin:
            raise PaymentRejected("authorization is expired or expires too soon",
                                  code=ERR_VALID_BEFORE)
        if recover_signer(auth, network) != auth.payer:
            raise PaymentRejected("signature does not recover authorization.from",
                                  code=ERR_SIGNATURE)
        if await self.authorization_used(auth.from_, auth.nonce, network):
            raise PaymentRejected("authorization nonce already used", code=ERR_NONCE_USED)
        if await self.balance_of(auth.from_, network) < auth.value:
            raise PaymentRejected("payer balance is below the authorized value",
                                  code=ERR_INSUFFICIENT_BALANCE)

    # ------------------------------------------------------------------ settle

    def _call(self, auth: Eip3009Authorization, network: EvmNetwork) -> Any:
        v, r, s = auth.vrs()
        return self._token(network).functions.transferWithAuthorization(
            to_checksum_address(auth.from_), to_checksum_address(auth.to), auth.value,
            auth.valid_after, auth.valid_before, HexBytes(auth.nonce), v, r, s)

    async def settle(self, auth: Eip3009Authorization, network: EvmNetwork) -> SettlementResult:
        """Submit ``transferWithAuthorization`` from the relayer and wait for the receipt.

        Simulates first (eth_estimateGas) so a doomed authorization costs no gas; a revert
        maps to the x402 code of its revert string. Waits for ``network.confirmations``
        blocks, then requires status 1 and a ``Transfer(from, to, value)`` log from the token.
        """
        sent, receipt = await submit(self.rpc, self._call(auth, network), network,
                                     code_of=revert_code, refused=ERR_TRANSACTION_STATE,
                                     poll=self._poll)
        try:
            if receipt.get("status") != 1:
                raise PaymentRejected(f"settlement transaction {sent} reverted",
                                      code=await self._explain_revert(auth, network),
                                      extra={"transaction": sent})
        except (ServiceUnavailable, UpstreamError) as exc:
            # Sent: whatever failed after, the caller must reconcile this hash.
            exc.extra.setdefault("transaction", sent)
            raise
        if not has_transfer_log(receipt, auth, network):
            raise PaymentRejected("settlement receipt lacks the Transfer event",
                                  code=ERR_TRANSFER_EVENT_MISMATCH, extra={"transaction": sent})
        return SettlementResult(tx_hash=sent, payer=auth.payer, amount=auth.value,
                                block_number=receipt["blockNumber"],
                                network=network.network)

    async def _explain_revert(self, auth: Eip3009Authorization, network: EvmNetwork) -> str:
        """Best-effort code for a mined revert (e.g. a concurrent settle of the same nonce)."""
        if await self.authorization_used(auth.from_, auth.nonce, network):
            return ERR_NONCE_USED
        if await self.balance_of(auth.from_, network) < auth.value:
            return ERR_INSUFFICIENT_BALANCE
        if auth.valid_before <= int(self._clock()):
            return ERR_VALID_BEFORE
        return ERR_TRANSACTION_STATE



async def submit(rpc: ChainRpc, fn: Any, network: EvmNetwork, *,
                 code_of: Callable[[str, str], str], refused: str,
                 poll: float) -> tuple[str, Mapping[str, Any]]:
    """Simulate the settlement call ``fn`` from the network's relayer, send it, and wait for
    its receipt: ``(transaction hash, receipt)``, whatever the receipt's status (the caller
    checks it and the transfer it expects). Shared by every scheme our relayer settles.

    Raises :class:`PaymentRejected` when the simulation reverts (code ``code_of(revert
    string, default)``) or a node that executes transactions first refuses it (``code_of(its
    refusal, refused)``): nothing moved; :class:`SettlementNotSubmitted` when nothing was
    broadcast for another reason (no relayer key, the simulation or the node failed); and
    ServiceUnavailable/UpstreamError carrying ``extra["transaction"]`` when it was broadcast
    and its outcome is unknown.
    """
    try:
        relayer = to_checksum_address(network.relayer_address)
    except ValueError as exc:
        raise SettlementNotSubmitted(str(exc)) from exc
    try:
        # Simulate in the "pending" block, the one our transaction will be mined in: its
        # timestamp is the node's clock (max(now, head + 1) on geth/reth/anvil), where
        # "latest" is the last mined block, whose timestamp lags when the chain is idle or
        # blocks are slow: a fresh authorization (validAfter a moment ago) would falsely
        # revert "not yet valid" there. Nodes that treat "pending" as "latest" (erigon)
        # are no worse off. The pending state also includes mempool transactions that
        # spend the payer's balance or this nonce, which is what our transaction will see.
        gas = await rpc.quantity(network, lambda: fn.estimate_gas(
            {"from": relayer}, block_identifier="pending"), "eth_estimateGas")
    except ContractLogicError as exc:
        message = str(exc.message or exc)
        raise PaymentRejected(f"settlement simulation reverted: {message}",
                              code=code_of(message, ERR_SIMULATION_FAILED)) from exc
    except (ServiceUnavailable, UpstreamError) as exc:  # e.g. the relayer has no gas money
        raise SettlementNotSubmitted(f"settlement simulation failed: {exc.message}") from exc
    try:
        tx_hash = await rpc.send(fn, key=network.relayer_secret(), gas=gas, network=network)
    except TransactionNotSent as exc:
        # Nodes that execute a transaction first (some sequencers) refuse a reverting one:
        # the payer's fault then.
        if "execution reverted" in exc.refusal:
            raise PaymentRejected(f"settlement refused: {exc.refusal}",
                                  code=code_of(exc.refusal, refused)) from exc
        raise SettlementNotSubmitted(f"settlement not sent: {exc.message}",
                                     refusal=exc.refusal) from exc
    sent = tx_hash.to_0x_hex()
    try:
        receipt = await rpc.wait_receipt(tx_hash, network, poll=poll)
    except (ServiceUnavailable, UpstreamError) as exc:
        # Sent: whatever failed after, the caller must reconcile this hash.
        exc.extra.setdefault("transaction", sent)
        raise
    return sent, receipt


__all__ = [
    "EIP3009_ABI",
    "ERR_INSUFFICIENT_BALANCE",
    "ERR_NONCE_USED",
    "ERR_RECIPIENT_MISMATCH",
    "ERR_SIGNATURE",
    "ERR_SIMULATION_FAILED",
    "ERR_TRANSACTION_STATE",
    "ERR_TRANSFER_EVENT_MISMATCH",
    "ERR_VALID_AFTER",
    "ERR_VALID_BEFORE",
    "ERR_VALUE_MISMATCH",
    "Eip3009Authorization",
    "EvmNetwork",
    "EvmSettler",
    "SettlementNotSubmitted",
    "SettlementResult",
    "TransactionStatus",
    "recover_signer",
    "revert_code",
    "sign_authorization",
    "submit",
    "typed_data",
]
