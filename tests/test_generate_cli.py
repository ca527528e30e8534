import json
import subprocess
import sys

import pytest


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "tokenmill.cli", *args], capture_output=True, text=True,
                          timeout=300)


def test_help_lists_engine_flags():
    result = run_cli("generate", "--help")
    assert result.returncode == 0
    for flag in ("--max-model-len", "--max-num-seqs", "--enable-prefix-caching", "--kv-cache-memory"):
        assert flag in result.stdout


def test_missing_model_is_a_one_line_error():
    result = run_cli("generate", "--model", "no/such/model", "--prompt", "hi")
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "no/such/model" in result.stderr
    assert "Traceback" not in result.stderr


def test_invalid_sampling_value_is_a_one_line_error():
    result = run_cli("generate", "--prompt", "hi", "--top-p", "0")
    assert result.returncode == 2 and "top_p" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.slow
def test_generate_json_with_default_model():
    result = run_cli("generate", "--prompt", "The capital of France is", "--max-tokens", "6", "--json")
    assert result.returncode == 0, result.stderr
    record = json.loads(result.stdout.strip().splitlines()[-1])
    assert record["prompt"] == "The capital of France is"
    assert len(record["token_ids"]) <= 6 and record["text"]
