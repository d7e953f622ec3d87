"""Prometheus metrics of a server, under vLLM's names with our prefix (`pagedllm:`).

Engine state (running / waiting requests, KV cache usage, prefix-cache and preemption
totals) comes from the engine core's stats, sent with every step; latencies are measured
per request by the front end (`RequestTiming`). Each server has its own registry; with data
parallelism every replica has its own series (label `engine`).

With several API server processes (`--api-server-count`), every process writes its series to
files in PROMETHEUS_MULTIPROC_DIR (prometheus_client's multiprocess mode, set up by the parent)
and /metrics on any of them reads them all: the request counters and histograms add up over
the processes. Every API server gets every replica's stats, but only API server 0 records them
(the prefix-cache and preemption counters would otherwise count K times); the engine gauges
report the most recent value written by any process.
"""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector

from pagedllm.engine.messages import EngineStats
from pagedllm.engine.request_timing import RequestTiming

_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0, 320.0)
_TOKEN_GAP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class ServerMetrics:
    """The server's registry. Every metric carries the labels model_name and engine (the
    data-parallel replica, "0" with one; vLLM's label): each replica's client reports to its
    own `EngineMetrics`, `engine(i)`."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self, model_name: str, api_server: int | None = None) -> None:
        """api_server: this process's index among several API servers (multiprocess mode), or None."""
        self.registry = CollectorRegistry()
        self.model_name = model_name
        self.multiprocess = api_server is not None
        self.records_engine_stats = not api_server  # None or 0
        labels = ["model_name", "engine"]

        def gauge(name: str, doc: str) -> Gauge:
            return Gauge(f"pagedllm:{name}", doc, labels, registry=self.registry, multiprocess_mode="mostrecent")

        def counter(name: str, doc: str) -> Counter:
            return Counter(f"pagedllm:{name}", doc, labels, registry=self.registry)

        def histogram(name: str, doc: str, buckets) -> Histogram:
            return Histogram(f"pagedllm:{name}", doc, labels, buckets=buckets, registry=self.registry)

        self.num_requests_running = gauge("num_requests_running", "Requests in the running batch")
        self.num_requests_waiting = gauge("num_requests_waiting", "Requests waiting to be scheduled")
        self.kv_cache_usage = gauge("kv_cache_usage_perc", "Fraction of KV cache blocks in use (1 = full)")
        self.engine_alive = gauge("engine_alive", "1 while the engine (data-parallel replica) runs, 0 once it is dead")
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
        self.request_success = Counter(
            "pagedllm:request_success", "Finished requests by reason (stop, length, abort)",
            [*labels, "finished_reason"], registry=self.registry,
        )

    def engine(self, index: int) -> EngineMetrics:
        """The metrics of data-parallel replica `index` (a StatsObserver of its client)."""
        return EngineMetrics(self, index)

    def render(self) -> bytes:
        if not self.multiprocess:
            return generate_latest(self.registry)
        registry = CollectorRegistry()
        MultiProcessCollector(registry)  # every API server's files
        return generate_latest(registry)


class EngineMetrics:
    """One replica's children of the server's metrics."""

    def __init__(self, families: ServerMetrics, index: int) -> None:
        labels = {"model_name": families.model_name, "engine": str(index)}
        self._families = families
        self._labels = labels
        f = families
        self.num_requests_running = f.num_requests_running.labels(**labels)
        self.num_requests_waiting = f.num_requests_waiting.labels(**labels)
        self.kv_cache_usage = f.kv_cache_usage.labels(**labels)
        self.engine_alive = f.engine_alive.labels(**labels)
        self.engine_alive.set(1)
        if families.records_engine_stats:  # a series appears before the first stats
            for gauge in (self.num_requests_running, self.num_requests_waiting, self.kv_cache_usage):
                gauge.set(0)
        self._totals = [m.labels(**labels) for m in (f.prefix_cache_queries, f.prefix_cache_hits, f.num_preemptions)]
        self.prompt_tokens = f.prompt_tokens.labels(**labels)
        self.generation_tokens = f.generation_tokens.labels(**labels)
        self._latencies = [
            m.labels(**labels) for m in (f.time_to_first_token, f.time_per_output_token, f.e2e_request_latency, f.request_queue_time)
        ]
        self._last_totals = (0, 0, 0)  # the engine sends running totals; counters take increments

    def record_stats(self, stats: EngineStats) -> None:
        if not self._families.records_engine_stats:
            return
        self.num_requests_running.set(stats.num_running)
        self.num_requests_waiting.set(stats.num_waiting)
        self.kv_cache_usage.set(stats.kv_cache_usage)
        totals = (stats.prefix_cache_queries, stats.prefix_cache_hits, stats.num_preemptions)
        for metric, new, old in zip(self._totals, totals, self._last_totals):
            if new > old:
                metric.inc(new - old)
        self._last_totals = totals

    def record_tokens(self, num_prompt_tokens: int, num_generation_tokens: int) -> None:
        if num_prompt_tokens:
            self.prompt_tokens.inc(num_prompt_tokens)
        if num_generation_tokens:
            self.generation_tokens.inc(num_generation_tokens)

    def record_finished(self, timing: RequestTiming, finish_reason: str) -> None:
        self._families.request_success.labels(**self._labels, finished_reason=finish_reason).inc()
        values = (
            timing.time_to_first_token,
            timing.time_per_output_token,
            timing.e2e_latency if finish_reason != "abort" else None,
            timing.queue_time,
        )
        for histogram, value in zip(self._latencies, values):
            if value is not None:
                histogram.observe(value)

    def record_dead(self) -> None:
        self.engine_alive.set(0)
