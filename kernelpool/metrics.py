"""Prometheus metrics, in a registry of the app's own (served at /metrics)."""

from __future__ import annotations

import gc
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from kernelpool.services import Services


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
        """Register gauges read at scrape time (sessions, kernels per user and state, memory)."""

        class _Live(Collector):
            def collect(self) -> Iterable[GaugeMetricFamily]:
                return collect()

        self.registry.register(_Live())


def _gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
    gauge = GaugeMetricFamily(name, documentation)
    gauge.add_metric([], value)
    return gauge


def live_gauges(services: Services) -> Iterable[GaugeMetricFamily]:
    yield _gauge("kernelpool_sessions", "MCP sessions with a context", len(services.sessions))
    yield _gauge("kernelpool_audit_pending", "audit rows waiting to be written", services.store.audit_pending)
    yield _gauge("kernelpool_audit_dropped", "audit rows dropped because the queue was full", services.store.audit_dropped)
    yield _gauge("kernelpool_result_bytes", "finished background results kept in memory", services.jobs.result_bytes())
    kernels = GaugeMetricFamily("kernelpool_kernels", "kernels by user and state", labels=["user", "state"])
    counts: dict[tuple[str, str], int] = {}
    for k in services.kernels.all():
        counts[(k.user, k.state.value)] = counts.get((k.user, k.state.value), 0) + 1
    for k in services.kernels.pooled():
        counts[(k.user, "warm")] = counts.get((k.user, "warm"), 0) + 1
    for (user, state), n in counts.items():
        kernels.add_metric([user, state], n)
    yield kernels
    if services.events is not None:
        yield _gauge("kernelpool_resume_events", "events kept for stream resumption", services.events.count())
    memory = GaugeMetricFamily("kernelpool_user_memory_bytes", "memory of a user's kernels", labels=["user"])
    cpu = GaugeMetricFamily("kernelpool_user_cpu_seconds", "CPU time of a user's kernels", labels=["user"])
    for user, (mem, secs) in services.kernels.usage().items():
        if mem is not None:
            memory.add_metric([user], mem)
        if secs is not None:
            cpu.add_metric([user], secs)
    yield memory
    yield cpu
