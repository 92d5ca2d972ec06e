"""Prometheus metrics, in a registry of the app's own (served at /metrics)."""

from __future__ import annotations

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

    def add_gauges(self, collect: Callable[[], Iterable[GaugeMetricFamily]]) -> None:
        """Register gauges read at scrape time (sessions, kernels per user and state, memory)."""

        class _Live(Collector):
            def collect(self) -> Iterable[GaugeMetricFamily]:
                return collect()

        self.registry.register(_Live())
