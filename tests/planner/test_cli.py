"""`tokenmill plan` end to end through the command line entry point."""
import json
import subprocess
import sys

import pytest

from tokenmill.cli import main
from tokenmill.planner import measure
from tokenmill.planner.catalog import Device

JSON_KEYS = {"weights_gb", "kv_bytes_per_token", "max_concurrent_sequences", "single_stream_tokens_per_s",
             "peak_concurrency", "gpus_needed", "monthly_cost_usd", "cost_per_user_usd",
             "cost_per_million_tokens_usd", "api_monthly_cost_usd", "breakeven_tokens_per_month"}


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path, monkeypatch):
    """Measured profiles and GGUF parses go to a fresh cache, never the user's."""
    monkeypatch.setenv("TOKENMILL_CACHE_DIR", str(tmp_path / "cache"))


def run(capsys, *argv):
    code = main(["plan", *argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_one_scenario_as_json(capsys):
    code, out, _ = run(capsys, "--model", "mistral-7b", "--gpu", "rtx-4090", "--tokens-per-s-per-user", "40",
                       "--json")
    assert code == 0
    document = json.loads(out)
    assert JSON_KEYS <= set(document)
    assert document["gpus_needed"] == 1
    assert document["monthly_cost_usd"] == pytest.approx(280.8)
    assert document["weights_gb"] == pytest.approx(14.496, abs=1e-3)
    assert document["kv_bytes_per_token"] == 131072
    assert set(document["api_monthly_cost_usd"]) == set(document["breakeven_tokens_per_month"])
    assert document["inputs"]["daily_active_users"] == 1000


def test_text_shows_the_working(capsys):
    code, out, _ = run(capsys, "--model", "llama-3-8b", "--gpu", "l40s", "--dau", "5000")
    assert code == 0
    for label in ("Weights", "KV per token", "KV capacity", "Single stream", "Peak concurrency", "Fleet",
                  "Monthly cost", "Per 1M tokens", "API gpt-4o", "Serverless"):
        assert label in out


def test_infeasible_scenario_says_why_and_how_to_fix(capsys):
    code, out, _ = run(capsys, "--model", "llama-3-70b", "--precision", "fp16", "--gpu", "h100", "--json")
    document = json.loads(out)
    assert code == 0 and document["feasible"] is False and document["gpus_needed"] is None
    assert "141.1 GB" in document["infeasible_reason"]
    assert document["fix"].startswith("use 2 with tensor parallelism")


def test_tensor_parallel_auto(capsys):
    _, out, _ = run(capsys, "--model", "llama-3-70b", "--precision", "fp16", "--gpu", "h100", "--tensor-parallel",
                    "auto", "--json")
    document = json.loads(out)
    assert document["feasible"] and document["tensor_parallel"] == 2 and document["gpus_needed"] == 2


def test_redundancy_adds_a_replica(capsys):
    _, out, _ = run(capsys, "--model", "mistral-7b", "--gpu", "rtx-4090", "--redundancy", "--json")
    assert json.loads(out)["gpus_needed"] == 2


def test_comparison_is_sorted_by_monthly_cost(capsys):
    code, out, _ = run(capsys, "--compare", "--model", "llama-3-70b", "--dau", "20000", "--json")
    plans = json.loads(out)["plans"]
    assert code == 0 and len(plans) > 10
    feasible = [plan for plan in plans if plan["feasible"]]
    costs = [plan["monthly_cost_usd"] for plan in feasible]
    assert costs == sorted(costs)
    assert all(not plan["feasible"] for plan in plans[len(feasible):])
    assert {plan["gpu"] for plan in plans} == {"rtx-3090", "rtx-4090", "l40s", "a100-80gb", "h100-sxm", "h200"}


def test_comparison_table_and_markdown(capsys):
    _, text, _ = run(capsys, "--compare", "--model", "mistral-7b", "--gpu", "rtx-4090,h100", "--precision",
                     "bf16,int4-awq")
    assert "GPU" in text and "$/month" in text and text.count("rtx-4090") == 2
    _, markdown, _ = run(capsys, "--compare", "--model", "mistral-7b", "--gpu", "rtx-4090", "--markdown")
    assert "| GPU | precision |" in markdown


def test_markdown_scenario(capsys):
    _, out, _ = run(capsys, "--model", "mistral-7b", "--gpu", "l40s", "--markdown")
    assert out.startswith("### Mistral 7B v0.3") and "- **Monthly cost**" in out


@pytest.mark.parametrize("argv, message", [
    (["--gpu", "x100"], "unknown GPU 'x100' (choose from: a100-80gb, cpu, h100-sxm, h200, l40s, rtx-3090, rtx-4090)"),
    (["--gpu", "h100", "--dau", "-5"], "--dau must be positive, got -5"),
    (["--gpu", "h100", "--peak-share", "1.5"], "--peak-share must be in (0, 1]"),
    (["--gpu", "h100", "--precision", "int3"], "unknown precision 'int3' (choose from:"),
    (["--gpu", "h100", "--model", "gpt-5"], "unknown model 'gpt-5' (choose from:"),
    (["--gpu", "h100", "--api", "nope"], "unknown API 'nope' (choose from:"),
    (["--gpu", "h100", "--provider", "nope"], "unknown provider for h100-sxm 'nope' (choose from:"),
    (["--gpu", "h100", "--price-point", "best"], "--price-point must be low, mid or high"),
    (["--gpu", "h100", "--tensor-parallel", "3"], "--tensor-parallel must be one of 1, 2, 4, 8 or auto"),
    (["--gpu", "h100", "--kv-cache-dtype", "fp4"], "unknown --kv-cache-dtype 'fp4' (choose from:"),
    (["--gpu", "cpu"], "cpu has no price in the catalog"),
    ([], "give --gpu NAME (choose from:"),
])
def test_nonsense_gives_one_line_naming_the_choices(capsys, argv, message):
    code, out, err = run(capsys, *argv)
    if message.startswith("cpu has no price"):  # not an error: the plan says so and prices nothing
        assert code == 0 and message in out
        return
    assert code == 2 and not out
    assert err.count("\n") == 1 and err.startswith("tokenmill plan: error: ")
    assert message in err


def test_argument_type_errors_are_one_line_too(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["plan", "--gpu", "h100", "--dau", "many"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert err == "tokenmill plan: error: argument --dau: invalid float value: 'many'\n"


def test_plots(capsys, tmp_path):
    code, _, err = run(capsys, "--model", "mistral-7b", "--gpu", "rtx-4090", "--plot", str(tmp_path / "plots"))
    assert code == 0 and "monthly_cost_vs_dau.png" in err
    for name in ("monthly_cost_vs_dau.png", "breakeven.png"):
        assert (tmp_path / "plots" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_measured_profile_becomes_the_cpu_device(capsys, monkeypatch):
    fake = Device(name="cpu", label="Test CPU (4 threads)", kind="cpu", memory_gb=16,
                  memory_bandwidth_gb_per_s=20, dense_tflops={"fp32": 0.2, "bf16": 0.4}, ecc=False, mig=False,
                  source="test", date="2026-11-23")
    monkeypatch.setattr(measure, "measure_cpu", lambda: fake)
    code, out, _ = run(capsys, "--measure-device")
    assert code == 0 and "wrote" in out
    _, out, _ = run(capsys, "--gpu", "cpu", "--usd-per-hour", "0.1", "--tokens-per-s-per-user", "5", "--json")
    document = json.loads(out)
    assert document["gpu_label"] == "Test CPU (4 threads)" and document["precision"] == "fp32"
    assert document["feasible"], document["infeasible_reason"]
    assert document["monthly_cost_usd"] == pytest.approx(0.1 * 720 * document["gpus_needed"])


def test_calibrate_writes_a_profile_plans_can_use(capsys, tmp_path):
    points = [{"concurrency": c, "output_tokens_per_s": 2.0 * c / (1 + 0.05 * c), "input_tokens": 64,
               "output_tokens": 32} for c in (1, 2, 4, 8, 16, 32)]
    results = tmp_path / "points.json"
    results.write_text(json.dumps(points))
    profile = tmp_path / "cpu-profile.yaml"
    code, out, _ = run(capsys, "--calibrate", str(results), "--out", str(profile))
    assert code == 0 and "fitted efficiency" in out and "largest aggregate tokens/s error" in out
    code, out, _ = run(capsys, "--calibrate", str(results), "--json")
    fitted = json.loads(out)
    assert fitted["worst_tokens_per_s_error"] < 0.25 and len(fitted["points"]) == 6
    _, out, _ = run(capsys, "--gpu", "cpu", "--device-profile", str(profile), "--usd-per-hour", "0.1", "--json")
    assert json.loads(out)["efficiency"] == pytest.approx(fitted["efficiency"], rel=1e-4)


def test_list(capsys):
    code, out, _ = run(capsys, "--list")
    assert code == 0
    for text in ("Devices:", "rtx-4090", "Models:", "llama-3-70b", "Precisions:", "q4_k_m", "APIs", "gpt-4o"):
        assert text in out


def test_planner_imports_no_torch():
    code = ("import sys, tokenmill.cli; from tokenmill.planner import command, plan, render, calibration, measure, "
            "architecture, plots; from tokenmill.planner.catalog import load_catalog; load_catalog(); "
            "assert 'torch' not in sys.modules and 'matplotlib' not in sys.modules, sorted(sys.modules)")
    subprocess.run([sys.executable, "-c", code], check=True)
