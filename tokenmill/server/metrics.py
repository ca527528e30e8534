"""Prometheus metrics, `tokenmill_*`; `docs/metrics.md` maps each to its vLLM twin.

Per-request histograms are observed by the serving layer when a request ends;
engine-wide gauges and counters are read from the engine's latest stats
snapshot at scrape time, so scraping never touches engine state.
"""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from tokenmill.engine.async_engine import RequestTimes

_LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0,
                    7.5, 10.0, 20.0, 40.0, 80.0, 160.0)
_TOKEN_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000)


class _EngineCollector:
    def __init__(self, stats_source, model_name: str) -> None:
        self._stats = stats_source
        self._model = model_name

    def collect(self):
        stats = self._stats()
        if stats is None:
            return
        labels = ["model_name"]

        def gauge(name, doc, value):
            family = GaugeMetricFamily(name, doc, labels=labels)
            family.add_metric([self._model], value)
            return family

        def counter(name, doc, value):
            family = CounterMetricFamily(name, doc, labels=labels)
            family.add_metric([self._model], value)
            return family

        yield gauge("tokenmill_num_requests_running", "Requests in the running batch.", stats.num_running)
        yield gauge("tokenmill_num_requests_waiting", "Requests waiting to be scheduled.", stats.num_waiting)
        yield gauge("tokenmill_kv_cache_usage_perc", "Fraction of KV-cache blocks in use (0-1).",
                    stats.kv_cache_usage)
        yield counter("tokenmill_num_preemptions", "Requests preempted for lack of KV blocks.",
                      stats.num_preemptions)
        yield counter("tokenmill_prefix_cache_queries", "Prompt tokens looked up in the prefix cache.",
                      stats.prefix_cache_queries)
        yield counter("tokenmill_prefix_cache_hits", "Prompt tokens found in the prefix cache.",
                      stats.prefix_cache_hits)


class ServerMetrics:
    def __init__(self, model_name: str, stats_source) -> None:
        self.registry = CollectorRegistry()
        self.model_name = model_name
        labels = ["model_name"]

        def histogram(name, doc, buckets):
            return Histogram(name, doc, labels, buckets=buckets, registry=self.registry).labels(model_name)

        self.ttft = histogram("tokenmill_time_to_first_token_seconds",
                              "Time from arrival to the first generated token.", _LATENCY_BUCKETS)
        self.itl = histogram("tokenmill_inter_token_latency_seconds",
                             "Time between consecutive generated tokens of a request.", _LATENCY_BUCKETS)
        self.e2e = histogram("tokenmill_e2e_request_latency_seconds",
                             "Time from arrival to the end of a request.", _LATENCY_BUCKETS)
        self.queue = histogram("tokenmill_request_queue_time_seconds",
                               "Time from arrival to first scheduling.", _LATENCY_BUCKETS)
        self.prefill = histogram("tokenmill_request_prefill_time_seconds",
                                 "Time from first scheduling to the first generated token.", _LATENCY_BUCKETS)
        self.decode = histogram("tokenmill_request_decode_time_seconds",
                                "Time from the first to the last generated token.", _LATENCY_BUCKETS)
        self.prompt_tokens_hist = histogram("tokenmill_request_prompt_tokens", "Prompt tokens per request.",
                                            _TOKEN_BUCKETS)
        self.generation_tokens_hist = histogram("tokenmill_request_generation_tokens",
                                                "Generated tokens per request.", _TOKEN_BUCKETS)
        self.prompt_tokens = Counter("tokenmill_prompt_tokens", "Prompt tokens processed.", labels,
                                     registry=self.registry).labels(model_name)
        self.generation_tokens = Counter("tokenmill_generation_tokens", "Tokens generated.", labels,
                                         registry=self.registry).labels(model_name)
        self.finished = Counter("tokenmill_request_success", "Finished requests by finish reason.",
                                labels + ["finished_reason"], registry=self.registry)
        self.registry.register(_EngineCollector(stats_source, model_name))

    def observe_token_gap(self, seconds: float) -> None:
        self.itl.observe(seconds)

    def observe_cut_short(self, reason: str, num_prompt_tokens: int, num_output_tokens: int,
                          count_prompt: bool) -> None:
        """A completion ended by the server (client gone: "abort"; --request-timeout:
        "timeout") before the engine finished it: it has no engine timings."""
        self.finished.labels(self.model_name, reason).inc()
        if count_prompt:
            self.prompt_tokens.inc(num_prompt_tokens)
        self.generation_tokens.inc(num_output_tokens)

    def observe_finished(self, times: RequestTimes, finish_reason: str, count_prompt: bool = True) -> None:
        """One completion (one of a request's n) has ended; the prompt of an
        `n > 1` request is counted once (`count_prompt` on one completion only)."""
        self.finished.labels(self.model_name, finish_reason).inc()
        self.e2e.observe(times.finished - times.arrival)
        if count_prompt:
            self.prompt_tokens_hist.observe(times.num_prompt_tokens)
            self.prompt_tokens.inc(times.num_prompt_tokens)
        self.generation_tokens_hist.observe(times.num_output_tokens)
        self.generation_tokens.inc(times.num_output_tokens)
        if times.first_scheduled is not None:
            self.queue.observe(times.first_scheduled - times.arrival)
            if times.first_token is not None:
                self.prefill.observe(times.first_token - times.first_scheduled)
        if times.first_token is not None:
            self.ttft.observe(times.first_token - times.arrival)
            self.decode.observe(times.finished - times.first_token)
