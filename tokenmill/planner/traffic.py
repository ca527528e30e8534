"""Traffic: from daily users to the peak request rate, peak concurrency (Little's
law) and monthly volume.

    requests/day      = DAU x requests per user per day
    peak rate (req/s) = requests/day x peak share / (peak hours x 3600)
    peak concurrency  = peak rate x seconds per request           (Little's law)
    requests/month    = requests/day x hours per month / 24

When the peak share is below the peak window's share of the day (say 20% in
8 hours), the hours outside the window are busier than the window; the peak
rate is then theirs: requests/day x (1 - share) / ((24 - hours) x 3600).
"""
from __future__ import annotations

from dataclasses import dataclass

from tokenmill.planner.errors import PlanError

SECONDS_PER_HOUR = 3600.0
DEFAULT_HOURS_PER_MONTH = 720.0  # 30 days, as the seeds' monthly costs use


@dataclass(frozen=True)
class Traffic:
    """A traffic description. Defaults are the seeds' worked example: 1,000 DAU, 3
    requests each, 500 input and 200 output tokens, 70% of requests in 8 hours."""

    daily_active_users: float = 1000
    requests_per_user_per_day: float = 3
    input_tokens: int = 500
    output_tokens: int = 200
    peak_share: float = 0.70
    peak_hours: float = 8
    hours_per_month: float = DEFAULT_HOURS_PER_MONTH

    def __post_init__(self) -> None:
        if not self.daily_active_users > 0:
            raise PlanError(f"--dau must be positive, got {self.daily_active_users:g}")
        if not self.requests_per_user_per_day > 0:
            raise PlanError(f"--requests-per-user must be positive, got {self.requests_per_user_per_day:g}")
        if self.input_tokens < 0:
            raise PlanError(f"--input-tokens must be >= 0, got {self.input_tokens}")
        if self.output_tokens < 1:
            raise PlanError(f"--output-tokens must be >= 1, got {self.output_tokens}")
        if not 0 < self.peak_share <= 1:
            raise PlanError(f"--peak-share must be in (0, 1] (a fraction of daily requests, e.g. 0.7), "
                            f"got {self.peak_share:g}")
        if not 0 < self.peak_hours <= 24:
            raise PlanError(f"--peak-hours must be in (0, 24], got {self.peak_hours:g}")
        if not 0 < self.hours_per_month <= 744:
            raise PlanError(f"--hours-per-month must be in (0, 744], got {self.hours_per_month:g}")

    @property
    def requests_per_day(self) -> float:
        return self.daily_active_users * self.requests_per_user_per_day

    @property
    def tokens_per_request(self) -> int:
        return self.input_tokens + self.output_tokens

    @property
    def peak_requests_per_s(self) -> float:
        in_window = self.requests_per_day * self.peak_share / (self.peak_hours * SECONDS_PER_HOUR)
        if self.peak_hours >= 24:
            return in_window
        outside = self.requests_per_day * (1 - self.peak_share) / ((24 - self.peak_hours) * SECONDS_PER_HOUR)
        return max(in_window, outside)

    @property
    def peak_is_outside_window(self) -> bool:
        """True when the hours outside the peak window carry the higher rate."""
        return self.peak_share < self.peak_hours / 24

    @property
    def average_requests_per_s(self) -> float:
        return self.requests_per_day / (24 * SECONDS_PER_HOUR)

    @property
    def requests_per_month(self) -> float:
        return self.requests_per_day * self.hours_per_month / 24

    @property
    def tokens_per_month(self) -> float:
        """Input and output tokens, counted alike (as per-token prices and break-evens count them)."""
        return self.requests_per_month * self.tokens_per_request

    @property
    def output_tokens_per_month(self) -> float:
        return self.requests_per_month * self.output_tokens

    def scaled(self, daily_active_users: float) -> Traffic:
        """The same usage pattern for another number of users."""
        return Traffic(daily_active_users, self.requests_per_user_per_day, self.input_tokens, self.output_tokens,
                       self.peak_share, self.peak_hours, self.hours_per_month)


def peak_concurrency(traffic: Traffic, seconds_per_request: float) -> float:
    """Little's law at the peak: requests in flight = arrival rate x time each spends in the system."""
    return traffic.peak_requests_per_s * seconds_per_request


def average_concurrency(traffic: Traffic, seconds_per_request: float) -> float:
    return traffic.average_requests_per_s * seconds_per_request
