"""Prometheus metrics of one gateway process (``GET /metrics``).

Counters are updated once per request, never per token, to keep the hot path free of them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client.core import Metric
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
        self.pauses = Counter("tollstream_stream_pauses", "Streams paused for a payment (a "
                              "voucher or a top-up)", registry=self.registry)
        self.resumes = Counter("tollstream_stream_resumes", "Paused streams resumed once "
                               "paid", registry=self.registry)
        self.pause_timeouts = Counter("tollstream_stream_pause_timeouts", "Paused streams "
                                      "ended because no payment came in time",
                                      registry=self.registry)

    def add(self, collect: Callable[[], Iterable[Metric]]) -> None:
        """Metrics a rail keeps itself (vouchers, unsettled amounts), read at each scrape."""
        self.registry.register(_Source(collect))

    def record(self, model: str, bill: Bill) -> None:
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


class _Source(Collector):
    def __init__(self, collect: Callable[[], Iterable[Metric]]) -> None:
        self._collect = collect

    def collect(self) -> Iterable[Metric]:
        return self._collect()
