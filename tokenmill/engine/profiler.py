"""Where an engine step's time goes: attention, matmuls, sampling, scheduling,
other tensor ops and Python overhead.

`profile_steps(engine, num_steps)` runs steps of an `EngineCore` under
`torch.profiler`, with the engine's phases marked for the duration (the marks are
removed afterwards, nothing in the engine knows about them). Each operator the
profiler records is charged to the innermost marked phase around it; outside
the marked phases, matmul operators count as matmuls and every other operator
as "other tensor ops". What the wall clock saw beyond all of that is Python
overhead: the interpreter running model and runner code between operators.

The profiler itself adds a few microseconds per operator, so the profiled step
is slower than an unprofiled one; the report gives both.
"""
from __future__ import annotations

import time
import types
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field

import torch
from torch.profiler import ProfilerActivity, profile, record_function

from tokenmill.engine import runner as runner_module
from tokenmill.models import gemma3, llama

MATMUL_OPS = frozenset({
    "aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::matmul", "aten::linear",
    "mkldnn::_linear_pointwise", "aten::_weight_int8pack_mm", "aten::_weight_int4pack_mm_for_cpu",
    "aten::_weight_int4pack_mm", "tokenmill::int8_linear",
})
# Phase marks: (label, object, attribute). Model modules call `paged_attention`
# through their own module globals, so each model module is patched.
_PHASES = (
    ("scheduling", "scheduler", "schedule"),
    ("scheduling", "scheduler", "update_from_output"),
    ("input preparation", runner_module, "build_attention_metadata"),
    ("attention", gemma3, "paged_attention"),
    ("attention", llama, "paged_attention"),
    ("output layer (logits)", "model", "compute_logits"),
    ("sampling", runner_module, "sample"),
)
CATEGORIES = ("matmuls (decoder projections)", "output layer (logits)", "attention", "sampling", "scheduling",
              "input preparation", "other tensor ops", "Python overhead")


@dataclass
class StepProfile:
    num_steps: int
    wall_ms_per_step: float            # unprofiled steps just before
    profiled_ms_per_step: float
    ms_per_step: dict[str, float] = field(default_factory=dict)  # category -> ms per profiled step
    batch_sizes: list[int] = field(default_factory=list)        # scheduled requests per profiled step

    def rows(self) -> list[tuple[str, float, float]]:
        """(category, ms per step, share of the profiled step) in CATEGORIES order."""
        return [(name, self.ms_per_step.get(name, 0.0), self.ms_per_step.get(name, 0.0) / self.profiled_ms_per_step)
                for name in CATEGORIES]

    def table(self) -> str:
        lines = [f"{'phase':32s} {'ms/step':>8s} {'share':>7s}"]
        lines += [f"{name:32s} {ms:8.2f} {share:7.1%}" for name, ms, share in self.rows()]
        lines.append(f"{'profiled step':32s} {self.profiled_ms_per_step:8.2f}")
        lines.append(f"{'unprofiled step':32s} {self.wall_ms_per_step:8.2f}")
        return "\n".join(lines)


@contextmanager
def _marked_phases(engine):
    targets = {"scheduler": engine.scheduler, "model": engine.runner.model}
    with ExitStack() as stack:
        for label, owner, name in _PHASES:
            owner = targets.get(owner, owner)
            original = getattr(owner, name, None)
            if original is None:
                continue

            def marked(*args, _original=original, _label=label, **kwargs):
                with record_function(f"phase::{_label}"):
                    return _original(*args, **kwargs)

            setattr(owner, name, marked)
            if isinstance(owner, types.ModuleType):
                stack.callback(setattr, owner, name, original)
            else:
                stack.callback(delattr, owner, name)  # an instance attribute shadowing the method
        yield


def _phase_of(event) -> str | None:
    parent = event.cpu_parent
    while parent is not None:
        if parent.name.startswith("phase::"):
            return parent.name.removeprefix("phase::")
        parent = parent.cpu_parent
    return None


def profile_steps(engine, num_steps: int = 20, warmup_steps: int = 3) -> StepProfile:
    """Profile `num_steps` steps of `engine` (an `EngineCore` with unfinished
    requests; it must have enough work left for warmup + 2 x num_steps steps).
    Raises ValueError when it runs out of work first."""
    def step() -> int:
        if not engine.has_unfinished_requests():
            raise ValueError("the engine ran out of requests before the profile was complete")
        size = len(engine.scheduler.running)
        engine.step()
        return size

    for _ in range(warmup_steps):
        step()
    start = time.perf_counter()
    for _ in range(num_steps):
        step()
    wall = (time.perf_counter() - start) / num_steps

    batch_sizes = []
    with _marked_phases(engine), profile(activities=[ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        for _ in range(num_steps):
            batch_sizes.append(step())
        profiled = (time.perf_counter() - start) / num_steps

    totals = dict.fromkeys(CATEGORIES, 0.0)
    for event in prof.events():
        if event.name.startswith("phase::"):
            if _phase_of(event) is None:  # outermost mark: its whole time, Python included
                totals[event.name.removeprefix("phase::")] += event.cpu_time_total
            continue
        parent = event.cpu_parent
        if parent is not None and not parent.name.startswith("phase::"):
            continue  # nested inside another operator: counted with it
        if _phase_of(event) is not None:
            continue  # inside a marked phase: counted with the phase
        category = "matmuls (decoder projections)" if event.name in MATMUL_OPS else "other tensor ops"
        totals[category] += event.cpu_time_total
    ms = {name: value / 1000 / num_steps for name, value in totals.items()}
    ms["Python overhead"] = max(0.0, profiled * 1000 - sum(ms.values()))
    return StepProfile(num_steps=num_steps, wall_ms_per_step=wall * 1000, profiled_ms_per_step=profiled * 1000,
                       ms_per_step=ms, batch_sizes=batch_sizes)
