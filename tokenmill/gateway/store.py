"""The gateway's database: one SQLAlchemy engine per URL, schema kept current by Alembic.

`open_database(url)` is the one entry point. It accepts

* `sqlite:///relative/or/absolute/path.db` (the default, see
  `tokenmill.gateway.config.default_database_url`), or a bare file path;
* `postgresql://user:pass@host:port/dbname` (also `postgres://`), driven by
  psycopg 3. Query options pass through, e.g. `?options=-csearch_path%3Dgw` to
  keep the gateway's tables in their own schema.

and returns a `Database` whose schema is at the latest migration: a new database
is created, an older one upgraded in place (`tokenmill/gateway/migrations/`). Two
processes opening the same fresh database at once are serialized (SQLite write
lock / PostgreSQL advisory lock), so each migration runs exactly once.

SQLite runs in WAL mode (readers never wait for the ledger's writer) with a busy
timeout, and every transaction is a real one: the pysqlite driver's implicit
transaction handling is switched off and `BEGIN` is emitted explicitly, `BEGIN
IMMEDIATE` for writers so that two writers queue on the busy timeout instead of
failing on a lock upgrade.

Contract: a `Database` is safe to share between threads (the engine pools
connections). All methods block; call them from a worker thread inside an
asyncio app. Failures to reach or migrate a database raise `DatabaseError` with
the URL's password hidden; a malformed URL raises `ValueError`.
"""
from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path

from sqlalchemy import (BigInteger, Boolean, Column, Connection, Engine, Float, Index, Integer, MetaData, SmallInteger,
                        String, Table, Text, TypeDecorator, create_engine, event)
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError, SQLAlchemyError

SQLITE_BUSY_TIMEOUT_S = 15.0
# Any constant shared by every gateway process works; this one spells "tmgw".
_PG_MIGRATION_LOCK = 0x746D6777
VERSION_TABLE = "gateway_schema_version"


class DatabaseError(RuntimeError):
    """The database could not be reached, opened or migrated; the message says which and why."""


class UTCDateTime(TypeDecorator):
    """Aware UTC datetimes in and out, on SQLite (which has no time zones) as on PostgreSQL."""
    impl = String  # replaced per dialect below
    cache_ok = True

    def load_dialect_impl(self, dialect):
        from sqlalchemy import DateTime
        return dialect.type_descriptor(DateTime(timezone=dialect.name == "postgresql"))

    def process_bind_param(self, value: datetime | None, dialect):
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError(f"naive datetime {value!r}: the gateway stores UTC times only")
        value = value.astimezone(timezone.utc)
        return value if dialect.name == "postgresql" else value.replace(tzinfo=None)

    def process_result_value(self, value: datetime | None, dialect):
        if value is None:
            return None
        return value.replace(tzinfo=timezone.utc) if value.tzinfo is None else value.astimezone(timezone.utc)


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


# The schema at the latest migration. Migrations (not this metadata) create it;
# tests check that the two agree.
metadata = MetaData()

api_keys = Table(
    "gateway_api_keys", metadata,
    Column("key_id", String(32), primary_key=True),
    Column("name", Text, nullable=False),
    Column("prefix", String(64), nullable=False),
    Column("salt", String(64), nullable=False),           # hex
    Column("secret_hash", String(128), nullable=False),   # hex HMAC-SHA256(salt, secret)
    Column("allowed_models", Text, nullable=False),       # JSON list; [] = every model
    Column("requests_per_minute", Integer, nullable=True),
    Column("tokens_per_minute", Integer, nullable=True),
    Column("max_concurrent", Integer, nullable=True),
    Column("monthly_budget_usd", Float, nullable=True),
    Column("max_tokens", Integer, nullable=True),
    Column("allow_overflow", Boolean, nullable=False),
    Column("created_at", UTCDateTime, nullable=False),
    Column("revoked_at", UTCDateTime, nullable=True),
)

usage = Table(
    "gateway_usage", metadata,
    Column("id", BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True),
    Column("request_id", Text, nullable=False),
    Column("key_id", String(32), nullable=True),
    Column("model", Text, nullable=False),
    Column("route", Text, nullable=False),
    Column("upstream", Text, nullable=True),
    Column("tier", Text, nullable=True),
    Column("status_code", Integer, nullable=False),
    Column("prompt_tokens", Integer, nullable=False),
    Column("completion_tokens", Integer, nullable=False),
    Column("ttft_s", Float, nullable=True),
    Column("latency_s", Float, nullable=False),
    Column("cost_usd", Float, nullable=False),
    Column("format_checked", Boolean, nullable=False),
    Column("format_ok", Boolean, nullable=True),
    Column("error", Text, nullable=True),
    Column("created_at", UTCDateTime, nullable=False),
    Index("ix_gateway_usage_key_created", "key_id", "created_at"),
    Index("ix_gateway_usage_created", "created_at"),
    Index("ix_gateway_usage_request", "request_id"),
)

feedback = Table(
    "gateway_feedback", metadata,
    Column("id", BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True),
    Column("request_id", Text, nullable=False),
    Column("key_id", String(32), nullable=True),
    Column("score", SmallInteger, nullable=False),
    Column("comment", Text, nullable=True),
    Column("created_at", UTCDateTime, nullable=False),
    Index("ix_gateway_feedback_request", "request_id"),
)


def normalize_url(url: str) -> URL:
    """A database URL (or a bare SQLite file path) → the SQLAlchemy URL the gateway uses."""
    if not isinstance(url, str) or not url.strip():
        raise ValueError("database URL is empty; use sqlite:///PATH.db or postgresql://USER@HOST/DB")
    text = url.strip()
    if "://" not in text:
        text = "sqlite:///" + str(Path(text).expanduser())
    elif text.startswith("postgres://"):
        text = "postgresql://" + text[len("postgres://"):]
    try:
        parsed = make_url(text)
    except (ArgumentError, ValueError):
        raise ValueError(f"not a database URL: {redact(text)}; use sqlite:///PATH.db or postgresql://USER@HOST/DB") \
            from None
    backend = parsed.get_backend_name()
    if backend == "postgresql":
        if parsed.drivername == "postgresql":
            parsed = parsed.set(drivername="postgresql+psycopg")
        return parsed
    if backend == "sqlite":
        if not parsed.database or parsed.database == ":memory:":
            raise ValueError("the gateway needs a SQLite file, not an in-memory database: use sqlite:///PATH.db")
        if parsed.drivername != "sqlite":
            raise ValueError(f"unsupported SQLite driver {parsed.drivername!r}; use sqlite:///PATH.db")
        return parsed.set(database=str(Path(parsed.database).expanduser()))
    raise ValueError(f"unsupported database {backend!r} in {redact(url)}; use sqlite:///PATH.db or "
                     "postgresql://USER@HOST/DB")


def one_line(error: BaseException | str) -> str:
    """A driver's (often multi-line) message as one line."""
    return " ".join(str(error).split()) or type(error).__name__


def redact(url: str | URL) -> str:
    """The URL with its password hidden, for messages."""
    try:
        parsed = url if isinstance(url, URL) else make_url(url)
    except (ArgumentError, ValueError):
        return "<malformed URL>"
    return parsed.render_as_string(hide_password=True)


def _sqlite_engine(url: URL) -> Engine:
    Path(url.database).parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(url, connect_args={"timeout": SQLITE_BUSY_TIMEOUT_S, "check_same_thread": False},
                           pool_size=8, max_overflow=8)

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection, _record):
        # Take transaction control away from pysqlite; "begin" below emits BEGIN.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute(f"PRAGMA busy_timeout={int(SQLITE_BUSY_TIMEOUT_S * 1000)}")
        cursor.execute("PRAGMA synchronous=NORMAL")  # durable at each WAL checkpoint; safe with WAL
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(connection: Connection):
        immediate = connection.get_execution_options().get("tokenmill_write", False)
        connection.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")

    return engine


def _postgres_engine(url: URL) -> Engine:
    return create_engine(url, pool_size=8, max_overflow=8, pool_pre_ping=True)


class Database:
    """An engine and the gateway's tables; see the module docstring for the contract."""

    def __init__(self, url: URL, engine: Engine) -> None:
        self.url = url
        self.engine = engine

    @property
    def dialect(self) -> str:
        return self.engine.dialect.name

    def __repr__(self) -> str:
        return f"Database({redact(self.url)!r})"

    @contextlib.contextmanager
    def read(self) -> Iterator[Connection]:
        """A connection in a read transaction."""
        with self.engine.connect() as connection, connection.begin():
            yield connection

    @contextlib.contextmanager
    def write(self) -> Iterator[Connection]:
        """A connection in a write transaction: committed on exit, rolled back on error."""
        with self.engine.connect() as connection:
            connection.execution_options(tokenmill_write=True)
            with connection.begin():
                yield connection

    def schema_revision(self) -> str | None:
        """The migration the database is at (None: no gateway schema yet)."""
        from alembic.runtime.migration import MigrationContext

        with self.read() as connection:
            return MigrationContext.configure(connection, opts={"version_table": VERSION_TABLE}) \
                .get_current_revision()

    def close(self) -> None:
        """Close every pooled connection; `open_database` on the same URL opens it anew."""
        with _registry_lock:
            if _registry.get(self.url.render_as_string(hide_password=False)) is self:
                del _registry[self.url.render_as_string(hide_password=False)]
        self.engine.dispose()


_registry: dict[str, Database] = {}
_registry_lock = threading.Lock()


def connect(url: str) -> Database:
    """The database at `url` as it is, schema untouched (for migration tools and tests).

    Not registered: `open_database` on the same URL builds its own engine.
    """
    parsed = normalize_url(url)
    try:
        engine = _sqlite_engine(parsed) if parsed.get_backend_name() == "sqlite" else _postgres_engine(parsed)
    except (OSError, SQLAlchemyError, ImportError) as error:
        raise DatabaseError(f"cannot open the database {redact(parsed)}: {one_line(error)}") from None
    return Database(parsed, engine)


def open_database(url: str) -> Database:
    """The database at `url` with its schema at the latest migration (one `Database` per URL per process)."""
    parsed = normalize_url(url)
    registry_key = parsed.render_as_string(hide_password=False)
    with _registry_lock:
        database = _registry.get(registry_key)
        if database is not None:
            return database
        database = connect(url)
        engine = database.engine
        try:
            upgrade_schema(database)
        except DatabaseError:
            engine.dispose()
            raise
        except SQLAlchemyError as error:
            engine.dispose()
            reason = getattr(error, "orig", None) or error
            raise DatabaseError(f"cannot open the database {redact(parsed)}: {one_line(reason)}") from None
        _registry[registry_key] = database
        return database


def close_database(url: str) -> None:
    """Close the `Database` that `open_database(url)` keeps for this process, if any."""
    key = normalize_url(url).render_as_string(hide_password=False)
    with _registry_lock:
        database = _registry.get(key)
    if database is not None:
        database.close()


def _alembic_config(connection: Connection | None = None):
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(Path(__file__).with_name("migrations")))
    config.set_main_option("version_table", VERSION_TABLE)
    config.attributes["connection"] = connection
    return config


def head_revision() -> str:
    """The latest migration shipped with this version of tokenmill."""
    from alembic.script import ScriptDirectory

    return ScriptDirectory.from_config(_alembic_config()).get_current_head()


def upgrade_schema(database: Database, revision: str = "head") -> None:
    """Migrate `database` to `revision` (default: the latest) in one transaction.

    Raises `DatabaseError` when the database is at a revision this tokenmill does
    not know (written by a newer version).
    """
    from alembic import command
    from alembic.runtime.migration import MigrationContext
    from alembic.script import ScriptDirectory
    from alembic.script.revision import RevisionError
    from alembic.util import CommandError

    script = ScriptDirectory.from_config(_alembic_config())
    target = script.get_current_head() if revision == "head" else revision
    with database.engine.connect() as connection:
        connection.execution_options(tokenmill_write=True)
        with connection.begin():
            if database.dialect == "postgresql":
                # Serializes concurrent first starts; released at commit.
                connection.exec_driver_sql(f"SELECT pg_advisory_xact_lock({_PG_MIGRATION_LOCK})")
            current = MigrationContext.configure(connection, opts={"version_table": VERSION_TABLE}) \
                .get_current_revision()
            if current is not None:
                try:
                    script.get_revision(current)
                except (RevisionError, CommandError):
                    raise DatabaseError(
                        f"the database {redact(database.url)} is at schema revision {current!r}, which this "
                        "version of tokenmill does not know; it was written by a newer tokenmill") from None
            if current == target:
                return
            command.upgrade(_alembic_config(connection), revision)
