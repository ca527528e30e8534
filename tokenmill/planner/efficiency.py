"""How much of a device's peak a serving engine achieves: the factors the
roofline model multiplies peaks by, and the per-step overheads it adds.

Defaults describe a mature GPU engine (vLLM-class); `tokenmill plan --calibrate`
fits all four to a measured sweep. Text form (flags, profiles):
`bandwidth=0.7,compute=0.5,step_overhead_ms=0,sequence_overhead_ms=0`.
"""
from __future__ import annotations

from dataclasses import dataclass, fields

from tokenmill.planner.errors import PlanError


@dataclass(frozen=True)
class Efficiency:
    """Achieved fractions of peak and fixed costs per decode step.

    bandwidth: fraction of peak memory bandwidth reached while reading weights and KV.
    compute: fraction of dense peak FLOP/s reached by the matmuls.
    step_overhead_s: time added to every engine step (scheduling, kernel launches).
    sequence_overhead_s: time added per running sequence per step (sampling, detokenization).
    """

    bandwidth: float = 0.7
    compute: float = 0.5
    step_overhead_s: float = 0.0
    sequence_overhead_s: float = 0.0

    def __post_init__(self) -> None:
        for name in ("bandwidth", "compute"):
            value = getattr(self, name)
            if not 0 < value <= 1.5:
                raise PlanError(f"efficiency {name} must be in (0, 1.5], got {value}")
        for name in ("step_overhead_s", "sequence_overhead_s"):
            if getattr(self, name) < 0:
                raise PlanError(f"efficiency {name} must be >= 0, got {getattr(self, name)}")

    def as_dict(self) -> dict[str, float]:
        return {"bandwidth": self.bandwidth, "compute": self.compute,
                "step_overhead_ms": self.step_overhead_s * 1e3,
                "sequence_overhead_ms": self.sequence_overhead_s * 1e3}

    def describe(self) -> str:
        """The text form, accepted back by `parse_efficiency`."""
        return ",".join(f"{key}={value:.4g}" for key, value in self.as_dict().items())


_KEYS = {"bandwidth": ("bandwidth", 1.0), "compute": ("compute", 1.0),
         "step_overhead_ms": ("step_overhead_s", 1e-3), "sequence_overhead_ms": ("sequence_overhead_s", 1e-3)}


def efficiency_from_mapping(values: dict, base: Efficiency | None = None) -> Efficiency:
    """{'bandwidth': 0.7, 'step_overhead_ms': 2} over `base` (default: the defaults)."""
    merged = {field.name: getattr(base or Efficiency(), field.name) for field in fields(Efficiency)}
    for key, value in values.items():
        if key not in _KEYS:
            raise PlanError(f"unknown efficiency key {key!r} (choose from: {', '.join(_KEYS)})")
        attribute, scale = _KEYS[key]
        try:
            merged[attribute] = float(value) * scale
        except (TypeError, ValueError):
            raise PlanError(f"efficiency {key} must be a number, got {value!r}") from None
    return Efficiency(**merged)


def parse_efficiency(text: str, base: Efficiency | None = None) -> Efficiency:
    """'bandwidth=0.7,compute=0.4' -> Efficiency; keys not given keep `base`'s values."""
    values = {}
    for part in text.split(","):
        key, sep, value = part.partition("=")
        if not sep:
            raise PlanError(f"invalid efficiency {text!r}: expected KEY=VALUE pairs separated by commas, "
                            f"KEY one of {', '.join(_KEYS)}")
        values[key.strip()] = value.strip()
    return efficiency_from_mapping(values, base)
