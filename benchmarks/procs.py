"""Child processes of a benchmark run and what /proc says about them."""

from __future__ import annotations

import contextlib
import os
import resource
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

_TICK = os.sysconf("SC_CLK_TCK")


@dataclass
class Process:
    popen: subprocess.Popen[bytes]

    @property
    def pid(self) -> int:
        return self.popen.pid

    def stop(self) -> None:
        """Stop this process (only ours, by PID): TERM, then KILL after 10 s; then KILL, by
        PID, any of its descendants (a server's workers) still running after it."""
        if self.popen.poll() is None:
            descendants = [(pid, _started(pid)) for pid in tree_pids(self.pid)[1:]]
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(10)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(5)
            for pid, started in descendants:
                if started is not None and _started(pid) == started:  # the same process
                    with contextlib.suppress(ProcessLookupError, PermissionError):
                        os.kill(pid, signal.SIGKILL)


def _started(pid: int) -> int | None:
    """A process's start time (clock ticks after boot): with its PID, who it is."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return int(stat.read().rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def start_process(argv: list[str]) -> Process:
    return Process(subprocess.Popen(argv, stdout=subprocess.DEVNULL,
                                    stderr=subprocess.DEVNULL))


def wait_http(url: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if httpx.get(url, timeout=1).status_code < 500:
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"{url} did not answer within {timeout} s")
        time.sleep(0.1)


def cpu_seconds(pid: int) -> float:
    """CPU time of a process so far, all its threads, to the nanosecond.

    Linux's per-process CPU clock (the clock id ``clock_getcpuclockid(pid)`` returns, built
    here as the kernel encodes it: ``(~pid << 3) | CPUCLOCK_SCHED``) counts every nanosecond
    the process ran. /proc's utime + stime count in 10 ms ticks, too coarse for a short run
    (a handful of requests read as 0 ms); they remain the fallback where the clock is refused.
    """
    try:
        return time.clock_gettime((~pid << 3) | 2)
    except OSError:
        with open(f"/proc/{pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / _TICK  # utime, stime


def peak_rss_mb(pid: int) -> float:
    """Peak resident memory of a process (VmHWM), in MiB."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return 0.0


def start_logged(argv: list[str], log: Path, env: dict[str, str] | None = None) -> Process:
    """Start a child with its stdout and stderr in ``log`` (read when it fails to start)."""
    with log.open("ab") as sink:
        return Process(subprocess.Popen(argv, stdout=sink, stderr=subprocess.STDOUT,
                                        env=env, start_new_session=True))


def _children() -> dict[int, list[int]]:
    """Every process's children, from /proc/<pid>/stat (one pass)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as stat:
                ppid = int(stat.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    return children


def tree_pids(root: int) -> list[int]:
    """``root`` and its descendants (a server's workers, their helpers)."""
    children, pids, todo = _children(), [], [root]
    while todo:
        pid = todo.pop()
        pids.append(pid)
        todo.extend(children.get(pid, ()))
    return pids


def tree_cpu(root: int) -> dict[int, float]:
    """CPU seconds so far of each process of the tree (a process gone meanwhile is left out)."""
    seconds: dict[int, float] = {}
    for pid in tree_pids(root):
        with contextlib.suppress(OSError, IndexError, ValueError):
            seconds[pid] = cpu_seconds(pid)
    return seconds


def cpu_since(root: int, before: dict[int, float]) -> float:
    """CPU the tree used since ``before`` (:func:`tree_cpu`); a process started meanwhile
    counts from its start."""
    return sum(now - before.get(pid, 0.0) for pid, now in tree_cpu(root).items())


def tree_rss_mb(root: int) -> float:
    """Resident memory of the whole tree now (VmRSS summed), in MiB."""
    total = 0
    for pid in tree_pids(root):
        with contextlib.suppress(OSError), open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
                    break
    return total / 1024


def raise_open_files() -> tuple[int, int]:
    """Raise this process's soft limit on open files to the hard one (its children inherit
    it); return (soft, hard) in force. Each stream holds a socket in the load client."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
    return soft, hard


def tree_peak_rss_mb(root: int) -> float:
    """Peak resident memory (VmHWM) summed over the tree's processes, in MiB: the server's
    own peak with one process, an upper bound of the whole with workers."""
    total = 0.0
    for pid in tree_pids(root):
        with contextlib.suppress(OSError):
            total += peak_rss_mb(pid)
    return total
