"""Fixtures of the gateway tests: real Redis, PostgreSQL and SQLite, each test isolated.

* `redis_url` (session): URL of a real Redis server (found or started by
  `services.find_redis`; see services.py for the order).
* `redis_prefix` (function): a key prefix of this test's own
  (`tokenmill:test:<hex>:`); every key under it is deleted after the test.
* `postgres_server_url` (session): URL of a real PostgreSQL server.
* `postgres_url` (function): URL of a fresh, empty schema on that server, made
  the default through the URL's `options=-csearch_path=...`; dropped after the
  test. Pass it to `open_database` or to a gateway process as is.
* `sqlite_url` (function): `sqlite:///<tmp>/gateway.db`, a file of this test's own.
* `database_url` (function, parametrized): each test using it runs once on
  SQLite and once on PostgreSQL.

When a server cannot be found, started or installed, the test fails with a
message that says what was tried.
"""
import uuid

import pytest

import services


def _require(finder):
    try:
        return finder()
    except services.ServiceUnavailable as error:
        pytest.fail(str(error), pytrace=False)


@pytest.fixture(scope="session")
def redis_url():
    url, stop = _require(services.find_redis)
    services.register_stop(stop)
    yield url
    if stop is not None:
        stop()


@pytest.fixture
def redis_prefix(redis_url):
    import redis

    prefix = f"tokenmill:test:{uuid.uuid4().hex[:12]}:"
    yield prefix
    client = redis.Redis.from_url(redis_url)
    try:
        keys = list(client.scan_iter(match=prefix + "*", count=1000))
        if keys:
            client.delete(*keys)
    finally:
        client.close()


@pytest.fixture(scope="session")
def postgres_server_url():
    url, stop = _require(services.find_postgres)
    services.register_stop(stop)
    yield url
    if stop is not None:
        stop()


@pytest.fixture
def postgres_url(postgres_server_url):
    import psycopg

    from tokenmill.gateway.store import close_database

    schema = f"tm_test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(postgres_server_url, autocommit=True) as connection:
        connection.execute(f'CREATE SCHEMA "{schema}"')
    url = services.with_search_path(postgres_server_url, schema)
    yield url
    close_database(url)
    with psycopg.connect(postgres_server_url, autocommit=True) as connection:
        connection.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


@pytest.fixture
def sqlite_url(tmp_path):
    from tokenmill.gateway.store import close_database

    url = f"sqlite:///{tmp_path / 'gateway.db'}"
    yield url
    close_database(url)


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request):
    return request.getfixturevalue("sqlite_url" if request.param == "sqlite" else "postgres_url")
