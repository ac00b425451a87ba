"""Prometheus metrics of ``cmiguard serve`` (``/metrics``): requests by route
and status, latency, queue depth, tokens, and batches run. Each app has its
own registry, so several apps in one process (the tests) do not collide."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class ServerMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "cmiguard_requests",
            "HTTP requests answered, by route and status",
            ["route", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "cmiguard_request_seconds",
            "Time from a request's arrival to its response (streams: to the first byte)",
            ["route"],
            registry=self.registry,
        )
        self.queue_depth = Gauge(
            "cmiguard_queue_depth", "Jobs waiting for a batch", registry=self.registry
        )
        self.tokens = Counter(
            "cmiguard_tokens", "Tokens processed, by kind", ["kind"], registry=self.registry
        )
        self.batches = Counter(
            "cmiguard_batches", "Batches run, by outcome", ["outcome"], registry=self.registry
        )
