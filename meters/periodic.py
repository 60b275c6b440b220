"""A pass run every few seconds in the background of a gateway process (channel settlement,
Stripe holds, Stripe meter events): started and stopped with the process, and kept alive when a
pass fails on an outage (Redis, a chain, Stripe): the next pass retries."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable


class Periodic:
    """Runs ``run_pass`` every ``interval`` seconds until stopped. A pass raising one of
    ``outages`` is logged (its ``code``) and retried at the next interval; anything else is
    a bug and ends the loop loudly."""

    def __init__(self, name: str, interval: float, run_pass: Callable[[], Awaitable[object]],
                 *, outages: tuple[type[Exception], ...], log: logging.Logger) -> None:
        self.name = name
        self.interval = interval
        self.run_pass = run_pass
        self.outages = outages
        self.log = log
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=self.name)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _run(self) -> None:
        while True:
            try:
                await self.run_pass()
            except self.outages as exc:
                self.log.error("%s pass failed (%s); retried in %ss", self.name,
                               getattr(exc, "code", type(exc).__name__), self.interval)
            await asyncio.sleep(self.interval)
