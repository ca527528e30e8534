"""The usage ledger: rows written in batches off the caller's path, nothing lost on close or failure."""
import asyncio
import logging
import threading
import time
from datetime import datetime, timedelta, timezone

import pytest
from sqlalchemy import event, text

from tokenmill.gateway.ledger import Ledger, LedgerFlushError, UsageRecord
from tokenmill.gateway.store import open_database


def row(index: int, key_id: str | None = "key1", **changes) -> UsageRecord:
    values = dict(request_id=f"req-{index}", key_id=key_id, model="gemma-3-270m", route="direct", upstream="r1",
                  tier="self", status_code=200, prompt_tokens=10, completion_tokens=5, ttft_s=0.05, latency_s=0.4,
                  cost_usd=0.001)
    values.update(changes)
    return UsageRecord(**values)


def count_usage_inserts(database) -> list:
    inserts = []

    def seen(connection, cursor, statement, parameters, context, executemany):
        if statement.lstrip().upper().startswith("INSERT INTO GATEWAY_USAGE"):
            inserts.append(len(parameters) if executemany else 1)

    event.listen(database.engine, "before_cursor_execute", seen)
    return inserts


def test_every_recorded_row_is_written_in_batches(database_url):
    database = open_database(database_url)
    ledger = Ledger(database, batch_size=100, flush_interval_s=0.05)
    inserts = count_usage_inserts(database)
    ledger.start()
    for index in range(1000):
        ledger.record(row(index))
    ledger.close()
    assert ledger.count() == 1000
    assert sum(inserts) == 1000
    assert len(inserts) <= 20  # many rows per statement and transaction, not one each
    with database.read() as connection:
        ids = connection.execute(text("SELECT request_id FROM gateway_usage")).scalars().all()
    assert sorted(ids) == sorted(f"req-{index}" for index in range(1000))


def test_record_never_touches_the_database_and_failures_are_retried(database_url, caplog):
    database = open_database(database_url)
    ledger = Ledger(database, batch_size=10, flush_interval_s=0.01)
    ledger.start()
    with database.write() as connection:  # the table disappears: every write fails
        connection.execute(text("ALTER TABLE gateway_usage RENAME TO gateway_usage_away"))
    for index in range(50):
        ledger.record(row(index))
    deadline = time.monotonic() + 10
    while ledger.write_failures < 2 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert ledger.write_failures >= 2  # the writer keeps retrying ...
    assert "retrying" in caplog.text  # ... and says so
    assert ledger.backlog == 50       # nothing was dropped meanwhile
    caller = threading.get_ident()
    statements_from_caller = []
    event.listen(database.engine, "before_cursor_execute",
                 lambda *args: threading.get_ident() == caller and statements_from_caller.append(args[2]))
    for index in range(50, 100):
        ledger.record(row(index))
    assert statements_from_caller == []  # the caller's thread never touched the database
    with database.write() as connection:
        connection.execute(text("ALTER TABLE gateway_usage_away RENAME TO gateway_usage"))
    ledger.close(timeout_s=30)
    assert ledger.count() == 100


def test_close_that_cannot_write_raises_and_loses_nothing(sqlite_url):
    database = open_database(sqlite_url)
    ledger = Ledger(database, batch_size=10, flush_interval_s=0.01)
    ledger.start()
    with database.write() as connection:
        connection.execute(text("ALTER TABLE gateway_usage RENAME TO gateway_usage_away"))
    for index in range(30):
        ledger.record(row(index))
    with pytest.raises(LedgerFlushError, match="30 usage row"):
        ledger.close(timeout_s=0.5)
    with pytest.raises(RuntimeError, match="closed"):
        ledger.record(row(99))
    with database.write() as connection:
        connection.execute(text("ALTER TABLE gateway_usage_away RENAME TO gateway_usage"))
    ledger.close(timeout_s=30)
    assert ledger.count() == 30


def test_close_during_a_burst_keeps_every_accepted_row(database_url):
    database = open_database(database_url)
    ledger = Ledger(database, batch_size=50, flush_interval_s=0.01)
    ledger.start()
    accepted = [0] * 4
    refused = [False] * 4

    def producer(worker: int) -> None:
        # Records until the ledger refuses (closed), bounded in case it never does.
        for index in range(200_000):
            try:
                ledger.record(row(worker * 1_000_000 + index))
            except RuntimeError:
                refused[worker] = True
                return
            accepted[worker] += 1

    threads = [threading.Thread(target=producer, args=(worker,)) for worker in range(4)]
    for thread in threads:
        thread.start()
    while sum(accepted) < 2000:
        time.sleep(0.005)
    ledger.close()
    for thread in threads:
        thread.join()
    assert all(refused)  # close really landed mid-burst
    assert ledger.count() == sum(accepted)


def test_a_full_backlog_stops_admission_but_drops_nothing(sqlite_url):
    ledger = Ledger(open_database(sqlite_url), batch_size=100, max_backlog=10)  # writer not started yet
    for index in range(10):
        ledger.record(row(index))
    assert not ledger.has_capacity()
    ledger.record(row(10))  # the requests already in flight still get their rows
    assert ledger.backlog == 11
    ledger.start()
    assert ledger.flush(timeout_s=10)
    assert ledger.has_capacity()
    ledger.close()
    assert ledger.count() == 11


def test_rows_the_database_refuses_are_logged_and_the_rest_written(postgres_url, caplog):
    ledger = Ledger(open_database(postgres_url), batch_size=100, flush_interval_s=0.01)
    ledger.start()
    for index in range(10):
        # PostgreSQL text cannot hold a NUL byte: this row can never be written.
        ledger.record(row(index, model="bad\x00model" if index == 3 else "gemma-3-270m"))
    with caplog.at_level(logging.ERROR):
        ledger.close()
    assert ledger.count() == 9
    assert ledger.rejected_rows == 1
    assert "NOT saved" in caplog.text and "req-3" in caplog.text


def test_usage_totals_and_breakdowns(database_url):
    database = open_database(database_url)
    ledger = Ledger(database, flush_interval_s=0.01)
    ledger.start()
    ledger.record(row(1, cost_usd=0.5))
    ledger.record(row(2, model="gpt-4o", route="auto:large", tier="external", cost_usd=1.25, prompt_tokens=100,
                      completion_tokens=50, format_checked=True, format_ok=True))
    ledger.record(row(3, model="gpt-4o", route="auto:large", status_code=502, error="upstream failed",
                      completion_tokens=0, format_checked=True, format_ok=False))
    ledger.record(row(4, key_id="key2", cost_usd=9.0))
    ledger.record(row(5, cost_usd=7.0, created_at=datetime.now(timezone.utc) - timedelta(days=40)))
    ledger.record_feedback("req-1", "key1", 1)
    ledger.record_feedback("req-2", "key1", -1, "wrong answer")
    ledger.close()

    report = ledger.usage("key1")
    totals = report["totals"]
    assert totals["requests"] == 4
    assert totals["prompt_tokens"] == 130 and totals["completion_tokens"] == 60 and totals["total_tokens"] == 190
    assert totals["cost_usd"] == pytest.approx(0.5 + 1.25 + 0.001 + 7.0)
    assert totals["errors"] == 1
    assert report["by_model"]["gpt-4o"]["requests"] == 2
    assert report["by_model"]["gpt-4o"]["format_compliance"] == pytest.approx(0.5)
    assert report["by_route"]["auto:large"]["errors"] == 1
    assert set(report["by_route"]) == {"direct", "auto:large"}
    assert report["feedback"] == {"up": 1, "down": 1}

    recent = ledger.usage("key1", since=datetime.now(timezone.utc) - timedelta(days=1))
    assert recent["totals"]["requests"] == 3
    assert ledger.usage()["totals"]["requests"] == 5
    assert ledger.month_to_date_spend("key1") == pytest.approx(0.5 + 1.25 + 0.001)  # last month's row excluded
    assert ledger.month_to_date_spend("key2") == pytest.approx(9.0)
    assert ledger.month_to_date_spend("nobody") == 0.0


def test_aclose_flushes_from_the_event_loop(sqlite_url):
    ledger = Ledger(open_database(sqlite_url), flush_interval_s=10.0)  # rows would otherwise wait 10 s
    ledger.start()

    async def main():
        for index in range(25):
            ledger.record(row(index))
        await ledger.aclose()

    asyncio.run(main())
    assert ledger.count() == 25


@pytest.mark.parametrize("changes, message", [
    (dict(request_id=""), "needs a request_id"),
    (dict(prompt_tokens=-1), "prompt_tokens must be a non-negative integer"),
    (dict(latency_s=float("nan")), "latency_s must be a non-negative number"),
    (dict(created_at=datetime(2026, 1, 1)), "timezone-aware"),
])
def test_bad_rows_are_refused_when_built(changes, message):
    with pytest.raises(ValueError, match=message):
        row(1, **changes)


def test_bad_feedback_is_refused(sqlite_url):
    ledger = Ledger(open_database(sqlite_url))
    with pytest.raises(ValueError, match="1 \\(thumbs up\\) or -1"):
        ledger.record_feedback("req-1", "key1", 5)
    with pytest.raises(ValueError, match="request_id"):
        ledger.record_feedback("", "key1", 1)
    with pytest.raises(ValueError, match="longer than"):
        ledger.record_feedback("req-1", "key1", 1, "x" * 5000)
    ledger.close()


def test_flush_writes_without_waiting_for_the_interval(sqlite_url):
    ledger = Ledger(open_database(sqlite_url), flush_interval_s=30.0)
    ledger.start()
    for index in range(5):
        ledger.record(row(index))
    assert ledger.flush(timeout_s=10)  # well before the 30 s interval
    assert ledger.count() == 5 and ledger.backlog == 0
    ledger.close()
