"""Prometheus metrics of one server: requests by endpoint and status, tokens, and the engine's counters.

The engine's numbers (forward passes, rows per pass, KV bytes in use, the queue) are read when `/metrics` is
scraped, from `engine.stats` and the pool, so nothing on the step loop's path updates a metric. Each app has a
registry of its own (no process-wide state), so several servers can live in one process, as in the tests.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric

from hogwild.engine import Engine

ROWS_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class EngineCollector:
    """The engine's counters and gauges, read at scrape time."""

    def __init__(self, engine: Engine, queued: Callable[[], int]) -> None:
        self.engine = engine
        self.queued = queued
        self.seen = 0  # entries of engine.stats.per_step_rows already counted into the histogram
        self.buckets = [0] * (len(ROWS_BUCKETS) + 1)  # the last one: above the largest bucket
        self.rows_sum = 0

    def collect(self) -> Iterator[Metric]:
        stats, pool = self.engine.stats, self.engine.pool
        rows = stats.per_step_rows[self.seen :]  # appended by the engine thread; a slice is a consistent snapshot
        self.seen += len(rows)
        self.rows_sum += sum(rows)
        for n in rows:
            self.buckets[next((i for i, le in enumerate(ROWS_BUCKETS) if n <= le), len(ROWS_BUCKETS))] += 1
        yield CounterMetricFamily("hogwild_forward_passes", "Forward passes of the model", value=stats.steps)
        yield CounterMetricFamily("hogwild_rows", "Rows fed to forward passes, summed over passes", value=stats.rows)
        yield CounterMetricFamily(
            "hogwild_tokens_fed", "Tokens fed to forward passes (prompts included)", value=stats.tokens
        )
        cumulative, total = [], 0
        for le, count in zip((*map(str, ROWS_BUCKETS), "+Inf"), self.buckets, strict=True):
            total += count
            cumulative.append((le, total))
        yield HistogramMetricFamily(
            "hogwild_rows_per_step",
            "Rows per forward pass (every run's rows together)",
            buckets=cumulative,
            sum_value=self.rows_sum,
        )
        yield GaugeMetricFamily(
            "hogwild_queue_length", "Requests waiting for a run slot or KV room", value=self.queued()
        )
        yield GaugeMetricFamily(
            "hogwild_running_runs", "Runs in the engine now", value=len(self.engine.scheduler.running)
        )
        yield GaugeMetricFamily("hogwild_kv_bytes_in_use", "Bytes of live KV block storage", value=pool.in_use_bytes)
        yield GaugeMetricFamily("hogwild_kv_bytes_budget", "The KV pool's byte budget", value=pool.budget_bytes)


class Metrics:
    def __init__(self, engine: Engine, queued: Callable[[], int]) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "hogwild_requests", "HTTP requests by endpoint and status", ["endpoint", "status"], registry=self.registry
        )
        self.prompt_tokens = Counter(
            "hogwild_prompt_tokens", "Prompt tokens of finished requests", registry=self.registry
        )
        self.completion_tokens = Counter(
            "hogwild_completion_tokens", "Tokens sampled for finished requests", registry=self.registry
        )
        self.registry.register(EngineCollector(engine, queued))

    def render(self) -> bytes:
        return generate_latest(self.registry)
