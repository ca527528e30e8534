"""The gateway config: the shipped example loads, and every kind of mistake is named."""
from pathlib import Path

import pytest
import yaml

from tokenmill.gateway.config import ConfigError, load_config, parse_config

EXAMPLE = Path(__file__).resolve().parents[2] / "deploy" / "gateway" / "gateway.example.yaml"


def minimal(**overrides) -> dict:
    config = {
        "pools": {"small": {"tier": "self_hosted", "model": "m", "upstreams": [{"base_url": "http://h:1/v1"}]},
                  "api": {"tier": "external", "model": "big", "upstreams": [{"base_url": "https://api.x/v1"}],
                          "cost": {"price_per_1m_input": 1, "price_per_1m_output": 2}}},
        "models": {"small": {"pool": "small", "overflow": "api"}, "big": {"pool": "api"}},
    }
    config.update(overrides)
    return config


def test_the_example_config_loads_with_its_documented_meaning(monkeypatch):
    monkeypatch.setenv("MISTRAL_API_KEY", "sk-test")
    config = load_config(EXAMPLE)
    assert config.aliases == ["gemma", "frontier", "auto"]
    small, frontier = config.pools["small"], config.pools["frontier"]
    assert small.tier == "self_hosted" and len(small.upstreams) == 2 and small.sla_wait_s == 2.0
    assert small.health.path == "/health" and small.health.metrics_path == "/metrics"
    # an external API has no /health: passive ejection only, by default
    assert frontier.health.path is None and frontier.health.metrics_path is None
    assert config.models["gemma"].overflow == "frontier"
    assert config.upstream_api_keys()[("frontier", 0)] == "sk-test"
    assert small.upstreams[0].origin == "http://10.0.0.11:8000"


def test_an_unset_api_key_variable_is_named(monkeypatch):
    monkeypatch.delenv("MISTRAL_API_KEY", raising=False)
    with pytest.raises(ConfigError, match=r"pools\.frontier\.upstreams\.0\.api_key_env: .*MISTRAL_API_KEY is not set"):
        load_config(EXAMPLE)


@pytest.mark.parametrize("change, message", [
    (lambda c: c["pools"]["small"]["upstreams"][0].update(base_url="ftp://h/v1"),
     r"pools\.small\.upstreams\.0\.base_url: .*http:// or https://"),
    (lambda c: c["pools"]["small"].update(tier="cloud"), r"pools\.small\.tier"),
    (lambda c: c["pools"]["small"].update(upstreams=[]), r"pools\.small\.upstreams"),
    (lambda c: c["pools"]["small"].update(timeouts={"first_token_s": 10, "total_s": 5}),
     r"first_token_s \(10.0\) must not exceed total_s"),
    (lambda c: c["pools"]["small"].update(cost={"gpu_hourly_usd": 1, "price_per_1m_input": 1}), r"not both"),
    (lambda c: c["pools"]["small"].update(sla_wait_s=-1), r"pools\.small\.sla_wait_s"),
    (lambda c: c["pools"]["small"].update(queue={"max_concurrent_per_upstream": 0}),
     r"max_concurrent_per_upstream"),
    (lambda c: c["pools"]["small"].update(health={"path": "health"}), r"must start with '/'"),
    (lambda c: c["pools"]["small"].update(colour="red"), r"pools\.small\.colour: Extra inputs"),
    (lambda c: c["models"].update(x={"pool": "nowhere"}), r"models\.x\.pool: no pool named 'nowhere'"),
    (lambda c: c["models"]["small"].update(overflow="small"), r"models\.small\.overflow: must be another pool"),
    (lambda c: c["models"].update(auto={"pool": "small"}), r"'auto' is reserved"),
    (lambda c: c.update(auto={"small": "small", "frontier": "gpt"}), r"auto\.frontier: no model alias named 'gpt'"),
    (lambda c: c.update(listen={"port": 70000}), r"listen\.port"),
])
def test_each_mistake_names_its_field(change, message):
    data = minimal()
    change(data)
    with pytest.raises(ConfigError, match=message):
        parse_config(data, "gateway.yaml")


def test_file_problems_are_one_clear_line(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("pools: [unclosed\n")
    with pytest.raises(ConfigError, match=r"not valid YAML \(line \d+, column \d+\)"):
        load_config(broken)
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("just a string\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_config(scalar)
    empty = tmp_path / "empty.yaml"
    empty.write_text(yaml.safe_dump(minimal(pools={})))
    with pytest.raises(ConfigError, match="pools"):
        load_config(empty)


def test_defaults_fill_what_is_left_out():
    config = parse_config(minimal())
    pool = config.pools["small"]
    assert config.database_url.startswith("sqlite:///") and config.database_url.endswith("gateway.db")
    assert (config.listen.host, config.listen.port) == ("127.0.0.1", 8080)
    assert pool.max_tokens == 4096 and pool.sla_wait_s is None and pool.max_attempts == 3
    assert pool.timeouts.connect_s == 5 and pool.queue.max_queue == 1024
    assert config.aliases == ["small", "big"]  # no auto section: no auto alias
