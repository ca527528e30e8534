"""Completions and chat completions: validated request -> engine streams -> OpenAI bodies.

Each prompt of a request is one engine request (its n completions travel
together). Streams of several prompts are merged; leaving early (client gone,
timeout) closes every engine stream, which aborts the request and frees its
blocks at once.
"""
from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse

from tokenmill.engine.async_engine import AsyncEngine, StreamDelta
from tokenmill.server.chat_template import render_chat
from tokenmill.server.errors import APIError, error_body, to_api_error
from tokenmill.server.metrics import ServerMetrics
from tokenmill.server.protocol import ChatCompletionRequest, CompletionRequest

TIMEOUT_FINISH_REASON = "timeout"


@dataclass
class _Choice:
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list = field(default_factory=list)  # (token_id, logprob, [(id, logprob)])
    finish_reason: str | None = None
    last_token_time: float | None = None


@dataclass
class _PromptState:
    token_ids: list[int]
    choices: list[_Choice]


@dataclass(frozen=True)
class ServingConfig:
    model_name: str
    max_model_len: int
    max_tokens_cap: int | None = None
    request_timeout: float | None = None
    chat_template: str | None = None


class OpenAIServing:
    def __init__(self, engine: AsyncEngine, tokenizer, config: ServingConfig, metrics: ServerMetrics) -> None:
        self.engine = engine
        self.tokenizer = tokenizer
        self.config = config
        self.metrics = metrics

    # ---- validation ----------------------------------------------------------
    def check_model(self, name: str | None) -> None:
        if name is not None and name != self.config.model_name:
            raise APIError(404, f"the model {name!r} does not exist; this server serves "
                                f"{self.config.model_name!r}", "not_found_error", param="model",
                           code="model_not_found")

    def _max_tokens(self, requested: int | None, default: int | None, prompt_len: int) -> int | None:
        value = requested if requested is not None else default
        if value is None:
            value = self.config.max_model_len - prompt_len
            if value < 1:
                raise APIError(400, f"the prompt has {prompt_len} tokens, which leaves no room to generate "
                                    f"within max_model_len ({self.config.max_model_len})", param="messages",
                               code="context_length_exceeded")
        if self.config.max_tokens_cap is not None:
            value = min(value, self.config.max_tokens_cap)
        total = prompt_len + value
        if total > self.config.max_model_len:
            raise APIError(400, f"this model's maximum context length is {self.config.max_model_len} tokens; "
                                f"the request asks for {total} ({prompt_len} in the prompt + {value} to "
                                "generate): shorten the prompt or lower max_tokens", param="max_tokens",
                           code="context_length_exceeded")
        return value

    def _tokenize_prompts(self, prompt) -> list[list[int]]:
        if isinstance(prompt, str):
            prompts = [prompt]
        elif prompt and all(isinstance(p, int) for p in prompt):
            prompts = [prompt]
        else:
            prompts = list(prompt)
        if not prompts:
            raise APIError(400, "prompt must not be empty", param="prompt")
        token_lists = []
        vocab_size = self.engine.core.model_info.vocab_size
        for item in prompts:
            if isinstance(item, str) and self.tokenizer is None:
                raise APIError(400, "this model has no tokenizer: give the prompt as token ids", param="prompt")
            ids = self.tokenizer(item).input_ids if isinstance(item, str) else list(item)
            if not ids:
                raise APIError(400, "prompt must not be empty", param="prompt")
            # Checked here, not only by the engine: `echo` decodes the ids before submitting.
            if any(token >= vocab_size for token in ids):
                raise APIError(400, f"prompt token ids must be below the vocabulary size ({vocab_size})",
                               param="prompt")
            token_lists.append(ids)
        return token_lists

    # ---- endpoints -----------------------------------------------------------
    async def create_completion(self, body: CompletionRequest, raw: Request):
        self.check_model(body.model)
        if body.echo and self.tokenizer is None:
            raise APIError(400, "this model has no tokenizer, so echo is not available", param="echo")
        prompts = self._tokenize_prompts(body.prompt)
        params = [body.sampling_params(self._max_tokens(body.max_tokens, 16, len(ids)), body.logprobs)
                  for ids in prompts]
        request_id = f"cmpl-{uuid.uuid4().hex}"
        states = [_PromptState(ids, [_Choice() for _ in range(body.n)]) for ids in prompts]
        echo_texts = [self.tokenizer.decode(ids) if body.echo else "" for ids in prompts]
        created = int(time.time())
        streams = await self._submit_all([(f"{request_id}-{i}", ids, p)
                                          for i, (ids, p) in enumerate(zip(prompts, params))])
        base = {"id": request_id, "object": "text_completion", "created": created, "model": self.config.model_name}

        def choice_index(prompt_index: int, index: int) -> int:
            return prompt_index * body.n + index

        if body.stream:
            async def events() -> AsyncIterator[str]:
                if body.echo:
                    for p, text in enumerate(echo_texts):
                        for index in range(body.n):
                            yield _sse({**base, "choices": [{"index": choice_index(p, index), "text": text,
                                                             "logprobs": None, "finish_reason": None}],
                                        **({"usage": None} if body.include_usage else {})})
                async for p, delta, finished_now in self._run(streams, states):
                    choice = {"index": choice_index(p, delta.index), "text": delta.text,
                              "logprobs": self._completion_logprobs(delta) if body.logprobs is not None else None,
                              "finish_reason": finished_now}
                    yield _sse({**base, "choices": [choice], **({"usage": None} if body.include_usage else {})})
                if body.include_usage:
                    yield _sse({**base, "choices": [], "usage": _usage(states)})
                yield "data: [DONE]\n\n"

            return await self._stream_response(events(), raw)

        await self._run_to_end(streams, states, raw)
        choices = []
        for p, state in enumerate(states):
            for index, choice in enumerate(state.choices):
                logprobs = None
                if body.logprobs is not None:
                    logprobs = self._completion_logprobs_full(choice, echo_texts[p])
                choices.append({"index": choice_index(p, index), "text": echo_texts[p] + choice.text,
                                "logprobs": logprobs, "finish_reason": choice.finish_reason})
        return JSONResponse({**base, "choices": choices, "usage": _usage(states)})

    async def create_chat_completion(self, body: ChatCompletionRequest, raw: Request, template: str):
        self.check_model(body.model)
        if self.tokenizer is None:
            raise APIError(400, "this model has no tokenizer, so chat is not available")
        messages = [{"role": m.role, "content": m.text} for m in body.messages]
        try:
            prompt_ids = render_chat(self.tokenizer, template, messages, body.add_generation_prompt)
        except Exception as error:  # a template error is the conversation's fault (e.g. role order)
            raise APIError(400, f"the messages cannot be rendered with the chat template: {error}",
                           param="messages") from error
        num_logprobs = (body.top_logprobs or 0) if body.logprobs else None
        params = body.sampling_params(self._max_tokens(body.requested_max_tokens, None, len(prompt_ids)),
                                      num_logprobs)
        request_id = f"chatcmpl-{uuid.uuid4().hex}"
        states = [_PromptState(prompt_ids, [_Choice() for _ in range(body.n)])]
        streams = await self._submit_all([(request_id, prompt_ids, params)])
        base = {"id": request_id, "object": "chat.completion.chunk", "created": int(time.time()),
                "model": self.config.model_name}

        if body.stream:
            async def events() -> AsyncIterator[str]:
                usage_field = {"usage": None} if body.include_usage else {}
                for index in range(body.n):
                    yield _sse({**base, "choices": [{"index": index, "delta": {"role": "assistant", "content": ""},
                                                     "logprobs": None, "finish_reason": None}], **usage_field})
                async for _, delta, finished_now in self._run(streams, states):
                    # A last token that adds no text still has its logprobs to report.
                    if delta.text or finished_now is None or (body.logprobs and delta.token_id is not None):
                        logprobs = self._chat_logprobs([_delta_logprob(delta)]) if body.logprobs else None
                        yield _sse({**base, "choices": [{"index": delta.index, "delta": {"content": delta.text},
                                                         "logprobs": logprobs, "finish_reason": None}],
                                    **usage_field})
                    if finished_now is not None:
                        yield _sse({**base, "choices": [{"index": delta.index, "delta": {}, "logprobs": None,
                                                         "finish_reason": finished_now}], **usage_field})
                if body.include_usage:
                    yield _sse({**base, "choices": [], "usage": _usage(states)})
                yield "data: [DONE]\n\n"

            return await self._stream_response(events(), raw)

        await self._run_to_end(streams, states, raw)
        choices = [{"index": index, "message": {"role": "assistant", "content": choice.text},
                    "logprobs": self._chat_logprobs(choice.logprobs) if body.logprobs else None,
                    "finish_reason": choice.finish_reason}
                   for index, choice in enumerate(states[0].choices)]
        return JSONResponse({**base, "object": "chat.completion", "choices": choices, "usage": _usage(states)})

    # ---- running engine streams --------------------------------------------------
    async def _submit_all(self, requests) -> list:
        """Submit every prompt; if one is refused, abort those already accepted."""
        handles = []
        try:
            for request_id, token_ids, params in requests:
                handles.append(await self.engine.submit(request_id, token_ids, params))
        except BaseException:
            for handle in handles:
                handle.close()
            raise
        return handles

    async def _run(self, streams, states: list[_PromptState]) -> AsyncIterator[tuple[int, StreamDelta, str | None]]:
        """Merge the prompts' engine streams; yields (prompt index, delta, finish
        reason if this delta ended its completion). Enforces --request-timeout:
        unfinished completions then end with finish reason "timeout"."""
        merged: asyncio.Queue = asyncio.Queue()
        done = object()

        async def pump(p: int, stream) -> None:
            try:
                async for deltas in stream:
                    for delta in deltas:
                        await merged.put((p, delta))
            except BaseException as error:  # handed to the consumer, which re-raises it
                await merged.put((p, error))
            finally:
                await merged.put((p, done))

        tasks = [asyncio.create_task(pump(p, stream)) for p, stream in enumerate(streams)]
        deadline = None if self.config.request_timeout is None else \
            asyncio.get_running_loop().time() + self.config.request_timeout
        remaining = len(tasks)
        try:
            while remaining:
                try:
                    async with asyncio.timeout_at(deadline):
                        p, item = await merged.get()
                except TimeoutError:
                    for state_index, state in enumerate(states):
                        for index, choice in enumerate(state.choices):
                            if choice.finish_reason is None:
                                choice.finish_reason = TIMEOUT_FINISH_REASON
                                self.metrics.observe_cut_short(TIMEOUT_FINISH_REASON, len(state.token_ids),
                                                               len(choice.token_ids), count_prompt=index == 0)
                                yield state_index, StreamDelta(index=index, token_id=None, text="", logprobs=None,
                                                               finish_reason=TIMEOUT_FINISH_REASON), \
                                    TIMEOUT_FINISH_REASON
                    return
                if item is done:
                    remaining -= 1
                    continue
                if isinstance(item, BaseException):
                    raise item
                finished_now = self._record(states[p], item)
                yield p, item, finished_now
        finally:
            for task in tasks:
                task.cancel()
            for stream in streams:
                stream.close()
            for state in states:  # whatever is still open was cut short by the client leaving
                for index, choice in enumerate(state.choices):
                    if choice.finish_reason is None:
                        choice.finish_reason = "abort"
                        self.metrics.observe_cut_short("abort", len(state.token_ids), len(choice.token_ids),
                                                       count_prompt=index == 0)

    def _record(self, state: _PromptState, delta: StreamDelta) -> str | None:
        choice = state.choices[delta.index]
        now = time.monotonic()
        if delta.token_id is not None:
            if choice.last_token_time is not None:
                self.metrics.observe_token_gap(now - choice.last_token_time)
            choice.last_token_time = now
            choice.token_ids.append(delta.token_id)
            if delta.logprobs is not None:
                choice.logprobs.append(_delta_logprob(delta))
        choice.text += delta.text
        if delta.finish_reason is not None:
            choice.finish_reason = delta.finish_reason
            if delta.times is not None:
                self.metrics.observe_finished(delta.times, delta.finish_reason, count_prompt=delta.index == 0)
        return delta.finish_reason

    async def _run_to_end(self, streams, states, raw: Request) -> None:
        """Non-streaming: run every stream to its end, aborting if the client leaves."""
        async def consume():
            async for _ in self._run(streams, states):
                pass

        work = asyncio.create_task(consume())

        async def watch_disconnect():
            while not work.done():
                if await raw.is_disconnected():
                    work.cancel()
                    return
                await asyncio.sleep(0.1)

        watcher = asyncio.create_task(watch_disconnect())
        try:
            await work
        except asyncio.CancelledError:
            if watcher.done():  # the client left: nobody reads the answer
                raise APIError(499, "client closed the request", code="client_closed") from None
            raise
        finally:
            watcher.cancel()

    async def _stream_response(self, events: AsyncIterator[str], raw: Request) -> StreamingResponse:
        """Start the stream once its first event is ready, so that a failure before
        it still gets a proper status code. A client that leaves while the first
        token is being computed is noticed here and its request aborted."""
        iterator = events.__aiter__()
        first_event = asyncio.ensure_future(iterator.__anext__())
        try:
            while not first_event.done():
                await asyncio.wait({first_event}, timeout=0.1)
                if not first_event.done() and await raw.is_disconnected():
                    first_event.cancel()
                    raise APIError(499, "client closed the request", code="client_closed")
            first = first_event.result()
        except StopAsyncIteration:
            first = None
        except BaseException:
            first_event.cancel()
            await events.aclose()
            raise

        async def body() -> AsyncIterator[str]:
            try:
                if first is not None:
                    yield first
                async for event in iterator:
                    yield event
            except Exception as error:  # mid-stream failure: say so in the stream, then end it
                api_error = to_api_error(error)
                yield _sse(error_body(api_error.message, api_error.type, api_error.param, api_error.code))
                yield "data: [DONE]\n\n"
            finally:
                await events.aclose()

        return StreamingResponse(body(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    # ---- logprobs --------------------------------------------------------------
    def _token_text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id]) if self.tokenizer is not None else str(token_id)

    def _completion_logprobs(self, delta: StreamDelta) -> dict | None:
        if delta.logprobs is None:
            return None
        token_id, logprob, top = _delta_logprob(delta)
        return {"tokens": [self._token_text(token_id)], "token_logprobs": [logprob],
                "top_logprobs": [{self._token_text(t): lp for t, lp in top}], "text_offset": [0]}

    def _completion_logprobs_full(self, choice: _Choice, prefix: str) -> dict:
        tokens, offsets, offset = [], [], len(prefix)
        for token_id, _, _ in choice.logprobs:
            text = self._token_text(token_id)
            tokens.append(text)
            offsets.append(offset)
            offset += len(text)
        return {"tokens": tokens, "token_logprobs": [lp for _, lp, _ in choice.logprobs],
                "top_logprobs": [{self._token_text(t): lp for t, lp in top} for _, _, top in choice.logprobs],
                "text_offset": offsets}

    def _chat_logprobs(self, entries) -> dict:
        def item(token_id, logprob):
            text = self._token_text(token_id)
            return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

        return {"content": [{**item(token_id, logprob), "top_logprobs": [item(t, lp) for t, lp in top]}
                            for token_id, logprob, top in entries if token_id is not None]}


def _delta_logprob(delta: StreamDelta):
    if delta.logprobs is None:
        return (delta.token_id, None, [])
    return (delta.token_id, delta.logprobs.token_logprob, delta.logprobs.top)


def _usage(states: list[_PromptState]) -> dict:
    prompt_tokens = sum(len(state.token_ids) for state in states)
    completion_tokens = sum(len(choice.token_ids) for state in states for choice in state.choices)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def _sse(payload: dict) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"
