"""Plans as JSON (stable keys), terminal text that shows the working, and Markdown.

JSON of one plan (`plan_to_dict`): the keys listed in docs/planner.md, among them
weights_gb, kv_bytes_per_token, max_concurrent_sequences,
single_stream_tokens_per_s, peak_concurrency, gpus_needed, monthly_cost_usd,
cost_per_user_usd, cost_per_million_tokens_usd, api_monthly_cost_usd and
breakeven_tokens_per_month (both keyed by API name). Keys are always present;
values that do not apply (infeasible plans, unpriced devices) are null.
"""
from __future__ import annotations

from collections.abc import Sequence

from tokenmill.planner.memory import GB
from tokenmill.planner.plan import Plan
from tokenmill.planner.traffic import Traffic

JSON_FORMAT_VERSION = 1


def traffic_to_dict(traffic: Traffic) -> dict:
    return {"daily_active_users": traffic.daily_active_users,
            "requests_per_user_per_day": traffic.requests_per_user_per_day,
            "input_tokens": traffic.input_tokens, "output_tokens": traffic.output_tokens,
            "peak_share": traffic.peak_share, "peak_hours": traffic.peak_hours,
            "hours_per_month": traffic.hours_per_month}


def plan_to_dict(plan: Plan) -> dict:
    traffic, memory, options = plan.traffic, plan.memory, plan.options
    capacity = plan.capacity
    return {
        "format_version": JSON_FORMAT_VERSION,
        "model": plan.model.name, "model_label": plan.model.label, "parameters": plan.model.parameters,
        "precision": plan.precision.name, "gpu": plan.device.name, "gpu_label": plan.device.label,
        "tensor_parallel": plan.tensor_parallel,
        "feasible": plan.feasible, "infeasible_reason": plan.infeasible_reason, "fix": plan.fix,
        "notes": list(plan.notes),
        "weights_gb": plan.weights_gb,
        "kv_bytes_per_token": memory.kv_bytes_per_token,
        "kv_capacity_gb": memory.kv_capacity_bytes / GB,
        "kv_capacity_tokens": memory.kv_capacity_tokens,
        "context_tokens": plan.workload.context_tokens,
        "tokens_per_sequence": memory.tokens_per_sequence,
        "max_concurrent_sequences": memory.max_concurrent_sequences,
        "compute_type": plan.roofline.compute,
        "efficiency": plan.efficiency.as_dict(),
        "single_stream_tokens_per_s": plan.single_stream_tokens_per_s,
        "ttft_s": plan.ttft_s,
        "tokens_per_s_per_user_target": options.tokens_per_s_per_user,
        "seconds_per_request": plan.seconds_per_request,
        "concurrent_users_per_replica": plan.concurrency_per_replica,
        "concurrency_limited_by": plan.concurrency_limited_by,
        "per_user_tokens_per_s_at_capacity": capacity.per_user_tokens_per_s if capacity else None,
        "output_tokens_per_s_per_replica": capacity.output_tokens_per_s if capacity else None,
        "bound_at_capacity": capacity.bound if capacity else None,
        "requests_per_day": traffic.requests_per_day,
        "peak_requests_per_s": traffic.peak_requests_per_s,
        "peak_requests_per_min": traffic.peak_requests_per_s * 60,
        "peak_concurrency": plan.peak_concurrency,
        "average_concurrency": plan.average_concurrency,
        "redundancy": options.redundancy,
        "replicas": plan.replicas,
        "gpus_needed": plan.gpus_needed,
        "provider": plan.price.provider if plan.price else None,
        "price": plan.price.describe() if plan.price else None,
        "price_point": options.price_point,
        "usd_per_gpu_hour": plan.usd_per_gpu_hour,
        "monthly_cost_usd": plan.monthly_cost_usd,
        "cost_per_user_usd": plan.cost_per_user_usd,
        "tokens_per_month": traffic.tokens_per_month,
        "cost_per_million_tokens_usd": plan.cost_per_million_tokens_usd,
        "utilization": plan.utilization,
        "capacity_tokens_per_month": plan.capacity_tokens_per_month,
        "cost_per_million_tokens_at_capacity_usd": plan.cost_per_million_tokens_at_capacity_usd,
        "api_monthly_cost_usd": {api.name: api.monthly_cost_usd for api in plan.apis},
        "breakeven_tokens_per_month": {api.name: api.breakeven_tokens_per_month for api in plan.apis},
        "apis": [{"name": api.name, "label": api.label, "monthly_cost_usd": api.monthly_cost_usd,
                  "blended_usd_per_million_tokens": api.blended_usd_per_million_tokens,
                  "breakeven_tokens_per_month": api.breakeven_tokens_per_month,
                  "breakeven_daily_active_users": api.breakeven_daily_active_users, "cheaper": api.cheaper}
                 for api in plan.apis],
        "serverless": [{"provider": row.provider, "usd_per_second": row.usd_per_second,
                        "monthly_cost_usd": row.monthly_cost_usd, "busy_share": row.busy_share,
                        "crossover_busy_share": row.crossover_busy_share, "cheaper": row.cheaper}
                       for row in plan.serverless],
    }


def single_document(plan: Plan) -> dict:
    return {"tool": "tokenmill plan", "inputs": traffic_to_dict(plan.traffic), **plan_to_dict(plan)}


def comparison_document(plans: Sequence[Plan], traffic: Traffic) -> dict:
    return {"tool": "tokenmill plan", "format_version": JSON_FORMAT_VERSION, "inputs": traffic_to_dict(traffic),
            "plans": [plan_to_dict(plan) for plan in plans]}


# ----- numbers for people -----

def money(value: float | None) -> str:
    if value is None:
        return "-"
    if abs(value) >= 100:
        return f"${value:,.0f}"
    if 0 < abs(value) < 0.1:  # per-user and per-token figures at scale: keep two significant digits
        return f"${value:.2g}"
    return f"${value:,.2f}"


def count(value: float | None) -> str:
    """1,234 / 12.3M / 4.5B."""
    if value is None:
        return "-"
    for size, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M")):
        if abs(value) >= size:
            return f"{value / size:,.3g}{suffix}"
    return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.3g}"


def _working_lines(plan: Plan) -> list[tuple[str, str]]:
    model, precision, device, traffic = plan.model, plan.precision, plan.device, plan.traffic
    memory, options, roofline, workload = plan.memory, plan.options, plan.roofline, plan.workload
    tp = plan.tensor_parallel
    devices = device.label if tp == 1 else f"{tp} x {device.label} (tensor parallel)"
    lines = [("Deployment", f"{model.label} ({count(model.parameters)} parameters) at {precision.label} "
                            f"on {devices}")]
    if precision.from_file:
        weights = f"{plan.weights_gb:.2f} GB as stored in the GGUF ({model.file_quantization or 'mixed'})"
    elif precision.embedding_bits is not None:
        head = model.head_parameters
        weights = (f"{plan.weights_gb:.2f} GB = {count(model.parameters - head)} x {precision.effective_bits:.4g} bits"
                   f" + {count(head)} embedding/LM-head x {precision.embedding_bits:g} bits, / 8")
    else:
        weights = f"{plan.weights_gb:.2f} GB = {count(model.parameters)} x {precision.effective_bits:.4g} bits / 8"
    lines.append(("Weights", weights))
    lines.append(("KV per token", f"{memory.kv_bytes_per_token:,} B = 2 x {model.layers} layers x {model.kv_heads} "
                                  f"KV heads x {model.head_dim} head dim x {plan.kv_bytes_per_element} B"))
    if options.memory.kv_cache_gb is None:
        budget = (f"{tp} x ({device.memory_gb:g} GB x {options.memory.gpu_memory_utilization:g} - "
                  f"{options.memory.runtime_reserve_gb:g} GB reserve) - {plan.weights_gb:.2f} GB weights")
    else:
        budget = f"fixed pool of {options.memory.kv_cache_gb:g} GB"
    lines.append(("KV capacity", f"{memory.kv_capacity_bytes / GB:.2f} GB = {budget} -> "
                                 f"{memory.kv_capacity_tokens:,} tokens"))
    lines.append(("Sequences", f"{memory.max_concurrent_sequences:,} fit at {workload.context_tokens:,} tokens each "
                               f"({memory.tokens_per_sequence:,} in {options.memory.block_size}-token blocks"
                               f"{', capped by --max-num-seqs' if memory.max_concurrent_sequences == options.memory.max_num_seqs else ''})"))
    efficiency = plan.efficiency
    context = workload.average_context
    memory_ms = roofline.memory_seconds(1, context) * 1e3
    compute_ms = roofline.compute_seconds(1, context) * 1e3
    overhead_ms = (efficiency.step_overhead_s + efficiency.sequence_overhead_s) * 1e3
    overhead = f" + overhead {overhead_ms:,.1f} ms" if overhead_ms else ""
    lines.append(("Single stream",
                  f"{plan.single_stream_tokens_per_s:.1f} tok/s = 1 / (max(memory {memory_ms:,.1f} ms, compute "
                  f"{compute_ms:,.2f} ms){overhead}) per step; memory = ({roofline.weight_read_bytes / GB:.2f} GB "
                  f"weights + {context:,.0f} x {memory.kv_bytes_per_token:,} B KV) / ({efficiency.bandwidth:g} x "
                  f"{device.memory_bandwidth_gb_per_s * tp:,.0f} GB/s); compute = (2 x {count(model.matmul_parameters)} "
                  f"params + attention) / ({efficiency.compute:g} x {device.tflops(roofline.compute) * tp:g} TFLOP/s "
                  f"{roofline.compute})"))
    if plan.capacity is not None:
        capacity = plan.capacity
        lines.append(("Users per replica",
                      f"{plan.concurrency_per_replica} concurrent streams keep >= {options.tokens_per_s_per_user:g} "
                      f"tok/s each ({capacity.per_user_tokens_per_s:.1f} tok/s, {capacity.output_tokens_per_s:,.0f} "
                      f"tok/s in all, {capacity.bound}-bound; limited by {plan.concurrency_limited_by})"))
    lines.append(("Traffic", f"{traffic.requests_per_day:,.0f} requests/day; {traffic.peak_share:.0%} in "
                             f"{traffic.peak_hours:g} h -> {traffic.peak_requests_per_s * 3600:,.1f} req/h = "
                             f"{traffic.peak_requests_per_s * 60:,.2f} req/min at peak"))
    lines.append(("Request time", f"{plan.seconds_per_request:.2f} s = TTFT {plan.ttft_s:.2f} s + "
                                  f"{workload.output_tokens} tokens / {options.tokens_per_s_per_user:g} tok/s"))
    lines.append(("Peak concurrency", f"{plan.peak_concurrency:.3g} = {traffic.peak_requests_per_s:.4g} req/s x "
                                      f"{plan.seconds_per_request:.2f} s (Little's law); average "
                                      f"{plan.average_concurrency:.3g}"))
    if not plan.feasible:
        lines.append(("INFEASIBLE", plan.infeasible_reason))
        lines.append(("Fix", plan.fix))
    else:
        spare = " + 1 spare (N+1)" if options.redundancy else ""
        lines.append(("Fleet", f"{plan.gpus_needed} device(s) = ceil({plan.peak_concurrency:.3g} / "
                               f"{plan.concurrency_per_replica}){spare} replica(s) x {tp}"))
    if plan.monthly_cost_usd is not None:
        if plan.price.per == "month":
            rate = f"{money(plan.price.at(options.price_point))}/month"
        else:
            rate = f"${plan.usd_per_gpu_hour:,.2f}/h x {traffic.hours_per_month:g} h"
        lines.append(("Monthly cost", f"{money(plan.monthly_cost_usd)} = {plan.gpus_needed} x {rate} "
                                      f"({plan.price.describe()}, {options.price_point} point)"))
        lines.append(("Per user", f"{money(plan.cost_per_user_usd)}/month for {traffic.daily_active_users:,.0f} DAU"))
        lines.append(("Per 1M tokens", f"{money(plan.cost_per_million_tokens_usd)} at the planned "
                                       f"{count(traffic.tokens_per_month)} tokens/month "
                                       f"(utilization {plan.utilization:.1%}); {money(plan.cost_per_million_tokens_at_capacity_usd)}"
                                       f" at full capacity ({count(plan.capacity_tokens_per_month)} tokens/month)"))
    for api in plan.apis:
        verdict = "" if api.cheaper is None else f"; {api.cheaper} is cheaper"
        breakeven = ("" if api.breakeven_tokens_per_month is None else
                     f"; break-even {count(api.breakeven_tokens_per_month)} tokens/month "
                     f"(~{count(api.breakeven_daily_active_users)} DAU)")
        lines.append((f"API {api.name}", f"{money(api.monthly_cost_usd)}/month at "
                                         f"${api.blended_usd_per_million_tokens:.3g}/M blended{breakeven}{verdict}"))
    for row in plan.serverless:
        crossover = ("" if row.crossover_busy_share is None else
                     f"; serverless wins below {row.crossover_busy_share:.0%} busy, this fleet is "
                     f"{row.busy_share:.1%} busy -> {row.cheaper}")
        lines.append(("Serverless", f"{money(row.monthly_cost_usd)}/month on {row.provider} "
                                    f"(${row.usd_per_second:g}/s per device){crossover}"))
    return lines


def render_text(plan: Plan) -> str:
    lines = _working_lines(plan)
    width = max(len(label) for label, _ in lines)
    text = [f"{label:<{width}}  {value}" for label, value in lines]
    text += [f"{'Note':<{width}}  {note}" for note in plan.notes]
    return "\n".join(text)


def render_markdown(plan: Plan) -> str:
    lines = [f"### {plan.model.label} / {plan.precision.name} / {plan.device.label}", ""]
    lines += [f"- **{label}**: {value}" for label, value in _working_lines(plan)]
    lines += [f"- *Note*: {note}" for note in plan.notes]
    return "\n".join(lines)


_COLUMNS = ("GPU", "precision", "TP", "weights GB", "seqs", "users/replica", "single tok/s", "GPUs", "$/month",
            "$/user", "$/1M tok", "remark")


def _comparison_rows(plans: Sequence[Plan]) -> list[tuple[str, ...]]:
    rows = []
    for plan in plans:
        remark = plan.price.describe() if plan.price else ("no price" if plan.feasible else "")
        if not plan.feasible:
            remark = f"infeasible, {plan.infeasible_summary}: {plan.fix}"
        rows.append((plan.device.name, plan.precision.name, str(plan.tensor_parallel), f"{plan.weights_gb:.1f}",
                     str(plan.memory.max_concurrent_sequences), str(plan.concurrency_per_replica or "-"),
                     f"{plan.single_stream_tokens_per_s:.0f}", str(plan.gpus_needed or "-"),
                     money(plan.monthly_cost_usd), money(plan.cost_per_user_usd),
                     money(plan.cost_per_million_tokens_usd), remark))
    return rows


def _traffic_line(traffic: Traffic, plans: Sequence[Plan]) -> str:
    target = plans[0].options.tokens_per_s_per_user if plans else 0
    return (f"{plans[0].model.label if plans else ''}: {traffic.daily_active_users:,.0f} DAU x "
            f"{traffic.requests_per_user_per_day:g} requests, {traffic.input_tokens} in / {traffic.output_tokens} out "
            f"tokens, {traffic.peak_share:.0%} in {traffic.peak_hours:g} h, >= {target:g} tok/s per user, "
            f"{traffic.hours_per_month:g} h/month")


def render_comparison_text(plans: Sequence[Plan], traffic: Traffic) -> str:
    rows = _comparison_rows(plans)
    widths = [max(len(column), *(len(row[i]) for row in rows)) for i, column in enumerate(_COLUMNS)]
    numeric = set(range(2, 11))

    def line(cells) -> str:
        parts = [cell.rjust(widths[i]) if i in numeric else cell.ljust(widths[i]) for i, cell in enumerate(cells)]
        return "  ".join(parts).rstrip()

    return "\n".join([_traffic_line(traffic, plans), "", line(_COLUMNS), line("-" * w for w in widths),
                      *(line(row) for row in rows)])


def render_comparison_markdown(plans: Sequence[Plan], traffic: Traffic) -> str:
    rows = _comparison_rows(plans)
    lines = [_traffic_line(traffic, plans), "", "| " + " | ".join(_COLUMNS) + " |",
             "|" + "|".join("---:" if 2 <= i <= 10 else "---" for i in range(len(_COLUMNS))) + "|"]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows]
    return "\n".join(lines)
