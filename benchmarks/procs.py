"""Child processes of a benchmark run and what /proc says about them."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from dataclasses import dataclass

import httpx

_TICK = os.sysconf("SC_CLK_TCK")


@dataclass
class Process:
    popen: subprocess.Popen[bytes]

    @property
    def pid(self) -> int:
        return self.popen.pid

    def stop(self) -> None:
        """Stop this process (only ours, by PID): TERM, then KILL after 10 s."""
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(10)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(5)


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
