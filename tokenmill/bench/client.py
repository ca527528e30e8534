"""Send one streamed request and record what arrived when: `StreamingClient.send`.

A run's requests share a few `httpx.AsyncClient` pools of at most
`POOL_SHARD_SIZE` keep-alive connections each, together as many connections as
the run can have in flight, so no request waits for a connection; each request
takes the pool with the fewest requests in flight (which always has room).
Sharding matters because httpcore scans its whole pool at every request start
and end: one pool of 64 connections doubled the bench's CPU per request
(benchmarks/bench_overhead.py). The hot
loop stamps each network read with `time.perf_counter()`, splits it into SSE
events and keeps, per content chunk, its arrival time, its text and (when the
server sends logprobs) how many tokens it carries. Everything derived from
that (token counts, TTFT, ITL, ...) is computed after the run
(`tokens.py`, `metrics.py`), off the measured path.

A content chunk is an event whose choice carries text (completions `text`,
chat `delta.content`, or a reasoning delta) or at least one logprobs entry.

Failure reasons (`RequestRecord.failure`):
- `http_<status>`: the server answered with a non-2xx status;
- `connection`: no connection, or the server closed it before answering;
- `timeout`: no complete answer within the request timeout;
- `truncated`: the stream broke off, or ended without a finish reason;
- `stream_error`: the server sent an error event inside the stream;
- `finish_<reason>`: the server ended the completion itself (abort, timeout, error);
- `no_output`: the stream finished without a single content chunk.
"""
from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

import httpx
import orjson

from tokenmill.bench.sse import SSEParser
from tokenmill.bench.workload import RequestSpec

FAILED_FINISH_REASONS = frozenset({"abort", "timeout", "error", "cancelled"})
POOL_SHARD_SIZE = 8
UNBOUNDED_POOLS = 16  # open loops without a concurrency cap: unbounded pools, load spread over this many


@dataclass(slots=True, eq=False)
class RequestRecord:
    """One request: raw observations (filled while it runs), then derived values
    (filled by `tokens.resolve_token_counts` and `metrics.measure`)."""

    index: int
    spec: RequestSpec
    start: float = 0.0  # perf_counter when the request was handed to the HTTP client
    end: float = 0.0  # perf_counter when the response ended (or failed)
    chunk_times: list[float] = field(default_factory=list)
    chunk_texts: list[str] = field(default_factory=list)
    chunk_logprob_tokens: list[int] = field(default_factory=list)
    saw_logprobs: bool = False
    finish_reason: str | None = None
    usage_prompt_tokens: int | None = None
    usage_completion_tokens: int | None = None
    failure: str | None = None
    failure_detail: str | None = None
    # derived after the run
    prompt_tokens: int | None = None
    prompt_tokens_source: str | None = None
    output_tokens: int | None = None
    output_tokens_source: str | None = None
    chunk_tokens: list[int] | None = None
    chunk_tokens_source: str | None = None
    ttft: float | None = None
    e2e: float | None = None
    tpot: float | None = None
    itl: list[float] | None = None
    meets_slo: bool | None = None

    @property
    def ok(self) -> bool:
        return self.failure is None

    def fail(self, reason: str, detail: str | None = None) -> None:
        if self.failure is None:
            self.failure, self.failure_detail = reason, detail


def error_message(body: bytes, limit: int = 300) -> str:
    """The human part of an error body: OpenAI's error.message, FastAPI's detail, or the text."""
    try:
        payload = orjson.loads(body)
    except orjson.JSONDecodeError:
        payload = None
    message = None
    if isinstance(payload, dict):
        error = payload.get("error")
        if isinstance(error, dict):
            message = error.get("message")
        elif isinstance(error, str):
            message = error
        message = message or payload.get("detail") or payload.get("message")
    if message is None:
        message = body.decode("utf-8", "replace")
    return " ".join(str(message).split())[:limit] or "(empty body)"


def describe_http_error(error: BaseException) -> str:
    text = str(error) or type(error).__name__
    return " ".join(text.split())


class StreamingClient:
    def __init__(self, base_url: str, endpoint: str, model: str, api_key: str | None = None,
                 timeout: float = 300.0, max_connections: int | None = None, temperature: float | None = 0.0,
                 ignore_eos: bool = False, logprobs: bool = False, extra_body: dict | None = None) -> None:
        self.base_url = base_url.rstrip("/")
        self.chat = endpoint == "chat"
        self.url = self.base_url + ("/chat/completions" if self.chat else "/completions")
        self.model = model
        self.timeout = timeout
        self.temperature = temperature
        self.ignore_eos = ignore_eos
        self.logprobs = logprobs
        self.extra_body = dict(extra_body or {})
        headers = {"Content-Type": "application/json", "Accept": "text/event-stream",
                   "Accept-Encoding": "identity"}
        if api_key:
            headers["Authorization"] = f"Bearer {api_key}"
        if max_connections is None:
            num_pools, per_pool = UNBOUNDED_POOLS, None
        else:
            num_pools = -(-max_connections // POOL_SHARD_SIZE)
            per_pool = -(-max_connections // num_pools)
        # Keep-alive for every slot: reconnecting would be measured as latency.
        limits = httpx.Limits(max_connections=per_pool, max_keepalive_connections=per_pool)
        self.pools = [httpx.AsyncClient(headers=headers, limits=limits, trust_env=False,
                                        timeout=httpx.Timeout(timeout, connect=min(timeout, 30.0), pool=None))
                      for _ in range(num_pools)]
        self.pool_loads = [0] * num_pools

    async def aclose(self) -> None:
        for pool in self.pools:
            await pool.aclose()

    def body(self, spec: RequestSpec) -> bytes:
        payload: dict = {"model": self.model, "stream": True, "stream_options": {"include_usage": True},
                         "max_tokens": spec.max_tokens}
        if self.chat:
            payload["messages"] = list(spec.messages) if spec.messages is not None else \
                [{"role": "user", "content": spec.prompt}]
        else:
            payload["prompt"] = spec.prompt if spec.prompt is not None else spec.prompt_text
        if self.temperature is not None:
            payload["temperature"] = self.temperature
        if self.ignore_eos:
            payload["ignore_eos"] = True
        if self.logprobs:
            # Completions: logprobs=0 lists each sampled token, no alternatives; chat: logprobs=true.
            payload["logprobs"] = True if self.chat else 0
        payload.update(self.extra_body)
        return orjson.dumps(payload)

    async def send(self, spec: RequestSpec, index: int) -> RequestRecord:
        record = RequestRecord(index=index, spec=spec)
        body = self.body(spec)
        loads = self.pool_loads
        pool = loads.index(min(loads)) if len(loads) > 1 else 0
        loads[pool] += 1
        answered = False
        record.start = time.perf_counter()
        try:
            async with asyncio.timeout(self.timeout):
                async with self.pools[pool].stream("POST", self.url, content=body) as response:
                    answered = True
                    if not 200 <= response.status_code < 300:
                        record.fail(f"http_{response.status_code}", error_message(await response.aread()))
                    else:
                        await self._read_events(response, record)
        except (TimeoutError, httpx.TimeoutException):
            record.fail("timeout", f"no complete answer within {self.timeout:g} s")
        except (httpx.HTTPError, OSError) as error:
            record.fail("truncated" if answered else "connection", describe_http_error(error))
        finally:
            loads[pool] -= 1
        if record.end == 0.0:
            record.end = time.perf_counter()
        if record.failure is None:
            if record.finish_reason is None:
                record.fail("truncated", "the stream ended without a finish reason")
            elif record.finish_reason in FAILED_FINISH_REASONS:
                record.fail(f"finish_{record.finish_reason}", f"finish_reason {record.finish_reason!r}")
            elif not record.chunk_times:
                record.fail("no_output", "the stream finished without any content")
        return record

    async def _read_events(self, response: httpx.Response, record: RequestRecord) -> None:
        parser = SSEParser()
        chat = self.chat
        loads = orjson.loads
        perf_counter = time.perf_counter
        times, texts, counts = record.chunk_times, record.chunk_texts, record.chunk_logprob_tokens
        chunks = response.aiter_bytes() if "content-encoding" in response.headers else response.aiter_raw()
        async for raw in chunks:
            now = perf_counter()
            for data in parser.feed(raw):
                if data == b"[DONE]":
                    continue
                try:
                    event = loads(data)
                except orjson.JSONDecodeError:
                    record.fail("stream_error", f"an event is not JSON: {data[:100]!r}")
                    continue
                if not isinstance(event, dict):
                    continue
                choices = event.get("choices")
                if choices:
                    choice = choices[0]
                    if chat:
                        delta = choice.get("delta") or {}
                        text = delta.get("content") or delta.get("reasoning_content") or delta.get("reasoning")
                    else:
                        text = choice.get("text")
                    logprobs = choice.get("logprobs")
                    carried = 0
                    if logprobs:
                        record.saw_logprobs = True
                        carried = len(logprobs.get("content") or ()) if chat else len(logprobs.get("tokens") or ())
                    if text or carried:
                        times.append(now)
                        texts.append(text or "")
                        counts.append(carried)
                    finish_reason = choice.get("finish_reason")
                    if finish_reason:
                        record.finish_reason = finish_reason
                usage = event.get("usage")
                if usage:
                    record.usage_prompt_tokens = usage.get("prompt_tokens")
                    record.usage_completion_tokens = usage.get("completion_tokens")
                error = event.get("error")
                if error:
                    record.fail("stream_error", error_message(data))
        record.end = perf_counter()
