"""The admin HTTP API: create, list, inspect, change and revoke API keys; a key's usage.

Every route needs `Authorization: Bearer <admin key>` (compared in constant
time). Without an admin key configured, the routes answer 403. Errors are raised
as `APIError` and rendered by the app's one error map
(`tokenmill.server.errors.install_error_handlers`, which the app installs), in
the OpenAI error shape. The routes are plain functions, so FastAPI runs their
database calls in its worker threads, off the event loop.
"""
from __future__ import annotations

import hmac
from datetime import datetime, timezone

from fastapi import APIRouter, Depends, Query, Request
from pydantic import BaseModel, ConfigDict, Field

from tokenmill.gateway.keys import KeyLimits, KeyStore, UnknownKeyError
from tokenmill.gateway.ledger import Ledger
from tokenmill.server.errors import APIError


class LimitsBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    requests_per_minute: int | None = Field(None, gt=0)
    tokens_per_minute: int | None = Field(None, gt=0)
    max_concurrent: int | None = Field(None, gt=0)
    monthly_budget_usd: float | None = Field(None, ge=0, allow_inf_nan=False)
    max_tokens: int | None = Field(None, gt=0)


class CreateKeyBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1, max_length=200)
    allowed_models: list[str] = Field(default_factory=list)
    limits: LimitsBody = Field(default_factory=LimitsBody)
    allow_overflow: bool = True


class UpdateKeyBody(BaseModel):
    """Fields left out stay as they are; a limit set to null is removed."""
    model_config = ConfigDict(extra="forbid")
    limits: LimitsBody | None = None
    allowed_models: list[str] | None = None
    allow_overflow: bool | None = None


def _not_found(key_id: str) -> APIError:
    return APIError(404, f"no API key with id {key_id!r}", "not_found_error", param="key_id", code="key_not_found")


def _admin_guard(admin_key: str | None):
    expected = admin_key.encode() if admin_key else None

    def require_admin(request: Request) -> None:
        if expected is None:
            raise APIError(403, "the admin API is disabled: no admin key is configured for this gateway "
                                "(set the environment variable named by admin_key_env)",
                           "permission_error", code="admin_disabled")
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), expected):
            raise APIError(401, "a valid admin key is required: send 'Authorization: Bearer <admin key>'",
                           "authentication_error", code="invalid_admin_key",
                           headers={"WWW-Authenticate": "Bearer"})

    return require_admin


def build_admin_router(store: KeyStore, ledger: Ledger, admin_key: str | None) -> APIRouter:
    router = APIRouter(prefix="/admin", dependencies=[Depends(_admin_guard(admin_key))], tags=["admin"])

    @router.post("/keys", status_code=201)
    def create_key(body: CreateKeyBody) -> dict:
        try:
            record, secret = store.create(body.name, allowed_models=body.allowed_models,
                                          limits=KeyLimits(**body.limits.model_dump()),
                                          allow_overflow=body.allow_overflow)
        except ValueError as error:
            raise APIError(400, str(error), code="invalid_value") from None
        return {**record.to_dict(), "secret": secret,
                "warning": "store this secret now: it is shown only once and cannot be recovered"}

    @router.get("/keys")
    def list_keys(include_revoked: bool = False) -> dict:
        return {"object": "list", "data": [key.to_dict() for key in store.list(include_revoked=include_revoked)]}

    @router.get("/keys/{key_id}")
    def get_key(key_id: str) -> dict:
        record = store.get(key_id)
        if record is None:
            raise _not_found(key_id)
        return record.to_dict()

    @router.patch("/keys/{key_id}")
    def update_key(key_id: str, body: UpdateKeyBody) -> dict:
        record = store.get(key_id)
        if record is None:
            raise _not_found(key_id)
        limits = record.limits
        if body.limits is not None:
            changes = body.limits.model_dump(include=body.limits.model_fields_set)
            limits = KeyLimits(**{**limits.to_dict(), **changes})
        try:
            updated = store.update_limits(key_id, limits, allowed_models=body.allowed_models,
                                          allow_overflow=body.allow_overflow)
        except UnknownKeyError:
            raise _not_found(key_id) from None
        except ValueError as error:
            raise APIError(400, str(error), code="invalid_value") from None
        return updated.to_dict()

    @router.delete("/keys/{key_id}")
    def revoke_key(key_id: str) -> dict:
        record = store.get(key_id)
        if record is None:
            raise _not_found(key_id)
        store.revoke(key_id)
        return store.get(key_id).to_dict()

    @router.get("/keys/{key_id}/usage")
    def key_usage(key_id: str, since: datetime | None = Query(
            None, description="ISO 8601 time; only requests since then (UTC if no offset is given)")) -> dict:
        if store.get(key_id) is None:
            raise _not_found(key_id)
        if since is not None and since.tzinfo is None:
            since = since.replace(tzinfo=timezone.utc)
        return {"object": "usage", **ledger.usage(key_id=key_id, since=since)}

    return router
