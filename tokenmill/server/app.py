"""The FastAPI app: thin routes over `OpenAIServing`, health, metrics, lifecycle.

The model loads in a background thread after the server starts listening, so
`/health` answers 503 while loading and 200 once the engine runs. If loading
fails the server stops and the process exits non-zero.
"""
from __future__ import annotations

import asyncio
import hmac
import logging
import threading
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from tokenmill.config import EngineConfig
from tokenmill.engine.async_engine import AsyncEngine
from tokenmill.engine.core import EngineCore
from tokenmill.server.chat_template import render_chat, resolve_chat_template
from tokenmill.server.errors import APIError, install_error_handlers
from tokenmill.server.metrics import ServerMetrics
from tokenmill.server.protocol import ChatCompletionRequest, CompletionRequest, DetokenizeRequest, TokenizeRequest
from tokenmill.server.serving import OpenAIServing, ServingConfig

logger = logging.getLogger("tokenmill.server")

DEFAULT_MODEL_NAME = "gemma-3-270m"


@dataclass(frozen=True)
class ServerConfig:
    engine: EngineConfig
    served_model_name: str | None = None
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    chat_template: str | None = None
    max_waiting_requests: int | None = 512
    request_timeout: float | None = None
    max_tokens_cap: int | None = None
    drain_timeout: float = 30.0

    @property
    def model_name(self) -> str:
        if self.served_model_name:
            return self.served_model_name
        if self.engine.model is None:
            return DEFAULT_MODEL_NAME
        return self.engine.model.rstrip("/").split("/")[-1].removesuffix(".gguf")


class ServerState:
    """What the routes see: loading, ready (with an engine) or failed."""

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.engine: AsyncEngine | None = None
        self.serving: OpenAIServing | None = None
        self.metrics: ServerMetrics | None = None
        self.chat_template: str | None = None
        self.load_error: BaseException | None = None
        self.started = time.time()
        self.ready_event = threading.Event()

    def require_ready(self) -> OpenAIServing:
        if self.serving is None or not self.engine.is_alive:
            status = "failed" if self.load_error else "loading" if self.engine is None else "unavailable"
            raise APIError(503, f"the model is {status}; retry shortly", "service_unavailable",
                           code="not_ready", headers={"Retry-After": "2"})
        return self.serving


def build_app(config: ServerConfig, loaded_model=None, on_load_failure=None) -> FastAPI:
    state = ServerState(config)

    def load(loop: asyncio.AbstractEventLoop) -> None:
        try:
            core = EngineCore(config.engine, loaded=loaded_model)
            template = resolve_chat_template(config.chat_template, core.tokenizer, core.model_info.architecture)
            engine = AsyncEngine(core, config.max_waiting_requests)
            metrics = ServerMetrics(config.model_name, lambda: engine.stats)
            engine.start(loop)
            serving = OpenAIServing(engine, core.tokenizer, ServingConfig(
                model_name=config.model_name, max_model_len=core.max_model_len,
                max_tokens_cap=config.max_tokens_cap, request_timeout=config.request_timeout,
                chat_template=template), metrics)
            state.chat_template, state.metrics, state.engine, state.serving = template, metrics, engine, serving
            _announce(config, core)
        except BaseException as error:
            state.load_error = error
            logger.error("could not load the model: %s", error)
            if on_load_failure is not None:
                on_load_failure(error)
        finally:
            state.ready_event.set()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        loader = threading.Thread(target=load, args=(asyncio.get_running_loop(),), name="tokenmill-load",
                                  daemon=True)
        loader.start()
        yield
        if state.engine is not None:
            state.engine.shutdown()

    app = FastAPI(title="tokenmill", version="0.1.0", lifespan=lifespan,
                  description="OpenAI-compatible API served by the tokenmill engine.")
    app.state.server = state
    install_error_handlers(app)

    async def check_api_key(request: Request) -> None:
        if config.api_key is None:
            return
        header = request.headers.get("authorization", "")
        token = header[7:] if header.lower().startswith("bearer ") else ""
        if not hmac.compare_digest(token.encode(), config.api_key.encode()):
            raise APIError(401, "invalid or missing API key (send 'Authorization: Bearer <key>')",
                           "invalid_request_error", code="invalid_api_key")

    guarded = [Depends(check_api_key)]

    @app.get("/health")
    async def health():
        if state.serving is not None and state.engine.is_alive:
            return {"status": "ok"}
        status = "failed" if state.load_error else "loading" if state.engine is None else "engine stopped"
        return JSONResponse({"status": status}, status_code=503)

    @app.get("/metrics")
    async def metrics():
        if state.metrics is None:
            return Response("", media_type=CONTENT_TYPE_LATEST)
        return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models", dependencies=guarded)
    async def list_models():
        serving = state.require_ready()
        return {"object": "list", "data": [{
            "id": config.model_name, "object": "model", "created": int(state.started), "owned_by": "tokenmill",
            "max_model_len": serving.config.max_model_len}]}

    @app.post("/v1/completions", dependencies=guarded)
    async def completions(body: CompletionRequest, raw: Request):
        return await state.require_ready().create_completion(body, raw)

    @app.post("/v1/chat/completions", dependencies=guarded)
    async def chat_completions(body: ChatCompletionRequest, raw: Request):
        return await state.require_ready().create_chat_completion(body, raw, state.chat_template)

    @app.post("/tokenize", dependencies=guarded)
    async def tokenize(body: TokenizeRequest):
        serving = state.require_ready()
        serving.check_model(body.model)
        if (body.prompt is None) == (body.messages is None):
            raise APIError(400, "give exactly one of prompt or messages", param="prompt")
        if serving.tokenizer is None:
            raise APIError(400, "this model has no tokenizer")
        if body.messages is not None:
            try:
                tokens = render_chat(serving.tokenizer, state.chat_template,
                                     [{"role": m.role, "content": m.text} for m in body.messages])
            except Exception as error:  # as in chat completions: the conversation's fault (e.g. role order)
                raise APIError(400, f"the messages cannot be rendered with the chat template: {error}",
                               param="messages") from error
        else:
            tokens = serving.tokenizer(body.prompt, add_special_tokens=body.add_special_tokens).input_ids
        return {"tokens": tokens, "count": len(tokens), "max_model_len": serving.config.max_model_len}

    @app.post("/detokenize", dependencies=guarded)
    async def detokenize(body: DetokenizeRequest):
        serving = state.require_ready()
        serving.check_model(body.model)
        if serving.tokenizer is None:
            raise APIError(400, "this model has no tokenizer")
        vocab_size = serving.engine.core.model_info.vocab_size
        if any(token >= vocab_size for token in body.tokens):
            raise APIError(400, f"token ids must be below the vocabulary size ({vocab_size})", param="tokens")
        return {"prompt": serving.tokenizer.decode(body.tokens)}

    return app


def _announce(config: ServerConfig, core: EngineCore) -> None:
    kv = core.kv_manager
    base = f"http://{config.host}:{config.port}"
    auth = f" -H 'Authorization: Bearer {config.api_key}'" if config.api_key else ""
    print(f"tokenmill: serving {config.model_name} ({core.model_info.architecture}, {core.dtype}) at {base}\n"
          f"tokenmill: KV cache {kv.num_blocks * kv.block_size} tokens ({kv.num_blocks} blocks of {kv.block_size}, "
          f"{core.runner.kv_cache_bytes / 2**20:.0f} MiB), max_model_len {core.max_model_len}\n"
          f"tokenmill: try  curl {base}/v1/chat/completions -H 'Content-Type: application/json'{auth} "
          f"-d '{{\"model\": \"{config.model_name}\", \"messages\": [{{\"role\": \"user\", \"content\": \"Hello!\"}}]}}'",
          flush=True)
