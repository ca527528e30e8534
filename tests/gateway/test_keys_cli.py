"""`tokenmill keys create|list|revoke|usage` as a user runs them."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tokenmill.cli import main
from tokenmill.gateway.keys import KeyStore
from tokenmill.gateway.ledger import Ledger, UsageRecord
from tokenmill.gateway.store import open_database

ROOT = Path(__file__).resolve().parents[2]


def keys(capsys, *args) -> tuple[int, str, str]:
    code = main(["keys", *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_create_prints_the_secret_once_with_a_warning(capsys, database_url):
    code, out, err = keys(capsys, "create", "--name", "team-a", "--model", "gemma-3-270m", "--model", "auto",
                          "--rpm", "60", "--tpm", "20000", "--max-concurrent", "4", "--budget", "25",
                          "--max-tokens", "512", "--no-overflow", "--db", database_url)
    assert code == 0 and err == ""
    secret = next(line.split(": ", 1)[1] for line in out.splitlines() if line.startswith("secret: "))
    assert "shown only once" in out
    record = KeyStore(open_database(database_url)).authenticate(secret)
    assert record.name == "team-a" and record.allowed_models == ("gemma-3-270m", "auto")
    assert record.limits.requests_per_minute == 60 and record.limits.tokens_per_minute == 20000
    assert record.limits.max_concurrent == 4 and record.limits.monthly_budget_usd == 25.0
    assert record.limits.max_tokens == 512 and record.allow_overflow is False
    assert "60 rpm, 20000 tpm, 4 concurrent, $25/month, max_tokens 512" in out

    code, out, _ = keys(capsys, "list", "--db", database_url)
    assert code == 0 and record.key_id in out and "team-a" in out
    assert secret not in out and secret.split("-", 2)[2] not in out


def test_json_output_and_the_lifecycle_of_a_key(capsys, sqlite_url):
    code, out, _ = keys(capsys, "create", "--name", "bot", "--json", "--db", sqlite_url)
    created = json.loads(out)
    assert code == 0 and created["secret"].startswith(f"tm-{created['id']}-") and "warning" in created
    code, out, _ = keys(capsys, "list", "--json", "--db", sqlite_url)
    assert [key["id"] for key in json.loads(out)] == [created["id"]]
    assert "secret" not in out

    code, out, _ = keys(capsys, "revoke", created["id"], "--db", sqlite_url)
    assert code == 0 and f"revoked {created['id']}" in out
    assert KeyStore(open_database(sqlite_url)).authenticate(created["secret"]) is None
    code, out, _ = keys(capsys, "revoke", created["id"], "--db", sqlite_url)
    assert code == 0 and "already revoked" in out
    code, out, _ = keys(capsys, "list", "--json", "--db", sqlite_url)
    assert json.loads(out) == []
    code, out, _ = keys(capsys, "list", "--all", "--json", "--db", sqlite_url)
    assert json.loads(out)[0]["revoked_at"] is not None


def test_usage_as_a_table_and_as_json(capsys, sqlite_url):
    database = open_database(sqlite_url)
    record, _ = KeyStore(database).create("user")
    ledger = Ledger(database)
    for index, (model, cost) in enumerate((("gemma", 0.01), ("gemma", 0.02), ("gpt-4o", 1.5))):
        ledger.record(UsageRecord(f"r{index}", record.key_id, model, "auto:" + model, "u", "self", 200, 100, 50,
                                  0.1, 0.5, cost))
    ledger.close()
    code, out, _ = keys(capsys, "usage", record.key_id, "--db", sqlite_url)
    assert code == 0
    total_line = next(line for line in out.splitlines() if line.startswith("total"))
    assert total_line.split()[1:6] == ["3", "300", "150", "1.530000", "0"]
    assert "gpt-4o" in out and "auto:gemma" in out
    code, out, _ = keys(capsys, "usage", "--json", "--since", "7d", "--db", sqlite_url)
    report = json.loads(out)
    assert report["totals"]["requests"] == 3 and report["by_model"]["gemma"]["requests"] == 2


def test_the_config_file_names_the_database(capsys, tmp_path, sqlite_url):
    config = tmp_path / "gateway.yaml"
    config.write_text(f"database_url: {sqlite_url}\npools: {{}}\n")
    code, _out, _ = keys(capsys, "create", "--name", "from-config", "--json", "--config", str(config))
    assert code == 0
    assert [key.name for key in KeyStore(open_database(sqlite_url)).list()] == ["from-config"]


def test_the_default_database_is_in_the_user_data_folder(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    code, _out, _ = keys(capsys, "create", "--name", "default-location", "--json")
    assert code == 0
    assert (tmp_path / "data" / "tokenmill" / "gateway.db").exists()


@pytest.mark.parametrize("args, message", [
    (["revoke", "000000000000"], "no API key with id '000000000000'"),
    (["usage", "000000000000"], "no API key with id '000000000000'"),
    (["list", "--db", "mysql://root@localhost/gw"], "unsupported database 'mysql'"),
    (["list", "--db", "postgresql://u:hunter2@127.0.0.1:1/gw?connect_timeout=2"], "cannot open the database"),
    (["list", "--config", "missing.yaml"], "config file not found"),
])
def test_failures_are_one_line_and_a_nonzero_exit(capsys, sqlite_url, args, message):
    if "--db" not in args and "--config" not in args:
        args = [*args, "--db", sqlite_url]
    code, out, err = keys(capsys, *args)
    assert code != 0 and out == ""
    assert message in err and len(err.strip().splitlines()) == 1
    assert "hunter2" not in err


@pytest.mark.parametrize("args", [["create", "--name", "x", "--rpm", "0"], ["create", "--name", "x", "--budget",
                                  "lots"], ["usage", "--since", "last tuesday"], ["create"], ["frobnicate"]])
def test_bad_flags_are_refused_by_the_parser(capsys, args):
    with pytest.raises(SystemExit) as exit_:
        main(["keys", *args])
    assert exit_.value.code == 2
    assert "error:" in capsys.readouterr().err


def test_a_bad_config_file_is_reported(capsys, tmp_path):
    config = tmp_path / "gateway.yaml"
    config.write_text("database_url: [1, 2\n")
    code, _, err = keys(capsys, "list", "--config", str(config))
    assert code != 0 and "not valid YAML" in err
    config.write_text("database_url: 42\n")
    code, _, err = keys(capsys, "list", "--config", str(config))
    assert code != 0 and "database_url must be a database URL string" in err


def test_every_subcommand_has_help_and_errors_print_no_traceback(tmp_path):
    env = {**os.environ, "XDG_DATA_HOME": str(tmp_path)}
    for action in ("create", "list", "revoke", "usage"):
        result = subprocess.run([sys.executable, "-m", "tokenmill.cli", "keys", action, "--help"], cwd=ROOT,
                                capture_output=True, text=True, env=env)
        assert result.returncode == 0 and "--db" in result.stdout and "--json" in result.stdout
    result = subprocess.run([sys.executable, "-m", "tokenmill.cli", "keys", "list", "--db",
                             "postgresql://gw@127.0.0.1:1/gw?connect_timeout=2"], cwd=ROOT, capture_output=True,
                            text=True, env=env)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.startswith("tokenmill keys list: error: cannot open the database")
