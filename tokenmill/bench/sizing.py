"""The sizing answer: the most concurrent users a server keeps within target.

A concurrency passes when, over its probe run, no request failed, the p95 TTFT
is at most the target, and the p95 per-user decode speed (the speed 95% of
requests reach or beat) is at least the target tokens/s. `search_max_users`
probes concurrency 1, 2, 4, ... until one fails or the limit is reached, then
bisects between the last pass and the first failure. It assumes that passing
is monotonic in concurrency (each concurrency is probed at most once, so a
noisy probe is not retried); every probe is reported so the table can be judged.
"""
from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from tokenmill.bench.config import MaxUsersSearch


@dataclass(frozen=True)
class Verdict:
    passed: bool
    reasons: tuple[str, ...]

    def describe(self) -> str:
        return "pass" if self.passed else "; ".join(self.reasons)


def judge(summary: dict, target: MaxUsersSearch) -> Verdict:
    reasons = []
    if summary["failed"]:
        reasons.append(f"{summary['failed']} failed")
    ttft = summary["ttft_ms"]
    if ttft is None:
        reasons.append("no TTFT measured")
    elif ttft["p95"] > target.ttft_p95 * 1e3:
        reasons.append(f"TTFT p95 {ttft['p95']:.0f} ms > {target.ttft_p95 * 1e3:g} ms")
    speed = summary["decode_tps_per_user"]
    if speed is None:
        reasons.append("no decode speed measured (outputs under 2 tokens)")
    elif speed["p95"] < target.per_user_tps:
        reasons.append(f"decode p95 {speed['p95']:.1f} tok/s < {target.per_user_tps:g}")
    return Verdict(not reasons, tuple(reasons))


async def search_max_users(probe: Callable[[int], Awaitable[Verdict]], limit: int) -> int:
    """The largest concurrency in 1..limit whose probe passes (0 when even 1 fails)."""
    verdicts: dict[int, bool] = {}

    async def passes(concurrency: int) -> bool:
        if concurrency not in verdicts:
            verdicts[concurrency] = (await probe(concurrency)).passed
        return verdicts[concurrency]

    best, first_failure, concurrency = 0, None, 1
    while concurrency <= limit:
        if not await passes(concurrency):
            first_failure = concurrency
            break
        best = concurrency
        concurrency *= 2
    if first_failure is None:
        if best == limit:
            return best
        if await passes(limit):
            return limit
        first_failure = limit
    while first_failure - best > 1:
        middle = (best + first_failure) // 2
        if await passes(middle):
            best = middle
        else:
            first_failure = middle
    return best
