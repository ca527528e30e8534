"""`Gateway`: one request's path from the key to the ledger row (docs/gateway.md, The path of a request).

auth (cached key) -> validate body -> route (alias, `auto` score) -> allowed
model -> cap max_tokens -> reserve tokens (limiter) -> admission queue (or
overflow) -> proxy -> on completion: release the slot, settle the reservation
(background task), metrics, ledger row (queued, written in batches off the
request path). Every request that passed authentication gets exactly one ledger
row, whatever its status; failures are answered in the OpenAI error shape with
the request's `x-request-id`.

Cost attribution (`Gateway.cost_of`): an API pool costs
`prompt_tokens × price_per_1m_input / 1e6 + completion_tokens × price_per_1m_output / 1e6`;
a self-hosted pool costs `gpu_hourly_usd / 3600` per busy second of the
replica, each busy second split equally among the requests this gateway had in
flight on it during that second (so a replica's cost is fully attributed
whenever it serves at least one request, and idle time is charged to no one).
"""
from __future__ import annotations

import asyncio
import logging
import math
import time
import uuid
from datetime import datetime, timezone

import httpx
from starlette.requests import Request
from starlette.responses import Response

from tokenmill.gateway.admission import AdmissionQueue, Overflow, Ticket
from tokenmill.gateway.config import GatewayConfig
from tokenmill.gateway.ledger import UsageRecord
from tokenmill.gateway.limits import LimiterUnavailableError, Rejection, Reservation
from tokenmill.gateway.metrics import GatewayMetrics
from tokenmill.gateway.proxy import (DisconnectWatcher, Outcome, Proxy, ProxyRequest, RelayResponse, check_format,
                                    parse_request)
from tokenmill.gateway.routing import RouteDecision, Router, estimate_tokens
from tokenmill.gateway.upstream_http import tls_context
from tokenmill.gateway.upstreams import UpstreamPool, affinity_digest
from tokenmill.server.errors import APIError, error_response

logger = logging.getLogger("tokenmill.gateway")

CLIENT_CLOSED = 499  # the client left before its answer (nginx's convention); recorded, never sent


def bearer_token(request: Request) -> str:
    header = request.headers.get("authorization", "")
    return header[7:].strip() if header[:7].lower() == "bearer " else ""


class _Flight:
    """The state of one request in flight; `finish()` does its bookkeeping exactly once."""

    __slots__ = ("gateway", "request_id", "arrival", "key", "request", "decision", "pool", "reservation",
                 "ticket", "overflow", "finished")

    def __init__(self, gateway: Gateway, request_id: str, arrival: float, key) -> None:
        self.gateway = gateway
        self.request_id = request_id
        self.arrival = arrival
        self.key = key
        self.request: ProxyRequest | None = None
        self.decision: RouteDecision | None = None
        self.pool: UpstreamPool | None = None
        self.reservation: Reservation | None = None
        self.ticket: Ticket | None = None
        self.overflow: Overflow | None = None
        self.finished = False

    def finish(self, outcome: Outcome | None = None, status: int | None = None, error: str | None = None) -> None:
        if self.finished:
            return
        self.finished = True
        self.gateway._finish(self, outcome or Outcome(status_code=status or 0, error=error))


class Gateway:
    """The gateway's shared state and request path. Event-loop only, except the
    store, ledger and limiter, which are safe to call from it as documented."""

    def __init__(self, config: GatewayConfig, store, ledger, limiter) -> None:
        self.config = config
        self.store = store
        self.ledger = ledger
        self.limiter = limiter
        self.router = Router(config)
        api_keys = config.upstream_api_keys()
        self.pools = {name: UpstreamPool(name, pool, {index: api_keys[(name, index)]
                                                      for index in range(len(pool.upstreams))})
                      for name, pool in config.pools.items()}
        self.queues = {name: AdmissionQueue(pool) for name, pool in self.pools.items()}
        self.metrics = GatewayMetrics()
        self.metrics.attach(self)
        for name, queue in self.queues.items():
            histogram = self.metrics.queue_wait.labels(name)
            queue.on_grant = histogram.observe
        self.proxy = Proxy()
        self.draining = False
        self._background: set[asyncio.Task] = set()
        self._health_client: httpx.AsyncClient | None = None

    # ---- lifecycle -----------------------------------------------------------------------
    async def start(self) -> None:
        # Straight to the upstreams and with the same TLS trust as the proxy's own connections.
        self._health_client = httpx.AsyncClient(limits=httpx.Limits(max_connections=64), trust_env=False,
                                                verify=tls_context())
        for pool in self.pools.values():
            pool.bind(self._health_client)
        try:  # one round of checks first, so that upstreams already down are known before traffic
            async with asyncio.timeout(max(p.health.timeout_s for p in self.config.pools.values()) + 1):
                await asyncio.gather(*(pool.check_now() for pool in self.pools.values()))
        except TimeoutError:
            pass
        for pool in self.pools.values():
            pool.start(self._health_client)

    async def close(self) -> None:
        """After the server has drained: settle what is left, stop the health tasks, close clients."""
        self.draining = True
        while self._background:
            await asyncio.gather(*list(self._background), return_exceptions=True)
        for pool in self.pools.values():
            await pool.close()
        await self.proxy.aclose()
        if self._health_client is not None:
            await self._health_client.aclose()

    def _spawn(self, coroutine) -> None:
        task = asyncio.get_running_loop().create_task(coroutine)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # ---- auth ----------------------------------------------------------------------------
    async def authenticate(self, raw: Request):
        secret = bearer_token(raw)
        if not secret:
            raise APIError(401, "missing API key: send 'Authorization: Bearer <key>'", "authentication_error",
                           code="missing_api_key")
        try:
            key = await self.store.authenticate_async(secret)
        except Exception as error:  # the database behind a cache miss is down: not the client's fault
            logger.error("cannot check an API key: %s", error)
            raise APIError(503, "the gateway cannot check API keys right now; retry shortly", "service_unavailable",
                           code="key_store_unavailable", headers={"Retry-After": "2"}) from None
        if key is None:
            raise APIError(401, "invalid API key (unknown, revoked or mistyped)", "authentication_error",
                           code="invalid_api_key")
        return key

    # ---- the request path -----------------------------------------------------------------
    async def handle(self, kind: str, raw: Request) -> Response:
        arrival = time.monotonic()
        request_id = uuid.uuid4().hex
        try:
            key = await self.authenticate(raw)
        except APIError as error:
            error.headers = {**error.headers, "x-request-id": request_id}
            raise
        flight = _Flight(self, request_id, arrival, key)
        body = await raw.body()
        watcher = DisconnectWatcher(raw.receive)
        relayed = False
        try:
            response = await self._serve(flight, kind, body, raw, watcher)
            relayed = isinstance(response, RelayResponse)  # it takes the watcher over
            return response
        except APIError as error:
            flight.finish(status=error.status, error=error.message)
            error.headers = {**error.headers, "x-request-id": request_id}
            return error_response(error)
        except Exception as error:  # a bug: release what the request holds, then the error map answers 500
            flight.finish(status=500, error=f"internal error: {type(error).__name__}")
            raise
        except asyncio.CancelledError:
            if not watcher.gone:
                flight.finish(status=CLIENT_CLOSED, error="the gateway stopped before the request was answered")
                raise
            asyncio.current_task().uncancel()
            flight.finish(status=CLIENT_CLOSED, error="the client disconnected")
            return Response(status_code=CLIENT_CLOSED)
        finally:
            if not relayed:
                watcher.stop()

    async def _serve(self, flight: _Flight, kind: str, body: bytes, raw: Request,
                     watcher: DisconnectWatcher) -> Response:
        if self.draining:
            raise APIError(503, "the gateway is shutting down; retry on another instance", "service_unavailable",
                           code="shutting_down", headers={"Retry-After": "1"})
        if not self.ledger.has_capacity():
            raise APIError(503, "the gateway's usage ledger is behind; retry shortly", "service_unavailable",
                           code="ledger_backlog", headers={"Retry-After": "2"})
        request = flight.request = parse_request(kind, body)
        key = flight.key
        prompt_tokens = estimate_tokens(request.prompt_text)
        decision = flight.decision = self.router.resolve(request.model, request.prompt_text, prompt_tokens,
                                                         request.requested_max_tokens or 0, raw.headers)
        if decision.score is not None:
            self.metrics.route_decisions.labels(decision.route, str(decision.forced).lower()).inc()
            self.metrics.route_score.observe(decision.score)
        if not key.allows_model(request.model):
            raise APIError(403, f"this API key may not use the model {request.model!r}", "permission_error",
                           param="model", code="model_not_allowed")
        model = self.config.models[decision.alias]
        pool = flight.pool = self.pools[model.pool]
        max_tokens = self._max_tokens(request, pool, key)
        reservation = await self._reserve(flight, prompt_tokens + request.n * max_tokens)
        may_overflow = bool(key.allow_overflow and model.overflow is not None)
        admitted = await self.queues[pool.name].admit(key.key_id, may_overflow)
        if isinstance(admitted, Overflow):
            target = self.pools[model.overflow]
            self.metrics.overflows.labels(pool.name, target.name, admitted.reason).inc()
            flight.overflow = admitted
            pool = flight.pool = target
            max_tokens = self._max_tokens(request, pool, key)
            admitted = await self.queues[pool.name].admit(key.key_id, False)
        flight.ticket = admitted
        headers = {"x-tokenmill-route": decision.route, "x-tokenmill-pool": pool.name,
                   "x-tokenmill-tier": pool.tier, **self.limiter.headers(reservation)}
        if decision.score is not None:
            headers["x-tokenmill-route-score"] = f"{decision.score:g}"
        if flight.overflow is not None:
            headers["x-tokenmill-overflow"] = flight.overflow.reason
        digest = None
        prefix_chars = pool.config.affinity.prefix_chars
        if prefix_chars and len(pool.upstreams) > 1:
            digest = affinity_digest(request.prompt_text[:prefix_chars])
        return await self.proxy.forward(request, pool, max_tokens, digest, flight.request_id, headers, watcher,
                                        flight.finish, flight.arrival)

    @staticmethod
    def _max_tokens(request: ProxyRequest, pool: UpstreamPool, key) -> int:
        cap = pool.config.max_tokens
        if key.limits.max_tokens is not None:
            cap = min(cap, key.limits.max_tokens)
        return min(request.requested_max_tokens or cap, cap)

    async def _reserve(self, flight: _Flight, tokens: int) -> Reservation:
        try:
            result = await self.limiter.acquire(flight.key, flight.request_id, tokens)
        except LimiterUnavailableError as error:
            self.metrics.rejections.labels("limiter_unavailable").inc()
            logger.error("rate limiter unavailable: %s", error)
            raise APIError(503, "the gateway cannot check rate limits right now; retry shortly",
                           "service_unavailable", code="limiter_unavailable", headers={"Retry-After": "1"}) from None
        if isinstance(result, Rejection):
            self.metrics.rejections.labels(result.reason).inc()
            if result.reason == "monthly_budget":
                raise APIError(402, result.message, "insufficient_quota", code="budget_exceeded",
                               headers=result.headers)
            raise APIError(429, result.message, "rate_limit_error", code=result.reason, headers=result.headers)
        flight.reservation = result
        return result

    # ---- completion ------------------------------------------------------------------------
    def cost_of(self, pool: UpstreamPool | None, prompt_tokens: int, completion_tokens: int,
                busy_share_s: float) -> float:
        if pool is None:
            return 0.0
        cost = pool.config.cost
        return (prompt_tokens * cost.price_per_1m_input + completion_tokens * cost.price_per_1m_output) / 1e6 \
            + cost.gpu_hourly_usd / 3600.0 * busy_share_s

    def _finish(self, flight: _Flight, outcome: Outcome) -> None:
        now = time.monotonic()
        latency = now - flight.arrival
        if flight.ticket is not None:
            granted = flight.ticket
            granted.release()
            if outcome.upstream is not None or outcome.attempts:
                flight.pool.observe_completion(now - granted.granted_at)
        request, pool, decision = flight.request, flight.pool, flight.decision
        answered = outcome.upstream is not None
        prompt_tokens = outcome.prompt_tokens
        if prompt_tokens is None:
            prompt_tokens = estimate_tokens(request.prompt_text) if answered and request is not None else 0
        completion_tokens = outcome.completion_tokens
        if completion_tokens is None:
            completion_tokens = outcome.content_chunks
        cost = self.cost_of(pool if answered or outcome.attempts else None, prompt_tokens, completion_tokens,
                            outcome.busy_share_s)
        status = outcome.status_code or CLIENT_CLOSED
        if outcome.client_gone:
            status = CLIENT_CLOSED
        format_checked = bool(request is not None and request.format_type is not None and status == 200
                              and outcome.error is None)
        format_ok = None
        if format_checked:
            format_ok, problem = check_format(request, "".join(outcome.texts))
            self.metrics.observe_format(pool.config.model, format_ok, problem)
        route = decision.route if decision is not None else (request.model if request is not None else "")
        if flight.overflow is not None:
            route += ":overflow"
        pool_name = pool.name if pool is not None else ""
        upstream = outcome.upstream.label if outcome.upstream is not None else ""
        metrics = self.metrics
        metrics.count_request(route, pool_name, upstream, status)
        children = metrics.route_children(route, pool_name)
        children.latency.observe(latency)
        if outcome.ttft_s is not None:
            children.ttft.observe(outcome.ttft_s)
        if answered:
            children.prompt_tokens.inc(prompt_tokens)
            children.completion_tokens.inc(completion_tokens)
            if cost:
                children.cost.inc(cost)
            if status == 200 and outcome.error_code is not None:
                metrics.stream_errors.labels(pool_name, outcome.error_code).inc()
        if flight.reservation is not None:
            self._spawn(self._settle(flight.reservation, prompt_tokens + completion_tokens, cost))
        error = outcome.error
        try:
            self.ledger.record(UsageRecord(
                request_id=flight.request_id, key_id=flight.key.key_id,
                model=request.model if request is not None else "", route=route,
                upstream=f"{pool_name}/{upstream}" if upstream else pool_name, tier=pool.tier if pool else "",
                status_code=status, prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                ttft_s=outcome.ttft_s, latency_s=latency, cost_usd=cost, format_checked=format_checked,
                format_ok=format_ok, error=error[:500] if error else None, created_at=datetime.now(timezone.utc)))
        except (ValueError, RuntimeError) as problem:  # the answer has gone out; say loudly what was not kept
            logger.error("usage row of request %s not recorded (%s): key %s, route %s, status %s, tokens %s+%s, "
                         "cost %.6f", flight.request_id, problem, flight.key.key_id, route, status, prompt_tokens,
                         completion_tokens, cost)

    async def _settle(self, reservation: Reservation, tokens: int, cost: float) -> None:
        try:
            await self.limiter.settle(reservation, max(0, int(tokens)), max(0.0, float(cost)) if math.isfinite(cost)
                                      else 0.0)
        except Exception as error:  # the lease expires by itself; the request is already answered
            logger.error("could not settle the reservation of request %s: %s", reservation.request_id, error)
