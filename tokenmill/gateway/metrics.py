"""`tokenmill_gateway_*` Prometheus metrics (table in docs/gateway.md, Metrics).

Per-request counters and histograms are observed once, when a request ends
(`GatewayMetrics.observe_request`); pool and upstream gauges (queue depth,
health, in-flight) are read from the live objects at scrape time, so the
request path never updates a gauge.
"""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 7.5, 10.0, 20.0,
                    40.0, 80.0, 160.0, 320.0)
_WAIT_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 3.0, 5.0, 10.0, 20.0, 40.0, 80.0)
_SCORE_BUCKETS = (0.1, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 2.0, 3.0, 5.0)


class _LiveCollector:
    """Gauges read from the pools and queues at scrape time."""

    def __init__(self, state) -> None:
        self._state = state

    def collect(self):
        depth = GaugeMetricFamily("tokenmill_gateway_queue_depth",
                                  "Requests waiting in the pool's admission queue (the autoscaling signal).",
                                  labels=["pool"])
        in_flight = GaugeMetricFamily("tokenmill_gateway_pool_in_flight", "Requests holding a slot of the pool.",
                                      labels=["pool"])
        capacity = GaugeMetricFamily("tokenmill_gateway_pool_capacity",
                                     "Slots of the pool's admitted upstreams.", labels=["pool"])
        predicted = GaugeMetricFamily("tokenmill_gateway_predicted_wait_seconds",
                                      "Predicted wait of a request arriving now (inf: no admitted upstream).",
                                      labels=["pool"])
        healthy = GaugeMetricFamily("tokenmill_gateway_upstream_healthy",
                                    "1 if the upstream is admitted, 0 while ejected.", labels=["pool", "upstream"])
        outstanding = GaugeMetricFamily("tokenmill_gateway_upstream_outstanding",
                                        "Requests this gateway has in flight on the upstream.",
                                        labels=["pool", "upstream"])
        scraped = GaugeMetricFamily("tokenmill_gateway_upstream_waiting",
                                    "Requests waiting inside the upstream, by its last /metrics scrape.",
                                    labels=["pool", "upstream"])
        ejections = CounterMetricFamily("tokenmill_gateway_upstream_ejections",
                                        "Times the upstream was ejected.", labels=["pool", "upstream"])
        retries = CounterMetricFamily("tokenmill_gateway_retries",
                                      "Attempts on another upstream after a failure before the first byte.",
                                      labels=["pool"])
        for name, queue in self._state.queues.items():
            pool = queue.pool
            depth.add_metric([name], queue.num_queued)
            in_flight.add_metric([name], queue.num_granted)
            capacity.add_metric([name], pool.capacity())
            predicted.add_metric([name], queue.predicted_wait(""))
            retries.add_metric([name], pool.num_retries)
            for upstream in pool.upstreams:
                labels = [name, upstream.label]
                healthy.add_metric(labels, 1.0 if upstream.healthy else 0.0)
                outstanding.add_metric(labels, upstream.outstanding)
                scraped.add_metric(labels, upstream.scraped_waiting)
                ejections.add_metric(labels, upstream.num_ejections)
        compliance = GaugeMetricFamily("tokenmill_gateway_format_compliance_ratio",
                                       "Share of checked responses that followed their response_format.",
                                       labels=["model"])
        for model, (ok, total) in sorted(self._state.metrics.format_tallies.items()):
            if total:
                compliance.add_metric([model], ok / total)
        yield from (depth, in_flight, capacity, predicted, healthy, outstanding, scraped, ejections, retries,
                    compliance)


class _RouteChildren:
    """The labelled children one (route, pool) observes when a request ends, looked up once."""

    __slots__ = ("latency", "ttft", "prompt_tokens", "completion_tokens", "cost")

    def __init__(self, metrics: GatewayMetrics, route: str, pool: str) -> None:
        self.latency = metrics.latency.labels(route, pool)
        self.ttft = metrics.ttft.labels(route, pool)
        self.prompt_tokens = metrics.tokens.labels(route, pool, "prompt")
        self.completion_tokens = metrics.tokens.labels(route, pool, "completion")
        self.cost = metrics.cost.labels(route, pool)


class GatewayMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        registry = self.registry
        self.requests = Counter("tokenmill_gateway_requests", "Requests answered, by route, pool, upstream, status.",
                                ["route", "pool", "upstream", "status"], registry=registry)
        self.latency = Histogram("tokenmill_gateway_request_latency_seconds",
                                 "Arrival at the gateway to the end of the response.", ["route", "pool"],
                                 buckets=_LATENCY_BUCKETS, registry=registry)
        self.ttft = Histogram("tokenmill_gateway_time_to_first_token_seconds",
                              "Arrival at the gateway to the first content token sent (streams).",
                              ["route", "pool"], buckets=_LATENCY_BUCKETS, registry=registry)
        self.queue_wait = Histogram("tokenmill_gateway_queue_wait_seconds",
                                    "Time a request waited for a slot of its pool.", ["pool"],
                                    buckets=_WAIT_BUCKETS, registry=registry)
        self.overflows = Counter("tokenmill_gateway_overflows", "Requests sent to their overflow pool, and why.",
                                 ["pool", "to_pool", "reason"], registry=registry)
        self.rejections = Counter("tokenmill_gateway_rejections",
                                  "Requests refused before reaching an upstream, by reason "
                                  "(rate limits, budget, queue full, ...).", ["reason"], registry=registry)
        self.tokens = Counter("tokenmill_gateway_tokens", "Tokens of answered requests.", ["route", "pool", "kind"],
                              registry=registry)
        self.cost = Counter("tokenmill_gateway_cost_usd", "Attributed cost of answered requests in USD.",
                            ["route", "pool"], registry=registry)
        self.stream_errors = Counter("tokenmill_gateway_stream_errors",
                                     "Streams ended with an error event after their first byte.", ["pool", "code"],
                                     registry=registry)
        self.route_decisions = Counter("tokenmill_gateway_route_decisions",
                                       "Choices of the auto router.", ["route", "forced"], registry=registry)
        self.route_score = Histogram("tokenmill_gateway_route_score", "Scores computed by the auto router.",
                                     buckets=_SCORE_BUCKETS, registry=registry)
        self.format_checks = Counter("tokenmill_gateway_format_checks",
                                     "Responses checked against their response_format, by result.",
                                     ["model", "result"], registry=registry)
        self.feedback = Counter("tokenmill_gateway_feedback", "Feedback received, by score.", ["score"],
                                registry=registry)
        self.format_tallies: dict[str, tuple[int, int]] = {}
        # `labels()` validates and locks on every call; a request's end reuses the children instead.
        self._route_children: dict[tuple[str, str], _RouteChildren] = {}
        self._request_counters: dict[tuple[str, str, str, int], object] = {}

    def route_children(self, route: str, pool: str) -> _RouteChildren:
        children = self._route_children.get((route, pool))
        if children is None:
            children = self._route_children[(route, pool)] = _RouteChildren(self, route, pool)
        return children

    def count_request(self, route: str, pool: str, upstream: str, status: int) -> None:
        key = (route, pool, upstream, status)
        counter = self._request_counters.get(key)
        if counter is None:
            counter = self._request_counters[key] = self.requests.labels(route, pool, upstream, str(status))
        counter.inc()

    def attach(self, state) -> None:
        """Export the live pool and queue gauges of `state` (has `.queues`, `.metrics`)."""
        self.registry.register(_LiveCollector(state))

    def observe_format(self, model: str, ok: bool, problem: str | None) -> None:
        self.format_checks.labels(model, "ok" if ok else problem or "invalid").inc()
        passed, total = self.format_tallies.get(model, (0, 0))
        self.format_tallies[model] = (passed + int(ok), total + 1)
