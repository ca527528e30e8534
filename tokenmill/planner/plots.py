"""`tokenmill plan --plot DIR`: two PNG charts (matplotlib, Agg backend, imported here only).

- `monthly_cost_vs_dau.png`: monthly cost of the cheapest feasible precision on each
  priced GPU as DAU grows (same usage pattern), with every API in the price list.
- `breakeven.png`: the planned deployment's monthly cost against tokens per month,
  next to each API's linear bill; where a line crosses the fleet's, the API
  stops being cheaper.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from tokenmill.planner.catalog import ApiPrice, Device, ModelSpec, Precision
from tokenmill.planner.plan import DeploymentOptions, Plan, plan_deployment
from tokenmill.planner.traffic import Traffic

DAU_POINTS = tuple(round(10 ** (exponent / 8)) for exponent in range(8, 49))  # 10 .. 1,000,000


def _label(text: str) -> str:
    """matplotlib reads $...$ as math: prices in labels need their dollar signs escaped."""
    return text.replace("$", r"\$")


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def cost_curve(model: ModelSpec, precisions: Sequence[Precision], device: Device, traffic: Traffic,
               options: DeploymentOptions) -> tuple[list[float], list[float]]:
    """(DAU, cheapest monthly cost over `precisions`) where some precision is feasible and priced."""
    users, costs = [], []
    for dau in DAU_POINTS:
        scaled = traffic.scaled(dau)
        monthly = [plan.monthly_cost_usd for plan in
                   (plan_deployment(model, precision, device, scaled, options) for precision in precisions)
                   if plan.feasible and plan.monthly_cost_usd is not None]
        if monthly:
            users.append(dau)
            costs.append(min(monthly))
    return users, costs


def write_plots(plan: Plan, devices: Sequence[Device], precisions: Sequence[Precision], apis: Sequence[ApiPrice],
                folder: str | Path) -> list[Path]:
    """Write both charts for `plan`'s model and traffic into `folder`; returns the paths."""
    plt = _pyplot()
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    traffic, options = plan.traffic, plan.options
    written = []

    figure, axes = plt.subplots(figsize=(9, 5.5))
    for device in devices:
        users, costs = cost_curve(plan.model, precisions, device, traffic, options)
        if users:
            axes.step(users, costs, where="post", label=_label(device.label))
    for api in apis:
        monthly = [traffic.scaled(dau).requests_per_month * api.usd_per_request(traffic.input_tokens,
                                                                                 traffic.output_tokens)
                   for dau in DAU_POINTS]
        axes.plot(DAU_POINTS, monthly, linestyle="--", linewidth=1, label=_label(f"API {api.label}"))
    axes.set(xscale="log", yscale="log", xlabel="daily active users", ylabel="USD per month",
             title=f"{_label(plan.model.label)}: monthly cost vs DAU ({traffic.requests_per_user_per_day:g} req/user/day, "
                   f"{traffic.input_tokens}+{traffic.output_tokens} tokens)")
    axes.grid(True, which="both", alpha=0.3)
    axes.legend(fontsize=7, loc="upper left")
    path = folder / "monthly_cost_vs_dau.png"
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    written.append(path)

    figure, axes = plt.subplots(figsize=(9, 5.5))
    tokens, fleet = [], []
    for dau in DAU_POINTS:
        scaled = traffic.scaled(dau)
        point = plan_deployment(plan.model, plan.precision, plan.device, scaled, options)
        if point.feasible and point.monthly_cost_usd is not None:
            tokens.append(scaled.tokens_per_month)
            fleet.append(point.monthly_cost_usd)
    if tokens:
        axes.step(tokens, fleet, where="post", linewidth=2,
                  label=_label(f"self-hosted: {plan.device.label}, {plan.precision.name}"))
        for api in apis:
            price = api.blended_usd_per_token(traffic.input_tokens, traffic.output_tokens)
            axes.plot(tokens, [volume * price for volume in tokens], linestyle="--", linewidth=1,
                      label=_label(f"API {api.label} (${price * 1e6:.3g}/M)"))
    axes.set(xscale="log", yscale="log", xlabel="tokens per month (input + output)", ylabel="USD per month",
             title="Self-hosting vs API: break-even where the lines cross")
    axes.grid(True, which="both", alpha=0.3)
    axes.legend(fontsize=7, loc="upper left")
    path = folder / "breakeven.png"
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    written.append(path)
    return written
