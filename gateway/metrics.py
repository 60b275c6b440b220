"""Prometheus metrics of one gateway process (``GET /metrics``).

Counters are updated once per request, never per token, to keep the hot path free of them.
"""

from __future__ import annotations

import bisect
import gc
import time
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client.core import HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from meters.meter import Bill, Outcome


class Metrics:
    """The process' metrics, in their own registry (tests run several gateways per process)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.tokens = Counter("tollstream_tokens_metered", "Tokens billed",
                              ["model", "kind"], registry=self.registry)
        self.revenue = Counter("tollstream_revenue_atomic_units",
                               "Atomic units charged", ["model"], registry=self.registry)
        self.requests = Counter("tollstream_requests", "Metered requests by outcome",
                                ["model", "outcome"], registry=self.registry)
        self.cutoffs = Counter("tollstream_cutoffs", "Streams cut when the allowance ran out",
                               ["model"], registry=self.registry)
        self.upstream_errors = Counter("tollstream_upstream_errors",
                                       "Upstream failures", ["model"], registry=self.registry)
        self.shortfall = Counter("tollstream_shortfall_atomic_units",
                                 "Reported usage the balance could not cover", ["model"],
                                 registry=self.registry)
        self.websocket_refused = Counter(
            "tollstream_websocket_refused", "WebSocket upgrades answered 426 (clients fall "
            "back to HTTP streaming)", registry=self.registry)
        self.active_streams = Gauge("tollstream_active_streams", "Streams in flight",
                                    registry=self.registry)
        self.lane_reads = Counter(
            "tollstream_fast_lane_reads", "Upstream reads whose events went to the client "
            "straight from the read callback (gateway/feed.py)", registry=self.registry)
        self.pauses = Counter("tollstream_stream_pauses", "Streams paused for a payment (a "
                              "voucher or a top-up)", registry=self.registry)
        self.resumes = Counter("tollstream_stream_resumes", "Paused streams resumed once "
                               "paid", registry=self.registry)
        self.pause_timeouts = Counter("tollstream_stream_pause_timeouts", "Paused streams "
                                      "ended because no payment came in time",
                                      registry=self.registry)
        self.activity = Activity()
        self.registry.register(_Source(gc_pauses().collect))

    def event(self, kind: str, model: str) -> None:
        """A pause, resume or pause timeout, for the status page and the counters."""
        {"pause": self.pauses, "resume": self.resumes,
         "pause_timeout": self.pause_timeouts}[kind].inc()
        self.activity.note(kind, model)

    def add(self, collect: Callable[[], Iterable[Metric]]) -> None:
        """Metrics a rail keeps itself (vouchers, unsettled amounts), read at each scrape."""
        self.registry.register(_Source(collect))

    def record(self, model: str, bill: Bill) -> None:
        self.activity.add(model, bill)
        self.tokens.labels(model, "input").inc(bill.input_tokens)
        self.tokens.labels(model, "output").inc(bill.output_tokens)
        self.revenue.labels(model).inc(bill.charged)
        self.requests.labels(model, bill.outcome.value).inc()
        if bill.outcome is Outcome.CUT:
            self.cutoffs.labels(model).inc()
        elif bill.outcome is Outcome.UPSTREAM_ERROR:
            self.upstream_errors.labels(model).inc()
        if bill.shortfall:
            self.shortfall.labels(model).inc(bill.shortfall)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class GcPauses:
    """How long the cyclic garbage collector held this process, by generation.

    A collection stops every stream of the process (it runs in the loop's thread): a full one
    that walks a large heap is a latency spike no per-request figure shows. Process-wide, as
    the collector is: one callback per process (:func:`gc_pauses`), read by every gateway's
    registry. The callback costs two clock reads per collection, never per token."""

    BUCKETS = (0.0005, 0.002, 0.01, 0.05, 0.1, 0.5)

    def __init__(self) -> None:
        #: Per generation: collections per bucket (the last: above every bound), seconds.
        self.counts = [[0] * (len(self.BUCKETS) + 1) for _ in range(3)]
        self.seconds = [0.0, 0.0, 0.0]
        self._started = 0.0

    def __call__(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
            return
        elapsed = time.perf_counter() - self._started
        generation = info["generation"]
        self.seconds[generation] += elapsed
        self.counts[generation][bisect.bisect_left(self.BUCKETS, elapsed)] += 1

    def collect(self) -> Iterable[Metric]:
        family = HistogramMetricFamily("tollstream_gc_pause_seconds", "Garbage collections "
                                       "of this process by generation, by how long they held "
                                       "it", labels=["generation"])
        for generation in range(3):
            cumulative, buckets = 0, []
            for bound, count in zip((*map(str, self.BUCKETS), "+Inf"),
                                    self.counts[generation], strict=True):
                cumulative += count
                buckets.append((bound, cumulative))
            family.add_metric([str(generation)], buckets, self.seconds[generation])
        yield family


_GC_PAUSES: GcPauses | None = None


def gc_pauses() -> GcPauses:
    """This process's :class:`GcPauses`, its callback installed on first use."""
    global _GC_PAUSES
    if _GC_PAUSES is None:
        _GC_PAUSES = GcPauses()
        gc.callbacks.append(_GC_PAUSES)
    return _GC_PAUSES


class _Source(Collector):
    def __init__(self, collect: Callable[[], Iterable[Metric]]) -> None:
        self._collect = collect

    def collect(self) -> Iterable[Metric]:
        return self._collect()


class Activity:
    """The last minutes, for people (the status page): tokens and revenue per model and
    minute, and the latest cuts, pauses and failures. In memory, per process."""

    MINUTES = 15

    def __init__(self) -> None:
        #: (minute, {model: [tokens, atomic units charged]}), oldest first.
        self.minutes: deque[tuple[int, dict[str, list[int]]]] = deque(maxlen=self.MINUTES)
        #: {"at", "kind", "model"}, newest last.
        self.recent: deque[dict[str, Any]] = deque(maxlen=25)

    def add(self, model: str, bill: Bill) -> None:
        minute = int(time.time() // 60)
        if not self.minutes or self.minutes[-1][0] != minute:
            self.minutes.append((minute, {}))
        totals = self.minutes[-1][1].setdefault(model, [0, 0])
        totals[0] += bill.input_tokens + bill.output_tokens
        totals[1] += bill.charged
        if bill.outcome in (Outcome.CUT, Outcome.UPSTREAM_ERROR, Outcome.LEDGER_ERROR):
            self.note(bill.outcome.value, model)

    def note(self, kind: str, model: str) -> None:
        self.recent.append({"at": time.time(), "kind": kind, "model": model})

    def series(self, now: float | None = None) -> list[tuple[int, dict[str, list[int]]]]:
        """One entry per minute of the last :attr:`MINUTES`, empty minutes included."""
        current = int((time.time() if now is None else now) // 60)
        known = dict(self.minutes)
        return [(m, known.get(m, {})) for m in range(current - self.MINUTES + 1, current + 1)]

