"""Per-key limits that hold across gateway processes: requests and tokens per window,
concurrent requests, monthly budget.

The admission rule, checked atomically for each request of a key with limits:

* budget:      month-to-date spend < monthly_budget_usd
* concurrency: (live requests + 1) <= max_concurrent
* requests:    (requests admitted in the last window_s + 1) <= requests_per_minute
* tokens:      (tokens of the requests admitted in the last window_s + this request's
               reservation) <= tokens_per_minute

The window slides: an admission counts for exactly `window_s` seconds (60 by
default) after it happened. A request's tokens count at its reservation (prompt
+ max_tokens) until it is settled, then at what it really consumed, so unused
tokens come back as soon as the request ends. Consequently the tokens admitted in
any window never exceed the limit, whatever the number of gateway processes; only
a request that consumed more than it reserved can push usage past it. A request
that holds a concurrency slot keeps it until settled or until its lease
(`concurrency_lease_s`, default 10 minutes) runs out, so the slots of a crashed
gateway come back by themselves. Spend is kept per UTC calendar month and seeded
from the usage ledger the first time a key is seen (by a fresh Redis or process),
so a restart does not reset budgets.

Two implementations with the same semantics: `RedisLimiter` (atomic Lua
scripts; every process sharing one Redis shares the limits; time is Redis
server time, so the gateway hosts' clocks do not matter) and `InProcessLimiter`
(one process; `build_limiter(None)`).

Contract:
* `acquire` returns a `Reservation` (admitted) or a `Rejection` (nothing was
  recorded). It raises `ValueError` for a negative reservation and
  `LimiterUnavailableError` when Redis cannot be reached or a key's spend
  cannot be seeded from the ledger (the caller chooses to fail open or closed).
* Every `Reservation` must be settled exactly once, also when the request
  failed (with what was really consumed, maybe 0). A second settle of the same
  reservation is ignored with a warning. Settle is per process: the limiter
  that acquired a reservation settles it.
* Keys without any limit are admitted without touching Redis on the way in;
  their spend is still tracked on settle.
"""
from __future__ import annotations

import abc
import asyncio
import logging
import math
import threading
import time
import uuid
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone

from tokenmill.gateway.keys import ApiKey, KeyLimits

logger = logging.getLogger(__name__)

DEFAULT_CONCURRENCY_LEASE_S = 600.0


class LimiterUnavailableError(RuntimeError):
    """The shared limit state (Redis) cannot be reached."""


@dataclass(frozen=True)
class Reservation:
    """An admitted request's hold on its key's limits, until `Limiter.settle`."""
    key_id: str
    request_id: str
    tokens: int
    acquired_at: float  # epoch seconds (Redis server time for RedisLimiter)
    # Unique per admission (request ids are the caller's and need not be unique).
    reservation_id: str = field(default_factory=lambda: uuid.uuid4().hex, compare=False)
    rate_limit_headers: tuple[tuple[str, str], ...] = field(default=(), compare=False, repr=False)


@dataclass(frozen=True)
class Rejection:
    reason: str            # "requests_per_minute" | "tokens_per_minute" | "max_concurrent" | "monthly_budget"
    message: str           # clear, for the client
    retry_after_s: float   # for Retry-After
    headers: dict[str, str]  # retry-after and the x-ratelimit-* headers as of the rejection


@dataclass(frozen=True)
class _Decision:
    """What one atomic check found: admitted or why not, and the window state."""
    admitted: bool
    reason: str | None
    retry_after_s: float
    now: float
    requests_in_window: int      # after admission, when admitted
    tokens_in_window: int        # after admission, when admitted
    live_requests: int
    spend_usd: float
    oldest_request_at: float | None
    oldest_tokens_at: float | None


def month_of(epoch_s: float) -> str:
    return datetime.fromtimestamp(epoch_s, timezone.utc).strftime("%Y-%m")


def seconds_to_next_month(epoch_s: float) -> float:
    now = datetime.fromtimestamp(epoch_s, timezone.utc)
    year, month = (now.year + 1, 1) if now.month == 12 else (now.year, now.month + 1)
    return max(datetime(year, month, 1, tzinfo=timezone.utc).timestamp() - epoch_s, 1.0)


def format_duration(seconds: float) -> str:
    """OpenAI's style for x-ratelimit-reset-*: '250ms', '12.5s', '6m0s'."""
    seconds = round(max(seconds, 0.0), 3)
    if seconds < 1:
        return f"{round(seconds * 1000)}ms"
    if seconds < 60:
        return f"{seconds:g}s"
    minutes, rest = divmod(round(seconds), 60)
    return f"{minutes}m{rest}s"


def _has_limits(limits: KeyLimits) -> bool:
    return any(value is not None for value in (limits.requests_per_minute, limits.tokens_per_minute,
                                               limits.max_concurrent, limits.monthly_budget_usd))


class Limiter(abc.ABC):
    """Admission against per-key limits; see the module docstring for the rule and the contract."""

    def __init__(self, window_s: float = 60.0, concurrency_lease_s: float = DEFAULT_CONCURRENCY_LEASE_S,
                 spend_source: Callable[[str], float] | None = None) -> None:
        if not (isinstance(window_s, (int, float)) and math.isfinite(window_s) and window_s > 0):
            raise ValueError(f"window_s must be a positive number of seconds, got {window_s!r}")
        if not (isinstance(concurrency_lease_s, (int, float)) and concurrency_lease_s > 0):
            raise ValueError(f"concurrency_lease_s must be positive, got {concurrency_lease_s!r}")
        self.window_s = float(window_s)
        self.concurrency_lease_s = float(concurrency_lease_s)
        self._spend_source = spend_source
        self._outstanding: set[str] = set()
        self._outstanding_lock = threading.Lock()

    # -- the interface ------------------------------------------------------

    async def acquire(self, key: ApiKey, request_id: str, reserve_tokens: int) -> Reservation | Rejection:
        if isinstance(reserve_tokens, bool) or not isinstance(reserve_tokens, int) or reserve_tokens < 0:
            raise ValueError(f"reserve_tokens must be a non-negative integer, got {reserve_tokens!r}")
        reservation_id = uuid.uuid4().hex
        limits = key.limits
        if not _has_limits(limits):
            decision = None
            acquired_at = time.time()
        else:
            decision = await self._decide(key.key_id, limits, reservation_id, reserve_tokens)
            acquired_at = decision.now
            if not decision.admitted:
                return self._rejection(key, limits, decision, reserve_tokens)
        reservation = Reservation(key_id=key.key_id, request_id=request_id, tokens=reserve_tokens,
                                  acquired_at=acquired_at, reservation_id=reservation_id,
                                  rate_limit_headers=tuple(self._window_headers(limits, decision).items()))
        with self._outstanding_lock:
            self._outstanding.add(reservation_id)
        return reservation

    async def settle(self, reservation: Reservation, actual_tokens: int, cost_usd: float = 0.0) -> None:
        if isinstance(actual_tokens, bool) or not isinstance(actual_tokens, int) or actual_tokens < 0:
            raise ValueError(f"actual_tokens must be a non-negative integer, got {actual_tokens!r}")
        if not (isinstance(cost_usd, (int, float)) and math.isfinite(cost_usd) and cost_usd >= 0):
            raise ValueError(f"cost_usd must be a non-negative number, got {cost_usd!r}")
        with self._outstanding_lock:
            if reservation.reservation_id not in self._outstanding:
                logger.warning("reservation of request %s settled twice (or by another limiter); ignored",
                               reservation.request_id)
                return
            self._outstanding.discard(reservation.reservation_id)
        await self._settle(reservation, actual_tokens, float(cost_usd))

    def headers(self, reservation: Reservation) -> dict[str, str]:
        """x-ratelimit-* headers for the successful response, as of admission (only the limits the key has)."""
        return dict(reservation.rate_limit_headers)

    @property
    def outstanding(self) -> int:
        """Reservations acquired here and not yet settled."""
        with self._outstanding_lock:
            return len(self._outstanding)

    async def month_to_date_spend(self, key_id: str) -> float:
        """The key's spend this UTC month as the limiter counts it (seeded from the ledger)."""
        return await self._spend(key_id)

    async def close(self) -> None:
        return None

    # -- implementations ----------------------------------------------------

    @abc.abstractmethod
    async def _decide(self, key_id: str, limits: KeyLimits, reservation_id: str, reserve_tokens: int) -> _Decision:
        """Check the rule and, if admitted, record the admission: one atomic step."""

    @abc.abstractmethod
    async def _settle(self, reservation: Reservation, actual_tokens: int, cost_usd: float) -> None: ...

    @abc.abstractmethod
    async def _spend(self, key_id: str) -> float: ...

    async def _seed_value(self, key_id: str) -> float:
        if self._spend_source is None:
            return 0.0
        try:
            value = await asyncio.to_thread(self._spend_source, key_id)
        except Exception as error:  # noqa: BLE001 - the admission cannot be decided without it
            raise LimiterUnavailableError(f"cannot read the month-to-date spend of key {key_id} from the usage "
                                          f"ledger: {' '.join(str(error).split()) or type(error).__name__}") from None
        return float(value or 0.0)

    # -- shared formatting --------------------------------------------------

    def _per_window(self) -> str:
        return "per minute" if self.window_s == 60 else f"per {self.window_s:g} s"

    def _window_headers(self, limits: KeyLimits, decision: _Decision | None) -> dict[str, str]:
        if decision is None:
            return {}
        headers: dict[str, str] = {}
        if limits.requests_per_minute is not None:
            reset = (decision.oldest_request_at + self.window_s - decision.now
                     if decision.oldest_request_at is not None else 0.0)
            headers["x-ratelimit-limit-requests"] = str(limits.requests_per_minute)
            headers["x-ratelimit-remaining-requests"] = str(max(limits.requests_per_minute
                                                                - decision.requests_in_window, 0))
            headers["x-ratelimit-reset-requests"] = format_duration(reset)
        if limits.tokens_per_minute is not None:
            reset = (decision.oldest_tokens_at + self.window_s - decision.now
                     if decision.oldest_tokens_at is not None else 0.0)
            headers["x-ratelimit-limit-tokens"] = str(limits.tokens_per_minute)
            headers["x-ratelimit-remaining-tokens"] = str(max(limits.tokens_per_minute
                                                              - decision.tokens_in_window, 0))
            headers["x-ratelimit-reset-tokens"] = format_duration(reset)
        return headers

    def _rejection(self, key: ApiKey, limits: KeyLimits, decision: _Decision, reserve_tokens: int) -> Rejection:
        who = f"API key {key.prefix}..."
        retry = max(decision.retry_after_s, 0.001)
        if decision.reason == "monthly_budget":
            message = (f"the monthly budget of ${limits.monthly_budget_usd:.2f} for {who} is spent "
                       f"(${decision.spend_usd:.2f} so far this month, UTC); it renews at the start of next month")
        elif decision.reason == "max_concurrent":
            message = (f"too many concurrent requests for {who}: its limit is {limits.max_concurrent} at once; "
                       "retry when one of them has finished")
        elif decision.reason == "requests_per_minute":
            message = (f"rate limit reached for {who}: {limits.requests_per_minute} requests {self._per_window()}; "
                       f"retry in {retry:.1f} s")
        elif reserve_tokens > (limits.tokens_per_minute or 0):
            message = (f"this request reserves {reserve_tokens} tokens (prompt + max_tokens), more than the "
                       f"{limits.tokens_per_minute} tokens {self._per_window()} allowed for {who}; "
                       "lower max_tokens or shorten the prompt")
        else:
            message = (f"token rate limit reached for {who}: {decision.tokens_in_window} of "
                       f"{limits.tokens_per_minute} tokens {self._per_window()} are in use and this request "
                       f"reserves {reserve_tokens} (prompt + max_tokens); retry in {retry:.1f} s")
        headers = {"retry-after": str(max(1, math.ceil(retry)))}
        headers.update(self._window_headers(limits, decision))
        return Rejection(reason=decision.reason, message=message, retry_after_s=retry, headers=headers)


# -- in-process -------------------------------------------------------------


class _KeyWindows:
    """One key's windows in one process."""

    def __init__(self) -> None:
        self.requests: deque[float] = deque()                         # admission times
        self.tokens: OrderedDict[str, list] = OrderedDict()           # reservation_id -> [admitted_at, tokens]
        self.tokens_in_window = 0
        self.leases: dict[str, float] = {}                            # reservation_id -> lease expiry

    def expire(self, now: float, window_s: float) -> None:
        cutoff = now - window_s
        while self.requests and self.requests[0] <= cutoff:
            self.requests.popleft()
        while self.tokens:
            reservation_id, (admitted_at, tokens) = next(iter(self.tokens.items()))
            if admitted_at > cutoff:
                break
            del self.tokens[reservation_id]
            self.tokens_in_window -= tokens
        for reservation_id in [rid for rid, expiry in self.leases.items() if expiry <= now]:
            del self.leases[reservation_id]

    @property
    def empty(self) -> bool:
        return not self.requests and not self.tokens and not self.leases


class InProcessLimiter(Limiter):
    """The limits of one gateway process (no Redis configured); same semantics as `RedisLimiter`."""

    def __init__(self, window_s: float = 60.0, concurrency_lease_s: float = DEFAULT_CONCURRENCY_LEASE_S,
                 spend_source: Callable[[str], float] | None = None, clock: Callable[[], float] = time.time) -> None:
        super().__init__(window_s, concurrency_lease_s, spend_source)
        self._clock = clock
        self._windows: dict[str, _KeyWindows] = {}
        self._spend_usd: dict[tuple[str, str], float] = {}
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"InProcessLimiter(window_s={self.window_s:g})"

    async def _ensure_seeded(self, key_id: str, month: str) -> None:
        if (key_id, month) in self._spend_usd:
            return
        value = await self._seed_value(key_id)
        with self._lock:
            self._spend_usd.setdefault((key_id, month), value)

    async def _decide(self, key_id: str, limits: KeyLimits, reservation_id: str, reserve_tokens: int) -> _Decision:
        await self._ensure_seeded(key_id, month_of(self._clock()))
        with self._lock:
            now = self._clock()
            windows = self._windows.setdefault(key_id, _KeyWindows())
            windows.expire(now, self.window_s)
            spend = self._spend_usd.get((key_id, month_of(now)), 0.0)
            reason, retry = self._check(windows, limits, now, spend, reserve_tokens)
            if reason is None:
                if limits.requests_per_minute is not None:
                    windows.requests.append(now)
                if limits.tokens_per_minute is not None:
                    windows.tokens[reservation_id] = [now, reserve_tokens]
                    windows.tokens_in_window += reserve_tokens
                if limits.max_concurrent is not None:
                    windows.leases[reservation_id] = now + self.concurrency_lease_s
            return _Decision(
                admitted=reason is None, reason=reason, retry_after_s=retry, now=now,
                requests_in_window=len(windows.requests), tokens_in_window=windows.tokens_in_window,
                live_requests=len(windows.leases), spend_usd=spend,
                oldest_request_at=windows.requests[0] if windows.requests else None,
                oldest_tokens_at=next(iter(windows.tokens.values()))[0] if windows.tokens else None)

    def _check(self, windows: _KeyWindows, limits: KeyLimits, now: float, spend: float,
               reserve_tokens: int) -> tuple[str | None, float]:
        if limits.monthly_budget_usd is not None and spend >= limits.monthly_budget_usd:
            return "monthly_budget", seconds_to_next_month(now)
        if limits.max_concurrent is not None and len(windows.leases) + 1 > limits.max_concurrent:
            return "max_concurrent", 1.0
        rpm = limits.requests_per_minute
        if rpm is not None and len(windows.requests) + 1 > rpm:
            # The (count + 1 - limit)-th oldest admission must leave the window first.
            oldest = windows.requests[len(windows.requests) - rpm]
            return "requests_per_minute", oldest + self.window_s - now
        tpm = limits.tokens_per_minute
        if tpm is not None and windows.tokens_in_window + reserve_tokens > tpm:
            if reserve_tokens > tpm:
                return "tokens_per_minute", self.window_s
            needed = windows.tokens_in_window + reserve_tokens - tpm
            freed = 0
            for admitted_at, tokens in windows.tokens.values():
                freed += tokens
                if freed >= needed:
                    return "tokens_per_minute", admitted_at + self.window_s - now
            return "tokens_per_minute", self.window_s
        return None, 0.0

    async def _settle(self, reservation: Reservation, actual_tokens: int, cost_usd: float) -> None:
        month = month_of(self._clock())
        if cost_usd > 0:
            await self._ensure_seeded(reservation.key_id, month)
        with self._lock:
            windows = self._windows.get(reservation.key_id)
            if windows is not None:
                entry = windows.tokens.get(reservation.reservation_id)
                if entry is not None:
                    windows.tokens_in_window += actual_tokens - entry[1]
                    entry[1] = actual_tokens
                windows.leases.pop(reservation.reservation_id, None)
                windows.expire(self._clock(), self.window_s)
                if windows.empty:
                    del self._windows[reservation.key_id]
            if cost_usd > 0:
                self._spend_usd[(reservation.key_id, month)] += cost_usd

    async def _spend(self, key_id: str) -> float:
        month = month_of(self._clock())
        await self._ensure_seeded(key_id, month)
        with self._lock:
            return self._spend_usd[(key_id, month)]


# -- Redis ------------------------------------------------------------------

# KEYS: 1 requests zset, 2 tokens zset, 3 tokens hash, 4 tokens total, 5 leases zset, 6 spend
# ARGV: 1 window_s, 2 rpm, 3 tpm, 4 max_concurrent, 5 budget (-1: unlimited), 6 reserve, 7 reservation id,
#       8 lease_s
# Returns {status, reason, retry_after, now, requests, tokens, live, spend, oldest_request, oldest_tokens};
# numbers as strings (Lua numbers would be truncated to integers). status "seed": the month's
# spend is not in Redis yet; the caller seeds it and calls again.
_ACQUIRE = """
-- Redis < 5 replicates scripts verbatim unless told to replicate their effects (TIME makes this one
-- non-deterministic); from Redis 5 on this is the default and the call a no-op.
if redis.replicate_commands then redis.replicate_commands() end
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local window = tonumber(ARGV[1])
local rpm = tonumber(ARGV[2])
local tpm = tonumber(ARGV[3])
local max_live = tonumber(ARGV[4])
local budget = tonumber(ARGV[5])
local reserve = tonumber(ARGV[6])
local rid = ARGV[7]
local lease = tonumber(ARGV[8])
local cutoff = now - window

local spend = redis.call('GET', KEYS[6])
if not spend then return {'seed'} end

redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', cutoff)
local expired = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', cutoff)
if #expired > 0 then
  local freed = 0
  for _, member in ipairs(expired) do
    freed = freed + (tonumber(redis.call('HGET', KEYS[3], member)) or 0)
    redis.call('HDEL', KEYS[3], member)
  end
  redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', cutoff)
  redis.call('DECRBY', KEYS[4], freed)
end
redis.call('ZREMRANGEBYSCORE', KEYS[5], '-inf', now)

local requests = redis.call('ZCARD', KEYS[1])
local tokens = tonumber(redis.call('GET', KEYS[4]) or '0')
local live = redis.call('ZCARD', KEYS[5])

local function oldest(key)
  local first = redis.call('ZRANGE', KEYS[key], 0, 0, 'WITHSCORES')
  if #first == 0 then return '' end
  return first[2]
end
local function answer(status, reason, retry)
  return {status, reason, tostring(retry), tostring(now), tostring(requests), tostring(tokens), tostring(live),
          spend, oldest(1), oldest(2)}
end

if budget >= 0 and tonumber(spend) >= budget then
  return answer('reject', 'monthly_budget', -1)
end
if max_live >= 0 and live + 1 > max_live then
  return answer('reject', 'max_concurrent', 1)
end
if rpm >= 0 and requests + 1 > rpm then
  local nth = redis.call('ZRANGE', KEYS[1], requests - rpm, requests - rpm, 'WITHSCORES')
  return answer('reject', 'requests_per_minute', tonumber(nth[2]) + window - now)
end
if tpm >= 0 and tokens + reserve > tpm then
  if reserve > tpm then return answer('reject', 'tokens_per_minute', window) end
  local needed = tokens + reserve - tpm
  local freed = 0
  local start = 0
  while true do
    local batch = redis.call('ZRANGE', KEYS[2], start, start + 99, 'WITHSCORES')
    if #batch == 0 then break end
    for i = 1, #batch, 2 do
      freed = freed + (tonumber(redis.call('HGET', KEYS[3], batch[i])) or 0)
      if freed >= needed then
        return answer('reject', 'tokens_per_minute', tonumber(batch[i + 1]) + window - now)
      end
    end
    start = start + 100
  end
  return answer('reject', 'tokens_per_minute', window)
end

local ttl_ms = math.ceil(window * 1000) + 1000
if rpm >= 0 then
  redis.call('ZADD', KEYS[1], now, rid)
  redis.call('PEXPIRE', KEYS[1], ttl_ms)
  requests = requests + 1
end
if tpm >= 0 then
  redis.call('ZADD', KEYS[2], now, rid)
  redis.call('HSET', KEYS[3], rid, reserve)
  redis.call('INCRBY', KEYS[4], reserve)
  redis.call('PEXPIRE', KEYS[2], ttl_ms)
  redis.call('PEXPIRE', KEYS[3], ttl_ms)
  redis.call('PEXPIRE', KEYS[4], ttl_ms)
  tokens = tokens + reserve
end
if max_live >= 0 then
  redis.call('ZADD', KEYS[5], now + lease, rid)
  redis.call('PEXPIRE', KEYS[5], math.ceil(lease * 1000) + 1000)
  live = live + 1
end
return answer('ok', '', 0)
"""

# KEYS: 1 tokens hash, 2 tokens total, 3 leases zset, 4 spend
# ARGV: 1 reservation id, 2 actual tokens, 3 cost (USD, as a string)
# Returns 'ok', or 'seed' when a cost is to be added to a month not yet in Redis.
_SETTLE = """
if tonumber(ARGV[3]) > 0 and redis.call('EXISTS', KEYS[4]) == 0 then return 'seed' end
local reserved = redis.call('HGET', KEYS[1], ARGV[1])
if reserved then
  redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
  redis.call('INCRBY', KEYS[2], tonumber(ARGV[2]) - tonumber(reserved))
end
redis.call('ZREM', KEYS[3], ARGV[1])
if tonumber(ARGV[3]) > 0 then redis.call('INCRBYFLOAT', KEYS[4], ARGV[3]) end
return 'ok'
"""


class RedisLimiter(Limiter):
    """Limits shared by every gateway process that uses the same Redis and `key_prefix`."""

    def __init__(self, redis_url: str, window_s: float = 60.0, key_prefix: str = "tokenmill:gw:",
                 concurrency_lease_s: float = DEFAULT_CONCURRENCY_LEASE_S,
                 spend_source: Callable[[str], float] | None = None) -> None:
        super().__init__(window_s, concurrency_lease_s, spend_source)
        import redis.asyncio

        if not isinstance(redis_url, str) or not redis_url.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError(f"not a Redis URL: {redis_url!r} (use redis://HOST:PORT/DB, rediss:// or unix://)")
        if not isinstance(key_prefix, str) or not key_prefix:
            raise ValueError("key_prefix must be a non-empty string")
        try:
            self._redis = redis.asyncio.Redis.from_url(redis_url, decode_responses=True,
                                                       socket_connect_timeout=5, socket_timeout=5,
                                                       health_check_interval=30)
        except ValueError as error:
            raise ValueError(f"bad Redis URL {_redact_redis(redis_url)}: {error}") from None
        self._url = _redact_redis(redis_url)
        self._prefix = key_prefix
        self._acquire_script = self._redis.register_script(_ACQUIRE)
        self._settle_script = self._redis.register_script(_SETTLE)

    def __repr__(self) -> str:
        return f"RedisLimiter({self._url!r}, window_s={self.window_s:g}, key_prefix={self._prefix!r})"

    def _keys(self, key_id: str, month: str) -> dict[str, str]:
        # The {key_id} hash tag keeps one key's state in one Redis Cluster slot.
        base = f"{self._prefix}{{{key_id}}}:"
        return {"requests": base + "requests", "tokens": base + "tokens", "token_counts": base + "token_counts",
                "tokens_total": base + "tokens_total", "leases": base + "leases", "spend": base + f"spend:{month}"}

    async def _call(self, script, keys: list[str], args: list):
        import redis.exceptions

        try:
            return await script(keys=keys, args=args)
        except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, OSError) as error:
            raise LimiterUnavailableError(f"Redis at {self._url} is unreachable: {error}") from None
        except redis.exceptions.RedisError as error:
            raise LimiterUnavailableError(f"Redis at {self._url} failed: {error}") from None

    async def _seed(self, key_id: str, spend_key: str) -> None:
        import redis.exceptions

        value = await self._seed_value(key_id)
        # Kept a week past the month's end; only the first seeder's value is kept.
        ttl_s = int(seconds_to_next_month(time.time())) + 7 * 86400
        try:
            await self._redis.set(spend_key, repr(value), nx=True, ex=ttl_s)
        except (redis.exceptions.RedisError, OSError) as error:
            raise LimiterUnavailableError(f"Redis at {self._url} is unreachable: {error}") from None

    async def _decide(self, key_id: str, limits: KeyLimits, reservation_id: str, reserve_tokens: int) -> _Decision:
        def unlimited(value):
            return -1 if value is None else value

        for _ in range(3):
            keys = self._keys(key_id, month_of(time.time()))
            answer = await self._call(self._acquire_script, list(keys.values()), [
                repr(self.window_s), unlimited(limits.requests_per_minute), unlimited(limits.tokens_per_minute),
                unlimited(limits.max_concurrent), repr(unlimited(limits.monthly_budget_usd)), reserve_tokens,
                reservation_id, repr(self.concurrency_lease_s)])
            if answer[0] != "seed":
                break
            await self._seed(key_id, keys["spend"])
        else:
            raise LimiterUnavailableError(f"Redis at {self._url} keeps losing the month's spend of key {key_id}")
        status, reason, retry, now, requests, tokens, live, spend, oldest_request, oldest_tokens = answer
        now = float(now)
        retry_after = float(retry)
        if reason == "monthly_budget":
            retry_after = seconds_to_next_month(now)
        return _Decision(admitted=status == "ok", reason=reason or None, retry_after_s=retry_after, now=now,
                         requests_in_window=int(requests), tokens_in_window=int(tokens), live_requests=int(live),
                         spend_usd=float(spend), oldest_request_at=float(oldest_request) if oldest_request else None,
                         oldest_tokens_at=float(oldest_tokens) if oldest_tokens else None)

    async def _settle(self, reservation: Reservation, actual_tokens: int, cost_usd: float) -> None:
        for _ in range(3):
            keys = self._keys(reservation.key_id, month_of(time.time()))
            answer = await self._call(self._settle_script,
                                      [keys["token_counts"], keys["tokens_total"], keys["leases"], keys["spend"]],
                                      [reservation.reservation_id, actual_tokens, repr(cost_usd)])
            if answer != "seed":
                return
            await self._seed(reservation.key_id, keys["spend"])
        raise LimiterUnavailableError(f"Redis at {self._url} keeps losing the month's spend of key "
                                      f"{reservation.key_id}")

    async def _spend(self, key_id: str) -> float:
        import redis.exceptions

        spend_key = self._keys(key_id, month_of(time.time()))["spend"]
        try:
            value = await self._redis.get(spend_key)
            if value is None:
                await self._seed(key_id, spend_key)
                value = await self._redis.get(spend_key)
        except (redis.exceptions.RedisError, OSError) as error:
            raise LimiterUnavailableError(f"Redis at {self._url} is unreachable: {error}") from None
        return float(value or 0.0)

    async def close(self) -> None:
        await self._redis.aclose()


def _redact_redis(url: str) -> str:
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = f"{parts.username or ''}:***@{parts.hostname}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


def build_limiter(redis_url: str | None, window_s: float = 60.0, key_prefix: str = "tokenmill:gw:", *,
                  concurrency_lease_s: float = DEFAULT_CONCURRENCY_LEASE_S,
                  spend_source: Callable[[str], float] | None = None) -> Limiter:
    """`RedisLimiter` when a Redis URL is configured, else `InProcessLimiter`.

    `spend_source(key_id)` gives a key's month-to-date spend from the usage
    ledger (`Ledger.month_to_date_spend`); it seeds the limiter's count of a key
    the first time this Redis or process sees it that month.
    """
    if redis_url:
        return RedisLimiter(redis_url, window_s=window_s, key_prefix=key_prefix,
                            concurrency_lease_s=concurrency_lease_s, spend_source=spend_source)
    return InProcessLimiter(window_s=window_s, concurrency_lease_s=concurrency_lease_s, spend_source=spend_source)
