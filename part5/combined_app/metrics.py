"""Prometheus metrics of one app instance, served as text at ``GET /metrics``.

Each app gets its own registry, so several apps (tests, a notebook) never share counters::

    metrics = Metrics(queue_depth=lambda: 0, busy_slots=lambda: 0)
    metrics.requests.labels(route="/v1/chat/completions", status="200").inc()
    metrics.render()   # (bytes, content type)
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

from part5.combined_app.cache import ResponseCache

# Seconds: a tiny model answers in tens of milliseconds, a long reply on CPU takes a minute.
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class Metrics:
    """Request, token, queue, latency and engine-failure figures; gauges read live values
    through callbacks."""

    def __init__(self, queue_depth: Callable[[], float], busy_slots: Callable[[], float]):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "llmlab_requests",
            "HTTP requests by route and status code",
            ["route", "status"],
            registry=r,
        )
        self.prompt_tokens = Counter("llmlab_prompt_tokens", "Prompt tokens processed", registry=r)
        self.completion_tokens = Counter(
            "llmlab_completion_tokens", "Completion tokens generated", registry=r
        )
        self.rejected = Counter(
            "llmlab_rejected_requests",
            "Requests turned away because the queue was full",
            registry=r,
        )
        self.cancelled = Counter(
            "llmlab_cancelled_requests",
            "Generations stopped because the client went away",
            registry=r,
        )
        self.engine_failures = Counter(
            "llmlab_engine_failures",
            "Times the decode engine failed (each time a new engine is loaded)",
            registry=r,
        )
        self.latency = Histogram(
            "llmlab_request_latency_seconds",
            "Time from request to last byte, by route",
            ["route"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.ttft = Histogram(
            "llmlab_time_to_first_token_seconds",
            "Time from request to the first generated token",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_depth = Gauge("llmlab_queue_depth", "Requests waiting for a slot", registry=r)
        self.queue_depth.set_function(queue_depth)
        self.busy_slots = Gauge("llmlab_busy_slots", "Slots decoding a request now", registry=r)
        self.busy_slots.set_function(busy_slots)
        self.cache_hits = Counter(
            "llmlab_cache_hits", "Replies answered from the response cache", registry=r
        )
        self.cache_misses = Counter(
            "llmlab_cache_misses", "Cacheable requests the cache could not answer", registry=r
        )
        self.cache_evictions = Counter(
            "llmlab_cache_evictions", "Cached replies dropped to make room", registry=r
        )
        self.cache_entries = Gauge("llmlab_cache_entries", "Replies in the cache", registry=r)
        self.cache_bytes = Gauge("llmlab_cache_bytes", "Bytes of replies in the cache", registry=r)

        self.model_loads = Counter(
            "llmlab_model_loads", "Models loaded on demand", ["model"], registry=r
        )
        self.model_unloads = Counter(
            "llmlab_model_unloads",
            "Models unloaded, by reason (idle, memory, shutdown)",
            ["model", "reason"],
            registry=r,
        )
        self.model_load_seconds = Counter(
            "llmlab_model_load_seconds",
            "Time spent loading models on demand",
            ["model"],
            registry=r,
        )
        self.routed = Counter(
            "llmlab_routed_requests",
            "Generation requests by the model that answered and how it was chosen "
            "(default, name, alias, auto)",
            ["model", "via"],
            registry=r,
        )

    def watch_cache(self, cache: ResponseCache) -> None:
        """Show ``cache``'s size in the gauges and count its evictions."""
        self.cache_entries.set_function(lambda: len(cache))
        self.cache_bytes.set_function(lambda: cache.bytes)
        cache.on_evict = self.cache_evictions.inc

    def count_tokens(self, prompt: int, completion: int) -> None:
        """Add one finished generation's token counts."""
        self.prompt_tokens.inc(prompt)
        self.completion_tokens.inc(completion)

    def render(self) -> tuple[bytes, str]:
        """The Prometheus text exposition and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
