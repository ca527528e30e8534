"""Schema migrations: a new database is created at the latest revision, an old one upgraded in place."""
import threading
from datetime import datetime, timezone

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import text

from tokenmill.gateway import store
from tokenmill.gateway.keys import KeyStore
from tokenmill.gateway.ledger import Ledger, UsageRecord
from tokenmill.gateway.store import (VERSION_TABLE, DatabaseError, connect, head_revision, metadata, open_database,
                                     upgrade_schema)


def test_a_new_database_is_created_at_the_latest_revision(database_url):
    database = open_database(database_url)
    assert database.schema_revision() == head_revision() == "0002"
    with database.read() as connection:
        context = MigrationContext.configure(connection, opts={"version_table": VERSION_TABLE})
        assert compare_metadata(context, metadata) == []  # the migrations build exactly the schema the code uses
    assert open_database(database_url) is database  # one engine per URL


def test_a_database_at_the_first_revision_is_upgraded_in_place_keeping_its_data(database_url):
    old = connect(database_url)
    upgrade_schema(old, "0001")
    assert old.schema_revision() == "0001"
    # Written by a gateway of revision 0001: a key (that table is unchanged since) and a usage
    # row without the columns revision 0002 added.
    created, secret = KeyStore(old).create("legacy")
    record = {"key_id": created.key_id}
    with old.write() as connection:
        connection.execute(text(
            "INSERT INTO gateway_usage (request_id, key_id, model, route, upstream, tier, status_code, "
            "prompt_tokens, completion_tokens, ttft_s, latency_s, cost_usd, error, created_at) VALUES "
            "('old-1', :key_id, 'gemma', 'direct', 'r1', 'self', 200, 10, 20, 0.1, 0.5, 0.25, NULL, :now)"),
            {"key_id": record["key_id"], "now": datetime.now(timezone.utc).replace(tzinfo=None)})
    old.close()

    database = open_database(database_url)
    assert database.schema_revision() == "0002"
    keys = KeyStore(database)
    assert keys.authenticate(secret).key_id == record["key_id"]  # the old key still works
    ledger = Ledger(database)
    assert ledger.count() == 1
    assert ledger.month_to_date_spend(record["key_id"]) == pytest.approx(0.25)
    totals = ledger.usage(record["key_id"])["totals"]
    assert totals["requests"] == 1 and totals["format_checked"] == 0  # old rows count as never checked
    ledger.record(UsageRecord("new-1", record["key_id"], "gemma", "direct", "r1", "self", 200, 1, 2, 0.1, 0.2,
                              0.5, format_checked=True, format_ok=True))
    ledger.record_feedback("old-1", record["key_id"], 1)
    ledger.close()
    report = ledger.usage(record["key_id"])
    assert report["totals"]["requests"] == 2 and report["totals"]["format_ok"] == 1
    assert report["feedback"] == {"up": 1, "down": 0}


def test_a_database_from_a_newer_tokenmill_is_refused_clearly(sqlite_url):
    open_database(sqlite_url).close()
    database = connect(sqlite_url)
    with database.write() as connection:
        connection.execute(text(f"UPDATE {VERSION_TABLE} SET version_num = '9999'"))
    database.close()
    with pytest.raises(DatabaseError, match="schema revision '9999'.*newer tokenmill"):
        open_database(sqlite_url)


def test_concurrent_first_opens_migrate_once(database_url):
    errors = []

    def first_start():
        try:
            database = connect(database_url)  # each its own engine, as separate gateway processes have
            upgrade_schema(database)
            database.close()
        except Exception as error:  # noqa: BLE001 - collected and asserted on below
            errors.append(error)

    threads = [threading.Thread(target=first_start) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    database = open_database(database_url)
    assert database.schema_revision() == head_revision()
    with database.read() as connection:
        assert connection.execute(text(f"SELECT count(*) FROM {VERSION_TABLE}")).scalar_one() == 1


def test_sqlite_runs_in_wal_mode_with_a_busy_timeout(sqlite_url):
    database = open_database(sqlite_url)
    with database.read() as connection:
        assert connection.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert connection.exec_driver_sql("PRAGMA busy_timeout").scalar() == int(store.SQLITE_BUSY_TIMEOUT_S * 1000)


@pytest.mark.parametrize("url, message", [
    ("", "database URL is empty"),
    ("mysql://root@localhost/gw", "unsupported database 'mysql'"),
    ("sqlite://", "needs a SQLite file"),
    ("sqlite:///:memory:", "needs a SQLite file"),
    ("bad url://x", "not a database URL"),
    ("postgresql://user:pw@host:notaport/db", "not a database URL"),
])
def test_bad_database_urls_get_a_clear_error(url, message):
    with pytest.raises(ValueError, match=message):
        open_database(url)


def test_an_unreachable_postgresql_is_reported_without_its_password():
    with pytest.raises(DatabaseError) as failure:
        open_database("postgresql://gateway:s3cret-pw@127.0.0.1:1/gw?connect_timeout=2")
    message = str(failure.value)
    assert "cannot open the database" in message and "127.0.0.1:1" in message
    assert "s3cret-pw" not in message and "\n" not in message


def test_a_bare_path_means_a_sqlite_file(tmp_path):
    path = tmp_path / "nested" / "gw.db"
    database = open_database(str(path))
    try:
        assert database.dialect == "sqlite" and path.exists()
    finally:
        database.close()
