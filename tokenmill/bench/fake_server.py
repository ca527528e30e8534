"""A scripted OpenAI-compatible streaming server whose timings are known exactly.

It measures the measurer: `tokenmill bench` is tested against it (the script
fixes TTFT, the gap between tokens and how many tokens each chunk carries) and
its own overhead is benchmarked against it (`FakeScript()` answers instantly).

Contract, per streamed `POST /v1/completions` or `/v1/chat/completions`:
- The request asks for `max_tokens` (or `max_completion_tokens`) output tokens,
  `script.output_tokens` when absent. Token 0 is due `ttft` seconds after the
  request was read, each next one `itl + itl_growth * (other open streams)`
  later (so `itl_growth` > 0 makes the server slow down with concurrency);
  a chunk is sent when its last token is due, and chunks carry
  `chunk_pattern` tokens in turn (cycled; the last chunk may carry fewer).
  Deadlines are absolute, so sleep jitter does not accumulate.
- Chat streams open with a role-only chunk (no content) sent at once, and end
  with an empty-delta chunk carrying the finish reason; completion streams put
  the finish reason on the last content chunk. Then the usage chunk (only with
  `stream_options.include_usage`), then `data: [DONE]`.
- `logprobs` (completions: an integer, chat: true) adds one entry per token
  carried, as OpenAI does.
- Prompt tokens are the number of whitespace-separated words of the prompt (of
  all message contents, for chat).
- Every `cut_every`-th request (by arrival) stops after half its content chunks:
  the connection is dropped, or with `cut_cleanly` the body ends without a
  finish reason. Every `reject_every`-th request gets a 503.
- Another `model` than the script's gets a 404; a missing or wrong key, when
  `api_key` is set, a 401. `GET /v1/models` and `GET /health` answer as usual.
- The first `fail_first` requests (by arrival) get a 500; `header_delay`
  seconds pass before any response byte (status line included) is sent.
- `answer`, when set, is the content: cut into `answer_chunk_chars`-character
  pieces, one token each (at most max_tokens of them) instead of the words.
- Without `"stream": true` the whole completion (OpenAI's non-streamed body
  with `usage`) is sent once its last token is due.
- `GET /metrics` says, as tokenmill does, how many streams are open
  (`tokenmill_num_requests_running`) and waiting (`_waiting`, always 0), and
  `GET /health` answers `health_status`.

Run it alone with `python -m tokenmill.bench.fake_server --port 0`; it prints
`listening on http://HOST:PORT` once ready.
"""
from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import threading
from dataclasses import dataclass

WORDS = ("alpha", "beta", "gamma", "delta", "river", "stone", "cloud", "green", "quiet", "north")


@dataclass(frozen=True)
class FakeScript:
    model: str = "fake-model"
    ttft: float = 0.0
    itl: float = 0.0
    itl_growth: float = 0.0
    output_tokens: int = 16
    chunk_pattern: tuple[int, ...] = (1,)
    cut_every: int = 0
    cut_cleanly: bool = False
    reject_every: int = 0
    api_key: str | None = None
    fail_first: int = 0
    header_delay: float = 0.0
    answer: str | None = None
    answer_chunk_chars: int = 4
    health_status: int = 200


def _chunks_of(num_tokens: int, pattern: tuple[int, ...]) -> list[range]:
    """Token index ranges of successive chunks."""
    chunks, start = [], 0
    for size in itertools.cycle(pattern):
        if start >= num_tokens:
            return chunks
        chunks.append(range(start, min(start + size, num_tokens)))
        start += size


def _http_chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


def _sse(payload: dict) -> bytes:
    return b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n"


_STREAM_HEAD = (b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n"
                b"Transfer-Encoding: chunked\r\n\r\n")
_END_OF_BODY = b"0\r\n\r\n"


def _json_response(status: int, reason: str, body: dict) -> bytes:
    data = json.dumps(body).encode()
    return (b"HTTP/1.1 %d %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
            % (status, reason.encode(), len(data), data))


def _error(status: int, reason: str, message: str) -> bytes:
    return _json_response(status, reason, {"error": {"message": message, "type": "invalid_request_error",
                                                     "param": None, "code": None}})


class _StreamBuilder:
    """The SSE events of one request; the request body decides their shape."""

    def __init__(self, chat: bool, body: dict, model: str) -> None:
        self.chat = chat
        self.model = model
        self.logprobs = bool(body.get("logprobs")) if chat else body.get("logprobs") is not None
        self.include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        self.base = {"id": "fake", "object": "chat.completion.chunk" if chat else "text_completion",
                     "created": 0, "model": model}

    def opening(self) -> bytes:
        if not self.chat:
            return b""
        return _sse({**self.base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                               "logprobs": None, "finish_reason": None}]})

    def content(self, tokens: range, finish_reason: str | None, pieces: list[str] | None = None) -> bytes:
        texts = [pieces[j] if pieces is not None else " " + WORDS[j % len(WORDS)] for j in tokens]
        text = "".join(texts)
        if self.chat:
            logprobs = {"content": [{"token": t, "logprob": -0.5, "bytes": list(t.encode()), "top_logprobs": []}
                                    for t in texts]} if self.logprobs else None
            event = _sse({**self.base, "choices": [{"index": 0, "delta": {"content": text}, "logprobs": logprobs,
                                                    "finish_reason": None}]})
            if finish_reason is not None:
                event += _sse({**self.base, "choices": [{"index": 0, "delta": {}, "logprobs": None,
                                                         "finish_reason": finish_reason}]})
            return event
        logprobs = {"tokens": texts, "token_logprobs": [-0.5] * len(texts), "top_logprobs": None,
                    "text_offset": [0] * len(texts)} if self.logprobs else None
        return _sse({**self.base, "choices": [{"index": 0, "text": text, "logprobs": logprobs,
                                               "finish_reason": finish_reason}]})

    def closing(self, prompt_tokens: int, completion_tokens: int) -> bytes:
        usage = b""
        if self.include_usage:
            usage = _sse({**self.base, "choices": [], "usage": {
                "prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens}})
        return usage + b"data: [DONE]\n\n"


def _prompt_words(body: dict, chat: bool) -> int:
    if chat:
        return sum(len(str(message.get("content") or "").split()) for message in body.get("messages", []))
    prompt = body.get("prompt", "")
    return len(prompt.split()) if isinstance(prompt, str) else len(prompt)


class FakeOpenAIServer:
    """Serves a `FakeScript` on an asyncio event loop (`start()` inside a running loop)."""

    def __init__(self, script: FakeScript) -> None:
        self.script = script
        self.num_requests = 0
        self.open_streams = 0
        self._server: asyncio.base_events.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._handlers: set[asyncio.Task] = set()

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> int:
        self._server = await asyncio.start_server(self._handle_connection, host, port, backlog=1024)
        return self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            for writer in list(self._writers):  # idle keep-alive connections would hold wait_closed() forever
                writer.transport.abort()
            for handler in list(self._handlers):  # e.g. one sleeping through a scripted delay for a client gone
                handler.cancel()
            await asyncio.gather(*self._handlers, return_exceptions=True)
            await self._server.wait_closed()

    async def _handle_connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        handler = asyncio.current_task()
        self._handlers.add(handler)
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
                    return
                request_line, *header_lines = head.decode("latin-1").split("\r\n")
                method, path, _ = request_line.split(" ", 2)
                headers = {}
                for line in header_lines:
                    if line:
                        name, _, value = line.partition(":")
                        headers[name.strip().lower()] = value.strip()
                length = int(headers.get("content-length", "0"))
                body = await reader.readexactly(length) if length else b""
                keep_open = await self._respond(method, path.split("?", 1)[0], headers, body, writer)
                if not keep_open or headers.get("connection", "").lower() == "close":
                    return
        except (ConnectionError, asyncio.IncompleteReadError):
            return
        finally:
            self._writers.discard(writer)
            self._handlers.discard(handler)
            writer.close()

    async def _respond(self, method: str, path: str, headers: dict, raw_body: bytes,
                       writer: asyncio.StreamWriter) -> bool:
        """Answer one request; False when the connection must be dropped afterwards."""
        script = self.script
        if method == "GET" and path == "/health":
            healthy = script.health_status == 200
            writer.write(_json_response(script.health_status, "OK" if healthy else "Service Unavailable",
                                        {"status": "ok" if healthy else "unavailable"}))
            return True
        if method == "GET" and path == "/metrics":
            text = (f"tokenmill_num_requests_running{{model_name=\"{script.model}\"}} {self.open_streams}\n"
                    f"tokenmill_num_requests_waiting{{model_name=\"{script.model}\"}} 0\n").encode()
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: %d\r\n\r\n%s"
                         % (len(text), text))
            return True
        if script.api_key is not None and headers.get("authorization") != f"Bearer {script.api_key}":
            writer.write(_error(401, "Unauthorized", "invalid API key"))
            return True
        if method == "GET" and path == "/v1/models":
            writer.write(_json_response(200, "OK", {"object": "list", "data": [
                {"id": script.model, "object": "model", "created": 0, "owned_by": "fake"}]}))
            return True
        if method != "POST" or path not in ("/v1/completions", "/v1/chat/completions"):
            writer.write(_error(404, "Not Found", f"no route {method} {path}"))
            return True
        body = json.loads(raw_body or b"{}")
        if body.get("model", script.model) != script.model:
            writer.write(_error(404, "Not Found", f"the model {body.get('model')!r} does not exist"))
            return True
        self.num_requests += 1
        arrival_number = self.num_requests
        if script.header_delay > 0:
            await asyncio.sleep(script.header_delay)
        if arrival_number <= script.fail_first:
            writer.write(_error(500, "Internal Server Error", "scripted failure"))
            return True
        if script.reject_every and arrival_number % script.reject_every == 0:
            writer.write(_error(503, "Service Unavailable", "overloaded"))
            return True
        self.open_streams += 1
        try:
            if not body.get("stream"):
                return await self._whole(body, path.endswith("/chat/completions"), writer)
            return await self._stream(body, path.endswith("/chat/completions"), arrival_number, writer)
        finally:
            self.open_streams -= 1

    def _pieces(self, num_tokens: int) -> list[str] | None:
        answer, size = self.script.answer, max(1, self.script.answer_chunk_chars)
        if answer is None:
            return None
        return [answer[i:i + size] for i in range(0, len(answer), size)][:num_tokens]

    async def _whole(self, body: dict, chat: bool, writer: asyncio.StreamWriter) -> bool:
        script = self.script
        num_tokens = body.get("max_completion_tokens") or body.get("max_tokens") or script.output_tokens
        pieces = self._pieces(num_tokens)
        if pieces is not None:
            num_tokens = len(pieces)
        delay = script.ttft + script.itl * max(0, num_tokens - 1)
        if delay > 0:
            await asyncio.sleep(delay)
        text = "".join(pieces) if pieces is not None else "".join(" " + WORDS[j % len(WORDS)]
                                                                  for j in range(num_tokens))
        prompt_tokens = _prompt_words(body, chat)
        choice = ({"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                   "finish_reason": "length"} if chat else
                  {"index": 0, "text": text, "logprobs": None, "finish_reason": "length"})
        writer.write(_json_response(200, "OK", {
            "id": "fake", "object": "chat.completion" if chat else "text_completion", "created": 0,
            "model": script.model, "choices": [choice],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": num_tokens,
                      "total_tokens": prompt_tokens + num_tokens}}))
        await writer.drain()
        return True

    async def _stream(self, body: dict, chat: bool, arrival_number: int, writer: asyncio.StreamWriter) -> bool:
        script = self.script
        loop = asyncio.get_running_loop()
        arrival = loop.time()
        num_tokens = body.get("max_completion_tokens") or body.get("max_tokens") or script.output_tokens
        pieces = self._pieces(num_tokens)
        if pieces is not None:
            num_tokens = len(pieces)
        chunks = _chunks_of(num_tokens, script.chunk_pattern)
        cut_at = len(chunks) // 2 if script.cut_every and arrival_number % script.cut_every == 0 else None
        events = _StreamBuilder(chat, body, script.model)
        pending = _STREAM_HEAD + _http_chunk(events.opening()) if chat else _STREAM_HEAD
        timed = script.ttft > 0 or script.itl > 0 or script.itl_growth > 0
        due = arrival + script.ttft
        for number, tokens in enumerate(chunks):
            if number == cut_at:
                if script.cut_cleanly:
                    writer.write(pending + _END_OF_BODY)
                    return True
                writer.write(pending)
                await writer.drain()
                writer.transport.abort()
                return False
            finish = "length" if number == len(chunks) - 1 else None
            if timed:
                if pending:
                    writer.write(pending)
                    pending = b""
                for token in tokens:
                    if token > 0:
                        due += script.itl + script.itl_growth * (self.open_streams - 1)
                delay = due - loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)
                writer.write(_http_chunk(events.content(tokens, finish, pieces)))
                if writer.transport.is_closing():  # the client has gone: stop streaming to nobody
                    return False
            else:  # answering instantly: one write per response keeps the server out of the measurement
                pending += _http_chunk(events.content(tokens, finish, pieces))
        writer.write(pending + _http_chunk(events.closing(_prompt_words(body, chat), num_tokens)) + _END_OF_BODY)
        await writer.drain()
        return True


class FakeServerThread:
    """A `FakeOpenAIServer` on its own event loop in a daemon thread; a context manager."""

    def __init__(self, script: FakeScript, host: str = "127.0.0.1") -> None:
        self.server = FakeOpenAIServer(script)
        self.host = host
        self.port: int | None = None
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="fake-openai-server", daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}/v1"

    def __enter__(self) -> FakeServerThread:
        self._thread.start()
        self.port = asyncio.run_coroutine_threadsafe(self.server.start(self.host), self._loop).result(timeout=10)
        return self

    def __exit__(self, *exc) -> None:
        asyncio.run_coroutine_threadsafe(self.server.stop(), self._loop).result(timeout=10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="A scripted OpenAI-compatible streaming server.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--model", default="fake-model")
    parser.add_argument("--ttft", type=float, default=0.0, help="seconds to the first token")
    parser.add_argument("--itl", type=float, default=0.0, help="seconds between tokens")
    parser.add_argument("--itl-growth", type=float, default=0.0,
                        help="seconds added to each gap per other stream in flight")
    parser.add_argument("--output-tokens", type=int, default=16, help="tokens when a request names no max_tokens")
    parser.add_argument("--chunk-pattern", default="1", help="tokens per chunk, cycled, e.g. 1,2")
    parser.add_argument("--cut-every", type=int, default=0, help="drop every n-th stream half-way (0: never)")
    parser.add_argument("--fail-first", type=int, default=0, help="answer the first n requests with a 500")
    parser.add_argument("--header-delay", type=float, default=0.0, help="seconds before any response byte")
    parser.add_argument("--answer", default=None, help="fixed answer text instead of words")
    args = parser.parse_args(argv)
    script = FakeScript(model=args.model, ttft=args.ttft, itl=args.itl, itl_growth=args.itl_growth,
                        output_tokens=args.output_tokens,
                        chunk_pattern=tuple(int(n) for n in args.chunk_pattern.split(",")),
                        cut_every=args.cut_every, fail_first=args.fail_first, header_delay=args.header_delay,
                        answer=args.answer)

    async def serve() -> None:
        server = FakeOpenAIServer(script)
        port = await server.start(args.host, args.port)
        print(f"listening on http://{args.host}:{port}", flush=True)
        await asyncio.Event().wait()

    try:
        asyncio.run(serve())
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
