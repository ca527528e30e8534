"""`tokenmill gateway`: a bad start is one clear line and exit status 2, never a traceback."""
import subprocess
import sys

import yaml
from gateway_harness import GatewayProcess, config_dict, fast_pool

from tokenmill.cli import main


def run(capsys, *argv) -> tuple[int, str]:
    status = main(["gateway", *argv])
    return status, capsys.readouterr().err


def test_config_problems_are_one_line_each(tmp_path, capsys):
    status, err = run(capsys, "--config", str(tmp_path / "nope.yaml"))
    assert status == 2 and err.strip() == f"tokenmill gateway: error: config file not found: {tmp_path / 'nope.yaml'}"
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"pools": {"p": {"tier": "gpu", "model": "m", "upstreams": []}},
                                   "models": {"m": {"pool": "p"}}}))
    status, err = run(capsys, "--config", str(bad))
    assert status == 2 and len(err.strip().splitlines()) == 1
    assert "pools.p.tier" in err and "pools.p.upstreams" in err and "Traceback" not in err
    secret = tmp_path / "secret.yaml"
    pool = fast_pool(["https://api.example/v1"], tier="external")
    pool["upstreams"][0]["api_key_env"] = "TOKENMILL_TEST_UNSET_KEY"
    secret.write_text(yaml.safe_dump(config_dict("sqlite:///x.db", {"api": pool}, {"m": {"pool": "api"}})))
    status, err = run(capsys, "--config", str(secret))
    assert status == 2 and "TOKENMILL_TEST_UNSET_KEY is not set" in err
    status, err = run(capsys, "--config", str(secret), "--port", "70000")
    assert status == 2 and "--port must be between 0 and 65535" in err


def test_an_unreachable_database_is_one_line(tmp_path):
    config = config_dict("postgresql://nobody@127.0.0.1:9/none", {"p": fast_pool(["http://127.0.0.1:9/v1"])},
                         {"m": {"pool": "p"}})
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump(config))
    result = subprocess.run([sys.executable, "-m", "tokenmill.cli", "gateway", "--config", str(path)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("tokenmill gateway: error: cannot open the database")
    assert "Traceback" not in result.stderr


def test_the_gateway_starts_and_answers_health_with_its_pools(tmp_path, sqlite_url):
    gateway = GatewayProcess(tmp_path, config_dict(sqlite_url, {"p": fast_pool(["http://127.0.0.1:9/v1"])},
                                                   {"m": {"pool": "p"}}))
    try:
        gateway.wait_ready()
        import httpx
        health = httpx.get(f"{gateway.base_url}/health", timeout=5).json()
        assert health["status"] == "ok" and health["pools"]["p"]["upstreams"] == 1
    finally:
        gateway.stop()
    assert gateway.process.returncode == 0, gateway.log()
