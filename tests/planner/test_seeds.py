"""The seeds' arithmetic, reproduced where the seeds state their inputs.

Seed 002: "Deploying LLMs to Production: A GPU Cost Optimization Guide" (2025-01-28).
Seed 000: Tensoria production LLM serving guide (prices as of May 2026).
Each assertion names the seed's figure and its tolerance. Where a seed's table
contradicts its own inputs, the test pins what the planner says instead
(docs/planner.md, "What the seeds get wrong").
"""
import math

import pytest

from tokenmill.planner.catalog import ServerlessPrice, builtin_catalog
from tokenmill.planner.economics import breakeven_tokens_per_month, compare_serverless
from tokenmill.planner.memory import GB, MemoryOptions, weight_bytes, weight_bytes_for
from tokenmill.planner.plan import DeploymentOptions, plan_deployment
from tokenmill.planner.traffic import Traffic, peak_concurrency

CATALOG = builtin_catalog()
# Seed 002's usage pattern: 3 requests/user/day, 200 output tokens, 70% of traffic in 8 hours.
SEED_002 = Traffic(daily_active_users=1000, requests_per_user_per_day=3, output_tokens=200, peak_share=0.70,
                   peak_hours=8)
SEED_002_GENERATION_S = 200 / 40  # "200 tokens at 40 tokens/sec"


def one_significant_figure(value: float) -> float:
    return float(f"{value:.1g}")


def price(device: str, provider: str):
    return CATALOG.device(device).price(provider, "mid", 720)


# ----- seed 002: the 1,000-DAU worked example -----

def test_worked_example_daily_volume():
    assert SEED_002.requests_per_day == 3000                       # "3,000 requests/day"
    assert SEED_002.requests_per_day * SEED_002.output_tokens == 600_000  # "= 600,000 tokens/day"


def test_worked_example_peak_rate():
    peak_requests = SEED_002.requests_per_day * SEED_002.peak_share
    assert peak_requests == pytest.approx(2100)                    # "2,100 requests in 8 hours"
    assert SEED_002.peak_requests_per_s * 3600 == pytest.approx(262.5)  # "262 requests/hour"
    assert SEED_002.peak_requests_per_s * 60 == pytest.approx(4.4, abs=0.05)  # "~4.4 requests/minute"


def test_worked_example_peak_concurrency():
    concurrency = peak_concurrency(SEED_002, SEED_002_GENERATION_S)
    assert concurrency == pytest.approx(0.3646, abs=1e-4)
    # "about 0.37 simultaneous requests": the seed rounds 4.375 req/min to 4.4 first (4.4 / 60 x 5 = 0.367).
    assert round(SEED_002.peak_requests_per_s * 60, 1) / 60 * SEED_002_GENERATION_S == pytest.approx(0.37, abs=0.005)
    assert concurrency == pytest.approx(0.37, abs=0.006)


@pytest.mark.parametrize("dau, seed_value", [(100, 0.04), (1_000, 0.4), (10_000, 4), (100_000, 40)])
def test_dau_table_peak_concurrency(dau, seed_value):
    concurrency = peak_concurrency(SEED_002.scaled(dau), SEED_002_GENERATION_S)
    assert one_significant_figure(concurrency) == seed_value       # the table rounds to one figure ("~0.04")
    assert concurrency == pytest.approx(seed_value, rel=0.10)


def test_full_plan_reproduces_the_worked_example():
    """The whole planner (prefill included) on the seed's setup: 7B fp16, RTX 4090, 40 tok/s per user."""
    traffic = Traffic(daily_active_users=1000, requests_per_user_per_day=3, input_tokens=500, output_tokens=200)
    plan = plan_deployment(CATALOG.model("mistral-7b"), CATALOG.precision("bf16"), CATALOG.device("rtx-4090"),
                           traffic, DeploymentOptions(tokens_per_s_per_user=40))
    assert plan.feasible
    assert plan.peak_concurrency == pytest.approx(0.37, abs=0.01)   # + modelled TTFT (~0.1 s) over the seed's 5 s
    assert plan.gpus_needed == 1                                    # "A single RTX 4090 can handle this easily"
    assert plan.monthly_cost_usd == pytest.approx(281, abs=0.5)     # "$281/mo"
    assert plan.cost_per_user_usd == pytest.approx(0.28, abs=0.005)  # "$0.28"


# ----- seed 002: monthly costs at 720 hours -----

@pytest.mark.parametrize("device, provider, hourly, monthly, per_user", [
    ("rtx-4090", "marketplace-low", 0.39, 281, 0.28),
    ("l40s", "marketplace-low", 0.88, 634, 0.63),
    ("h100-sxm", "marketplace-low", 1.87, 1346, 1.35),
    ("h100-sxm", "aws", 8.46, 6091, 6.09),
])
def test_monthly_costs_at_720_hours(device, provider, hourly, monthly, per_user):
    listed = price(device, provider)
    assert listed.low == listed.high == hourly
    plan = plan_deployment(CATALOG.model("mistral-7b"), CATALOG.precision("bf16"), CATALOG.device(device),
                           SEED_002, DeploymentOptions(provider=provider))
    assert plan.gpus_needed == 1
    assert plan.monthly_cost_usd == pytest.approx(monthly, abs=0.5)
    assert plan.cost_per_user_usd == pytest.approx(per_user, abs=0.005)


def test_cost_ratios_of_the_worked_example():
    rtx, h100, aws = (price(d, p).usd_per_month(720, "mid") for d, p in
                      (("rtx-4090", "marketplace-low"), ("h100-sxm", "marketplace-low"), ("h100-sxm", "aws")))
    assert h100 / rtx == pytest.approx(4.8, abs=0.05)    # "4.8x cheaper than the H100"
    assert aws / rtx == pytest.approx(21.7, abs=0.05)    # "21.7x cheaper than the AWS H100"


def test_dau_table_costs():
    rtx = price("rtx-4090", "marketplace-low").usd_per_month(720, "mid")
    assert 4 * rtx == pytest.approx(1124, abs=1)         # "4 / $1,124": the seed multiplies the rounded $281
    assert price("h100-sxm", "marketplace-low").usd_per_month(720, "mid") == pytest.approx(1346, abs=0.5)


def test_int4_instead_of_l40s_saves_56_percent():
    """'a 13B model quantized to INT4 (7GB) fits on an RTX 4090 ... from $0.88 to $0.39 — a 56% reduction'."""
    plan = plan_deployment(CATALOG.model("llama-2-13b"), CATALOG.precision("int4-awq"), CATALOG.device("rtx-4090"),
                           SEED_002)
    assert plan.feasible
    assert 1 - 0.39 / 0.88 == pytest.approx(0.56, abs=0.005)


# ----- seed 002: serverless -----

SEED_IMPLIED_SERVERLESS = ServerlessPrice("seed-002-implied", 15 / (100 * 3 * 30 * 5), "$15 for 100 DAU", "2025-01-28")


@pytest.mark.parametrize("dau, seed_cost", [(100, 15), (1_000, 150), (10_000, 1_500), (100_000, 15_000)])
def test_serverless_column(dau, seed_cost):
    traffic = SEED_002.scaled(dau)
    # The column is linear in DAU: requests x 5 s x one per-second price ($0.000333/s, $1.20/h).
    implied = compare_serverless(SEED_IMPLIED_SERVERLESS, traffic, SEED_002_GENERATION_S, 1, 1, 0.39, 280.8)
    assert implied.monthly_cost_usd == pytest.approx(seed_cost, rel=1e-9)
    # RunPod's listed 4090 flex price gives 7% less; the seed rounds up.
    runpod = CATALOG.device("rtx-4090").serverless_prices[0]
    listed = compare_serverless(runpod, traffic, SEED_002_GENERATION_S, 1, 1, 0.39, 280.8)
    assert listed.monthly_cost_usd == pytest.approx(seed_cost, rel=0.08)
    assert listed.monthly_cost_usd <= seed_cost


def test_serverless_wins_at_100_dau_and_loses_at_10000():
    runpod = CATALOG.device("rtx-4090").serverless_prices[0]
    low = compare_serverless(runpod, SEED_002.scaled(100), SEED_002_GENERATION_S, 1, 1, 0.39, 280.8)
    high = compare_serverless(runpod, SEED_002.scaled(10_000), SEED_002_GENERATION_S, 1, 1, 0.39, 280.8)
    assert low.cheaper == "serverless" and high.cheaper == "dedicated"


@pytest.mark.parametrize("device", ["l40s", "h100-sxm"])
def test_crossover_utilization_is_40_to_50_percent(device):
    """'Self-managed ... is cheaper when your utilization exceeds roughly 40-50%' (seed-002 prices, RunPod flex)."""
    entry = CATALOG.device(device)
    row = compare_serverless(entry.serverless_prices[0], SEED_002, SEED_002_GENERATION_S, 1, 1,
                             entry.prices[0].usd_per_hour(720, "mid"), 1.0)
    assert 0.40 <= row.crossover_busy_share <= 0.50


# ----- seed 002: VRAM by precision -----

VRAM_TABLE = {7e9: (14, 7, 4), 13e9: (26, 13, 7), 30e9: (60, 30, 16), 70e9: (140, 70, 38)}


@pytest.mark.parametrize("parameters", sorted(VRAM_TABLE))
def test_vram_table_nominal_sizes(parameters):
    fp16, int8, int4 = VRAM_TABLE[parameters]
    size = lambda name: weight_bytes_for(parameters, 0, CATALOG.precision(name)) / GB
    assert size("fp16") == pytest.approx(fp16, rel=1e-12)          # 2 bytes per parameter
    assert size("int8") == pytest.approx(int8, rel=1e-12)          # 1 byte (per-channel scales neglected)
    # The seed's INT4 column implies ~4.3 bits per weight; AWQ/GPTQ with group 128 store 4.16.
    assert size("int4") == pytest.approx(int4, rel=0.10)
    assert size("int4") < int4


@pytest.mark.parametrize("model, fp16, int4", [("llama-2-7b", 14, 4), ("llama-2-13b", 26, 7),
                                               ("llama-3-70b", 140, 38)])
def test_vram_table_real_models(model, fp16, int4):
    spec = CATALOG.model(model)
    assert weight_bytes(spec, CATALOG.precision("fp16")) / GB == pytest.approx(fp16, rel=0.05)
    # Real checkpoints keep embeddings and LM head in fp16 (Llama 3 70B: 2.1B parameters, 4.2 GB).
    assert weight_bytes(spec, CATALOG.precision("int4-awq")) / GB == pytest.approx(int4, rel=0.10)


# ----- contradictions in seed 002's concurrency table -----

def test_70b_fp16_does_not_fit_one_h100():
    """The table gives '70B FP16 | H100 (80GB) | 5-8 users'; 141 GB of weights cannot fit 80 GB."""
    plan = plan_deployment(CATALOG.model("llama-3-70b"), CATALOG.precision("fp16"), CATALOG.device("h100"),
                           SEED_002, alternative_precisions=CATALOG.precisions)
    assert not plan.feasible
    assert "141.1 GB" in plan.infeasible_reason and "80 GB" in plan.infeasible_reason
    assert "use 2 with tensor parallelism" in plan.fix and "int4" in plan.fix
    assert weight_bytes_for(70e9, 0, CATALOG.precision("fp16")) / GB > 80  # even a nominal 70B


def test_70b_fp16_does_not_fit_one_h200_even_at_full_memory():
    """'70B FP16 | H200 (141GB) | 10-15 users': 141.1 GB of weights leave no byte of the 141 GB for KV."""
    everything = DeploymentOptions(memory=MemoryOptions(gpu_memory_utilization=1.0, runtime_reserve_gb=0))
    plan = plan_deployment(CATALOG.model("llama-3-70b"), CATALOG.precision("fp16"), CATALOG.device("h200"),
                           SEED_002, everything, alternative_precisions=CATALOG.precisions)
    assert not plan.feasible and "fp8" in plan.fix
    tensor_parallel = plan_deployment(CATALOG.model("llama-3-70b"), CATALOG.precision("fp16"),
                                      CATALOG.device("h200"), SEED_002, DeploymentOptions(tensor_parallel=2))
    assert tensor_parallel.feasible and tensor_parallel.gpus_needed == 2


# ----- seed 000 -----

@pytest.mark.parametrize("point, tokens", [("low", 500e6), ("high", 2500 / 3 * 1e6)])
def test_breakeven_a100_at_3_dollars(point, tokens):
    """'At $3/M tokens ... A100 80GB at $1,500-2,500/month ... you need 500-833M tokens/month'."""
    plan = plan_deployment(CATALOG.model("llama-3-8b"), CATALOG.precision("int4-awq"), CATALOG.device("a100"),
                           SEED_002, DeploymentOptions(provider="cloud-monthly", price_point=point),
                           apis=[CATALOG.api("midrange-3")])
    breakeven = plan.apis[0].breakeven_tokens_per_month
    assert breakeven == pytest.approx(tokens, rel=1e-9)
    assert round(breakeven / 1e6) == (500 if point == "low" else 833)


def test_100m_tokens_at_3_dollars_cost_300():
    api = CATALOG.api("midrange-3")
    assert 100e6 * api.blended_usd_per_token(500, 200) == pytest.approx(300)
    assert breakeven_tokens_per_month(300, 3e-6) == pytest.approx(100e6)


TEN_K_REQUESTS_A_DAY = Traffic(daily_active_users=10_000, requests_per_user_per_day=1, input_tokens=500,
                               output_tokens=200)


@pytest.mark.parametrize("api, low, high, split", [("gpt-4o", 525, 2100, 975), ("claude-sonnet", 630, 3150, 1350),
                                                   ("mistral-large", 420, 1260, 660)])
def test_api_monthly_costs_at_10k_requests_a_day(api, low, high, split):
    """The seed's 'Monthly (10K req/day)' range is every token at the input price to every token at the
    output price ($500-2,100 rounds GPT-4o's $525 down); the bill for 500 in + 200 out is in between."""
    entry = CATALOG.api(api)
    tokens = TEN_K_REQUESTS_A_DAY.tokens_per_month
    assert tokens == pytest.approx(210e6)
    assert tokens * entry.usd_per_million_input / 1e6 == pytest.approx(low)
    assert tokens * entry.usd_per_million_output / 1e6 == pytest.approx(high)
    plan = plan_deployment(CATALOG.model("llama-3-8b"), CATALOG.precision("bf16"), CATALOG.device("l40s"),
                           TEN_K_REQUESTS_A_DAY, DeploymentOptions(provider="cloud-monthly"), apis=[entry])
    assert plan.apis[0].monthly_cost_usd == pytest.approx(split)


@pytest.mark.parametrize("point, dollars", [("low", 900), ("high", 1500)])
def test_l40s_effective_rate_at_10k_requests_a_day(point, dollars):
    """The seed's L40S row claims $0.15-0.35/M at 10K req/day with a $900-1,500 GPU; its own inputs give
    $4.29-7.14/M, and break-even with GPT-4o's blended $4.64/M at 194-323M tokens, not 30-80M."""
    plan = plan_deployment(CATALOG.model("llama-3-8b"), CATALOG.precision("bf16"), CATALOG.device("l40s"),
                           TEN_K_REQUESTS_A_DAY, DeploymentOptions(provider="cloud-monthly", price_point=point),
                           apis=[CATALOG.api("gpt-4o")])
    assert plan.monthly_cost_usd == dollars
    assert plan.cost_per_million_tokens_usd == pytest.approx(dollars / 210)
    assert plan.apis[0].breakeven_tokens_per_month == pytest.approx(dollars / 4.642857e-6, rel=1e-6)
    assert plan.apis[0].breakeven_tokens_per_month > 80e6


def test_api_wins_at_1000_requests_a_day():
    traffic = TEN_K_REQUESTS_A_DAY.scaled(1000)
    plan = plan_deployment(CATALOG.model("llama-3-8b"), CATALOG.precision("bf16"), CATALOG.device("l40s"),
                           traffic, DeploymentOptions(provider="cloud-monthly", price_point="low"),
                           apis=[CATALOG.api("gpt-4o")])
    assert plan.apis[0].cheaper == "api"


def test_breakeven_range_in_requests_per_day():
    """'50-200 million tokens per month ... approximately 5,000-15,000 requests per day' does not hold at
    700 tokens per request: 50-200M tokens are 2,381-9,524 requests a day."""
    per_day = [tokens / 700 / 30 for tokens in (50e6, 200e6)]
    assert per_day == pytest.approx([2381, 9524], abs=1)


@pytest.mark.parametrize("precision, seed_gb, tolerance", [("bf16", 16, 0.01), ("int4-awq", 5.5, 0.05)])
def test_llama_3_8b_vram(precision, seed_gb, tolerance):
    """'BF16: 16GB VRAM', 'AWQ 4-bit: 5.5GB VRAM' (fp16 embeddings and LM head: 5.73 GB)."""
    size = weight_bytes(CATALOG.model("llama-3-8b"), CATALOG.precision(precision)) / GB
    assert size == pytest.approx(seed_gb, rel=tolerance)


def test_llama_3_8b_q4_k_m():
    """'GGUF Q4_K_M ... ~4.5GB': llama.cpp's 4.58 GiB."""
    size = weight_bytes(CATALOG.model("llama-3-8b"), CATALOG.precision("q4_k_m"))
    assert size / 2**30 == pytest.approx(4.58, abs=0.01)


def test_llama_3_70b_vram():
    """'BF16 requires 140GB of VRAM', 'AWQ 4-bit fits in 40GB' (and not the '~35GB' of the L40S paragraph)."""
    spec = CATALOG.model("llama-3-70b")
    assert weight_bytes(spec, CATALOG.precision("bf16")) / GB == pytest.approx(140, rel=0.01)
    awq = weight_bytes(spec, CATALOG.precision("int4-awq")) / GB
    assert 39 < awq < 40


def test_7b_fp16_is_14_gb():
    assert weight_bytes_for(7e9, 0, CATALOG.precision("fp16")) / GB == 14


def test_one_32k_context_holds_the_kv_of_sixteen_2k_contexts():
    spec, precision, device = CATALOG.model("llama-3-8b"), CATALOG.precision("bf16"), CATALOG.device("h100")
    long = plan_deployment(spec, precision, device, Traffic(input_tokens=32768 - 200, output_tokens=200))
    short = plan_deployment(spec, precision, device, Traffic(input_tokens=2048 - 200, output_tokens=200))
    assert long.memory.tokens_per_sequence == 16 * short.memory.tokens_per_sequence
    assert math.isclose(long.memory.kv_capacity_tokens, short.memory.kv_capacity_tokens)
