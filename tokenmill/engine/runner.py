"""Runs one scheduler step on the model.

SchedulerOutput -> flat tensors (token ids, positions, slot mapping, block
tables) -> model forward, which writes new K/V into the paged cache and attends
over each request's blocks -> logits for the rows that sample only -> sampler.
The runner owns the KV tensors and each request's sampling state.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from tokenmill.engine.outputs import NewRequestData, RunnerOutput, SchedulerOutput
from tokenmill.engine.sampler import SamplingRow, sample
from tokenmill.models.layers.attention import build_attention_metadata


def kv_bytes_per_block(num_layers: int, num_kv_heads: int, head_dim: int, block_size: int,
                       dtype: torch.dtype) -> int:
    """Keys and values of every layer for `block_size` tokens."""
    return 2 * num_layers * num_kv_heads * head_dim * block_size * torch.empty((), dtype=dtype).element_size()


@dataclass
class _RequestState:
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    params: object
    generator: torch.Generator | None
    stop_token_ids: tuple[int, ...]


class ModelRunner:
    """Contracts: `execute(step)` runs every scheduled token exactly once and
    returns one sampled token for each scheduled request whose `sample` is true.
    It raises only on internal errors; inputs were validated upstream."""

    def __init__(self, model: torch.nn.Module, info, num_blocks: int, block_size: int,
                 dtype: torch.dtype, device: torch.device | str) -> None:
        self.model = model
        self.info = info
        self.block_size = block_size
        self.device = torch.device(device)
        shape = (num_blocks, block_size, info.num_kv_heads, info.head_dim)
        # One (keys, values) pair per layer: [num_blocks, block_size, num_kv_heads, head_dim].
        # Left uninitialised: attention reads only slots its own sequence has written.
        self.kv_caches = [(torch.empty(shape, dtype=dtype, device=self.device),
                           torch.empty(shape, dtype=dtype, device=self.device))
                          for _ in range(info.num_layers)]
        self.kv_cache_bytes = num_blocks * kv_bytes_per_block(
            info.num_layers, info.num_kv_heads, info.head_dim, block_size, dtype)
        self._states: dict[str, _RequestState] = {}

    def _add_request(self, data: NewRequestData) -> None:
        state = self._states.get(data.request_id)
        if state is not None:
            # Resumed after preemption: keep the generator so seeded samples continue
            # exactly where they stopped.
            state.output_token_ids = list(data.output_token_ids)
            return
        generator = None
        if data.seed is not None:
            generator = torch.Generator(device=self.device)
            generator.manual_seed(data.seed)
        params = data.sampling_params
        stop_ids = tuple(params.stop_token_ids) + (() if params.ignore_eos else tuple(self.info.eos_token_ids))
        self._states[data.request_id] = _RequestState(
            prompt_token_ids=data.prompt_token_ids, output_token_ids=list(data.output_token_ids),
            params=params, generator=generator, stop_token_ids=stop_ids)

    @torch.inference_mode()
    def execute(self, step: SchedulerOutput) -> RunnerOutput:
        for request_id in step.finished_request_ids:
            self._states.pop(request_id, None)
        if not step.scheduled:
            return RunnerOutput(sampled_token_ids={})
        for item in step.scheduled:
            if item.new_request is not None:
                self._add_request(item.new_request)

        # Decodes first: the attention batches single-token queries together.
        items = sorted(step.scheduled, key=lambda item: len(item.token_ids) != 1)
        input_ids: list[int] = []
        sample_index: list[int] = []
        for item in items:
            input_ids.extend(item.token_ids)
            if item.sample:
                sample_index.append(len(input_ids) - 1)
        metadata = build_attention_metadata(
            query_lens=[len(item.token_ids) for item in items],
            num_computed_tokens=[item.num_computed_tokens for item in items],
            block_tables=[item.block_table for item in items],
            block_size=self.block_size,
            device=self.device,
        )
        input_tensor = torch.tensor(input_ids, dtype=torch.long, device=self.device)
        hidden_states = self.model(input_tensor, metadata.positions, self.kv_caches, metadata)
        if not sample_index:
            return RunnerOutput(sampled_token_ids={})

        sampling_items = [item for item in items if item.sample]
        index = torch.tensor(sample_index, dtype=torch.long, device=self.device)
        logits = self.model.compute_logits(hidden_states[index])  # [num_samples, vocab]
        rows = []
        for item in sampling_items:
            state = self._states[item.request_id]
            rows.append(SamplingRow(params=state.params, prompt_token_ids=state.prompt_token_ids,
                                    output_token_ids=state.output_token_ids, generator=state.generator,
                                    stop_token_ids=state.stop_token_ids))
        token_ids, logprobs = sample(logits, rows)
        output = RunnerOutput(sampled_token_ids={})
        for item, token_id, token_logprobs in zip(sampling_items, token_ids, logprobs):
            self._states[item.request_id].output_token_ids.append(token_id)
            output.sampled_token_ids[item.request_id] = token_id
            if token_logprobs is not None:
                output.logprobs[item.request_id] = token_logprobs
        return output
