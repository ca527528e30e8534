"""The gateway's FastAPI app: thin routes over `Gateway`, plus health, metrics, usage, feedback, admin.

`build_gateway_app(config)` opens the database (SQLite file or PostgreSQL,
migrated to the current schema), the key store, the ledger and the limiter.
The lifespan starts the ledger writer and the pools' health checks; at
shutdown (uvicorn has stopped accepting and drained the requests in flight,
SIGTERM included) it settles what is left, flushes every ledger row and closes.
"""
from __future__ import annotations

import asyncio
import logging
from contextlib import asynccontextmanager
from datetime import datetime, timedelta, timezone

import orjson
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from tokenmill.gateway.admin import build_admin_router
from tokenmill.gateway.config import GatewayConfig
from tokenmill.gateway.keys import KeyStore
from tokenmill.gateway.ledger import Ledger
from tokenmill.gateway.limits import build_limiter
from tokenmill.gateway.service import Gateway
from tokenmill.gateway.store import open_database
from tokenmill.server.errors import APIError, error_response, install_error_handlers, to_api_error

logger = logging.getLogger("tokenmill.gateway")

MAX_FEEDBACK_COMMENT = 4000


def _parse_since(value: str | None) -> datetime | None:
    """`since` of GET /v1/usage: an ISO 8601 time (UTC if no zone) or a number of days back."""
    if value is None or value == "":
        return None
    try:
        days = float(value)
    except ValueError:
        pass
    else:
        if not days >= 0 or days > 36500:
            raise APIError(400, "since: a number of days must be between 0 and 36500", param="since",
                           code="invalid_value")
        return datetime.now(timezone.utc) - timedelta(days=days)
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        raise APIError(400, f"since: not an ISO 8601 time or a number of days: {value!r}", param="since",
                       code="invalid_value") from None
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=timezone.utc)


def _parse_feedback(raw: bytes) -> tuple[str, int, str | None]:
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise APIError(400, "the request body is not valid JSON", code="invalid_json") from None
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object", code="invalid_value")
    request_id = body.get("request_id")
    if not isinstance(request_id, str) or not request_id or len(request_id) > 200:
        raise APIError(400, "request_id: the x-request-id of the answer being rated is required",
                       param="request_id", code="invalid_value")
    score = body.get("score")
    scores = {"up": 1, "down": -1, 1: 1, -1: -1}
    if isinstance(score, bool) or score not in scores:
        raise APIError(400, "score: must be 1 or 'up' (thumbs up), -1 or 'down' (thumbs down)", param="score",
                       code="invalid_value")
    comment = body.get("comment")
    if comment is not None and (not isinstance(comment, str) or len(comment) > MAX_FEEDBACK_COMMENT):
        raise APIError(400, f"comment: must be a string of at most {MAX_FEEDBACK_COMMENT} characters",
                       param="comment", code="invalid_value")
    return request_id, scores[score], comment


_PROXIED_PATHS = {"/v1/chat/completions": "chat", "/v1/completions": "completions"}


class _ProxiedRoutes:
    """POST /v1/chat/completions and /v1/completions straight to `Gateway.handle`.

    An ASGI middleware inside FastAPI's outermost ones (the 500 handler, the body
    size limit), ahead of its exception middleware, exit stack and router: their
    per-request and per-chunk layers were about a tenth of the gateway's CPU per
    streamed request. Errors map as the app's handlers would map them."""

    def __init__(self, app, gateway: Gateway) -> None:
        self.app = app
        self.gateway = gateway

    async def __call__(self, scope, receive, send) -> None:
        kind = _PROXIED_PATHS.get(scope["path"]) if scope["type"] == "http" else None
        if kind is None or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        try:
            response = await self.gateway.handle(kind, Request(scope, receive))
        except (APIError, ValueError) as error:
            response = error_response(to_api_error(error))
        await response(scope, receive, send)


def build_gateway_app(config: GatewayConfig) -> FastAPI:
    database = open_database(config.database_url)
    store = KeyStore(database)
    ledger = Ledger(database)
    limiter = build_limiter(config.redis_url, window_s=config.limiter_window_s, key_prefix=config.redis_key_prefix,
                            spend_source=ledger.month_to_date_spend)
    gateway = Gateway(config, store, ledger, limiter)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        ledger.start()
        await gateway.start()
        try:
            yield
        finally:
            await gateway.close()
            await limiter.close()
            await asyncio.to_thread(ledger.close)  # writes every queued row (raises if it cannot)
            database.close()

    app = FastAPI(title="tokenmill gateway", version="0.1.0", lifespan=lifespan,
                  description="OpenAI-compatible gateway in front of tokenmill replicas and external APIs.")
    app.state.gateway = gateway
    install_error_handlers(app)

    # POSTs to the two proxied routes are answered by `_ProxiedRoutes` before routing (the body is
    # the upstream's business); the routes stay for the router's answers to other methods (405).
    app.add_middleware(_ProxiedRoutes, gateway=gateway)

    async def chat_completions(raw: Request):
        return await gateway.handle("chat", raw)

    async def completions(raw: Request):
        return await gateway.handle("completions", raw)

    app.add_route("/v1/chat/completions", chat_completions, methods=["POST"])
    app.add_route("/v1/completions", completions, methods=["POST"])

    @app.get("/v1/models")
    async def list_models(raw: Request):
        key = await gateway.authenticate(raw)
        return {"object": "list", "data": [
            {"id": alias, "object": "model", "created": 0, "owned_by": "tokenmill-gateway"}
            for alias in config.aliases if key.allows_model(alias)]}

    @app.get("/v1/usage")
    async def usage(raw: Request):
        key = await gateway.authenticate(raw)
        since = _parse_since(raw.query_params.get("since"))
        return await asyncio.to_thread(ledger.usage, key.key_id, since)

    @app.post("/v1/feedback")
    async def feedback(raw: Request):
        key = await gateway.authenticate(raw)
        request_id, score, comment = _parse_feedback(await raw.body())
        ledger.record_feedback(request_id, key.key_id, score, comment)
        gateway.metrics.feedback.labels("up" if score > 0 else "down").inc()
        return {"object": "feedback", "request_id": request_id, "score": score, "recorded": True}

    @app.get("/health")
    async def health():
        pools = {name: {"tier": pool.tier, "healthy_upstreams": pool.num_healthy(),
                        "upstreams": len(pool.upstreams), "queued": gateway.queues[name].num_queued}
                 for name, pool in gateway.pools.items()}
        status = "draining" if gateway.draining else "ok"
        return JSONResponse({"status": status, "pools": pools}, status_code=503 if gateway.draining else 200)

    @app.get("/metrics")
    async def metrics():
        return Response(generate_latest(gateway.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    admin_key = config.admin_key()
    if admin_key is not None:
        app.include_router(build_admin_router(store, ledger, admin_key))
    elif config.admin_key_env is not None:
        logger.warning("$%s is not set: the admin API (/admin/keys) is off", config.admin_key_env)
    return app
