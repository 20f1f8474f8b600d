"""Prometheus metrics of one server: requests by endpoint and status, tokens, and the engines' counters.

The engines' numbers (forward passes, rows per pass, KV bytes in use, the queue, tokens of finished requests) come
as a `Snapshot` that the service takes when `/metrics` is scraped, from `engine.stats` and the pool, so nothing on
the step loop's path updates a metric; over Ray replicas the snapshots of every replica are added up. Each app has
a registry of its own (no process-wide state), so several servers can live in one process, as in the tests.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric

ROWS_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class RowsHistogram:
    """Rows per forward pass in buckets, read from `engine.stats.per_step_rows` as it grows."""

    def __init__(self) -> None:
        self.seen = 0  # entries of per_step_rows already counted
        self.buckets = [0] * (len(ROWS_BUCKETS) + 1)  # the last one: above the largest bucket
        self.total = 0

    def update(self, per_step_rows: list[int]) -> None:
        rows = per_step_rows[self.seen :]  # appended by the engine thread; a slice is a consistent snapshot
        self.seen += len(rows)
        self.total += sum(rows)
        for n in rows:
            self.buckets[next((i for i, le in enumerate(ROWS_BUCKETS) if n <= le), len(ROWS_BUCKETS))] += 1


@dataclass
class Snapshot:
    """An engine's counters and gauges at one moment; `+` adds two engines' (replicas)."""

    forward_passes: int = 0
    rows: int = 0  # rows fed, summed over passes
    tokens_fed: int = 0
    rows_buckets: list[int] = field(default_factory=lambda: [0] * (len(ROWS_BUCKETS) + 1))
    rows_sum: int = 0
    queued: int = 0
    running: int = 0
    kv_bytes_in_use: int = 0
    kv_bytes_budget: int = 0
    prompt_tokens: int = 0  # of finished requests
    completion_tokens: int = 0

    def __add__(self, other: Snapshot) -> Snapshot:
        added = {f.name: getattr(self, f.name) + getattr(other, f.name) for f in dataclasses.fields(self)}
        added["rows_buckets"] = [a + b for a, b in zip(self.rows_buckets, other.rows_buckets, strict=True)]
        return Snapshot(**added)


class SnapshotCollector:
    """Yields the snapshot the scrape took (set before each `generate_latest`)."""

    def __init__(self) -> None:
        self.snapshot = Snapshot()

    def collect(self) -> Iterator[Metric]:
        s = self.snapshot
        yield CounterMetricFamily("hogwild_forward_passes", "Forward passes of the model", value=s.forward_passes)
        yield CounterMetricFamily("hogwild_rows", "Rows fed to forward passes, summed over passes", value=s.rows)
        yield CounterMetricFamily(
            "hogwild_tokens_fed", "Tokens fed to forward passes (prompts included)", value=s.tokens_fed
        )
        cumulative, total = [], 0
        for le, count in zip((*map(str, ROWS_BUCKETS), "+Inf"), s.rows_buckets, strict=True):
            total += count
            cumulative.append((le, total))
        yield HistogramMetricFamily(
            "hogwild_rows_per_step",
            "Rows per forward pass (every run's rows together)",
            buckets=cumulative,
            sum_value=s.rows_sum,
        )
        yield CounterMetricFamily("hogwild_prompt_tokens", "Prompt tokens of finished requests", value=s.prompt_tokens)
        yield CounterMetricFamily(
            "hogwild_completion_tokens", "Tokens sampled for finished requests", value=s.completion_tokens
        )
        yield GaugeMetricFamily("hogwild_queue_length", "Requests waiting for a run slot or KV room", value=s.queued)
        yield GaugeMetricFamily("hogwild_running_runs", "Runs in the engine now", value=s.running)
        yield GaugeMetricFamily("hogwild_kv_bytes_in_use", "Bytes of live KV block storage", value=s.kv_bytes_in_use)
        yield GaugeMetricFamily("hogwild_kv_bytes_budget", "The KV pool's byte budget", value=s.kv_bytes_budget)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "hogwild_requests", "HTTP requests by endpoint and status", ["endpoint", "status"], registry=self.registry
        )
        self.engines = SnapshotCollector()
        self.registry.register(self.engines)

    def render(self, snapshot: Snapshot) -> bytes:
        self.engines.snapshot = snapshot
        return generate_latest(self.registry)
