"""API keys: secrets shown once and stored only as salted hashes, authentication, revocation, limits."""
import asyncio
import glob
import logging

import pytest
from sqlalchemy import event, text

from tokenmill.gateway.keys import (ApiKey, KeyLimits, KeyStore, KeyStoreUnavailableError, UnknownKeyError,
                                    parse_secret)
from tokenmill.gateway.store import open_database


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _other_char(char: str) -> str:
    return "B" if char == "A" else "A"


def count_queries(database):
    """A list that grows by one per query of the keys table."""
    statements = []

    def seen(connection, cursor, statement, *rest):
        if "FROM gateway_api_keys" in statement:
            statements.append(statement)

    event.listen(database.engine, "before_cursor_execute", seen)
    return statements


def test_created_secret_authenticates_and_has_the_documented_shape(database_url):
    store = KeyStore(open_database(database_url))
    record, secret = store.create("alice", allowed_models=["gemma-3-270m"],
                                  limits=KeyLimits(requests_per_minute=10, monthly_budget_usd=5))
    assert secret.startswith(f"tm-{record.key_id}-")
    assert parse_secret(secret) == record.key_id
    assert secret.startswith(record.prefix) and len(record.prefix) < len(secret) // 2
    assert store.authenticate(secret) == record
    assert store.get(record.key_id) == record
    assert record.limits == KeyLimits(requests_per_minute=10, monthly_budget_usd=5.0)
    # Two keys never share a secret or an id.
    other, other_secret = store.create("bob")
    assert other.key_id != record.key_id and other_secret != secret


def test_the_raw_secret_is_nowhere_in_the_sqlite_files(sqlite_url, tmp_path):
    database = open_database(sqlite_url)
    store = KeyStore(database)
    secrets = [store.create(f"user{i}")[1] for i in range(3)]
    for secret in secrets:
        assert store.authenticate(secret) is not None
    database.close()
    files = glob.glob(str(tmp_path / "gateway.db*"))  # the database, and its WAL and shared-memory files
    assert files
    contents = b"".join(open(path, "rb").read() for path in files)
    for secret in secrets:
        random_part = secret.rsplit("-", 1)[1] if secret.count("-") == 2 else secret.split("-", 2)[2]
        assert secret.encode() not in contents
        assert random_part.encode() not in contents


def test_the_raw_secret_is_nowhere_in_the_postgresql_table(postgres_url):
    database = open_database(postgres_url)
    store = KeyStore(database)
    record, secret = store.create("alice")
    random_part = secret.split("-", 2)[2]
    with database.read() as connection:
        rows = connection.execute(text("SELECT t::text FROM gateway_api_keys AS t")).scalars().all()
        dump = "\n".join(rows)
    assert record.key_id in dump  # the search does look at the key's row
    assert secret not in dump and random_part not in dump
    assert random_part.encode().hex() not in dump


def test_wrong_malformed_and_unknown_secrets_are_refused(database_url):
    store = KeyStore(open_database(database_url))
    record, secret = store.create("alice")
    other, other_secret = store.create("bob")
    tampered = secret[:-1] + _other_char(secret[-1])
    # bob's id with alice's random part: a valid-looking secret of the wrong key
    swapped = f"tm-{other.key_id}-{secret.split('-', 2)[2]}"
    for bad in (tampered, swapped, "", "tm-", secret + "x", secret.upper(), " " + secret, "Bearer " + secret,
                f"tm-{'0' * 12}-{secret.split('-', 2)[2]}", "sk-" + secret[3:]):
        assert store.authenticate(bad) is None, bad
    assert store.authenticate(None) is None
    assert store.authenticate(secret) == record and store.authenticate(other_secret) == other


def test_revocation_is_immediate_in_the_same_process(database_url):
    store = KeyStore(open_database(database_url))
    record, secret = store.create("alice")
    assert store.authenticate(secret) == record  # now cached
    assert store.revoke(record.key_id) is True
    assert store.authenticate(secret) is None
    assert store.revoke(record.key_id) is False  # already revoked
    assert store.revoke("000000000000") is False  # unknown
    revoked = store.get(record.key_id)
    assert revoked.revoked and revoked.revoked_at is not None
    assert [key.key_id for key in store.list()] == []
    assert [key.key_id for key in store.list(include_revoked=True)] == [record.key_id]


def test_another_process_sees_a_revocation_within_the_cache_ttl(sqlite_url):
    database = open_database(sqlite_url)
    clock = FakeClock()
    gateway_store = KeyStore(database, cache_ttl_s=5.0, clock=clock)   # a gateway process
    admin_store = KeyStore(database)                                   # `tokenmill keys revoke` elsewhere
    record, secret = admin_store.create("alice")
    assert gateway_store.authenticate(secret) == record
    admin_store.revoke(record.key_id)
    clock.now += 4.9
    assert gateway_store.authenticate(secret) == record  # still inside the documented TTL
    clock.now += 0.2
    assert gateway_store.authenticate(secret) is None


def test_authentication_is_served_from_the_cache(sqlite_url):
    database = open_database(sqlite_url)
    store = KeyStore(database)
    record, secret = store.create("alice")
    store.clear_cache()
    statements = count_queries(database)
    assert store.authenticate(secret) == record
    first = len(statements)
    assert first == 1
    for _ in range(50):
        assert store.authenticate(secret) == record
        assert store.authenticate(secret[:-1] + _other_char(secret[-1])) is None
    unknown = f"tm-{'1' * 12}-{secret.split('-', 2)[2]}"
    assert store.authenticate(unknown) is None
    after_unknown = len(statements)
    for _ in range(50):
        assert store.authenticate(unknown) is None  # misses are cached too
    assert len(statements) == after_unknown == first + 1


def test_authenticate_async_answers_cache_hits_inline_and_reads_in_a_thread(sqlite_url):
    store = KeyStore(open_database(sqlite_url))
    record, secret = store.create("alice")
    store.clear_cache()

    async def main():
        first = await store.authenticate_async(secret)
        again = await asyncio.gather(*(store.authenticate_async(secret) for _ in range(20)))
        wrong = await store.authenticate_async(secret[:-1] + _other_char(secret[-1]))
        return first, again, wrong

    first, again, wrong = asyncio.run(main())
    assert first == record and all(key == record for key in again) and wrong is None


def test_secrets_stay_out_of_reprs_and_logs(sqlite_url, caplog):
    caplog.set_level(logging.DEBUG)
    database = open_database(sqlite_url)
    store = KeyStore(database)
    record, secret = store.create("alice")
    store.authenticate(secret)
    store.authenticate(secret[:-1] + _other_char(secret[-1]))
    random_part = secret.split("-", 2)[2]
    for shown in (repr(record), str(record), repr(store), repr(vars(store)), repr(store._cache), repr(database)):
        assert random_part not in shown
    assert random_part not in caplog.text


def test_update_limits_replaces_limits_models_and_overflow(database_url):
    store = KeyStore(open_database(database_url))
    record, secret = store.create("alice", allowed_models=["a"], limits=KeyLimits(requests_per_minute=5))
    assert store.authenticate(secret).limits.requests_per_minute == 5  # cached
    updated = store.update_limits(record.key_id, KeyLimits(tokens_per_minute=1000, max_tokens=256),
                                  allowed_models=["b", "c-*"], allow_overflow=False)
    assert updated.limits == KeyLimits(tokens_per_minute=1000, max_tokens=256)
    assert updated.allowed_models == ("b", "c-*") and updated.allow_overflow is False
    assert store.authenticate(secret) == updated  # the cache was refreshed
    assert store.get(record.key_id) == updated
    kept = store.update_limits(record.key_id, KeyLimits())
    assert kept.allowed_models == ("b", "c-*") and kept.allow_overflow is False and kept.limits == KeyLimits()
    with pytest.raises(UnknownKeyError):
        store.update_limits("000000000000", KeyLimits())


def test_allowed_models_with_exact_names_and_wildcards():
    def key(models):
        return ApiKey("k", "n", "tm-k-", tuple(models), KeyLimits(), True, None, None)

    assert key([]).allows_model("anything")
    assert key(["gemma-3-270m", "auto"]).allows_model("auto")
    assert not key(["gemma-3-270m"]).allows_model("gpt-4o")
    assert key(["gpt-4o*"]).allows_model("gpt-4o-mini")
    assert not key(["gpt-4o*"]).allows_model("gpt-5")


@pytest.mark.parametrize("limits, message", [
    (dict(requests_per_minute=0), "requests_per_minute must be a positive integer"),
    (dict(tokens_per_minute=-5), "tokens_per_minute must be a positive integer"),
    (dict(max_concurrent=1.5), "max_concurrent must be a positive integer"),
    (dict(max_tokens=True), "max_tokens must be a positive integer"),
    (dict(monthly_budget_usd=-1), "monthly_budget_usd must be a non-negative number"),
    (dict(monthly_budget_usd=float("nan")), "monthly_budget_usd must be a non-negative number"),
])
def test_bad_limits_are_refused_with_a_clear_message(limits, message):
    with pytest.raises(ValueError, match=message):
        KeyLimits(**limits)


def test_bad_key_fields_are_refused(sqlite_url):
    store = KeyStore(open_database(sqlite_url))
    with pytest.raises(ValueError, match="non-empty name"):
        store.create("   ")
    with pytest.raises(ValueError, match="longer than 200"):
        store.create("x" * 201)
    with pytest.raises(ValueError, match="allowed model names"):
        store.create("alice", allowed_models=["ok", ""])
    assert store.list(include_revoked=True) == []


def test_a_database_outage_is_bridged_by_recent_entries_then_reported(sqlite_url):
    database = open_database(sqlite_url)
    clock = FakeClock()
    store = KeyStore(database, cache_ttl_s=5.0, stale_if_error_s=60.0, clock=clock)
    record, secret = store.create("alice")
    assert store.authenticate(secret) == record
    with database.write() as connection:  # the keys table becomes unreadable
        connection.execute(text("ALTER TABLE gateway_api_keys RENAME TO gateway_api_keys_away"))
    clock.now += 30  # past the TTL: the database is asked, fails, and the recent entry answers
    assert store.authenticate(secret) == record
    assert store.authenticate(secret[:-1] + _other_char(secret[-1])) is None
    with pytest.raises(KeyStoreUnavailableError, match="unreachable"):
        store.authenticate(f"tm-{'2' * 12}-{secret.split('-', 2)[2]}")  # never seen: nothing to fall back on
    clock.now += 60
    with pytest.raises(KeyStoreUnavailableError):
        store.authenticate(secret)
    with database.write() as connection:
        connection.execute(text("ALTER TABLE gateway_api_keys_away RENAME TO gateway_api_keys"))
    assert store.authenticate(secret) == record
