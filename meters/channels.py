"""Payment channels (MPP sessions) in the ledger: "Server-Side Accounting" of
specs/mpp/draft-evm-session-00.md.

A channel is a ledger account (``mpp_<channelId>``) whose credited total is the channel's
``acceptedCumulative``: accepting a voucher credits what it adds, atomically with raising the
accepted amount (``voucher.lua``), so the existing lease / settle / sweep machinery meters
streams against ``acceptedCumulative - spent`` unchanged, across streams and processes, and
``spent`` is persisted before the tokens it pays for are delivered. Beside the account, a
channel hash keeps what the chain said (deposit, settled on-chain, close state) and a sorted
set keeps every accepted voucher by amount, so settlement can capture exactly what was spent.

Keys: ``{prefix}chan:{mpp_<id>}`` (payer, signer, token, deposit, accepted, settled,
close_requested, finalized) and ``{prefix}chan:{mpp_<id>}:vouchers``, in the slot of the
channel's account ``{prefix}acct:{mpp_<id>}`` (the account id is their hash tag), and
``{prefix}chans:open``, the set of open channels. That set spans channels (another slot on a
cluster), so it is kept outside the scripts: a channel is listed before it is recorded and
unlisted after it is finalized; readers skip (and unlist) a finalized one still listed. It
decides nothing about money (the scripts do, in the channel's slot).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any, cast

from meters.connection import as_text, redis_errors
from meters.errors import InvalidAmount
from meters.ledger import Account, Ledger, account_from
from meters.money import MAX_AMOUNT
from meters.scripts import LuaScript, script


class VoucherStatus(enum.IntEnum):
    ACCEPTED = 1
    REPLAY = 0          # not above what was accepted: an idempotent retry, nothing changes
    DELTA_TOO_SMALL = -1
    EXCEEDS_DEPOSIT = -2
    CLOSE_PENDING = -3
    UNKNOWN = -4
    FINALIZED = -5


@dataclass(frozen=True, slots=True)
class ChannelState:
    """What the ledger knows of a channel (amounts in atomic units)."""

    channel_id: str
    account_id: str
    payer: str
    signer: str
    token: str
    deposit: int
    accepted: int
    settled: int
    close_requested: bool
    finalized: bool


def _state_from(channel_id: str, raw: dict[Any, Any]) -> ChannelState | None:
    if not raw:
        return None
    data = {as_text(k): as_text(v) for k, v in raw.items()}
    return ChannelState(channel_id=channel_id.lower(), account_id=account_of(channel_id),
                        payer=data["payer"], signer=data["signer"], token=data["token"],
                        deposit=int(data["deposit"]), accepted=int(data["accepted"]),
                        settled=int(data["settled"]),
                        close_requested=data["close_requested"] != "0",
                        finalized=data["finalized"] == "1")


def account_of(channel_id: str) -> str:
    """The ledger account a channel's vouchers credit."""
    return f"mpp_{channel_id.lower()}"


class Channels:
    """Channel accounting next to the ledger, in the same Redis."""

    def __init__(self, ledger: Ledger) -> None:
        self.ledger = ledger
        self.redis = ledger.redis
        self.prefix = ledger.prefix
        self._open = LuaScript(ledger.redis, script("channel_open.lua"))
        self._voucher = LuaScript(ledger.redis, script("voucher.lua"))
        self._close = LuaScript(ledger.redis, script("channel_close.lua"))

    def _key(self, channel_id: str) -> str:
        return f"{self.prefix}chan:{{{account_of(channel_id)}}}"

    def _account(self, channel_id: str) -> str:
        return self.ledger.account_key(account_of(channel_id))

    async def open(self, channel_id: str, *, payer: str, signer: str, token: str,
                   deposit: int) -> bool:
        """Record a channel the chain shows open; True if recorded now (False: known)."""
        if not 0 < deposit <= MAX_AMOUNT:
            raise InvalidAmount(f"a channel deposit must be between 1 and {MAX_AMOUNT}",
                                param="deposit")
        channel_id = channel_id.lower()
        fields: list[Any] = ["payer", payer, "signer", signer, "token", token,
                             "deposit", deposit]
        with redis_errors():
            await self.redis.sadd(f"{self.prefix}chans:open", channel_id)
            created = await self._open(keys=[self._key(channel_id), self._account(channel_id)],
                                       args=[channel_id, *fields])
        return bool(created)

    async def get(self, channel_id: str) -> ChannelState | None:
        with redis_errors():
            raw = await self.redis.hgetall(self._key(channel_id))
        state = _state_from(channel_id, raw)
        if state is not None and state.finalized:
            with redis_errors():  # finalized, still listed (a crash after finish): unlist
                await self.redis.srem(f"{self.prefix}chans:open", state.channel_id)
        return state

    async def snapshot(self, channel_id: str) -> tuple[ChannelState, Account] | None:
        """The channel and its ledger account, read together (one round trip)."""
        with redis_errors():
            # Not a transaction (MULTI costs more than it buys here): each hash is read
            # whole, and a receipt needs no instant across the two.
            async with self.redis.pipeline(transaction=False) as pipe:
                pipe.hgetall(self._key(channel_id))
                pipe.hgetall(self._account(channel_id))
                raw, account = await pipe.execute()
        state = _state_from(channel_id, raw)
        return None if state is None else (state, account_from(state.account_id, account))

    async def accept(self, channel_id: str, cumulative: int, signature: str, *,
                     min_delta: int) -> tuple[VoucherStatus, int]:
        """Take a verified voucher (see ``voucher.lua``); (status, acceptedCumulative)."""
        channel_id = channel_id.lower()
        with redis_errors():
            status, accepted = await self._voucher(
                keys=[self._key(channel_id), f"{self._key(channel_id)}:vouchers",
                      self._account(channel_id)],
                args=[cumulative, signature, min_delta, self.ledger.credit_channel,
                      account_of(channel_id)])
        return VoucherStatus(int(status)), int(accepted)

    async def update(self, channel_id: str, **fields: int | str) -> None:
        """Record what the chain said (deposit after a top-up, settled, close state)."""
        with redis_errors():
            await self.redis.hset(self._key(channel_id), mapping=cast(Any, dict(fields)))

    async def raise_deposit(self, channel_id: str, deposit: int) -> None:
        """The deposit only ever grows (a top-up); a stale read never lowers it."""
        state = await self.get(channel_id)
        if state is not None and deposit > state.deposit:
            if deposit > MAX_AMOUNT:
                raise InvalidAmount(f"a channel deposit must be at most {MAX_AMOUNT}",
                                    param="deposit")
            await self.update(channel_id, deposit=deposit)

    async def best_voucher(self, channel_id: str, at_most: int) -> tuple[int, str] | None:
        """The highest accepted voucher whose amount is at most ``at_most``: what settlement
        may capture without taking more than was spent."""
        with redis_errors():
            found = await self.redis.zrevrangebyscore(
                f"{self._key(channel_id)}:vouchers", at_most, "-inf", start=0, num=1)
        if not found:
            return None
        amount, _, signature = as_text(cast(bytes, found[0])).partition(":")
        return int(amount), signature

    async def _close_step(self, mode: str, channel_id: str, settled: int = 0) -> int:
        channel_id = channel_id.lower()
        with redis_errors():
            result = int(await self._close(
                keys=[self._key(channel_id), self._account(channel_id)],
                args=[mode, channel_id, settled]))
            if mode == "finish" and result == 1:
                await self.redis.srem(f"{self.prefix}chans:open", channel_id)
        return result

    async def begin_close(self, channel_id: str) -> int | None:
        """Stop the channel being streamed on and take its unspent accepted amount out of the
        account; the amount, or None while a stream still holds money on it."""
        left = await self._close_step("begin", channel_id)
        return None if left < 0 else left

    async def abort_close(self, channel_id: str) -> None:
        """The close failed on-chain: the channel is usable again."""
        await self._close_step("abort", channel_id)

    async def covering_voucher(self, channel_id: str, at_least: int) -> tuple[int, str] | None:
        """The lowest accepted voucher whose amount is at least ``at_least``."""
        with redis_errors():
            found = await self.redis.zrangebyscore(
                f"{self._key(channel_id)}:vouchers", at_least, "+inf", start=0, num=1)
        if not found:
            return None
        amount, _, signature = as_text(cast(bytes, found[0])).partition(":")
        return int(amount), signature

    async def finalize(self, channel_id: str, *, settled: int) -> None:
        """The channel closed on-chain: nothing more is accepted or settled."""
        await self._close_step("finish", channel_id, settled)

    async def open_ids(self) -> list[str]:
        with redis_errors():
            members = await self.redis.smembers(f"{self.prefix}chans:open")
        return sorted(as_text(m) for m in members)
