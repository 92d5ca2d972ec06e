"""Prometheus metrics, in a registry of the app's own (served at /metrics)."""

from __future__ import annotations

import gc
import time
from collections.abc import Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.tool_calls = Counter("kernelpool_tool_calls_total", "MCP tool calls", ["tool", "outcome"], registry=self.registry)
        self.executions = Counter("kernelpool_executions_total", "code executions", ["status"], registry=self.registry)
        self.execution_seconds = Histogram(
            "kernelpool_execution_seconds", "time from request to result of one execution",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 1800),
            registry=self.registry,
        )
        self.auth_failures = Counter("kernelpool_auth_failures_total", "rejected bearer tokens", ["reason"], registry=self.registry)
        # counted by the kernel registry (kernels.registry, kernels.launch)
        self.kernel_starts = Counter(
            "kernelpool_kernel_starts_total", "kernel processes started, by the fork server or the stock way",
            ["source"], registry=self.registry)
        self.pool_hits = Counter("kernelpool_pool_hits_total", "kernels handed out warm", registry=self.registry)
        self.pool_misses = Counter("kernelpool_pool_misses_total", "kernels started on demand", registry=self.registry)
        self.misbehaving_kernels = Counter(
            "kernelpool_misbehaving_kernels_total", "kernels stopped because they broke a bound on their channels "
            "(too_large: a message over kernel_max_message_bytes; flood: kernel_flood_bytes; malformed; closed)",
            ["reason"], registry=self.registry)
        # the cyclic garbage collector stops the one event loop that serves everyone (`watch_gc`)
        self.gc_pauses = Histogram(
            "kernelpool_gc_pause_seconds", "pauses of Python's cyclic garbage collector, by generation", ["generation"],
            buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1), registry=self.registry)

    def watch_gc(self) -> None:
        """Time every collection of the cyclic garbage collector into `gc_pauses`."""
        started: list[float] = []

        def on_gc(phase: str, info: dict[str, int]) -> None:
            if phase == "start":
                started[:] = [time.perf_counter()]
            elif started:
                self.gc_pauses.labels(str(info.get("generation", "?"))).observe(time.perf_counter() - started[0])

        gc.callbacks.append(on_gc)

    def add_gauges(self, collect: Callable[[], Iterable[GaugeMetricFamily]]) -> None:
        """Register gauges read at scrape time (sessions, kernels per user and state, memory): the
        app's, which reads them from every service (`kernelpool.app`); this module knows none."""

        class _Live(Collector):
            def collect(self) -> Iterable[GaugeMetricFamily]:
                return collect()

        self.registry.register(_Live())


def gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
    """One unlabelled gauge, for the collector given to `Metrics.add_gauges`."""
    family = GaugeMetricFamily(name, documentation)
    family.add_metric([], value)
    return family
