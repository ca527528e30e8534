"""Money: the fleet's monthly bill, the same traffic on hosted APIs, the break-even
volume, and serverless against dedicated devices.

    monthly cost        = devices x $/device-hour x hours per month   (or x $/device-month)
    cost per user       = monthly cost / DAU
    $ per 1M tokens     = monthly cost / (tokens per month / 10^6)
    API monthly cost    = requests/month x (input x $in + output x $out) / 10^6
    API blended price   = (input x $in + output x $out) / (input + output)   per token
    break-even tokens   = monthly cost / blended price per token
    serverless cost     = requests/month x seconds per request x $/s x devices per worker
    crossover busy share = $/device-hour / ($/s x 3600)

Serverless bills each request's seconds on its own worker (no batching across
requests), the accounting of the seeds; it is cheaper while the request-seconds
per dedicated device-second (the busy share) stay below the crossover.
"""
from __future__ import annotations

from dataclasses import dataclass

from tokenmill.planner.catalog import ApiPrice, ServerlessPrice
from tokenmill.planner.traffic import SECONDS_PER_HOUR, Traffic


def cost_per_million(monthly_cost_usd: float, tokens_per_month: float) -> float:
    return monthly_cost_usd / tokens_per_month * 1e6


def breakeven_tokens_per_month(monthly_cost_usd: float, usd_per_token: float) -> float:
    """Tokens a month at which an API bill at `usd_per_token` equals `monthly_cost_usd`."""
    return monthly_cost_usd / usd_per_token


@dataclass(frozen=True)
class ApiComparison:
    """The planned traffic on one hosted API, against the self-hosted fleet."""

    name: str
    label: str
    monthly_cost_usd: float
    blended_usd_per_million_tokens: float
    breakeven_tokens_per_month: float | None  # None when the fleet is unpriced
    breakeven_daily_active_users: float | None
    cheaper: str | None  # "self-hosted", "api" or None when the fleet is unpriced


def compare_api(api: ApiPrice, traffic: Traffic, fleet_monthly_cost_usd: float | None) -> ApiComparison:
    per_token = api.blended_usd_per_token(traffic.input_tokens, traffic.output_tokens)
    monthly = traffic.requests_per_month * api.usd_per_request(traffic.input_tokens, traffic.output_tokens)
    if fleet_monthly_cost_usd is None:
        return ApiComparison(api.name, api.label, monthly, per_token * 1e6, None, None, None)
    breakeven = breakeven_tokens_per_month(fleet_monthly_cost_usd, per_token)
    tokens_per_user_month = traffic.tokens_per_month / traffic.daily_active_users
    return ApiComparison(api.name, api.label, monthly, per_token * 1e6, breakeven,
                         breakeven / tokens_per_user_month,
                         "self-hosted" if fleet_monthly_cost_usd < monthly else "api")


@dataclass(frozen=True)
class ServerlessComparison:
    """Pay-per-second workers of the same device for the same requests."""

    provider: str
    usd_per_second: float
    monthly_cost_usd: float
    busy_share: float            # request-seconds per dedicated device-second
    crossover_busy_share: float | None  # None when the dedicated fleet is unpriced
    cheaper: str | None          # "serverless", "dedicated" or None


def compare_serverless(price: ServerlessPrice, traffic: Traffic, seconds_per_request: float,
                       devices_per_worker: int, replicas: int, dedicated_usd_per_device_hour: float | None,
                       dedicated_monthly_cost_usd: float | None) -> ServerlessComparison:
    request_seconds = traffic.requests_per_month * seconds_per_request
    monthly = request_seconds * price.usd_per_second * devices_per_worker
    busy_share = request_seconds / (replicas * traffic.hours_per_month * SECONDS_PER_HOUR)
    if dedicated_usd_per_device_hour is None or dedicated_monthly_cost_usd is None:
        return ServerlessComparison(price.provider, price.usd_per_second, monthly, busy_share, None, None)
    crossover = dedicated_usd_per_device_hour / (price.usd_per_second * SECONDS_PER_HOUR)
    return ServerlessComparison(price.provider, price.usd_per_second, monthly, busy_share, crossover,
                                "serverless" if monthly < dedicated_monthly_cost_usd else "dedicated")
