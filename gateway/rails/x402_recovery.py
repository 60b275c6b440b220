"""Finishing the deposits that requests left between their claim and their credit.

A deposit is claimed in Redis before it is settled (:mod:`meters.deposits`). A request can
leave it unfinished three ways: its process died, the chain did not confirm the settlement
within the receipt timeout (the request answered 503 naming the transaction, which may still
land), or a remote facilitator kept answering ``settlement_pending``. The payer has paid in
the last two cases as soon as the chain takes the transfer, so waiting for the next restart
to credit it is not enough: :class:`DepositRecovery` runs when the rail starts and then every
``recovery_interval_seconds``, in every process.

The chain is the judge. An authorization that was used was settled: credit it (the ledger's
credit is once per deposit key, so two processes recovering the same record credit it once).
One that was not is settled now if it is still valid, else dropped (nothing moved).

A claim still ``settling`` may belong to a request in flight in this or another process, and
settling it a second time would race that request (a second transaction, reverted, and a
payer told their payment failed while it was credited). So a ``settling`` claim is taken up
only once it is older than the longest a request's settlement can take
(:func:`settle_bound`), and by one process at a time (the first to take it, for that long);
a ``settled`` one (the chain took it, only the credit is missing) at any age, by any process.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping
from typing import Any

from gateway.errors import GatewayError, PaymentRejected
from gateway.rail_settings import X402Settings
from gateway.rails.evm import EvmNetwork, EvmSettler, SettlementNotSubmitted
from gateway.rails.facilitator import Settlement
from gateway.rails.x402 import PaymentRequirements, parse_payment_payload, to_authorization
from meters.deposits import SETTLED, DepositRecord, Deposits
from meters.errors import LedgerUnavailable
from meters.periodic import Periodic

log = logging.getLogger("tollstream.x402")

#: Added to the computed settlement bound: the Redis steps around it, a loaded machine.
BOUND_MARGIN_SECONDS = 60.0


def settle_bound(cfg: X402Settings) -> float:
    """Seconds past which no request can still be settling a deposit it claimed.

    Local mode: the re-verification, the broadcast and the receipt's polling are RPC calls,
    each bounded by the network's ``rpc_timeout_seconds`` (ten of them allowed), and the wait
    for the receipt by ``receipt_timeout_seconds``. Remote mode: each ``/settle`` call is
    bounded by ``facilitator_timeout_seconds``, sent up to ``settle_pending_retries`` more
    times, ``settle_pending_delay_seconds`` apart (and one ``/verify``)."""
    if cfg.mode == "remote":
        pending = cfg.facilitator
        core = (cfg.facilitator_timeout_seconds * (pending.settle_pending_retries + 2)
                + pending.settle_pending_delay_seconds * pending.settle_pending_retries)
    else:
        core = max((net.receipt_timeout_seconds + 10 * net.rpc_timeout_seconds
                    for net in cfg.networks.values()), default=0.0)
    return core + BOUND_MARGIN_SECONDS


class DepositRecovery:
    """Finishes unfinished deposits on the given networks (see the module docstring)."""

    def __init__(self, *, deposits: Deposits, settler: EvmSettler, settlement: Settlement,
                 networks: Mapping[str, EvmNetwork], min_age: float, interval: float) -> None:
        self.deposits = deposits
        self.settler = settler
        self.settlement = settlement
        self.networks = networks
        #: How old a ``settling`` claim must be before recovery settles it itself.
        self.min_age = min_age
        self.interval = interval
        self._loop: Periodic | None = None

    async def start(self) -> None:
        """Recover now and then every :attr:`interval` seconds, in the background (a slow
        chain RPC must not hold up serving requests)."""
        if self._loop is None:
            self._loop = Periodic("x402-recovery", self.interval, self._pass,
                                  outages=(LedgerUnavailable,), log=log)
            await self._loop.start()

    async def aclose(self) -> None:
        if self._loop is not None:
            await self._loop.stop()
            self._loop = None

    async def _pass(self) -> None:
        finished = await self.recover(min_age=self.min_age)
        if finished:
            log.warning("credited %d deposits that requests had left unfinished", finished)

    async def recover(self, *, min_age: float = 0.0) -> int:
        """Finish the unfinished deposits on this recovery's networks whose claim is older
        than ``min_age`` seconds (``settled`` ones whatever their age); returns how many were
        credited now."""
        credited = 0
        now = time.time()
        for record in await self.deposits.unfinished():
            network = self.networks.get(record.deposit.network)
            if network is None:
                continue  # another rail's engine serves that network
            if record.status != SETTLED:
                if now - record.created < min_age:
                    continue  # its request may still be settling it
                if not await self.deposits.take_for_recovery(record.deposit.key,
                                                             self.min_age):
                    continue  # another process is finishing it
            try:
                if await self._finish(record, network):
                    credited += 1
            except GatewayError as exc:
                # This one cannot be finished now (its transaction still unconfirmed, the
                # chain unreachable): the others still are; it is tried again next pass.
                log.warning("deposit %s not finished yet (%s)", record.deposit.key, exc.code)
        return credited

    async def _finish(self, record: DepositRecord, network: EvmNetwork) -> bool:
        deposit = record.deposit
        payload = parse_payment_payload(_json(deposit.payload))
        auth = to_authorization(payload)
        if record.status != SETTLED:
            if await self.settler.authorization_used(auth.from_, auth.nonce, network):
                # Used: settled by us (or relayed by anyone: the transfer went to pay_to
                # either way), unless the payer cancelled it, when nothing moved.
                if await self.settler.authorization_canceled(
                        auth.from_, auth.nonce, network, from_block=deposit.block):
                    log.warning("deposit %s: the payer cancelled the authorization; "
                                "nothing to credit", deposit.key)
                    await self.deposits.abandon(deposit.key)
                    return False
            else:
                requirements = PaymentRequirements.model_validate(_json(deposit.requirements))
                try:
                    result = await self.settlement.settle(payload, requirements)
                except (PaymentRejected, SettlementNotSubmitted):
                    # Nothing moved: release the claim (the payer may pay again).
                    await self.deposits.abandon(deposit.key)
                    return False
                await self.deposits.mark_settled(deposit.key, result.tx_hash)
        return await self.deposits.credit(record, label=f"x402 {deposit.payer}")


def _json(text: str) -> Any:
    return json.loads(text)
