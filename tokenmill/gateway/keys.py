"""API keys: creation, constant-time authentication with a short cache, revocation, limits.

A secret looks like `tm-<key_id>-<random>`: `key_id` is 12 hex characters (the
row's primary key, so a lookup is one indexed read) and `<random>` is 32 bytes
from `secrets` (256 bits), URL-safe base64. Only `HMAC-SHA256(salt, secret)`
and a per-key random salt are stored. A fast keyed hash is the right tool here:
slow password hashes (bcrypt, scrypt, argon2) exist to make guessing
low-entropy human passwords expensive, but guessing a 256-bit random value is
infeasible at any hash speed, while a slow hash would cost milliseconds of CPU on
every cache miss of the request path. Hashes are compared with
`hmac.compare_digest`. Secrets are never logged and appear in no repr.

`KeyStore.authenticate` caches each key's row (with its hash, never the secret)
for `cache_ttl_s` seconds (default 5), so the database is read at most once per
key per TTL; the HMAC is checked on every call. A revocation in the same process
evicts the entry at once; other gateway processes see it within the TTL.
Unknown key ids are cached as misses for the same TTL, so a flood of made-up
keys does not reach the database either. If the database cannot be read when an
entry has expired, the entry keeps answering for up to `stale_if_error_s`
(default 5 minutes, logged); past that, or for a key never seen,
`authenticate` raises `KeyStoreUnavailableError`.

Contract: `KeyStore` methods are thread-safe and block on the database (except
cache hits); in an asyncio app use `authenticate_async`, which answers cache hits
inline and reads the database in a worker thread. Bad arguments raise
`ValueError`; an unknown key id for `update_limits` raises `UnknownKeyError`.
"""
from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import math
import re
import secrets
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field, fields
from datetime import datetime
from fnmatch import fnmatchcase

from sqlalchemy import insert, select, update
from sqlalchemy.exc import SQLAlchemyError

from tokenmill.gateway.store import Database, api_keys, one_line, utcnow

logger = logging.getLogger(__name__)

SECRET_PREFIX = "tm"
_KEY_ID_HEX_CHARS = 12
_RANDOM_BYTES = 32
_SALT_BYTES = 16
# How much of the random part the shown prefix reveals (24 of 256 bits).
_SHOWN_RANDOM_CHARS = 4
_SECRET_PATTERN = re.compile(rf"^{SECRET_PREFIX}-([0-9a-f]{{{_KEY_ID_HEX_CHARS}}})-([A-Za-z0-9_-]{{43}})$")
MAX_NAME_LENGTH = 200


class UnknownKeyError(LookupError):
    """No key has this id."""


class KeyStoreUnavailableError(RuntimeError):
    """The key database cannot be read and no recent cache entry can stand in (answer 503)."""


def _positive_int_or_none(name: str, value) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer or unset, got {value!r}")


@dataclass(frozen=True)
class KeyLimits:
    """Per-key limits; None means unlimited. Semantics: docs/gateway.md, Limits."""
    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None     # prompt + completion tokens, reserved at admission
    max_concurrent: int | None = None
    monthly_budget_usd: float | None = None
    max_tokens: int | None = None            # cap on a request's max_tokens for this key

    def __post_init__(self) -> None:
        for name in ("requests_per_minute", "tokens_per_minute", "max_concurrent", "max_tokens"):
            _positive_int_or_none(name, getattr(self, name))
        budget = self.monthly_budget_usd
        if budget is not None:
            if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not math.isfinite(budget) \
                    or budget < 0:
                raise ValueError(f"monthly_budget_usd must be a non-negative number of USD or unset, got {budget!r}")
            object.__setattr__(self, "monthly_budget_usd", float(budget))

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_dict(cls, values: dict) -> KeyLimits:
        unknown = set(values) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"unknown limit(s): {', '.join(sorted(unknown))}")
        return cls(**values)


@dataclass(frozen=True)
class ApiKey:
    """A key's record. Holds no secret and no hash: safe to log and to show."""
    key_id: str
    name: str
    prefix: str                       # the first characters of the secret, safe to show
    allowed_models: tuple[str, ...]   # empty = every model/alias; entries may use * and ? wildcards
    limits: KeyLimits
    allow_overflow: bool              # may this key's requests overflow to the external tier
    created_at: datetime
    revoked_at: datetime | None = None

    @property
    def revoked(self) -> bool:
        return self.revoked_at is not None

    def allows_model(self, model: str) -> bool:
        if not self.allowed_models:
            return True
        return any(model == allowed or fnmatchcase(model, allowed) for allowed in self.allowed_models)

    def to_dict(self) -> dict:
        """JSON-ready form (admin API, `tokenmill keys --json`)."""
        return {"id": self.key_id, "object": "api_key", "name": self.name, "prefix": self.prefix,
                "allowed_models": list(self.allowed_models), "limits": self.limits.to_dict(),
                "allow_overflow": self.allow_overflow, "created_at": self.created_at.isoformat(),
                "revoked_at": self.revoked_at.isoformat() if self.revoked_at else None}


@dataclass(frozen=True)
class _StoredKey:
    record: ApiKey
    salt: bytes = field(repr=False)
    secret_hash: bytes = field(repr=False)


def _hash_secret(salt: bytes, secret: str) -> bytes:
    return hmac.new(salt, secret.encode("ascii"), hashlib.sha256).digest()


def _normalize_models(allowed_models) -> tuple[str, ...]:
    if allowed_models is None:
        return ()
    if isinstance(allowed_models, str):
        allowed_models = (allowed_models,)
    models: list[str] = []
    for model in allowed_models:
        if not isinstance(model, str) or not model.strip():
            raise ValueError(f"allowed model names must be non-empty strings, got {model!r}")
        if model.strip() not in models:
            models.append(model.strip())
    return tuple(models)


def _check_name(name) -> str:
    if not isinstance(name, str) or not name.strip():
        raise ValueError("a key needs a non-empty name")
    if len(name) > MAX_NAME_LENGTH:
        raise ValueError(f"key name is longer than {MAX_NAME_LENGTH} characters")
    return name.strip()


def parse_secret(secret: str) -> str | None:
    """The key id embedded in a well-formed secret, else None."""
    if not isinstance(secret, str):
        return None
    match = _SECRET_PATTERN.match(secret)
    return match.group(1) if match else None


class KeyStore:
    """API keys in the gateway database; see the module docstring for the contract."""

    def __init__(self, database: Database, cache_ttl_s: float = 5.0, cache_size: int = 10_000,
                 stale_if_error_s: float = 300.0, clock=time.monotonic) -> None:
        if cache_ttl_s < 0:
            raise ValueError("cache_ttl_s must be >= 0")
        self._stale_if_error_s = stale_if_error_s
        self._database = database
        self._cache_ttl_s = cache_ttl_s
        self._cache_size = cache_size
        self._clock = clock
        # key_id -> (fetched_at, _StoredKey | None for an unknown id)
        self._cache: OrderedDict[str, tuple[float, _StoredKey | None]] = OrderedDict()
        self._lock = threading.Lock()
        # (event loop, key_id) -> the database read in flight for it (`authenticate_async`)
        self._loading: dict[tuple[int, str], asyncio.Future] = {}

    def __repr__(self) -> str:
        return f"KeyStore({self._database!r})"

    # -- writes -------------------------------------------------------------

    def create(self, name: str, allowed_models=(), limits: KeyLimits = KeyLimits(),
               allow_overflow: bool = True) -> tuple[ApiKey, str]:
        """A new key and its secret. The secret is returned here once and stored nowhere."""
        name = _check_name(name)
        models = _normalize_models(allowed_models)
        if not isinstance(limits, KeyLimits):
            raise ValueError("limits must be a KeyLimits")
        if not isinstance(allow_overflow, bool):
            raise ValueError("allow_overflow must be true or false")
        key_id = secrets.token_hex(_KEY_ID_HEX_CHARS // 2)
        secret = f"{SECRET_PREFIX}-{key_id}-{secrets.token_urlsafe(_RANDOM_BYTES)}"
        salt = secrets.token_bytes(_SALT_BYTES)
        prefix = secret[:len(SECRET_PREFIX) + 1 + _KEY_ID_HEX_CHARS + 1 + _SHOWN_RANDOM_CHARS]
        record = ApiKey(key_id=key_id, name=name, prefix=prefix, allowed_models=models, limits=limits,
                        allow_overflow=allow_overflow, created_at=utcnow(), revoked_at=None)
        with self._database.write() as connection:
            connection.execute(insert(api_keys).values(
                key_id=key_id, name=name, prefix=prefix, salt=salt.hex(),
                secret_hash=_hash_secret(salt, secret).hex(), allowed_models=json.dumps(list(models)),
                allow_overflow=allow_overflow, created_at=record.created_at, revoked_at=None, **limits.to_dict()))
        self._evict(key_id)
        return record, secret

    def revoke(self, key_id: str) -> bool:
        """Revoke a key: True if it was active, False if unknown or already revoked. Immediate in this process."""
        with self._database.write() as connection:
            result = connection.execute(update(api_keys)
                                        .where(api_keys.c.key_id == key_id, api_keys.c.revoked_at.is_(None))
                                        .values(revoked_at=utcnow()))
        self._evict(key_id)
        return result.rowcount == 1

    def update_limits(self, key_id: str, limits: KeyLimits, allowed_models=None,
                      allow_overflow: bool | None = None) -> ApiKey:
        """Replace a key's limits (and, when given, its allowed models and overflow permission)."""
        if not isinstance(limits, KeyLimits):
            raise ValueError("limits must be a KeyLimits")
        values = dict(limits.to_dict())
        if allowed_models is not None:
            values["allowed_models"] = json.dumps(list(_normalize_models(allowed_models)))
        if allow_overflow is not None:
            if not isinstance(allow_overflow, bool):
                raise ValueError("allow_overflow must be true or false")
            values["allow_overflow"] = allow_overflow
        with self._database.write() as connection:
            result = connection.execute(update(api_keys).where(api_keys.c.key_id == key_id).values(**values))
            if result.rowcount != 1:
                raise UnknownKeyError(f"no API key with id {key_id!r}")
            row = connection.execute(select(api_keys).where(api_keys.c.key_id == key_id)).one()
        self._evict(key_id)
        return _stored(row).record

    # -- reads --------------------------------------------------------------

    def get(self, key_id: str) -> ApiKey | None:
        """A key's record (revoked ones too), read from the database."""
        stored = self._load(key_id)
        return stored.record if stored else None

    def list(self, include_revoked: bool = False) -> list[ApiKey]:
        query = select(api_keys).order_by(api_keys.c.created_at, api_keys.c.key_id)
        if not include_revoked:
            query = query.where(api_keys.c.revoked_at.is_(None))
        with self._database.read() as connection:
            return [_stored(row).record for row in connection.execute(query)]

    def authenticate(self, secret: str) -> ApiKey | None:
        """The active key this secret belongs to; None if malformed, unknown, wrong or revoked."""
        key_id = parse_secret(secret)
        if key_id is None:
            return None
        found, stored = self._cached(key_id)
        if not found:
            stored = self._load_into_cache(key_id)
        return _verify(stored, secret)

    async def authenticate_async(self, secret: str) -> ApiKey | None:
        """`authenticate` for the event loop: cache hits inline, database reads in a worker thread.

        Requests of a key that arrive while its entry is being read wait for that one
        read: when the entry of a busy key expires, the database sees one query, not one
        per request in flight (each a worker thread, queued behind the others)."""
        key_id = parse_secret(secret)
        if key_id is None:
            return None
        found, stored = self._cached(key_id)
        if not found:
            loop = asyncio.get_running_loop()
            slot = (id(loop), key_id)
            loading = self._loading.get(slot)
            if loading is None:
                loading = self._loading[slot] = asyncio.ensure_future(
                    asyncio.to_thread(self._load_into_cache, key_id))
                loading.add_done_callback(lambda _: self._loading.pop(slot, None))
            stored = await asyncio.shield(loading)  # a waiter cancelled does not cancel the others' read
        return _verify(stored, secret)

    def clear_cache(self) -> None:
        with self._lock:
            self._cache.clear()

    # -- internals ----------------------------------------------------------

    def _load_into_cache(self, key_id: str) -> _StoredKey | None:
        """The key's row from the database, cached; a stale entry or KeyStoreUnavailableError if unreadable."""
        try:
            stored = self._load(key_id)
        except SQLAlchemyError as error:
            return self._stale_or_raise(key_id, error)
        self._remember(key_id, stored)
        return stored

    def _load(self, key_id: str) -> _StoredKey | None:
        if not isinstance(key_id, str):
            return None
        with self._database.read() as connection:
            row = connection.execute(select(api_keys).where(api_keys.c.key_id == key_id)).first()
        return _stored(row) if row is not None else None

    def _cached(self, key_id: str) -> tuple[bool, _StoredKey | None]:
        """(fresh entry found, entry). Expired entries stay, for `_stale_or_raise`, until evicted."""
        with self._lock:
            entry = self._cache.get(key_id)
            if entry is None:
                return False, None
            fetched_at, stored = entry
            if self._clock() - fetched_at >= self._cache_ttl_s:
                return False, None
            self._cache.move_to_end(key_id)
            return True, stored

    def _stale_or_raise(self, key_id: str, error: SQLAlchemyError) -> _StoredKey | None:
        """The database failed: answer from a recently expired entry, else raise KeyStoreUnavailableError."""
        with self._lock:
            entry = self._cache.get(key_id)
        if entry is not None and self._clock() - entry[0] < self._stale_if_error_s:
            logger.warning("key database unreachable (%s); using the cached entry of key %s", one_line(error), key_id)
            return entry[1]
        raise KeyStoreUnavailableError(f"the key database {self._database!r} is unreachable: "
                                       f"{one_line(getattr(error, 'orig', None) or error)}") from None

    def _remember(self, key_id: str, stored: _StoredKey | None) -> None:
        if self._cache_ttl_s == 0:
            return
        with self._lock:
            self._cache[key_id] = (self._clock(), stored)
            self._cache.move_to_end(key_id)
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)

    def _evict(self, key_id: str) -> None:
        with self._lock:
            self._cache.pop(key_id, None)


def _verify(stored: _StoredKey | None, secret: str) -> ApiKey | None:
    if stored is None or stored.record.revoked_at is not None:
        return None
    if not hmac.compare_digest(_hash_secret(stored.salt, secret), stored.secret_hash):
        return None
    return stored.record


def _stored(row) -> _StoredKey:
    limits = KeyLimits(requests_per_minute=row.requests_per_minute, tokens_per_minute=row.tokens_per_minute,
                       max_concurrent=row.max_concurrent, monthly_budget_usd=row.monthly_budget_usd,
                       max_tokens=row.max_tokens)
    record = ApiKey(key_id=row.key_id, name=row.name, prefix=row.prefix,
                    allowed_models=tuple(json.loads(row.allowed_models)), limits=limits,
                    allow_overflow=bool(row.allow_overflow), created_at=row.created_at, revoked_at=row.revoked_at)
    return _StoredKey(record=record, salt=bytes.fromhex(row.salt), secret_hash=bytes.fromhex(row.secret_hash))
