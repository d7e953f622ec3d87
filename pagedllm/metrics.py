"""Prometheus metrics of a server, under vLLM's names with our prefix (`pagedllm:`).

Engine state (running / waiting requests, KV cache usage, prefix-cache and preemption
totals) comes from the engine core's stats, sent with every step; latencies are measured
per request by the front end (`RequestTiming`). Each server has its own registry.
"""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from pagedllm.engine.messages import EngineStats
from pagedllm.engine.request_timing import RequestTiming

_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0, 320.0)
_TOKEN_GAP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class ServerMetrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self, model_name: str) -> None:
        self.registry = CollectorRegistry()
        labels = {"model_name": model_name}

        def gauge(name: str, doc: str) -> Gauge:
            return Gauge(f"pagedllm:{name}", doc, list(labels), registry=self.registry).labels(**labels)

        def counter(name: str, doc: str) -> Counter:
            return Counter(f"pagedllm:{name}", doc, list(labels), registry=self.registry).labels(**labels)

        def histogram(name: str, doc: str, buckets) -> Histogram:
            return Histogram(f"pagedllm:{name}", doc, list(labels), buckets=buckets, registry=self.registry).labels(**labels)

        self.num_requests_running = gauge("num_requests_running", "Requests in the running batch")
        self.num_requests_waiting = gauge("num_requests_waiting", "Requests waiting to be scheduled")
        self.kv_cache_usage = gauge("kv_cache_usage_perc", "Fraction of KV cache blocks in use (1 = full)")
        self.prefix_cache_queries = counter("prefix_cache_queries", "Prompt tokens looked up in the prefix cache")
        self.prefix_cache_hits = counter("prefix_cache_hits", "Prompt tokens found in the prefix cache")
        self.num_preemptions = counter("num_preemptions", "Requests preempted (to recompute) for lack of KV blocks")
        self.prompt_tokens = counter("prompt_tokens", "Prompt tokens of accepted requests")
        self.generation_tokens = counter("generation_tokens", "Generated tokens")
        self.time_to_first_token = histogram("time_to_first_token_seconds", "Arrival to first token", _LATENCY_BUCKETS)
        self.time_per_output_token = histogram(
            "time_per_output_token_seconds", "Mean gap between output tokens after the first", _TOKEN_GAP_BUCKETS
        )
        self.e2e_request_latency = histogram("e2e_request_latency_seconds", "Arrival to last token", _LATENCY_BUCKETS)
        self.request_queue_time = histogram("request_queue_time_seconds", "Arrival to first scheduled", _LATENCY_BUCKETS)
        self._request_finished = Counter(
            "pagedllm:request_success", "Finished requests by reason (stop, length, abort)",
            ["model_name", "finished_reason"], registry=self.registry,
        )
        self._model_name = model_name
        self._last_totals = (0, 0, 0)  # the engine sends running totals; counters take increments

    def record_stats(self, stats: EngineStats) -> None:
        self.num_requests_running.set(stats.num_running)
        self.num_requests_waiting.set(stats.num_waiting)
        self.kv_cache_usage.set(stats.kv_cache_usage)
        totals = (stats.prefix_cache_queries, stats.prefix_cache_hits, stats.num_preemptions)
        for metric, new, old in zip((self.prefix_cache_queries, self.prefix_cache_hits, self.num_preemptions), totals, self._last_totals):
            if new > old:
                metric.inc(new - old)
        self._last_totals = totals

    def record_tokens(self, num_prompt_tokens: int, num_generation_tokens: int) -> None:
        if num_prompt_tokens:
            self.prompt_tokens.inc(num_prompt_tokens)
        if num_generation_tokens:
            self.generation_tokens.inc(num_generation_tokens)

    def record_finished(self, timing: RequestTiming, finish_reason: str) -> None:
        self._request_finished.labels(model_name=self._model_name, finished_reason=finish_reason).inc()
        for histogram, value in (
            (self.time_to_first_token, timing.time_to_first_token),
            (self.time_per_output_token, timing.time_per_output_token),
            (self.e2e_request_latency, timing.e2e_latency if finish_reason != "abort" else None),
            (self.request_queue_time, timing.queue_time),
        ):
            if value is not None:
                histogram.observe(value)

    def render(self) -> bytes:
        return generate_latest(self.registry)
