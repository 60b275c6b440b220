"""On-chain deposits credited exactly once.

A deposit goes through three recorded states in Redis, under a key derived from what makes the
payment unique (network, asset, payer and the authorization nonce):

``settling``  written atomically, all fields at once, *before* the settlement is sent: whoever
              writes it first owns the deposit; concurrent requests with the same
              authorization wait for it.
``settled``   the chain accepted the transfer (transaction hash recorded).
``credited``  the amount was added to the payer's account (the ledger's credit is itself
              idempotent on the same key, so a repeated credit is a no-op).
A claim whose settlement the chain refused is abandoned (deleted): nothing moved, and the payer
may retry the same authorization.

A process that dies between ``settling`` and ``credited`` leaves the record behind; on
start-up :meth:`Deposits.unfinished` lists such records and the payment rail asks the chain
whether the authorization was used, then finishes (credits) or fails it. The record holds
everything needed for that, never a secret: an EIP-3009 authorization is already spent or
useless once its record is finished.

Keys: ``{prefix}deposit:<key>`` (the record, one key: ``claim.lua`` touches nothing else) and
``{prefix}deposits:open``, the deposits that may be unfinished (a sorted set, scored by when
each was listed). On a cluster the two live in different slots, so the index is kept outside
the script: a deposit is listed *before* it is claimed (a crash after the claim always leaves
it listed, so recovery finds it) and unlisted once credited. An abandoned claim's record is
deleted and its listing left to :meth:`Deposits.unfinished`, which unlists it an hour later
(unlisting it at once could race a retry listed just before and claimed just after). No money
moves in any of these steps: the credit itself is once per deposit key (``credit.lua``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, cast

from meters.connection import as_text, redis_errors
from meters.ledger import Ledger
from meters.scripts import LuaScript, script

SETTLING, SETTLED, CREDITED = "settling", "settled", "credited"
#: A record's ``error`` when its request ended not knowing whether the chain took it.
UNCONFIRMED = "unconfirmed"
#: How long a finished record is kept (replays are refused by the chain long after that).
RECORD_TTL_SECONDS = 30 * 86400
#: A listed deposit without a record is unlisted once its listing is this old (see above).
STALE_LISTING_SECONDS = 3600


@dataclass(frozen=True, slots=True)
class Deposit:
    """One payment: ``key`` is its idempotency key, ``amount`` atomic units."""

    key: str
    account_id: str
    amount: int
    payer: str
    network: str
    asset: str
    payload: str  # the payment payload as JSON, for recovery
    requirements: str  # the requirements it paid, as JSON
    #: The chain's head block when the deposit was claimed (0: unknown): recovery looks for
    #: what happened to the authorization from there on.
    block: int = 0


@dataclass(frozen=True, slots=True)
class DepositRecord:
    deposit: Deposit
    status: str
    transaction: str
    error: str
    created: float


class Deposits:
    """Deposit records next to the ledger, in the same Redis."""

    def __init__(self, ledger: Ledger) -> None:
        self.ledger = ledger
        self.redis = ledger.redis
        self.prefix = ledger.prefix
        self._open = f"{self.prefix}deposits:open"
        self._claim = LuaScript(ledger.redis, script("claim.lua"))

    def _key(self, key: str) -> str:
        return f"{self.prefix}deposit:{key}"

    async def begin(self, deposit: Deposit) -> tuple[bool, DepositRecord]:
        """Claim the deposit. Returns (claimed, record): claimed is False when another request
        already owns this authorization (its record is returned)."""
        fields: dict[str, Any] = {
            "account_id": deposit.account_id, "amount": deposit.amount,
            "payer": deposit.payer, "network": deposit.network, "asset": deposit.asset,
            "payload": deposit.payload, "requirements": deposit.requirements,
            "block": deposit.block,
            "status": SETTLING, "transaction": "", "error": "", "created": time.time()}
        args: list[Any] = []
        for name, value in fields.items():
            args += [name, value]
        with redis_errors():
            await self.redis.zadd(self._open, {deposit.key: time.time()})
            claimed = await self._claim(keys=[self._key(deposit.key)], args=args)
        record = await self.get(deposit.key)
        assert record is not None
        return bool(claimed), record

    async def get(self, key: str) -> DepositRecord | None:
        with redis_errors():
            raw = await self.redis.hgetall(self._key(key))
        if not raw or b"account_id" not in raw:
            return None
        data = {as_text(k): as_text(v) for k, v in raw.items()}
        deposit = Deposit(key=key, account_id=data["account_id"], amount=int(data["amount"]),
                          payer=data["payer"], network=data["network"], asset=data["asset"],
                          payload=data["payload"], requirements=data["requirements"],
                          block=int(data.get("block") or 0))
        return DepositRecord(deposit, data["status"], data.get("transaction", ""),
                             data.get("error", ""), float(data.get("created", 0)))

    async def mark_settled(self, key: str, transaction: str) -> None:
        await self._update(key, status=SETTLED, transaction=transaction)

    async def mark_unconfirmed(self, key: str, transaction: str) -> None:
        """The request that claimed it ended without knowing whether the chain took it
        (``transaction``, when one was sent, may still land): recovery finishes it."""
        await self._update(key, error=UNCONFIRMED, transaction=transaction)

    async def take_for_recovery(self, key: str, seconds: float) -> bool:
        """Whether this caller may finish deposit ``key`` now: the first to ask within
        ``seconds`` may. Recovery runs in every process; without this each would settle the
        same old claim, all but one of the transactions reverting (gas spent for nothing)."""
        with redis_errors():
            return bool(await self.redis.set(f"{self.prefix}deposit-recovery:{key}", "1",
                                             nx=True, px=max(1, int(seconds * 1000))))

    async def abandon(self, key: str) -> None:
        """Forget a claim whose settlement was refused (nothing moved on-chain), so the payer
        may retry the same authorization once the problem is fixed (e.g. wallet funded)."""
        with redis_errors():
            await self.redis.delete(self._key(key))

    async def credit(self, record: DepositRecord, *, label: str = "") -> bool:
        """Credit a settled deposit to its account; True if credited now (False: already)."""
        deposit = record.deposit
        await self.ledger.ensure_account(deposit.account_id, label=label)
        credited, _ = await self.ledger.credit(deposit.account_id, deposit.amount,
                                               idempotency_key=deposit.key,
                                               purpose="deposit")
        await self._update(deposit.key, status=CREDITED)
        await self._close(deposit.key)
        return credited

    async def unfinished(self) -> list[DepositRecord]:
        """Deposits a process started but did not finish (settling or settled)."""
        with redis_errors():
            listed = cast(list[tuple[bytes, float]], await self.redis.zrange(
                self._open, 0, -1, withscores=True))
        records = []
        for raw_key, listed_at in sorted(listed):
            key = as_text(raw_key)
            record = await self.get(key)
            if record is not None and record.status in (SETTLING, SETTLED):
                records.append(record)
            elif ((record is not None and record.status == CREDITED)
                  or (record is None and listed_at < time.time() - STALE_LISTING_SECONDS)):
                # Finished but still listed (a crash between the steps), or abandoned long
                # ago: unlist. A fresh listing without a record stays: its claim may be on
                # its way (begin() lists before it claims, refreshing the score).
                with redis_errors():
                    await self.redis.zrem(self._open, key)
        return records

    async def _update(self, key: str, **fields: str) -> None:
        with redis_errors():
            await self.redis.hset(self._key(key), mapping=cast(Any, fields))

    async def _close(self, key: str) -> None:
        with redis_errors():
            await self.redis.expire(self._key(key), RECORD_TTL_SECONDS)
            await self.redis.zrem(self._open, key)
