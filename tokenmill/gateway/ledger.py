"""The usage ledger: one row per request, written off the request path in batches.

`Ledger.record(row)` appends to an in-memory queue and returns at once: it never
blocks and never touches the database. A writer thread drains the queue in
batches of up to `batch_size` rows, one transaction per batch, at the latest
`flush_interval_s` after a row arrived. `close()` writes every queued row before
it returns; if it cannot (the database stays unreachable past its timeout) it
raises `LedgerFlushError` naming how many rows are unwritten, never returning as
if they were saved.

Nothing is dropped silently:

* A failed batch (database down, lock timeout, ...) is logged and retried with
  backoff (0.1 s doubling to 5 s), in order, until it is written or `close()`
  gives up. Meanwhile rows keep queueing in memory.
* A batch the database refuses for its content (IntegrityError/DataError, e.g.
  a NUL byte in a text column on PostgreSQL) is retried row by row; only the
  offending rows are left out, each logged at ERROR with its full content so it
  can be re-entered. `rejected_rows` counts them.
* The queue has no hard bound, so `record()` can always accept the rows of the
  requests already in flight. It has a high-water mark instead
  (`max_backlog`, default 100,000 rows, tens of MB): past it `has_capacity()`
  is false and a warning is logged, and the gateway stops admitting new
  requests (503) until the writer catches up, so memory stays bounded by
  max_backlog plus the requests in flight. A healthy writer drains thousands of
  rows per second, far more than a gateway answers.

Thumbs up/down feedback goes through the same queue and writer.

`usage()` and `month_to_date_spend()` read what has been written, at most
`flush_interval_s` behind `record()` (call `flush()` first to wait for the
queue). All read methods block on the database; call them from a worker thread
in an asyncio app.
"""
from __future__ import annotations

import asyncio
import atexit
import dataclasses
import json
import logging
import math
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from datetime import datetime, timezone

from sqlalchemy import and_, case, func, insert, select
from sqlalchemy.exc import DataError, IntegrityError

from tokenmill.gateway.store import Database, feedback, usage, utcnow

logger = logging.getLogger(__name__)

MAX_COMMENT_LENGTH = 4000


class LedgerFlushError(RuntimeError):
    """`close()` could not write every queued row in time; the message says how many are left."""


@dataclass
class UsageRecord:
    """One answered (or failed) request."""
    request_id: str
    key_id: str | None
    model: str
    route: str
    upstream: str | None
    tier: str | None
    status_code: int
    prompt_tokens: int
    completion_tokens: int
    ttft_s: float | None
    latency_s: float
    cost_usd: float
    format_checked: bool = False
    format_ok: bool | None = None
    error: str | None = None
    created_at: datetime = field(default_factory=utcnow)

    def __post_init__(self) -> None:
        if not isinstance(self.request_id, str) or not self.request_id:
            raise ValueError("a usage record needs a request_id")
        for name in ("prompt_tokens", "completion_tokens", "status_code"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
        for name in ("latency_s", "cost_usd", "ttft_s"):
            value = getattr(self, name)
            if value is None and name == "ttft_s":
                continue
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ValueError(f"{name} must be a non-negative number, got {value!r}")
        if self.created_at.tzinfo is None:
            raise ValueError("created_at must be timezone-aware (UTC)")

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass
class _Feedback:
    request_id: str
    key_id: str | None
    score: int
    comment: str | None
    created_at: datetime = field(default_factory=utcnow)


def _month_start(now: datetime) -> datetime:
    return now.astimezone(timezone.utc).replace(day=1, hour=0, minute=0, second=0, microsecond=0)


class Ledger:
    """Batched, off-path usage writes and usage reads; see the module docstring for the contract."""

    def __init__(self, database: Database, batch_size: int = 200, flush_interval_s: float = 0.5,
                 max_backlog: int = 100_000) -> None:
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError("batch_size must be a positive integer")
        if not flush_interval_s >= 0:
            raise ValueError("flush_interval_s must be >= 0")
        if not isinstance(max_backlog, int) or max_backlog < 1:
            raise ValueError("max_backlog must be a positive integer")
        self._database = database
        self.batch_size = batch_size
        self.flush_interval_s = float(flush_interval_s)
        self.max_backlog = max_backlog
        self._queue: deque[UsageRecord | _Feedback] = deque()
        self._condition = threading.Condition()
        self._oldest_queued_at: float | None = None
        self._in_flight = 0            # rows taken off the queue, not yet committed
        self._recorded = 0
        self._written = 0
        self._closing = False
        self._closed = False
        self._flush_requested = False  # flush() waits: write without waiting for flush_interval_s
        self._thread: threading.Thread | None = None
        self._over_mark_warned = False
        self.rejected_rows = 0         # rows the database refused for their content (logged)
        self.write_failures = 0        # failed batch attempts (retried)

    def __repr__(self) -> str:
        return f"Ledger({self._database!r}, backlog={self.backlog})"

    # -- writing ------------------------------------------------------------

    def start(self) -> None:
        """Start the background writer (idempotent)."""
        with self._condition:
            if self._closed:
                raise RuntimeError("the ledger is closed")
            if self._thread is not None:
                return
            self._thread = threading.Thread(target=self._run, name="tokenmill-ledger-writer", daemon=True)
            self._thread.start()
        atexit.register(self._close_at_exit)

    def record(self, row: UsageRecord) -> None:
        """Queue a usage row. Never blocks, never touches the database. Raises RuntimeError once closed."""
        if not isinstance(row, UsageRecord):
            raise TypeError("record() takes a UsageRecord")
        self._enqueue(row)

    def record_feedback(self, request_id: str, key_id: str | None, score: int, comment: str | None = None) -> None:
        """Queue a thumbs up (+1) or down (-1) for a request; written like usage rows."""
        if not isinstance(request_id, str) or not request_id:
            raise ValueError("feedback needs the request_id of the answer it rates")
        if isinstance(score, bool) or score not in (1, -1):
            raise ValueError(f"feedback score must be 1 (thumbs up) or -1 (thumbs down), got {score!r}")
        if comment is not None:
            if not isinstance(comment, str):
                raise ValueError("feedback comment must be a string")
            if len(comment) > MAX_COMMENT_LENGTH:
                raise ValueError(f"feedback comment is longer than {MAX_COMMENT_LENGTH} characters")
        self._enqueue(_Feedback(request_id=request_id, key_id=key_id, score=score, comment=comment))

    def _enqueue(self, item) -> None:
        with self._condition:
            if self._closing:
                raise RuntimeError("the ledger is closed; rows can no longer be recorded")
            self._queue.append(item)
            self._recorded += 1
            if self._oldest_queued_at is None:
                self._oldest_queued_at = time.monotonic()
            if len(self._queue) >= self.max_backlog and not self._over_mark_warned:
                self._over_mark_warned = True
                logger.warning("usage ledger backlog reached %d rows (database slow or unreachable?); new "
                               "requests should wait until it drains", len(self._queue))
            if len(self._queue) >= self.batch_size:
                self._condition.notify_all()

    @property
    def backlog(self) -> int:
        """Rows recorded and not yet written."""
        with self._condition:
            return len(self._queue) + self._in_flight

    def has_capacity(self) -> bool:
        """False while the backlog is past `max_backlog`: admit no new requests until it drains."""
        with self._condition:
            return len(self._queue) < self.max_backlog

    def flush(self, timeout_s: float | None = None) -> bool:
        """Wait until every row recorded so far is written (or refused and logged); False on timeout."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        with self._condition:
            if self._thread is None:
                self._write_synchronously_locked(deadline)
            target = self._recorded
            while self._written < target:
                self._flush_requested = True
                self._condition.notify_all()
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return False
                self._condition.wait(timeout=0.05 if remaining is None else min(remaining, 0.05))
            return True

    def close(self, timeout_s: float | None = 60.0) -> None:
        """Write every queued row, then stop the writer. After it returns, nothing recorded is lost.

        Raises `LedgerFlushError` if rows remain unwritten after `timeout_s`
        (None: wait as long as it takes). Idempotent.
        """
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        with self._condition:
            if self._closed:
                return
            self._closing = True
            self._condition.notify_all()
            thread = self._thread
            if thread is None:
                self._write_synchronously_locked(deadline)
        if thread is not None:
            thread.join(None if deadline is None else max(deadline - time.monotonic(), 0))
        with self._condition:
            left = len(self._queue) + self._in_flight
            if left:
                # The writer keeps trying in the background; leave the ledger open so a later close() can succeed.
                self._closing = True
                raise LedgerFlushError(f"{left} usage row(s) could not be written to {self._database!r} "
                                       f"within {timeout_s} s; the database is failing (see the log)")
            self._closed = True
            self._condition.notify_all()
        atexit.unregister(self._close_at_exit)

    async def aclose(self, timeout_s: float | None = 60.0) -> None:
        """`close()` from the event loop, in a worker thread."""
        await asyncio.to_thread(self.close, timeout_s)

    def _close_at_exit(self) -> None:
        try:
            self.close(timeout_s=10.0)
        except LedgerFlushError as error:
            logger.error("at exit: %s", error)

    def _take_batch_locked(self) -> list:
        batch = []
        while self._queue and len(batch) < self.batch_size:
            batch.append(self._queue.popleft())
        self._in_flight = len(batch)
        self._oldest_queued_at = time.monotonic() if self._queue else None
        if len(self._queue) < self.max_backlog:
            self._over_mark_warned = False
        return batch

    def _run(self) -> None:
        while True:
            with self._condition:
                while True:
                    if self._queue:
                        due = self._oldest_queued_at + self.flush_interval_s
                        if (self._closing or self._flush_requested or len(self._queue) >= self.batch_size
                                or time.monotonic() >= due):
                            break
                        self._condition.wait(timeout=max(due - time.monotonic(), 0.001))
                    elif self._closing:
                        return
                    else:
                        self._flush_requested = False
                        self._condition.wait()
                batch = self._take_batch_locked()
            self._write_with_retry(batch)

    def _write_synchronously_locked(self, deadline: float | None) -> None:
        """No writer thread: write in the caller's thread (called with the lock held)."""
        while self._queue and (deadline is None or time.monotonic() < deadline):
            batch = self._take_batch_locked()
            self._condition.release()
            try:
                self._write_with_retry(batch, deadline)
            finally:
                self._condition.acquire()

    def _write_with_retry(self, batch: list, deadline: float | None = None) -> None:
        """Write a batch, retrying failures; rows the database refuses for their content are logged and left out.

        With a `deadline`, rows still unwritten when it would pass go back to the
        front of the queue, in order.
        """
        delay = 0.1
        one_by_one = False
        position = 0
        while position < len(batch):
            chunk = batch[position:position + 1] if one_by_one else batch[position:]
            try:
                self._write(chunk)
                position += len(chunk)
                delay = 0.1
            except (IntegrityError, DataError) as error:
                if len(chunk) > 1:
                    logger.error("usage ledger: the database refused a batch of %d rows (%s); writing them one "
                                 "by one", len(chunk), _reason(error))
                    one_by_one = True
                else:
                    self.rejected_rows += 1
                    logger.error("usage ledger: the database refused a row (%s); it is NOT saved: %s",
                                 _reason(error), json.dumps(_as_json(chunk[0]), default=str))
                    position += 1
            except Exception as error:  # noqa: BLE001 - every failure is logged and retried, never swallowed
                self.write_failures += 1
                logger.error("usage ledger: writing %d row(s) failed (%s); retrying in %.1f s",
                             len(chunk), _reason(error), delay)
                if deadline is not None and time.monotonic() + delay > deadline:
                    with self._condition:
                        self._queue.extendleft(reversed(batch[position:]))
                        self._oldest_queued_at = self._oldest_queued_at or time.monotonic()
                        self._written += position
                        self._in_flight = 0
                        self._condition.notify_all()
                    return
                time.sleep(delay)
                delay = min(delay * 2, 5.0)
        with self._condition:
            self._written += len(batch)
            self._in_flight = 0
            self._condition.notify_all()

    def _write(self, batch: list) -> None:
        usage_rows = [_usage_values(item) for item in batch if isinstance(item, UsageRecord)]
        feedback_rows = [dataclasses.asdict(item) for item in batch if isinstance(item, _Feedback)]
        with self._database.write() as connection:
            if usage_rows:
                connection.execute(insert(usage), usage_rows)
            if feedback_rows:
                connection.execute(insert(feedback), feedback_rows)

    # -- reading ------------------------------------------------------------

    def count(self) -> int:
        """Usage rows written so far."""
        with self._database.read() as connection:
            return connection.execute(select(func.count()).select_from(usage)).scalar_one()

    def month_to_date_spend(self, key_id: str) -> float:
        """USD spent by a key since the start of this UTC month (rows written so far)."""
        with self._database.read() as connection:
            value = connection.execute(
                select(func.coalesce(func.sum(usage.c.cost_usd), 0.0))
                .where(usage.c.key_id == key_id, usage.c.created_at >= _month_start(utcnow()))).scalar_one()
        return float(value)

    def usage(self, key_id: str | None = None, since: datetime | None = None) -> dict:
        """Totals and per-model and per-route breakdowns: requests, tokens, cost, errors, format checks.

        `key_id=None`: every key. `since=None`: all time. An error is a status
        >= 400 or a recorded error (e.g. a stream cut mid-way).
        """
        if since is not None and since.tzinfo is None:
            raise ValueError("since must be timezone-aware (UTC)")
        conditions = []
        if key_id is not None:
            conditions.append(usage.c.key_id == key_id)
        if since is not None:
            conditions.append(usage.c.created_at >= since)
        where = and_(*conditions) if conditions else None
        error = (usage.c.status_code >= 400) | usage.c.error.is_not(None)
        measures = [
            func.count().label("requests"),
            func.coalesce(func.sum(usage.c.prompt_tokens), 0).label("prompt_tokens"),
            func.coalesce(func.sum(usage.c.completion_tokens), 0).label("completion_tokens"),
            func.coalesce(func.sum(usage.c.cost_usd), 0.0).label("cost_usd"),
            func.coalesce(func.sum(case((error, 1), else_=0)), 0).label("errors"),
            func.coalesce(func.sum(case((usage.c.format_checked, 1), else_=0)), 0).label("format_checked"),
            func.coalesce(func.sum(case((usage.c.format_ok.is_(True), 1), else_=0)), 0).label("format_ok"),
            func.avg(usage.c.latency_s).label("mean_latency_s"),
            func.avg(usage.c.ttft_s).label("mean_ttft_s"),
        ]

        def query(*group):
            statement = select(*group, *measures).select_from(usage)
            if where is not None:
                statement = statement.where(where)
            if group:
                statement = statement.group_by(*group).order_by(*group)
            return statement

        with self._database.read() as connection:
            totals = connection.execute(query()).one()
            by_model = connection.execute(query(usage.c.model)).all()
            by_route = connection.execute(query(usage.c.route)).all()
            feedback_query = select(feedback.c.score, func.count()).group_by(feedback.c.score)
            if key_id is not None:
                feedback_query = feedback_query.where(feedback.c.key_id == key_id)
            if since is not None:
                feedback_query = feedback_query.where(feedback.c.created_at >= since)
            scores = dict(connection.execute(feedback_query).all())
        return {
            "key_id": key_id,
            "since": since.isoformat() if since else None,
            "totals": _measures(totals),
            "by_model": {row.model: _measures(row) for row in by_model},
            "by_route": {row.route: _measures(row) for row in by_route},
            "feedback": {"up": int(scores.get(1, 0)), "down": int(scores.get(-1, 0))},
        }


def _measures(row) -> dict:
    checked = int(row.format_checked)
    return {
        "requests": int(row.requests),
        "prompt_tokens": int(row.prompt_tokens),
        "completion_tokens": int(row.completion_tokens),
        "total_tokens": int(row.prompt_tokens) + int(row.completion_tokens),
        "cost_usd": round(float(row.cost_usd), 9),
        "errors": int(row.errors),
        "format_checked": checked,
        "format_ok": int(row.format_ok),
        "format_compliance": (int(row.format_ok) / checked) if checked else None,
        "mean_latency_s": float(row.mean_latency_s) if row.mean_latency_s is not None else None,
        "mean_ttft_s": float(row.mean_ttft_s) if row.mean_ttft_s is not None else None,
    }


def _usage_values(row: UsageRecord) -> dict:
    return {f.name: getattr(row, f.name) for f in dataclasses.fields(row)}


def _as_json(item) -> dict:
    values = dataclasses.asdict(item)
    values["kind"] = "usage" if isinstance(item, UsageRecord) else "feedback"
    return values


def _reason(error: BaseException) -> str:
    original = getattr(error, "orig", None)
    return str(original or error).strip().splitlines()[0] if str(original or error).strip() else type(error).__name__
