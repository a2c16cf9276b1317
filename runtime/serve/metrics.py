"""Prometheus metrics of one server: requests by outcome, queue depth, batch sizes, latencies, tokens, and the
process (resident memory, CPU time)."""

from __future__ import annotations

from prometheus_client import (CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector,
                               generate_latest)

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class Metrics:
    """A registry of its own, so that several servers (tests, Ray replicas) in one process do not collide."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self):
        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)  # process_resident_memory_bytes, cpu seconds, open fds (Linux)
        self.requests = Counter("xmtf_requests", "Completion requests by outcome", ["outcome"], registry=self.registry)
        self.queue_depth = Gauge("xmtf_queue_depth", "Requests waiting for the engine", registry=self.registry)
        self.batch_size = Histogram("xmtf_batch_size", "Sequences per batch the engine ran",
                                    buckets=(1, 2, 4, 8, 16, 32, 64), registry=self.registry)
        self.first_token = Histogram("xmtf_time_to_first_token_seconds", "Arrival to first generated token",
                                     buckets=LATENCY_BUCKETS, registry=self.registry)
        self.inter_token = Histogram("xmtf_inter_token_seconds", "Mean time between a request's tokens",
                                     buckets=LATENCY_BUCKETS, registry=self.registry)
        self.end_to_end = Histogram("xmtf_request_seconds", "Arrival to the last token", buckets=LATENCY_BUCKETS,
                                    registry=self.registry)
        self.generated_tokens = Counter("xmtf_generated_tokens", "Tokens generated", registry=self.registry)
        self.dropped = Counter("xmtf_dropped_requests", "Requests the engine dropped mid-batch (deadline, disconnect)",
                               registry=self.registry)

    def render(self) -> bytes:
        return generate_latest(self.registry)
