"""What one `tokenmill bench` run measures, and the small text syntaxes of its flags.

Every parser raises `BenchError` (a ValueError, so the command line prints it as
one line and exits non-zero) naming the bad text and the accepted forms:

- durations: `500ms`, `10s`, `2m`, `1h` or plain seconds (`0.5`);
- SLOs: `ttft=500ms,itl=50ms,tpot=40ms,e2e=10s` (any subset, at least one);
- sweeps: `concurrency=1,2,4,8` or `request-rate=1,2.5,5`;
- length distributions: `128` (fixed), `64-256` (uniform, inclusive) or
  `normal:128,32` (mean, standard deviation; rounded, at least 1).
"""
from __future__ import annotations

import math
import random
import re
from dataclasses import dataclass, field
from pathlib import Path


class BenchError(ValueError):
    """A problem the user can fix (arguments, server, dataset): reported as one line."""


_DURATION_UNITS = {"ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0, "": 1.0}
_DURATION = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:e[-+]?[0-9]+)?)\s*(ms|s|m|h|)\s*$", re.IGNORECASE)


def parse_duration(text: str) -> float:
    """'500ms', '10s', '2m', '1h' or plain seconds -> seconds (positive)."""
    match = _DURATION.match(text)
    if not match:
        raise BenchError(f"not a duration: {text!r} (use e.g. 500ms, 10s, 2m or plain seconds)")
    seconds = float(match.group(1)) * _DURATION_UNITS[match.group(2).lower()]
    if seconds <= 0:
        raise BenchError(f"a duration must be positive: {text!r}")
    return seconds


SLO_METRICS = ("ttft", "itl", "tpot", "e2e")


@dataclass(frozen=True)
class SLO:
    """Per-request latency bounds in seconds; None = not part of the objective.

    A request meets the SLO when it succeeded and: its TTFT <= ttft; none of its
    per-token inter-token latencies exceeds itl; its TPOT <= tpot; its E2E <= e2e.
    """

    ttft: float | None = None
    itl: float | None = None
    tpot: float | None = None
    e2e: float | None = None

    @property
    def is_set(self) -> bool:
        return any(getattr(self, name) is not None for name in SLO_METRICS)

    def as_ms(self) -> dict[str, float]:
        return {name: getattr(self, name) * 1e3 for name in SLO_METRICS if getattr(self, name) is not None}

    def describe(self) -> str:
        return ", ".join(f"{name} <= {ms:g} ms" for name, ms in self.as_ms().items())


def parse_slo(text: str) -> SLO:
    """'ttft=500ms,itl=50ms,e2e=10s' -> SLO."""
    bounds: dict[str, float] = {}
    for part in text.split(","):
        name, sep, value = part.partition("=")
        name = name.strip().lower()
        if not sep or name not in SLO_METRICS:
            raise BenchError(f"invalid SLO {text!r}: expected NAME=DURATION pairs separated by commas, "
                             f"NAME one of {', '.join(SLO_METRICS)} (e.g. ttft=500ms,itl=50ms,e2e=10s)")
        if name in bounds:
            raise BenchError(f"invalid SLO {text!r}: {name} is given twice")
        try:
            bounds[name] = parse_duration(value)
        except BenchError:
            raise BenchError(f"invalid SLO {text!r}: {value.strip()!r} is not a duration "
                             "(use e.g. 500ms or 10s)") from None
    return SLO(**bounds)


@dataclass(frozen=True)
class LengthDistribution:
    """Token lengths: `fixed` (a), `uniform` (a..b inclusive) or `normal` (mean a, std b)."""

    kind: str
    a: float
    b: float = 0.0

    def sample(self, rng: random.Random) -> int:
        if self.kind == "fixed":
            return int(self.a)
        if self.kind == "uniform":
            return rng.randint(int(self.a), int(self.b))
        return max(1, round(rng.gauss(self.a, self.b)))

    @property
    def mean(self) -> float:
        return (self.a + self.b) / 2 if self.kind == "uniform" else self.a

    def describe(self) -> str:
        if self.kind == "fixed":
            return f"{int(self.a)}"
        if self.kind == "uniform":
            return f"uniform {int(self.a)}-{int(self.b)}"
        return f"normal(mean {self.a:g}, std {self.b:g})"


def parse_length(text: str) -> LengthDistribution:
    """'128', '64-256' or 'normal:128,32' -> LengthDistribution."""
    value = text.strip().lower()
    try:
        if value.startswith("normal:"):
            mean, std = (float(x) for x in value[len("normal:"):].split(","))
            if mean < 1 or std < 0:
                raise ValueError
            return LengthDistribution("normal", mean, std)
        if "-" in value:
            low, high = (int(x) for x in value.split("-"))
            if not 1 <= low <= high:
                raise ValueError
            return LengthDistribution("uniform", low, high)
        fixed = int(value)
        if fixed < 1:
            raise ValueError
        return LengthDistribution("fixed", fixed)
    except ValueError:
        raise BenchError(f"not a length distribution: {text!r} (use N, LOW-HIGH or normal:MEAN,STD; "
                         "lengths are positive)") from None


SWEEP_PARAMETERS = {"concurrency": "concurrency", "request-rate": "request_rate", "request_rate": "request_rate",
                    "rate": "request_rate"}


@dataclass(frozen=True)
class Sweep:
    parameter: str  # "concurrency" or "request_rate"
    values: tuple[float, ...]


def parse_sweep(text: str) -> Sweep:
    """'concurrency=1,2,4' or 'request-rate=1,2.5' -> Sweep (values kept in the given order)."""
    name, sep, values = text.partition("=")
    parameter = SWEEP_PARAMETERS.get(name.strip().lower())
    if not sep or parameter is None:
        raise BenchError(f"invalid sweep {text!r}: use concurrency=1,2,4 or request-rate=1,2,4")
    try:
        numbers = tuple(float(v) for v in values.split(","))
    except ValueError:
        raise BenchError(f"invalid sweep {text!r}: the values must be numbers separated by commas") from None
    if parameter == "concurrency" and any(v < 1 or v != int(v) for v in numbers):
        raise BenchError(f"invalid sweep {text!r}: concurrency values must be positive integers")
    if any(v <= 0 for v in numbers):
        raise BenchError(f"invalid sweep {text!r}: values must be positive")
    return Sweep(parameter, tuple(int(v) if parameter == "concurrency" else v for v in numbers))


@dataclass(frozen=True)
class LoadShape:
    """How requests are issued in one run.

    Closed loop (request_rate None): `concurrency` requests in flight, each
    sending its next request when the last one ends. Open loop: arrivals at
    `request_rate` per second (math.inf: all at once) with gamma-distributed
    gaps of shape `burstiness` (1 = Poisson), at most `concurrency` in flight
    when set. A run ends after `num_requests` requests or when `duration`
    seconds have passed since its start (then no new request is sent and those
    in flight finish), whichever comes first. `requests_per_user` instead of
    `num_requests` sends that many per unit of concurrency (sweeps keep the
    same number of waves at every point).
    """

    concurrency: int | None = 1
    request_rate: float | None = None
    burstiness: float = 1.0
    num_requests: int | None = None
    duration: float | None = None
    requests_per_user: int | None = None

    @property
    def request_limit(self) -> int | None:
        """Requests to send; None when only `duration` bounds the run."""
        if self.num_requests is not None:
            return self.num_requests
        if self.requests_per_user is not None:
            return self.requests_per_user * (self.concurrency or 1)
        if self.duration is not None:
            return None
        if self.request_rate is None:
            return max(16, 4 * (self.concurrency or 1))
        return 100

    def label(self) -> dict[str, float | int]:
        if self.request_rate is None:
            return {"concurrency": self.concurrency}
        label: dict[str, float | int] = {"request_rate": self.request_rate}
        if self.concurrency is not None:
            label["concurrency"] = self.concurrency
        return label

    def describe(self) -> str:
        if self.request_rate is None:
            return f"concurrency {self.concurrency}"
        rate = "all at once" if math.isinf(self.request_rate) else f"{self.request_rate:g} req/s"
        arrivals = "Poisson" if self.burstiness == 1.0 else f"gamma, burstiness {self.burstiness:g}"
        cap = f", at most {self.concurrency} in flight" if self.concurrency is not None else ""
        return f"request rate {rate} ({arrivals}){cap}"


@dataclass(frozen=True)
class MaxUsersSearch:
    """Find the largest concurrency whose p95 per-user decode speed is at least
    `per_user_tps` and whose p95 TTFT is at most `ttft_p95`, with no failure."""

    per_user_tps: float = 20.0
    ttft_p95: float = 0.5
    limit: int = 256


@dataclass(frozen=True)
class BenchConfig:
    base_url: str
    model: str | None = None
    api_key: str | None = None
    endpoint: str = "completions"
    load: LoadShape = field(default_factory=LoadShape)
    sweep: Sweep | None = None
    max_users: MaxUsersSearch | None = None
    input_len: LengthDistribution = field(default_factory=lambda: LengthDistribution("fixed", 128))
    output_len: LengthDistribution = field(default_factory=lambda: LengthDistribution("fixed", 128))
    dataset: Path | None = None
    prefix_len: int = 0  # words of a prefix shared by every synthetic prompt
    ignore_eos: bool = False
    temperature: float | None = 0.0
    extra_body: dict = field(default_factory=dict)
    seed: int = 0
    slo: SLO = field(default_factory=SLO)
    warmup: int = 0
    timeout: float = 300.0
    logprobs: bool | None = None  # None: use them when the server returns them
    tokenizer: str | None = None
    out: Path | None = None
    csv: Path | None = None
    plot_dir: Path | None = None
    progress: bool = True
    json_output: bool = False

    @property
    def max_connections(self) -> int | None:
        """Pool size: the most requests this run can have in flight (None: unbounded)."""
        if self.max_users is not None:
            return self.max_users.limit
        values = [self.load.concurrency]
        if self.sweep is not None and self.sweep.parameter == "concurrency":
            values = list(self.sweep.values)
        if any(v is None for v in values):
            return None
        return int(max(values))
