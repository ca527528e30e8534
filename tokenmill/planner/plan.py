"""One deployment planned end to end: memory -> speed -> fleet -> money, and the
comparison of many ("which GPU should I pick?").

`plan_deployment` never raises for combinations that cannot work: it returns a
`Plan` with `feasible=False`, the reason and the fix, so a comparison can list
them. Bad inputs (unknown names, out-of-range numbers) raise `PlanError` earlier.
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from tokenmill.planner.catalog import ApiPrice, Catalog, Device, DevicePrice, ModelSpec, Precision
from tokenmill.planner.economics import (
    ApiComparison,
    ServerlessComparison,
    compare_api,
    compare_serverless,
    cost_per_million,
)
from tokenmill.planner.efficiency import Efficiency
from tokenmill.planner.errors import PlanError
from tokenmill.planner.memory import GB, MemoryOptions, MemoryPlan, plan_memory, smallest_fitting_tensor_parallel
from tokenmill.planner.performance import (
    LoadPoint,
    Roofline,
    Workload,
    build_roofline,
    load_point,
    max_concurrency_at_speed,
    single_stream_tokens_per_s,
)
from tokenmill.planner.traffic import SECONDS_PER_HOUR, Traffic, average_concurrency, peak_concurrency

KV_CACHE_DTYPES = {"auto": None, "fp32": 4, "bf16": 2, "fp16": 2, "fp8": 1, "int8": 1}
TENSOR_PARALLEL_SIZES = (1, 2, 4, 8)


@dataclass(frozen=True)
class DeploymentOptions:
    """Everything about a deployment that is not the model, precision, device or traffic.

    tensor_parallel: devices per replica; None picks the smallest that fits.
    tokens_per_s_per_user: the per-user decode speed every stream must keep; also
    the speed Little's law assumes for a request's generation time.
    redundancy: add one spare replica (N+1).
    provider / price_point / usd_per_hour: which price (see `Device.price`).
    efficiency: None uses the device's measured factors, else the defaults.
    """

    tensor_parallel: int | None = 1
    memory: MemoryOptions = field(default_factory=MemoryOptions)
    kv_cache_dtype: str = "auto"
    efficiency: Efficiency | None = None
    tokens_per_s_per_user: float = 20.0
    redundancy: bool = False
    provider: str | None = None
    price_point: str = "mid"
    usd_per_hour: float | None = None

    def __post_init__(self) -> None:
        if self.tensor_parallel is not None and self.tensor_parallel not in TENSOR_PARALLEL_SIZES:
            raise PlanError(f"--tensor-parallel must be one of {', '.join(map(str, TENSOR_PARALLEL_SIZES))} or auto, "
                            f"got {self.tensor_parallel}")
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise PlanError(f"unknown --kv-cache-dtype {self.kv_cache_dtype!r} "
                            f"(choose from: {', '.join(KV_CACHE_DTYPES)})")
        if not self.tokens_per_s_per_user > 0:
            raise PlanError(f"--tokens-per-s-per-user must be positive, got {self.tokens_per_s_per_user:g}")
        if self.price_point not in ("low", "mid", "high"):
            raise PlanError(f"--price-point must be low, mid or high, got {self.price_point!r}")
        if self.usd_per_hour is not None and not self.usd_per_hour > 0:
            raise PlanError(f"--usd-per-hour must be positive, got {self.usd_per_hour:g}")


@dataclass(frozen=True)
class Plan:
    """A planned deployment. Fleet and money fields are None when infeasible; money
    fields are None when the device has no price."""

    model: ModelSpec
    precision: Precision
    device: Device
    traffic: Traffic
    options: DeploymentOptions
    efficiency: Efficiency
    tensor_parallel: int
    kv_bytes_per_element: int
    memory: MemoryPlan
    roofline: Roofline
    workload: Workload
    feasible: bool
    infeasible_reason: str | None
    infeasible_summary: str | None  # the reason in a few words, for tables
    fix: str | None
    notes: tuple[str, ...]
    single_stream_tokens_per_s: float
    seconds_per_request: float
    ttft_s: float
    peak_concurrency: float
    average_concurrency: float
    # per replica, at the largest concurrency that keeps the per-user speed
    concurrency_per_replica: int | None = None
    concurrency_limited_by: str | None = None
    capacity: LoadPoint | None = None
    replicas: int | None = None
    gpus_needed: int | None = None
    price: DevicePrice | None = None
    usd_per_gpu_hour: float | None = None
    monthly_cost_usd: float | None = None
    capacity_tokens_per_month: float | None = None
    apis: tuple[ApiComparison, ...] = ()
    serverless: tuple[ServerlessComparison, ...] = ()

    @property
    def weights_gb(self) -> float:
        return self.memory.weights_bytes / GB

    @property
    def cost_per_user_usd(self) -> float | None:
        return None if self.monthly_cost_usd is None else self.monthly_cost_usd / self.traffic.daily_active_users

    @property
    def cost_per_million_tokens_usd(self) -> float | None:
        if self.monthly_cost_usd is None:
            return None
        return cost_per_million(self.monthly_cost_usd, self.traffic.tokens_per_month)

    @property
    def cost_per_million_tokens_at_capacity_usd(self) -> float | None:
        if self.monthly_cost_usd is None or not self.capacity_tokens_per_month:
            return None
        return cost_per_million(self.monthly_cost_usd, self.capacity_tokens_per_month)

    @property
    def utilization(self) -> float | None:
        """Tokens served / tokens the fleet (spare excluded) could serve at its per-user speed, over a month."""
        if not self.capacity_tokens_per_month:
            return None
        return self.traffic.tokens_per_month / self.capacity_tokens_per_month


def _kv_bytes(options: DeploymentOptions, precision: Precision) -> int:
    return KV_CACHE_DTYPES[options.kv_cache_dtype] or precision.kv_bytes


def _price(device: Device, options: DeploymentOptions, hours_per_month: float) -> DevicePrice | None:
    if options.usd_per_hour is not None:
        return DevicePrice("custom", options.usd_per_hour, options.usd_per_hour, "hour", "--usd-per-hour", "")
    return device.price(options.provider, options.price_point, hours_per_month)


def _replica_phrase(device: Device, tensor_parallel: int) -> str:
    size = f"{device.memory_gb:g} GB"
    return f"one {size} {device.label}" if tensor_parallel == 1 else f"{tensor_parallel} x {size} {device.label}"


def _fix_for_weights(model: ModelSpec, precision: Precision, device: Device, context: int, kv_bytes: int,
                     options: DeploymentOptions, alternatives: Sequence[Precision]) -> str:
    ways = []
    tensor_parallel = smallest_fitting_tensor_parallel(model, precision, device, context, kv_bytes, options.memory)
    if tensor_parallel is not None:
        ways.append(f"use {tensor_parallel} with tensor parallelism (--tensor-parallel {tensor_parallel})")
    for other in alternatives:
        if other.from_file or other.name == precision.name or other.effective_bits >= precision.effective_bits:
            continue
        memory = plan_memory(model, other, device, 1, context, kv_bytes, options.memory)
        if memory.fits:
            ways.append(f"{other.name} ({memory.weights_bytes / GB:.1f} GB)")
            break
    if not ways:
        return "use a device with more memory or a smaller model"
    return " or ".join(ways)


def plan_deployment(model: ModelSpec, precision: Precision, device: Device, traffic: Traffic,
                    options: DeploymentOptions = DeploymentOptions(), apis: Iterable[ApiPrice] = (),
                    alternative_precisions: Sequence[Precision] = ()) -> Plan:
    """Plan `traffic` on replicas of `model` at `precision` on `device`.

    `alternative_precisions` are offered in the fix when the weights do not fit.
    """
    if precision.from_file and model.file_weight_bytes is None:
        raise PlanError(f"precision {precision.name!r} needs a .gguf file as --model, {model.name!r} is not one")
    apis = tuple(apis)
    workload = Workload(traffic.input_tokens, traffic.output_tokens)
    context = workload.context_tokens
    kv_bytes = _kv_bytes(options, precision)
    efficiency = options.efficiency or device.efficiency or Efficiency()
    notes: list[str] = []
    tensor_parallel = options.tensor_parallel
    if tensor_parallel is None:
        tensor_parallel = smallest_fitting_tensor_parallel(model, precision, device, context, kv_bytes,
                                                           options.memory) or 1
    memory = plan_memory(model, precision, device, tensor_parallel, context, kv_bytes, options.memory)
    roofline = build_roofline(model, precision, device, tensor_parallel, kv_bytes, efficiency)
    single = single_stream_tokens_per_s(roofline, workload)
    ttft = roofline.ttft_seconds(1, workload.input_tokens, workload.average_context)
    seconds_per_request = ttft + workload.output_tokens / options.tokens_per_s_per_user
    peak = peak_concurrency(traffic, seconds_per_request)
    average = average_concurrency(traffic, seconds_per_request)
    base = dict(model=model, precision=precision, device=device, traffic=traffic, options=options,
                efficiency=efficiency, tensor_parallel=tensor_parallel, kv_bytes_per_element=kv_bytes, memory=memory,
                roofline=roofline, workload=workload, single_stream_tokens_per_s=single,
                seconds_per_request=seconds_per_request, ttft_s=ttft, peak_concurrency=peak,
                average_concurrency=average)

    def infeasible(reason: str, summary: str, fix: str) -> Plan:
        # The APIs' bills do not depend on the fleet: they are still shown, without a break-even.
        return Plan(**base, feasible=False, infeasible_reason=reason, infeasible_summary=summary, fix=fix,
                    notes=tuple(notes), apis=tuple(compare_api(api, traffic, None) for api in apis))

    if traffic.peak_is_outside_window:
        notes.append(f"{traffic.peak_share:.0%} of requests in {traffic.peak_hours:g} h is below the window's "
                     f"share of the day: the busier off-peak hours set the peak rate")
    if context > model.max_context:
        notes.append(f"{context} tokens per request exceed {model.label}'s trained context of {model.max_context}")
    if roofline.compute != precision.compute:
        notes.append(f"{device.label} has no {precision.compute} tensor cores: matmuls modelled in "
                     f"{roofline.compute} (weight-only kernels)")
    if tensor_parallel > model.kv_heads:
        notes.append(f"tensor parallelism {tensor_parallel} exceeds the model's {model.kv_heads} KV heads")
    if device.kind == "cpu" and options.efficiency is None and device.efficiency is None:
        notes.append("this CPU profile has no calibrated efficiency: the speeds assume GPU-engine defaults and "
                     "no per-step engine overhead; fit them with --calibrate on a bench sweep")
    if device.kind == "gpu" and not device.ecc:
        notes.append(f"{device.label} has no ECC memory and no MIG: fine for internal tools, "
                     f"a risk for production traffic")

    if not memory.weights_fit:
        reason = (f"{model.label} {precision.name} needs {memory.weights_bytes / GB:.1f} GB of weights; "
                  f"{_replica_phrase(device, tensor_parallel)} holds {memory.usable_bytes / GB:.1f} GB at "
                  f"{options.memory.gpu_memory_utilization:.0%} memory utilization after a "
                  f"{options.memory.runtime_reserve_gb:g} GB runtime reserve per device")
        fix = _fix_for_weights(model, precision, device, context, kv_bytes, options, alternative_precisions)
        return infeasible(reason, f"weights {memory.weights_bytes / GB:.1f} GB > {memory.usable_bytes / GB:.1f} GB "
                                  f"usable", fix)
    if memory.max_concurrent_sequences < 1:
        reason = (f"the KV cache holds {memory.kv_capacity_tokens:,} tokens after the weights; one request needs "
                  f"{memory.tokens_per_sequence:,} ({context:,} in whole {options.memory.block_size}-token blocks)")
        fix = ("shorten --input-tokens/--output-tokens, use --kv-cache-dtype fp8, a lower precision, "
               f"or --tensor-parallel {min(tensor_parallel * 2, 8)}")
        return infeasible(reason, f"KV holds {memory.kv_capacity_tokens:,} tokens < "
                                  f"{memory.tokens_per_sequence:,} per request", fix)

    capacity = max_concurrency_at_speed(roofline, workload, options.tokens_per_s_per_user,
                                        memory.max_concurrent_sequences)
    if capacity < 1:
        reason = (f"one stream alone decodes at {single:.1f} tok/s, below the per-user target of "
                  f"{options.tokens_per_s_per_user:g} tok/s")
        fix = "lower --tokens-per-s-per-user, use a lower precision, a faster device or more tensor parallelism"
        return infeasible(reason, f"one stream {single:.0f} tok/s < {options.tokens_per_s_per_user:g} tok/s", fix)
    if capacity < memory.max_concurrent_sequences:
        limited_by = "per-user speed"
    elif memory.max_concurrent_sequences == options.memory.max_num_seqs:
        limited_by = "max-num-seqs"
    else:
        limited_by = "KV cache"
    point = load_point(roofline, workload, capacity)

    serving_replicas = max(1, math.ceil(peak / capacity - 1e-9))
    replicas = serving_replicas + (1 if options.redundancy else 0)
    gpus = replicas * tensor_parallel
    seconds_per_month = traffic.hours_per_month * SECONDS_PER_HOUR
    requests_per_s_at_capacity = point.output_tokens_per_s / workload.output_tokens
    capacity_tokens = serving_replicas * requests_per_s_at_capacity * workload.context_tokens * seconds_per_month

    price = _price(device, options, traffic.hours_per_month)
    monthly = usd_per_hour = None
    if price is None:
        notes.append(f"{device.name} has no price in the catalog: give --usd-per-hour for costs")
    else:
        usd_per_hour = price.usd_per_hour(traffic.hours_per_month, options.price_point)
        monthly = gpus * price.usd_per_month(traffic.hours_per_month, options.price_point)
    api_rows = tuple(compare_api(api, traffic, monthly) for api in apis)
    serverless_rows = tuple(
        compare_serverless(serverless, traffic, seconds_per_request, tensor_parallel, replicas, usd_per_hour, monthly)
        for serverless in device.serverless_prices)
    return Plan(**base, feasible=True, infeasible_reason=None, infeasible_summary=None, fix=None, notes=tuple(notes),
                concurrency_per_replica=capacity, concurrency_limited_by=limited_by, capacity=point,
                replicas=replicas, gpus_needed=gpus, price=price, usd_per_gpu_hour=usd_per_hour,
                monthly_cost_usd=monthly, capacity_tokens_per_month=capacity_tokens, apis=api_rows,
                serverless=serverless_rows)


def _sort_key(plan: Plan):
    if not plan.feasible:
        return (2, 0.0, 0, plan.device.name, plan.precision.name)
    if plan.monthly_cost_usd is None:
        return (1, 0.0, 0, plan.device.name, plan.precision.name)
    # Equal bills: the plan with more headroom (users per replica) first.
    return (0, plan.monthly_cost_usd, -(plan.concurrency_per_replica or 0), plan.device.name, plan.precision.name)


def compare_deployments(model: ModelSpec, devices: Iterable[Device], precisions: Sequence[Precision],
                        traffic: Traffic, options: DeploymentOptions = DeploymentOptions(),
                        apis: Iterable[ApiPrice] = (), alternative_precisions: Sequence[Precision] = ()) -> list[Plan]:
    """Every device x precision, cheapest feasible first, then unpriced, then infeasible."""
    apis = tuple(apis)
    plans = [plan_deployment(model, precision, device, traffic, options, apis, alternative_precisions or precisions)
             for device in devices for precision in precisions]
    return sorted(plans, key=_sort_key)


def comparison_devices(catalog: Catalog, names: Sequence[str] | None) -> list[Device]:
    """The named devices, else every priced GPU of the catalog."""
    if names:
        return [catalog.device(name) for name in names]
    return [device for device in catalog.devices if device.kind == "gpu" and device.prices]


def comparison_precisions(catalog: Catalog, names: Sequence[str] | None, model: ModelSpec) -> list[Precision]:
    """The named precisions, else those marked for comparison (plus the file's own for GGUF models)."""
    if names:
        return [catalog.precision(name) for name in names]
    chosen = [precision for precision in catalog.precisions if precision.in_comparison]
    if model.file_weight_bytes is not None:
        chosen += [precision for precision in catalog.precisions if precision.from_file]
    return chosen
