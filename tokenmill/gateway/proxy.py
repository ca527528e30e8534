"""Forwarding one request to a pool: retries before the first byte, explicit errors after it.

Failover semantics (docs/gateway.md, Failover):
- Before the first byte reaches the client (connect error, a 5xx/429/401/403
  answer, the connection dropped or the first-token timeout passed before the
  first content token), the attempt counts as a failure of that upstream
  (passive ejection) and the request is tried on another upstream of the pool,
  up to `max_attempts` in all. A stream is committed only when its first
  content token (or its end) has arrived, so a replica that dies while the
  request waits in its queue is invisible to the client.
- Other 4xx answers are the request's fault: passed through as they are.
- After the first byte, a broken connection, an upstream that stops without
  `data: [DONE]`, or the total timeout ends the stream with an SSE error event
  `data: {"error": {...}}` and then `data: [DONE]`: never a silent truncation.
- A client that disconnects cancels the upstream request at once (its
  connection is closed, which a tokenmill replica turns into an abort).

Usage: upstream streams are asked for `stream_options.include_usage`; the usage
chunk is passed on only when the client asked for it. Without upstream usage,
completion tokens are counted as content chunks and prompt tokens estimated
(routing.estimate_tokens).
"""
from __future__ import annotations

import asyncio
import functools
import logging
import time
from dataclasses import dataclass, field
from typing import Callable

import jsonschema
import orjson
from starlette.responses import Response

from tokenmill.bench.sse import SSEParser
from tokenmill.gateway.upstream_http import UpstreamConnections, UpstreamHTTPError, UpstreamResponse, UpstreamTimeout
from tokenmill.gateway.upstreams import Upstream, UpstreamPool
from tokenmill.server.errors import APIError, error_body

logger = logging.getLogger("tokenmill.gateway")

_RETRYABLE_STATUSES = frozenset({401, 403, 408, 409, 425, 429})
_DONE = b"data: [DONE]\n\n"


# ---- the validated request -----------------------------------------------------------------
@dataclass
class ProxyRequest:
    """A client body checked enough to route, limit and forward it (the upstream validates the rest)."""
    kind: str                       # "chat" or "completions"
    body: dict
    model: str
    stream: bool
    include_usage: bool             # the client asked for the usage chunk
    max_tokens_field: str           # the field the client used for its output limit
    requested_max_tokens: int | None
    n: int
    prompt_text: str
    format_type: str | None = None  # "json_object" or "json_schema"
    schema: dict | None = None

    @property
    def path(self) -> str:
        return "/chat/completions" if self.kind == "chat" else "/completions"


def _bad(message: str, param: str | None = None) -> APIError:
    return APIError(400, message, param=param, code="invalid_value")


def _text_of(content) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(part.get("text", "") for part in content if isinstance(part, dict)
                       and isinstance(part.get("text", ""), str))
    raise _bad("a message's content must be a string or a list of parts", "messages")


def parse_request(kind: str, raw: bytes) -> ProxyRequest:
    """The validated request, or APIError 400 naming the bad field."""
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise APIError(400, "the request body is not valid JSON", code="invalid_json") from None
    if not isinstance(body, dict):
        raise _bad("the request body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise _bad("model: a model name (string) is required", "model")
    stream = body.get("stream") or False
    if not isinstance(stream, bool):
        raise _bad("stream: must be a boolean", "stream")
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise _bad("stream_options: must be an object", "stream_options")
    include_usage = bool(options and options.get("include_usage"))
    field_name = "max_tokens"
    if kind == "chat" and body.get("max_completion_tokens") is not None:
        field_name = "max_completion_tokens"
    requested = body.get(field_name)
    if requested is not None and (not isinstance(requested, int) or isinstance(requested, bool) or requested < 1):
        raise _bad(f"{field_name}: must be a positive integer", field_name)
    n = body.get("n")
    n = 1 if n is None else n
    if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= 128:
        raise _bad("n: must be an integer from 1 to 128", "n")
    if kind == "chat":
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise _bad("messages: a non-empty list of messages is required", "messages")
        parts = []
        for message in messages:
            if not isinstance(message, dict):
                raise _bad("messages: each message must be an object", "messages")
            parts.append(_text_of(message.get("content")))
        prompt_text = "\n".join(parts)
    else:
        prompt = body.get("prompt")
        if isinstance(prompt, str):
            prompt_text = prompt
        elif isinstance(prompt, list) and prompt:
            prompt_text = "\n".join(item if isinstance(item, str) else " ".join(map(str, item))
                                    if isinstance(item, list) else str(item) for item in prompt)
        else:
            raise _bad("prompt: a string or a non-empty list is required", "prompt")
    request = ProxyRequest(kind=kind, body=body, model=model, stream=stream, include_usage=include_usage,
                           max_tokens_field=field_name, requested_max_tokens=requested, n=n,
                           prompt_text=prompt_text)
    _parse_response_format(body.get("response_format"), request)
    return request


def _parse_response_format(value, request: ProxyRequest) -> None:
    if value is None:
        return
    if not isinstance(value, dict) or not isinstance(value.get("type"), str):
        raise _bad("response_format: must be an object with a 'type'", "response_format")
    kind = value["type"]
    if kind == "text":
        return
    if kind == "json_object":
        request.format_type = kind
        return
    if kind != "json_schema":
        raise _bad(f"response_format.type: must be text, json_object or json_schema, got {kind!r}",
                   "response_format")
    spec = value.get("json_schema")
    schema = spec.get("schema") if isinstance(spec, dict) else None
    if schema is not None and not isinstance(schema, dict):
        raise _bad("response_format.json_schema.schema: must be a JSON object", "response_format")
    if schema is not None:
        try:
            _validator(orjson.dumps(schema, option=orjson.OPT_SORT_KEYS))
        except jsonschema.SchemaError as error:
            raise _bad(f"response_format.json_schema.schema is not a valid JSON schema: {error.message}",
                       "response_format") from None
    request.format_type = kind
    request.schema = schema


@functools.lru_cache(maxsize=256)
def _validator(schema_json: bytes):
    schema = orjson.loads(schema_json)
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    return cls(schema)


def check_format(request: ProxyRequest, text: str) -> tuple[bool, str | None]:
    """Does the answer follow the request's response_format? (ok, why not)."""
    try:
        value = orjson.loads(text)
    except orjson.JSONDecodeError:
        return False, "invalid_json"
    if request.format_type == "json_object" and not isinstance(value, dict):
        return False, "not_an_object"
    if request.schema is not None:
        validator = _validator(orjson.dumps(request.schema, option=orjson.OPT_SORT_KEYS))
        if next(validator.iter_errors(value), None) is not None:
            return False, "schema_mismatch"
    return True, None


def upstream_body(request: ProxyRequest, upstream_model: str, max_tokens: int) -> bytes:
    body = dict(request.body)
    body["model"] = upstream_model
    body[request.max_tokens_field] = max_tokens
    if request.stream:
        body["stream_options"] = {**(body.get("stream_options") or {}), "include_usage": True}
    return orjson.dumps(body)


# ---- what happened ------------------------------------------------------------------------
def token_count(value) -> int | None:
    """A usage count from an upstream, if it is one (a non-negative integer)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        return None
    return value


@dataclass
class Outcome:
    """How a forwarded request ended; handed once to the caller's `on_done`."""
    status_code: int = 0
    upstream: Upstream | None = None
    attempts: int = 0
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    content_chunks: int = 0
    ttft_s: float | None = None
    error: str | None = None
    error_code: str | None = None
    format_checked: bool = False
    format_ok: bool | None = None
    format_problem: str | None = None
    busy_share_s: float = 0.0
    client_gone: bool = False
    texts: list[str] = field(default_factory=list)


class DisconnectWatcher:
    """Cancels a task when the client disconnects (read after the request body).

    uvicorn's receive() also answers `http.disconnect` once the response is
    complete, so `stop()` must come before the last body message is sent."""

    def __init__(self, receive) -> None:
        self.gone = False
        self._target = asyncio.current_task()
        self._task = asyncio.ensure_future(self._watch(receive))

    async def _watch(self, receive) -> None:
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                self.gone = True
                if self._target is not None:
                    self._target.cancel()
                return

    def retarget(self, task: asyncio.Task | None) -> None:
        self._target = task

    def stop(self) -> None:
        self._target = None
        self._task.cancel()


class _UpstreamFailure(Exception):
    """An attempt failed before the first byte; another upstream may be tried."""

    def __init__(self, reason: str, code: str, timeout: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.code = code
        self.timeout = timeout


# ---- the stream's events --------------------------------------------------------------------
class _StreamReader:
    """Reads an upstream SSE body: what to forward, and what it says about the request."""

    def __init__(self, request: ProxyRequest, outcome: Outcome) -> None:
        self.request = request
        self.outcome = outcome
        self.parser = SSEParser()
        self.done = False
        self.upstream_error = False
        self.first_content = False

    def feed(self, chunk: bytes) -> bytes:
        out = []
        for data in self.parser.feed(chunk):
            if data == b"[DONE]":
                self.done = True
                continue
            if self.done:
                continue
            forwarded = self._event(data)
            if forwarded is not None:
                out.append(b"data: " + forwarded + b"\n\n")
        return b"".join(out)

    def _event(self, data: bytes) -> bytes | None:
        try:
            event = orjson.loads(data)
        except orjson.JSONDecodeError:
            return data
        if not isinstance(event, dict):
            return data
        if "error" in event:
            self.upstream_error = True
            error = event["error"] if isinstance(event["error"], dict) else {"message": str(event["error"])}
            self.outcome.error = str(error.get("message") or "the upstream reported an error")
            self.outcome.error_code = "upstream_error"
            return data
        usage = event.get("usage")
        choices = event.get("choices") or ()
        if isinstance(usage, dict):
            self.outcome.prompt_tokens = token_count(usage.get("prompt_tokens"))
            self.outcome.completion_tokens = token_count(usage.get("completion_tokens"))
            if not self.request.include_usage:
                if not choices:
                    return None
                del event["usage"]
                data = orjson.dumps(event)
        for choice in choices:
            if not isinstance(choice, dict):
                continue
            delta = choice.get("delta") if self.request.kind == "chat" else None
            if self.request.kind == "chat":
                if not isinstance(delta, dict):
                    continue
                text = delta.get("content")
                has_content = bool(text) or bool(delta.get("tool_calls")) or bool(delta.get("reasoning_content"))
            else:
                text = choice.get("text")
                has_content = bool(text)
            if has_content:
                self.first_content = True
                self.outcome.content_chunks += 1
                if self.request.format_type is not None and isinstance(text, str) and choice.get("index", 0) == 0:
                    self.outcome.texts.append(text)
        return data


def _error_event(message: str, code: str, type_: str = "upstream_error") -> bytes:
    return b"data: " + orjson.dumps(error_body(message, type_, None, code)) + b"\n\n" + _DONE


# ---- the proxy ------------------------------------------------------------------------------
class Proxy:
    """Forwards requests to pools. One per gateway; its upstream connections are
    kept alive across requests (never one per request)."""

    def __init__(self) -> None:
        self._connections: dict[tuple[str, int], UpstreamConnections] = {}

    def _connections_of(self, upstream: Upstream) -> UpstreamConnections:
        key = (upstream.pool, upstream.index)
        connections = self._connections.get(key)
        if connections is None:
            connections = self._connections[key] = UpstreamConnections(upstream.base_url)
        return connections

    async def aclose(self) -> None:
        for connections in self._connections.values():
            await connections.aclose()

    async def forward(self, request: ProxyRequest, pool: UpstreamPool, max_tokens: int, digest: bytes | None,
                      request_id: str, headers: dict, watcher: DisconnectWatcher,
                      on_done: Callable[[Outcome], None], arrival: float) -> Response:
        """The response for the client. `on_done(outcome)` is called exactly once: when
        the response has ended (streams), before returning (others), or before raising
        APIError (no upstream could answer; the outcome says why)."""
        body = upstream_body(request, pool.config.model, max_tokens)
        outcome = Outcome()
        deadline = arrival + pool.config.timeouts.total_s
        headers = {**headers, "x-request-id": request_id}
        if request.stream:
            return await self._forward_stream(request, pool, body, digest, headers, watcher, on_done, outcome,
                                              arrival, deadline)
        try:
            return await self._forward_once(request, pool, body, digest, headers, outcome, deadline)
        finally:
            on_done(outcome)

    # -- attempts --
    def _failure_for(self, status: int, payload: bytes) -> _UpstreamFailure:
        detail = ""
        try:
            error = orjson.loads(payload).get("error")
            detail = f": {error.get('message')}" if isinstance(error, dict) and error.get("message") else ""
        except (orjson.JSONDecodeError, AttributeError):
            pass
        return _UpstreamFailure(f"the upstream answered {status}{detail}", f"upstream_{status}")

    def _exhausted(self, pool: UpstreamPool, outcome: Outcome, failure: _UpstreamFailure | None) -> APIError:
        if failure is None:
            outcome.status_code = 503
            outcome.error = f"no upstream of pool {pool.name!r} is available"
            outcome.error_code = "no_upstream"
            return APIError(503, outcome.error + "; retry later", "service_unavailable", code="no_upstream",
                            headers={"Retry-After": "2"})
        status = 504 if failure.timeout else 502
        outcome.status_code = status
        outcome.error = failure.reason
        outcome.error_code = failure.code
        return APIError(status, f"pool {pool.name!r} could not answer after {outcome.attempts} attempt(s): "
                                f"{failure.reason}", "upstream_error", code=failure.code,
                        headers={"Retry-After": "1"})

    @staticmethod
    def _retryable_status(status: int) -> bool:
        return status >= 500 or status in _RETRYABLE_STATUSES

    async def _forward_once(self, request: ProxyRequest, pool: UpstreamPool, body: bytes, digest: bytes | None,
                            headers: dict, outcome: Outcome, deadline: float) -> Response:
        timeouts = pool.config.timeouts
        tried: set[int] = set()
        failure: _UpstreamFailure | None = None
        while outcome.attempts < pool.config.max_attempts:
            upstream = pool.choose(digest, tried)
            if upstream is None:
                break
            tried.add(upstream.index)
            outcome.attempts += 1
            if outcome.attempts > 1:
                pool.num_retries += 1
            connections = self._connections_of(upstream)
            share = upstream.begin()
            try:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    outcome.busy_share_s += upstream.end(share)
                    failure = _UpstreamFailure("the total timeout passed", "timeout", timeout=True)
                    break
                response = None
                try:
                    async with asyncio.timeout(remaining):
                        response = await connections.post(request.path, body, upstream.headers,
                                                          timeouts.connect_s, remaining)
                        await response.aread()
                except (TimeoutError, UpstreamTimeout) as error:
                    raise _UpstreamFailure(f"no answer in time ({type(error).__name__})", "timeout",
                                           timeout=True) from None
                except UpstreamHTTPError as error:
                    raise _UpstreamFailure(f"{type(error).__name__}: {error}", "connection_error") from None
                finally:
                    if response is not None:
                        response.close()
                if self._retryable_status(response.status_code):
                    raise self._failure_for(response.status_code, response.content)
            except _UpstreamFailure as error:
                failure = error
                outcome.busy_share_s += upstream.end(share)
                pool.record_failure(upstream, error.reason)
                continue
            except BaseException:  # cancelled (client gone)
                upstream.end(share)
                raise
            outcome.busy_share_s += upstream.end(share)
            upstream.record_success()
            outcome.upstream = upstream
            outcome.status_code = response.status_code
            content_type = response.headers.get("content-type", "application/json")
            if response.status_code == 200:
                self._read_answer(request, response.content, outcome)
            else:
                outcome.error = f"the upstream answered {response.status_code}"
                outcome.error_code = f"upstream_{response.status_code}"
            return Response(response.content, status_code=response.status_code, headers=headers,
                            media_type=content_type)
        raise self._exhausted(pool, outcome, failure)

    @staticmethod
    def _read_answer(request: ProxyRequest, content: bytes, outcome: Outcome) -> None:
        try:
            answer = orjson.loads(content)
        except orjson.JSONDecodeError:
            return
        if not isinstance(answer, dict):
            return
        usage = answer.get("usage")
        if isinstance(usage, dict):
            outcome.prompt_tokens = token_count(usage.get("prompt_tokens"))
            outcome.completion_tokens = token_count(usage.get("completion_tokens"))
        choices = answer.get("choices") or []
        if choices and isinstance(choices[0], dict):
            first = choices[0]
            text = (first.get("message") or {}).get("content") if request.kind == "chat" else first.get("text")
            if isinstance(text, str):
                outcome.texts.append(text)
                outcome.content_chunks = 1

    async def _forward_stream(self, request: ProxyRequest, pool: UpstreamPool, body: bytes,
                              digest: bytes | None, headers: dict, watcher: DisconnectWatcher,
                              on_done: Callable[[Outcome], None], outcome: Outcome, arrival: float,
                              deadline: float) -> Response:
        timeouts = pool.config.timeouts
        tried: set[int] = set()
        failure: _UpstreamFailure | None = None
        while outcome.attempts < pool.config.max_attempts:
            upstream = pool.choose(digest, tried)
            if upstream is None:
                break
            tried.add(upstream.index)
            outcome.attempts += 1
            if outcome.attempts > 1:
                pool.num_retries += 1
            connections = self._connections_of(upstream)
            share = upstream.begin()
            response = None
            reader = _StreamReader(request, outcome)
            try:
                first_deadline = min(time.monotonic() + timeouts.first_token_s, deadline)
                try:
                    async with asyncio.timeout(first_deadline - time.monotonic()):
                        response = await connections.post(request.path, body, upstream.headers, timeouts.connect_s,
                                                          timeouts.first_token_s)
                        if response.status_code != 200:
                            payload = await response.aread()
                            if self._retryable_status(response.status_code):
                                raise self._failure_for(response.status_code, payload)
                            response.close()
                            outcome.busy_share_s += upstream.end(share)
                            upstream.record_success()
                            outcome.upstream = upstream
                            outcome.status_code = response.status_code
                            outcome.error = f"the upstream answered {response.status_code}"
                            outcome.error_code = f"upstream_{response.status_code}"
                            on_done(outcome)
                            return Response(payload, status_code=response.status_code, headers=headers,
                                            media_type=response.headers.get("content-type", "application/json"))
                        chunks = response.stream()
                        pending = []
                        while not (reader.first_content or reader.done):
                            try:
                                chunk = await chunks.__anext__()
                            except StopAsyncIteration:
                                raise _UpstreamFailure("the upstream closed the stream before its first token",
                                                       "stream_closed") from None
                            pending.append(reader.feed(chunk))
                            if reader.upstream_error and not reader.first_content:
                                raise _UpstreamFailure("the upstream reported an error before the first token: "
                                                       f"{outcome.error}", "upstream_error")
                except _UpstreamFailure:
                    raise
                except (TimeoutError, UpstreamTimeout) as error:
                    raise _UpstreamFailure(f"no first token within {timeouts.first_token_s:g} s "
                                           f"({type(error).__name__})", "first_token_timeout",
                                           timeout=True) from None
                except UpstreamHTTPError as error:
                    raise _UpstreamFailure(f"{type(error).__name__}: {error}", "connection_error") from None
            except _UpstreamFailure as error:
                failure = error
                outcome.busy_share_s += upstream.end(share)
                pool.record_failure(upstream, error.reason)
                outcome.content_chunks = 0
                outcome.texts.clear()
                outcome.prompt_tokens = outcome.completion_tokens = None
                outcome.error = None
                outcome.error_code = None
                if response is not None:
                    response.close()
                continue
            except BaseException:  # cancelled (client gone) before the first byte
                outcome.busy_share_s += upstream.end(share)
                if response is not None:
                    response.close()
                raise
            upstream.record_success()
            outcome.upstream = upstream
            outcome.status_code = 200
            outcome.ttft_s = time.monotonic() - arrival
            stream = _OpenStream(upstream, response, chunks, reader, b"".join(pending), deadline, share,
                                 on_done, outcome)
            return RelayResponse(stream, headers, watcher)
        on_done_error = self._exhausted(pool, outcome, failure)
        on_done(outcome)
        raise on_done_error


class _OpenStream:
    """A committed upstream stream. Its reader task (`start()`) reads the upstream
    and queues what to send; the relay takes everything queued at once (`take()`),
    so events that arrived in one network read leave in one write, and nothing
    waits for an event that has not arrived. The total timeout is one timer that
    cancels the reader. `finish()` does the bookkeeping, once."""

    def __init__(self, upstream: Upstream, response: UpstreamResponse, chunks, reader: _StreamReader,
                 first: bytes, deadline: float, share_token: float, on_done: Callable[[Outcome], None],
                 outcome: Outcome) -> None:
        self.upstream = upstream
        self.response = response
        self.chunks = chunks
        self.reader = reader
        self.deadline = deadline
        self._share_token = share_token
        self._on_done = on_done
        self.outcome = outcome
        self._finished = False
        self._queued: list[bytes] = [first] if first else []
        self._ended = False
        self._waiter: asyncio.Future | None = None
        self._task: asyncio.Task | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._timed_out = False

    def start(self) -> None:
        if self.reader.done and self.response.is_complete:  # the whole answer came before the commit
            self._put(_DONE)
            self._ended = True
            return
        loop = asyncio.get_running_loop()
        self._task = loop.create_task(self._read())
        self._timer = loop.call_at(loop.time() + max(0.0, self.deadline - time.monotonic()), self._time_out)

    def _time_out(self) -> None:
        self._timed_out = True
        self._task.cancel()

    def _put(self, data: bytes) -> None:
        self._queued.append(data)
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def take(self) -> bytes | None:
        """Everything queued since the last call (waiting if nothing is); None at the end."""
        while not self._queued:
            if self._ended:
                return None
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        data = self._queued[0] if len(self._queued) == 1 else b"".join(self._queued)
        self._queued.clear()
        return data

    @property
    def drained(self) -> bool:
        """Nothing more will come: the last `take()` returned the end of the stream."""
        return self._ended and not self._queued

    async def _read(self) -> None:
        reader = self.reader
        chunks = self.chunks
        try:
            while not reader.done:
                out = reader.feed(await chunks.__anext__())
                if out:
                    self._put(out)
            async for _ in chunks:  # read the body to its end, so that the connection is reused
                pass
            self._put(_DONE)
        except StopAsyncIteration:
            self._cut("the upstream ended the stream before it was complete", "stream_truncated")
        except UpstreamTimeout:
            self._cut("the upstream sent nothing for too long", "timeout", "timeout_error")
        except UpstreamHTTPError as error:
            if not reader.done:
                self._cut(f"the upstream connection broke mid-stream ({type(error).__name__})",
                          "stream_interrupted")
            else:
                self._put(_DONE)  # the answer was complete; only the connection is not reusable
        except asyncio.CancelledError:
            if not self._timed_out:
                raise
            if reader.done:
                self._put(_DONE)
            else:
                self._cut("the request exceeded its total timeout", "timeout", "timeout_error")
        finally:
            if self._timer is not None:
                self._timer.cancel()
            self._ended = True
            self._put(b"")

    def _cut(self, message: str, code: str, type_: str = "upstream_error") -> None:
        self.outcome.error = message
        self.outcome.error_code = code
        logger.warning("stream from %s ended with an error: %s", self.upstream.label, message)
        self._put(_error_event(message, code, type_))

    async def stop(self) -> None:
        """Stop reading (idempotent): the reader task is cancelled and awaited."""
        task = self._task
        if task is not None and not task.done():
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass
        if self._timer is not None:
            self._timer.cancel()

    def finish(self) -> None:
        """Bookkeeping, exactly once (the caller then closes the response)."""
        if self._finished:
            return
        self._finished = True
        self.outcome.busy_share_s += self.upstream.end(self._share_token)
        self._on_done(self.outcome)


class RelayResponse(Response):
    """Streams an `_OpenStream` to the client as it arrives; a client that leaves
    cancels the relay, which closes the upstream connection."""

    media_type = "text/event-stream"

    def __init__(self, stream: _OpenStream, headers: dict, watcher: DisconnectWatcher) -> None:
        self.status_code = 200
        self.background = None
        self.stream = stream
        self.watcher = watcher
        self.init_headers({**headers, "cache-control": "no-cache", "x-accel-buffering": "no"})

    async def __call__(self, scope, receive, send) -> None:
        stream = self.stream
        watcher = self.watcher
        task = asyncio.current_task()
        watcher.retarget(task)
        stream.start()
        try:
            await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
            while True:
                data = await stream.take()
                if data is None or stream.drained:  # the end goes out with the last events, in one write
                    break
                if data:
                    await send({"type": "http.response.body", "body": data, "more_body": True})
            watcher.stop()
            await send({"type": "http.response.body", "body": data or b"", "more_body": False})
        except asyncio.CancelledError:
            if not watcher.gone:
                if stream.outcome.error is None:
                    stream.outcome.error = "the gateway stopped before the stream was complete"
                    stream.outcome.error_code = "gateway_stopped"
                raise
            task.uncancel()
            stream.outcome.client_gone = True
            stream.outcome.error = "the client disconnected"
            stream.outcome.error_code = "client_closed"
        except OSError:  # the client's socket failed under us
            stream.outcome.client_gone = True
            stream.outcome.error = "the client disconnected"
            stream.outcome.error_code = "client_closed"
        finally:
            watcher.stop()
            await stream.stop()
            stream.finish()
            stream.response.close()
