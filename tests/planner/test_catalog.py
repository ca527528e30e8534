"""The shipped catalogs and user catalogs: contents, sources, lookups, overrides, errors."""
import pytest

from tokenmill.planner.catalog import CHEAPEST, builtin_catalog, load_catalog, load_catalog_file
from tokenmill.planner.errors import PlanError

CATALOG = builtin_catalog()


def test_devices_of_the_issue_are_there():
    names = {device.name for device in CATALOG.devices}
    assert {"rtx-3090", "rtx-4090", "l40s", "a100-80gb", "h100-sxm", "h200", "cpu"} <= names
    for device in CATALOG.devices:
        assert device.memory_gb > 0 and device.memory_bandwidth_gb_per_s > 0 and device.dense_tflops


def test_models_and_precisions_of_the_issue_are_there():
    for name in ("llama-3-8b", "llama-3-70b", "mistral-7b", "qwen2.5-7b", "gemma-3-270m", "llama-2-13b",
                 "qwen2.5-32b"):
        CATALOG.model(name)
    for name in ("fp16", "bf16", "fp8", "int8", "int4-awq", "int4-gptq", "q4_k_m", "gguf-file"):
        CATALOG.precision(name)


def test_every_entry_has_a_source_and_a_date():
    entries = [*CATALOG.devices, *CATALOG.models, *CATALOG.precisions, *CATALOG.apis]
    entries += [price for device in CATALOG.devices for price in (*device.prices, *device.serverless_prices)]
    for entry in entries:
        assert entry.source and entry.date, entry


@pytest.mark.parametrize("device, provider, low, high, per", [
    ("rtx-4090", "marketplace-low", 0.39, 0.39, "hour"),
    ("l40s", "marketplace-low", 0.88, 0.88, "hour"),
    ("h100-sxm", "marketplace-low", 1.87, 1.87, "hour"),
    ("h100-sxm", "aws", 8.46, 8.46, "hour"),
    ("h200", "marketplace-low", 1.84, 1.84, "hour"),
    ("h100-sxm", "cloud-on-demand", 3.50, 5.50, "hour"),
    ("a100-80gb", "cloud-on-demand", 1.80, 3.00, "hour"),
    ("l40s", "cloud-on-demand", 1.20, 1.80, "hour"),
    ("a100-80gb", "cloud-monthly", 1500, 2500, "month"),
])
def test_seed_prices(device, provider, low, high, per):
    price = CATALOG.device(device).price(provider, "mid", 720)
    assert (price.low, price.high, price.per) == (low, high, per)


def test_price_choice():
    h100 = CATALOG.device("h100")
    assert h100.price(None, "mid", 720).provider == "marketplace-low"  # first listed: the seed's rate
    assert h100.price(CHEAPEST, "mid", 720).usd_per_hour(720, "mid") == 1.87
    ranged = h100.price("cloud-on-demand", "mid", 720)
    assert [ranged.at(point) for point in ("low", "mid", "high")] == [3.5, 4.5, 5.5]
    monthly = CATALOG.device("a100").price("cloud-monthly", "low", 730)
    assert monthly.usd_per_month(730, "low") == 1500  # monthly prices ignore the hours
    with pytest.raises(PlanError, match=r"unknown provider for h100-sxm 'nowhere' \(choose from: aws, cheapest, "):
        h100.price("nowhere", "mid", 720)


def test_ecc_and_mig_flags():
    assert not CATALOG.device("rtx-4090").ecc and not CATALOG.device("rtx-4090").mig
    assert CATALOG.device("a100").ecc and CATALOG.device("h100").mig
    assert CATALOG.device("l40s").ecc and not CATALOG.device("l40s").mig


def test_lookups_accept_aliases_and_name_the_choices():
    assert CATALOG.device("H100").name == "h100-sxm"
    assert CATALOG.precision("awq").name == "int4-awq"
    assert CATALOG.model("default").name == "gemma-3-270m"
    with pytest.raises(PlanError, match=r"unknown GPU 'x100' \(choose from: a100-80gb, cpu, h100-sxm"):
        CATALOG.device("x100")
    with pytest.raises(PlanError, match="unknown precision 'int3'"):
        CATALOG.precision("int3")


def test_user_catalog_replaces_and_adds(tmp_path, monkeypatch):
    monkeypatch.setenv("TOKENMILL_CACHE_DIR", str(tmp_path / "cache"))
    path = tmp_path / "mine.yaml"
    path.write_text("""
version: 1
devices:
  - name: rtx-4090
    memory_gb: 24
    memory_bandwidth_gb_per_s: 1008
    dense_tflops: {bf16: 165.2}
    source: my rack
    date: 2026-11-01
    prices:
      - {provider: own, usd_per_month: 90, source: power bill, date: 2026-11-01}
  - name: b200
    memory_gb: 180
    memory_bandwidth_gb_per_s: 8000
    dense_tflops: {bf16: 2250, fp8: 4500}
    source: datasheet
    date: 2025-03
apis:
  - {name: house-model, usd_per_million_input: 0.2, usd_per_million_output: 0.8, source: contract, date: 2026-10}
""")
    catalog = load_catalog([path])
    assert catalog.device("rtx-4090").prices[0].provider == "own"
    assert catalog.device("rtx-4090").date == "2026-11-01"  # YAML dates come back as text
    assert catalog.device("b200").memory_gb == 180
    assert catalog.api("house-model").usd_per_million_output == 0.8
    assert len(catalog.devices) == len(CATALOG.devices) + 1


@pytest.mark.parametrize("text, message", [
    ("devices: [{name: x}]", "missing 'memory_gb'"),
    ("devices: [{name: x, memory_gb: -1}]", "memory_gb must be positive"),
    ("version: 2", "version 2 is not supported"),
    ("gpus: []", "unknown section"),
    ("devices: [{name: x, memory_gb: 1, memory_bandwidth_gb_per_s: 1, dense_tflops: {fp4: 1}, source: s, date: d}]",
     "unknown compute type 'fp4'"),
    ("models: 3", "models must be a list"),
    (": : :", "not valid YAML"),
])
def test_bad_user_catalogs(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(PlanError, match=message):
        load_catalog_file(path)


def test_missing_catalog_file(tmp_path):
    with pytest.raises(PlanError, match="cannot read catalog"):
        load_catalog_file(tmp_path / "nope.yaml")
