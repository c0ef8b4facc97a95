"""Prometheus metrics: the worker spec's names plus scheduler gauges and latency histograms."""

from __future__ import annotations

import time
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

MS_BUCKETS = (1, 2.5, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000, 60000, 300000)


class Metrics:
    """One registry per app, so several apps (tests) can live in one process."""

    def __init__(self, vram_bytes: int, running: Callable[[], int], waiting: Callable[[], int],
                 kv_used: Callable[[], int], kv_total: int, kv_blocks_used: Callable[[], int] | None = None,
                 kv_blocks_total: int = 0):
        self.registry = CollectorRegistry()
        r = self.registry
        started = time.monotonic()
        Gauge("worker_vram_bytes", "Bytes of device memory held by weights and KV cache", registry=r).set(vram_bytes)
        Gauge("worker_uptime_seconds", "Seconds since the worker started", registry=r).set_function(
            lambda: time.monotonic() - started)
        self.requests = Counter("worker_requests_total", "Finished requests by outcome", ["outcome"], registry=r)
        self.tokens_in = Counter("worker_tokens_in_total", "Prompt tokens admitted", registry=r)
        self.tokens_out = Counter("worker_tokens_generated_total", "Tokens generated", registry=r)
        self.prefix_queries = Counter("worker_prefix_cache_queries_total",
                                      "Prompt tokens of admitted requests looked up in the prefix cache", registry=r)
        self.prefix_hits = Counter("worker_prefix_cache_hits_total",
                                   "Prompt tokens whose KV came from the prefix cache", registry=r)
        self.duration = Histogram("worker_inference_duration_ms", "Request time from submit to the last event",
                                  buckets=MS_BUCKETS, registry=r)
        self.ttft = Histogram("worker_time_to_first_token_ms", "Time from submit to the first token",
                              buckets=MS_BUCKETS, registry=r)
        self.token_latency = Histogram("worker_inter_token_latency_ms", "Time between two tokens of one stream",
                                       buckets=MS_BUCKETS, registry=r)
        Gauge("worker_running_sequences", "Sequences holding a KV slot", registry=r).set_function(running)
        Gauge("worker_waiting_sequences", "Requests waiting for a KV slot", registry=r).set_function(waiting)
        Gauge("worker_kv_cache_used_tokens", "KV cache positions in use", registry=r).set_function(kv_used)
        Gauge("worker_kv_cache_capacity_tokens", "KV cache positions in all slots", registry=r).set(kv_total)
        Gauge("worker_kv_cache_usage_ratio", "Fraction of KV cache positions in use", registry=r).set_function(
            lambda: kv_used() / kv_total if kv_total else 0.0)
        if kv_blocks_used is not None:  # the paged pool (engine/block_manager.py): blocks handed out, blocks in all
            Gauge("worker_kv_blocks_used", "KV pool blocks held by sequences", registry=r).set_function(kv_blocks_used)
            Gauge("worker_kv_blocks_total", "KV pool blocks", registry=r).set(kv_blocks_total)

    def render(self) -> bytes:
        return generate_latest(self.registry)
