"""The garbage collector's pauses as a metric (gateway/metrics.py): one callback per process,
each collection counted once, in its generation and its bucket, with its time."""

from __future__ import annotations

import gc
import re
from collections.abc import Iterable

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import Metric
from prometheus_client.registry import Collector

from gateway.metrics import GcPauses, Metrics, gc_pauses


def buckets(text: str, generation: int) -> list[tuple[str, float]]:
    return [(bound, float(count)) for bound, count in re.findall(
        'tollstream_gc_pause_seconds_bucket\\{generation="' + str(generation)
        + r'",le="([^"]+)"\} (\S+)', text)]


def total(text: str, generation: int, what: str) -> float:
    match = re.search(f"tollstream_gc_pause_seconds_{what}" + r'\{generation="'
                      + str(generation) + r'"\} (\S+)', text)
    assert match, text
    return float(match.group(1))


def test_one_callback_per_process_read_by_every_gateway() -> None:
    first, second = Metrics(), Metrics()
    assert gc_pauses() is gc_pauses()
    assert sum(callback is gc_pauses() for callback in gc.callbacks) == 1
    before = total(first.render().decode(), 2, "count")
    gc.collect()
    for metrics in (first, second):
        text = metrics.render().decode()
        assert total(text, 2, "count") >= before + 1
        assert total(text, 2, "sum") > 0


def test_a_collection_lands_in_its_generation_and_bucket() -> None:
    pauses = GcPauses()  # not installed: fed by hand
    for generation, seconds in ((0, 0.0001), (1, 0.003), (2, 0.07), (2, 2.0)):
        pauses("start", {"generation": generation})
        pauses._started -= seconds  # as if the collection had begun that long ago
        pauses("stop", {"generation": generation})
    assert pauses.counts[0] == [1, 0, 0, 0, 0, 0, 0]
    assert pauses.counts[1] == [0, 0, 1, 0, 0, 0, 0]
    assert pauses.counts[2] == [0, 0, 0, 0, 1, 0, 1]  # 70 ms in <= 0.1, 2 s above 0.5
    assert abs(pauses.seconds[2] - 2.07) < 0.01


def test_the_histogram_is_cumulative_with_an_infinite_bucket() -> None:
    pauses = GcPauses()
    for seconds in (0.0001, 0.0003, 0.03, 0.2):
        pauses("start", {"generation": 1})
        pauses._started -= seconds
        pauses("stop", {"generation": 1})
    class Source(Collector):
        def collect(self) -> Iterable[Metric]:
            return pauses.collect()

    registry = CollectorRegistry()
    registry.register(Source())
    text = generate_latest(registry).decode()
    assert buckets(text, 1) == [("0.0005", 2.0), ("0.002", 2.0), ("0.01", 2.0),
                                ("0.05", 3.0), ("0.1", 3.0), ("0.5", 4.0), ("+Inf", 4.0)]
    assert total(text, 1, "count") == 4
