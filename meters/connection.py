"""redis-py's asyncio connection with one fix: a cancelled caller stays cancelled.

On Python 3.11, ``asyncio.wait_for`` returns the inner result instead of raising when its
caller is cancelled in the loop iteration in which the inner task finishes (CPython gh-86296;
3.12 rebuilt ``wait_for`` on ``asyncio.timeout`` and fixed it). redis-py 8.1 bounds every
socket write with ``wait_for`` when ``socket_timeout`` is set, and a write to Redis finishes in
one iteration, so a cancellation that landed on a command's send was lost more often than not
(measured: 120-200 of 200 cancellations of a task looping on ``GET``). The task then carried on
as if nothing had happened: a background pass never stopped (a gateway's shutdown hung), a
stream cancelled because its client left ran on to its next send, an ``asyncio.timeout``
around a ledger call did not fire.

:class:`CancelSafeConnection` bounds the write with ``asyncio.timeout`` (which propagates the
cancellation on 3.11) and otherwise does what redis-py's ``send_packed_command`` does: connect
if needed, the health check, and a connection closed after any failed or interrupted write
(half a command on the wire cannot be resumed).
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Iterable
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

#: Where ``asyncio.wait_for`` is sound, redis-py's own write path is used unchanged.
WAIT_FOR_LOSES_CANCELLATION = sys.version_info < (3, 12)


class CancelSafeConnection(aioredis.Connection):
    """A TCP connection to Redis whose writes never swallow a cancellation."""

    async def send_packed_command(self, command: str | bytes | Iterable[bytes],
                                  check_health: bool = True) -> None:
        if not WAIT_FOR_LOSES_CANCELLATION or not self.socket_timeout:
            await super().send_packed_command(command, check_health)
            return
        if not self.is_connected:
            await self.connect_check_health(check_health=False)
        if check_health:
            await self.check_health()
        if isinstance(command, str):
            command = command.encode()
        chunks = [command] if isinstance(command, bytes) else command
        writer: Any = self._writer
        try:
            async with asyncio.timeout(self.socket_timeout):
                writer.writelines(chunks)
                await writer.drain()
        except TimeoutError:
            await self.disconnect(nowait=True)
            raise RedisTimeoutError("Timeout writing to socket") from None
        except OSError as exc:
            await self.disconnect(nowait=True)
            raise RedisConnectionError(f"Error while writing to socket: {exc}") from exc
        except BaseException:
            # Cancelled mid-write: part of the command may be on the wire, so the
            # connection cannot carry another one.
            await self.disconnect(nowait=True)
            raise
