"""The replicas of a pool: which one serves a request, which are healthy, how busy each is.

Balancing rule (`UpstreamPool.choose`): among the admitted (healthy, not yet
tried) upstreams, the *preferred* one for a request is picked by weighted
rendezvous hashing of the request's prompt prefix (its first
`affinity.prefix_chars` characters: the system prompt and first message), so
requests that share a long prefix land on the replica whose prefix cache holds
it, and only the prefixes of a replica that leaves move elsewhere. The preferred
replica is used unless its load exceeds the least-loaded replica's by more than
`affinity.max_imbalance` requests; then the least-loaded one is used (least
outstanding requests). A replica's load is the requests this gateway has in
flight on it plus those its last `/metrics` scrape showed beyond them (other
gateways' requests), divided by its weight. Replicas at
`queue.max_concurrent_per_upstream` are skipped while another has room.

Health: every `health.interval_s` each replica's `health.path` is fetched (200 =
pass) and its `health.metrics_path` scraped for `tokenmill_num_requests_waiting`
/ `_running` (vLLM's `vllm:` names too). `health.eject_after_failures`
consecutive failures (of those checks, or of requests that failed before their
first byte) eject a replica; it is re-admitted by the first passing check at
least `health.readmit_after_s` after the ejection, or, with no health path
(external APIs), after the cool-down on probation: one more failure ejects it
again.

One owner: all state here is changed on the event loop only, by the proxy
(`begin`/`end`/`record_*`) and the pool's own health task.
"""
from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import time
from collections import deque
from collections.abc import Callable

import httpx

from tokenmill.gateway.config import PoolConfig, UpstreamConfig

logger = logging.getLogger("tokenmill.gateway")

_QUEUE_METRICS = {
    "waiting": ("tokenmill_num_requests_waiting", "vllm:num_requests_waiting"),
    "running": ("tokenmill_num_requests_running", "vllm:num_requests_running"),
}
THROUGHPUT_WINDOW_S = 30.0
_SERVICE_TIME_SMOOTHING = 0.2


def affinity_digest(prefix: str) -> bytes:
    """The 8-byte hash of a prompt prefix that rendezvous hashing keys on."""
    return hashlib.blake2b(prefix.encode("utf-8", "surrogatepass"), digest_size=8).digest()


def parse_queue_metrics(text: str) -> dict[str, float]:
    """{'waiting': n, 'running': n} summed over label sets from a Prometheus scrape;
    a name absent from the scrape is absent from the result."""
    found: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line[0] == "#":
            continue
        for kind, names in _QUEUE_METRICS.items():
            for name in names:
                if line.startswith(name) and line[len(name)] in "{ ":
                    rest = line[len(name):]
                    if rest.startswith("{"):
                        rest = rest[rest.index("}") + 1:]
                    try:
                        found[kind] = found.get(kind, 0.0) + float(rest.split()[0])
                    except (ValueError, IndexError):
                        pass
    return found


class Upstream:
    """One replica or API endpoint of a pool, and what the gateway knows about it."""

    def __init__(self, pool: str, index: int, config: UpstreamConfig, api_key: str | None,
                 max_concurrent: int) -> None:
        self.pool = pool
        self.index = index
        self.config = config
        self.label = config.label
        self.base_url = config.base_url
        self.origin = config.origin
        self.weight = config.weight
        self.max_concurrent = max_concurrent
        self.headers = {"content-type": "application/json"}
        if api_key:
            self.headers["authorization"] = f"Bearer {api_key}"
        self._hash_salt = f"{pool}/{index}/{config.base_url}".encode()
        self.outstanding = 0
        self.healthy = True
        self.probation = False
        self.consecutive_failures = 0        # of requests, reset by a request that succeeds
        self.consecutive_check_failures = 0  # of health checks, reset by a check that passes
        self.ejected_at: float | None = None
        self.num_ejections = 0
        self.scraped_waiting = 0.0
        self.scraped_running = 0.0
        self.scraped_at: float | None = None
        self._outstanding_at_scrape = 0
        # Busy-time shares for cost: sum over time of dt / (requests in flight here).
        self._share_seconds = 0.0
        self._share_updated = time.monotonic()

    def url(self, path: str) -> str:
        return self.base_url + path

    def rendezvous_score(self, digest: bytes) -> float:
        value = int.from_bytes(hashlib.blake2b(digest + self._hash_salt, digest_size=8).digest(), "big")
        unit = (value + 1) / (2**64 + 1)  # in (0, 1)
        return -self.weight / math.log(unit)

    def others_in_flight(self, now: float, stale_after_s: float) -> float:
        """Requests the last scrape showed beyond this gateway's own (other gateways')."""
        if self.scraped_at is None or now - self.scraped_at > stale_after_s:
            return 0.0
        return max(0.0, self.scraped_waiting + self.scraped_running - self._outstanding_at_scrape)

    # ---- requests --------------------------------------------------------------------------
    def _advance_shares(self, now: float) -> None:
        if self.outstanding > 0:
            self._share_seconds += (now - self._share_updated) / self.outstanding
        self._share_updated = now

    def begin(self) -> float:
        """A request starts here; returns the token `end()` needs for its busy-time share."""
        now = time.monotonic()
        self._advance_shares(now)
        self.outstanding += 1
        return self._share_seconds

    def end(self, share_token: float) -> float:
        """The request has ended; returns its share of this upstream's busy seconds."""
        now = time.monotonic()
        self._advance_shares(now)
        self.outstanding -= 1
        return self._share_seconds - share_token

    def record_success(self) -> None:
        self.consecutive_failures = 0
        self.probation = False

    def record_failure(self, eject_after: int, reason: str, check: bool = False) -> bool:
        """A request that failed before its first byte, or (`check`) a failed health
        check; True when it ejects the upstream."""
        if check:
            self.consecutive_check_failures += 1
        else:
            self.consecutive_failures += 1
        worst = max(self.consecutive_failures, self.consecutive_check_failures)
        if self.healthy and (self.probation or worst >= eject_after):
            self.healthy = False
            self.probation = False
            self.ejected_at = time.monotonic()
            self.num_ejections += 1
            logger.warning("upstream %s of pool %s ejected after %d consecutive failures (last: %s)",
                           self.label, self.pool, worst, reason)
            return True
        return False

    def readmit(self, probation: bool) -> None:
        self.healthy = True
        self.probation = probation
        self.consecutive_failures = 0
        self.consecutive_check_failures = 0
        self.ejected_at = None
        logger.warning("upstream %s of pool %s re-admitted%s", self.label, self.pool,
                       " on probation" if probation else "")


class UpstreamPool:
    """The upstreams of one configured pool, their health task and the pool's recent throughput."""

    def __init__(self, name: str, config: PoolConfig, api_keys: dict[int, str | None]) -> None:
        self.name = name
        self.config = config
        self.tier = config.tier
        self.upstreams = [Upstream(name, index, upstream, api_keys.get(index),
                                   config.queue.max_concurrent_per_upstream)
                          for index, upstream in enumerate(config.upstreams)]
        self.on_capacity_change: Callable[[], None] | None = None
        self.num_retries = 0
        self._completions: deque[float] = deque()
        self.service_time_s: float | None = None  # smoothed seconds a request holds its slot
        self._task: asyncio.Task | None = None
        self._client: httpx.AsyncClient | None = None

    # ---- state read by admission ----------------------------------------------------------
    @property
    def in_flight(self) -> int:
        return sum(upstream.outstanding for upstream in self.upstreams)

    def capacity(self) -> int:
        """Requests the admitted upstreams may hold at once."""
        return sum(upstream.max_concurrent for upstream in self.upstreams if upstream.healthy)

    def num_healthy(self) -> int:
        return sum(1 for upstream in self.upstreams if upstream.healthy)

    def _stale_after(self) -> float:
        return 3 * self.config.health.interval_s

    def upstream_waiting(self) -> float:
        """Requests waiting inside the healthy upstreams' own queues, by their last fresh scrape."""
        now = time.monotonic()
        return sum(upstream.scraped_waiting for upstream in self.upstreams
                   if upstream.healthy and upstream.scraped_at is not None
                   and now - upstream.scraped_at <= self._stale_after())

    def upstream_busy(self) -> float:
        """Requests running on the healthy upstreams: the larger of this gateway's count and the scrape's."""
        now = time.monotonic()
        busy = 0.0
        for upstream in self.upstreams:
            if not upstream.healthy:
                continue
            scraped = (upstream.scraped_running if upstream.scraped_at is not None
                       and now - upstream.scraped_at <= self._stale_after() else 0.0)
            busy += max(float(upstream.outstanding), scraped)
        return busy

    def observe_completion(self, slot_seconds: float) -> None:
        now = time.monotonic()
        self._completions.append(now)
        while self._completions and now - self._completions[0] > THROUGHPUT_WINDOW_S:
            self._completions.popleft()
        if self.service_time_s is None:
            self.service_time_s = slot_seconds
        else:
            self.service_time_s += _SERVICE_TIME_SMOOTHING * (slot_seconds - self.service_time_s)

    def completions_per_s(self) -> float:
        """Requests completed per second over the last `THROUGHPUT_WINDOW_S` seconds."""
        now = time.monotonic()
        while self._completions and now - self._completions[0] > THROUGHPUT_WINDOW_S:
            self._completions.popleft()
        return len(self._completions) / THROUGHPUT_WINDOW_S

    # ---- balancing ------------------------------------------------------------------------
    def choose(self, digest: bytes | None, exclude: set[int] = frozenset()) -> Upstream | None:
        """The upstream for a request (rule in the module docstring); None if none is admitted."""
        candidates = [u for u in self.upstreams if u.healthy and u.index not in exclude]
        if not candidates:
            return None
        with_room = [u for u in candidates if u.outstanding < u.max_concurrent]
        if with_room:
            candidates = with_room
        if len(candidates) == 1:
            return candidates[0]
        now = time.monotonic()
        stale = self._stale_after()
        loads = {u.index: (u.outstanding + u.others_in_flight(now, stale)) / u.weight for u in candidates}
        least = min(candidates, key=lambda u: loads[u.index])
        if digest is None:
            return least
        preferred = max(candidates, key=lambda u: u.rendezvous_score(digest))
        if loads[preferred.index] - loads[least.index] <= self.config.affinity.max_imbalance:
            return preferred
        return least

    def record_failure(self, upstream: Upstream, reason: str, check: bool = False) -> None:
        if upstream.record_failure(self.config.health.eject_after_failures, reason, check):
            self._capacity_changed()

    def _capacity_changed(self) -> None:
        if self.on_capacity_change is not None:
            self.on_capacity_change()

    # ---- health ---------------------------------------------------------------------------
    def bind(self, client: httpx.AsyncClient) -> None:
        """The HTTP client of the health checks and scrapes."""
        self._client = client

    def start(self, client: httpx.AsyncClient) -> None:
        """Start the health and scrape task (on the running loop); `close()` stops it."""
        self.bind(client)
        self._task = asyncio.create_task(self._health_loop(), name=f"gateway-health-{self.name}")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None

    async def check_now(self) -> None:
        """One round of health checks and scrapes over every upstream."""
        await asyncio.gather(*(self._check(upstream) for upstream in self.upstreams))

    async def _health_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.health.interval_s)
            try:
                await self.check_now()
            except Exception:  # a bug in a check must not stop the checks
                logger.exception("health checks of pool %s failed", self.name)

    async def _check(self, upstream: Upstream) -> None:
        health = self.config.health
        client = self._client
        passed: bool | None = None
        reason = ""
        if health.path is not None:
            try:
                response = await client.get(upstream.origin + health.path, timeout=health.timeout_s)
                passed = response.status_code == 200
                reason = f"health check answered {response.status_code}"
            except httpx.HTTPError as error:
                passed, reason = False, f"health check failed: {type(error).__name__}"
        if health.metrics_path is not None and passed is not False:
            try:
                response = await client.get(upstream.origin + health.metrics_path, timeout=health.timeout_s)
                if response.status_code == 200:
                    values = parse_queue_metrics(response.text)
                    upstream.scraped_waiting = values.get("waiting", 0.0)
                    upstream.scraped_running = values.get("running", 0.0)
                    upstream.scraped_at = time.monotonic()
                    upstream._outstanding_at_scrape = upstream.outstanding
            except httpx.HTTPError:
                pass  # the health check decides health; a missed scrape only ages the numbers
        now = time.monotonic()
        if not upstream.healthy:
            cooled = now - upstream.ejected_at >= health.readmit_after_s
            if cooled and (passed is True or (passed is None and health.path is None)):
                upstream.readmit(probation=passed is None)
                self._capacity_changed()
        elif passed is True:
            upstream.consecutive_check_failures = 0
        elif passed is False:
            self.record_failure(upstream, reason, check=True)
