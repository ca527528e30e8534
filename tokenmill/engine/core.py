"""EngineCore.step(): schedule -> run -> update. Synchronous; one owner thread."""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass

import torch

from tokenmill.config import EngineConfig
from tokenmill.engine.detokenizer import IncrementalDetokenizer
from tokenmill.engine.kv_manager import KVCacheManager
from tokenmill.engine.outputs import SampleLogprobs
from tokenmill.engine.platform import cpu_has_native_bf16
from tokenmill.engine.request import Request, RequestStatus, SamplingParams
from tokenmill.engine.runner import ModelRunner, kv_bytes_per_block
from tokenmill.engine.scheduler import Scheduler, SchedulerConfig
from tokenmill.kernels import load_cpu_kernels
from tokenmill.models.loader import load_model
from tokenmill.models.prepack import prepack_model
from tokenmill.models.quantize import quantize_model

logger = logging.getLogger(__name__)

_TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(dtype: str, device: str) -> torch.dtype:
    """"auto": bfloat16 on CUDA and on CPUs with native bf16 matmuls, else float32."""
    if dtype == "auto":
        if torch.device(device).type == "cuda" or cpu_has_native_bf16():
            return torch.bfloat16
        return torch.float32
    return _TORCH_DTYPES[dtype]


class EngineOverloadedError(RuntimeError):
    """The waiting queue is full: retry later (HTTP 503 with Retry-After)."""


@dataclass
class RequestUpdate:
    """What one step did to one request: the token it gained (if any), the text
    that token added (after stop-string handling) and whether it has finished."""
    request: Request
    new_token_id: int | None
    text_delta: str
    logprobs: SampleLogprobs | None

    @property
    def finished(self) -> bool:
        return self.request.is_finished


class EngineCore:
    """Contracts: `add_request` raises ValueError for input that can never run and
    then leaves no trace; `step()` advances every scheduled request by one
    iteration and returns an update for each request that gained a token or
    finished; `abort_request` frees the request's blocks at once."""

    def __init__(self, config: EngineConfig, loaded=None) -> None:
        self.config = config
        self.dtype = resolve_dtype(config.dtype, config.device)
        torch.manual_seed(config.seed)
        loaded_here = loaded is None
        if loaded is None:
            loaded = load_model(config.model, dtype=self.dtype, device=config.device, cache_dir=config.cache_dir)
        else:
            model_dtype = next(loaded.model.parameters()).dtype
            if config.dtype == "auto":
                self.dtype = model_dtype
            elif model_dtype != self.dtype:
                raise ValueError(f"the given model is loaded in {model_dtype} but dtype {config.dtype!r} was "
                                 "asked for; load it in that dtype or pass dtype='auto'")
        if config.quantization is not None:
            if not loaded_here:  # quantizing rewrites the modules: never do it to a model shared with others
                raise ValueError("quantization is applied at load time: pass a model path, not a loaded model")
            quantize_model(loaded.model, config.quantization)
        prepack_model(loaded.model, self.dtype, config.device)
        if torch.device(config.device).type == "cpu":
            load_cpu_kernels()  # built once per machine; here rather than in the first request's step
        self.model_info = loaded.info
        self.tokenizer = loaded.tokenizer
        info = loaded.info

        block_bytes = kv_bytes_per_block(info.num_layers, info.num_kv_heads, info.head_dim,
                                         config.block_size, self.dtype)
        num_blocks = config.num_kv_blocks or config.resolved_kv_cache_memory // block_bytes
        if num_blocks < 1:
            raise ValueError(f"kv_cache_memory {config.resolved_kv_cache_memory} B holds no block "
                             f"(one block of {config.block_size} tokens takes {block_bytes} B)")
        capacity = num_blocks * config.block_size
        if config.max_model_len is None:
            max_model_len = min(info.max_position_embeddings, capacity)
        else:
            max_model_len = config.max_model_len
            if max_model_len > info.max_position_embeddings:
                raise ValueError(f"max_model_len {max_model_len} exceeds the model's context "
                                 f"({info.max_position_embeddings} tokens)")
            if max_model_len > capacity:
                raise ValueError(f"max_model_len {max_model_len} does not fit the KV cache "
                                 f"({num_blocks} blocks x {config.block_size} = {capacity} tokens); "
                                 "raise kv_cache_memory or lower max_model_len")
        self.max_model_len = max_model_len
        self.kv_manager = KVCacheManager(num_blocks, config.block_size, config.enable_prefix_caching)
        self.scheduler = Scheduler(
            SchedulerConfig(max_num_seqs=config.max_num_seqs,
                            max_num_batched_tokens=config.max_num_batched_tokens,
                            max_model_len=max_model_len,
                            long_prefill_token_threshold=config.resolved_long_prefill_token_threshold),
            self.kv_manager)
        self.runner = ModelRunner(loaded.model, info, num_blocks, config.block_size, self.dtype, config.device)
        self._detokenizers: dict[str, IncrementalDetokenizer] = {}
        self._groups: dict[str, list[str]] = {}  # caller's id -> its n > 1 request ids
        logger.info("KV cache: %d blocks x %d tokens (%.1f MiB), max_model_len %d",
                    num_blocks, config.block_size, self.runner.kv_cache_bytes / 2**20, max_model_len)

    # ---- requests ------------------------------------------------------------
    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                    max_waiting: int | None = None) -> list[Request]:
        """Queue a prompt; `params.n > 1` becomes n requests that share the prompt's
        blocks (ids `{request_id}-{i}`, seeds `seed + i`). Raises ValueError if the
        prompt or parameters can never run, then EngineOverloadedError if
        `max_waiting` requests are already waiting; either way it queues nothing."""
        vocab_size = self.model_info.vocab_size
        bad = [t for t in prompt_token_ids if not isinstance(t, int) or not 0 <= t < vocab_size]
        if bad:
            raise ValueError(f"prompt token ids must be integers in [0, {vocab_size}), got {bad[:5]}")
        if not prompt_token_ids:
            raise ValueError("the prompt is empty")
        if request_id in self._groups or request_id in self.scheduler.requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        if params.max_tokens is None:
            room = self.max_model_len - len(prompt_token_ids)
            if room < 1:
                raise ValueError(f"the prompt has {len(prompt_token_ids)} tokens, which leaves no room "
                                 f"to generate within max_model_len ({self.max_model_len})")
            params = dataclasses.replace(params, max_tokens=room)
        requests = []
        for index in range(params.n):
            child_params = params
            if params.n > 1 and params.seed is not None:
                child_params = dataclasses.replace(params, seed=params.seed + index)
            requests.append(Request(
                request_id=request_id if params.n == 1 else f"{request_id}-{index}",
                prompt_token_ids=list(prompt_token_ids), sampling_params=child_params,
                eos_token_ids=tuple(self.model_info.eos_token_ids),
                group_id=request_id if params.n > 1 else None, sample_index=index))
        self.scheduler.check_request(requests[0])
        num_waiting = len(self.scheduler.waiting)
        if max_waiting is not None and num_waiting + len(requests) > max_waiting:
            raise EngineOverloadedError(f"{num_waiting} requests are already waiting (limit {max_waiting})")
        for request in requests:
            self.scheduler.add_request(request)
            if self.tokenizer is not None:
                self._detokenizers[request.request_id] = IncrementalDetokenizer(
                    self.tokenizer, request.prompt_token_ids, request.sampling_params)
        if params.n > 1:
            self._groups[request_id] = [request.request_id for request in requests]
        return requests

    def abort_request(self, request_id: str) -> list[Request]:
        """Abort a request (all n completions of it) and free its blocks at once.
        Unknown or finished ids are ignored. Returns the requests aborted."""
        aborted = []
        for child_id in self._groups.pop(request_id, [request_id]):
            self._detokenizers.pop(child_id, None)
            request = self.scheduler.finish_request(child_id, RequestStatus.FINISHED_ABORTED)
            if request is not None:
                aborted.append(request)
        return aborted

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.num_unfinished > 0

    # ---- the step ------------------------------------------------------------
    def step(self) -> list[RequestUpdate]:
        scheduler_output = self.scheduler.schedule()
        runner_output = self.runner.execute(scheduler_output)
        updates = []
        for request, token_id in self.scheduler.update_from_output(scheduler_output, runner_output):
            text_delta = ""
            detokenizer = self._detokenizers.get(request.request_id)
            if detokenizer is not None:
                stop = detokenizer.update(token_id)
                if stop is not None and not request.is_finished:
                    request.stop_reason = stop
                    self.scheduler.finish_request(request.request_id, RequestStatus.FINISHED_STOPPED)
                text_delta = detokenizer.get_delta(request.is_finished)
            if request.is_finished:
                self._detokenizers.pop(request.request_id, None)
                self._forget_group(request)
            updates.append(RequestUpdate(request, token_id, text_delta,
                                         runner_output.logprobs.get(request.request_id)))
        return updates

    def _forget_group(self, request: Request) -> None:
        siblings = self._groups.get(request.group_id) if request.group_id is not None else None
        if siblings is not None and all(child not in self.scheduler.requests for child in siblings):
            del self._groups[request.group_id]

    def check_integrity(self) -> None:
        self.scheduler.check_integrity()
