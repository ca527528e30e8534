"""The one error type of the planner.

`PlanError` is a `ValueError`, so `tokenmill plan` prints it as a single line
(`tokenmill plan: error: ...`) and exits with status 2. Every message names the
offending value and, where there is a closed set, the valid choices.
"""
from __future__ import annotations

from collections.abc import Iterable


class PlanError(ValueError):
    """Bad input the user can fix: unknown names, out-of-range numbers, unreadable files."""


def unknown_name(kind: str, name: str, choices: Iterable[str]) -> PlanError:
    """`unknown GPU 'x100' (choose from: a100-80gb, h100-sxm, ...)`."""
    return PlanError(f"unknown {kind} {name!r} (choose from: {', '.join(sorted(choices))})")
