"""Offline API, shaped like vLLM's: `LLM(...).generate(prompts, sampling_params)`."""
from __future__ import annotations

import itertools
from collections.abc import Sequence

from tqdm.auto import tqdm

from tokenmill.config import EngineConfig
from tokenmill.engine.core import EngineCore, RequestUpdate
from tokenmill.engine.request import SamplingParams
from tokenmill.outputs import CompletionOutput, Logprob, RequestOutput

PromptType = str | list[int] | dict


class LLM:
    """An engine for offline batch generation.

    `LLM()` serves the default Gemma 3 270M. Keyword arguments are the fields of
    `EngineConfig` (model, dtype, max_model_len, max_num_seqs,
    max_num_batched_tokens, long_prefill_token_threshold, block_size, kv_cache_memory, num_kv_blocks,
    enable_prefix_caching, seed, device, cache_dir).
    """

    def __init__(self, model: str | None = None, *, loaded_model=None, **kwargs) -> None:
        """`loaded_model` (a `tokenmill.models.loader.LoadedModel`) reuses weights that
        are already in memory instead of loading `model` again."""
        self.config = EngineConfig(model=model, **kwargs)
        self.engine = EngineCore(self.config, loaded=loaded_model)
        self.tokenizer = self.engine.tokenizer
        self._counter = itertools.count()

    def _to_token_ids(self, prompt: PromptType) -> tuple[str | None, list[int]]:
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                return prompt.get("prompt"), list(prompt["prompt_token_ids"])
            prompt = prompt.get("prompt")
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("this model has no tokenizer: pass prompts as token ids")
            return prompt, self.tokenizer(prompt).input_ids
        if isinstance(prompt, list) and all(isinstance(t, int) for t in prompt):
            return None, prompt
        raise ValueError(f"a prompt must be a string, a list of token ids or a dict, got {type(prompt).__name__}")

    def generate(self, prompts: PromptType | Sequence[PromptType],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 use_tqdm: bool = True) -> list[RequestOutput]:
        """Generate completions for every prompt; returns one RequestOutput per prompt,
        in the order given. Raises ValueError (and runs nothing) if any prompt or
        parameter is invalid."""
        if isinstance(prompts, (str, dict)) or (isinstance(prompts, list) and prompts
                                                and all(isinstance(t, int) for t in prompts)):
            prompts = [prompts]
        prompts = list(prompts)
        if sampling_params is None:
            sampling_params = SamplingParams()
        if isinstance(sampling_params, SamplingParams):
            params_list = [sampling_params] * len(prompts)
        else:
            params_list = list(sampling_params)
            if len(params_list) != len(prompts):
                raise ValueError(f"got {len(prompts)} prompts but {len(params_list)} sampling params")

        results: dict[str, RequestOutput] = {}
        try:
            for prompt, params in zip(prompts, params_list):
                text, token_ids = self._to_token_ids(prompt)
                request_id = str(next(self._counter))
                self.engine.add_request(request_id, token_ids, params)
                results[request_id] = RequestOutput(
                    request_id=request_id, prompt=text, prompt_token_ids=token_ids,
                    outputs=[CompletionOutput(index=i, text="", token_ids=[]) for i in range(params.n)])
        except Exception:
            for request_id in results:
                self.engine.abort_request(request_id)
            raise

        remaining = {request_id: len(output.outputs) for request_id, output in results.items()}
        with tqdm(total=len(results), desc="Generating", disable=not use_tqdm, unit="prompt") as progress:
            try:
                while self.engine.has_unfinished_requests():
                    for update in self.engine.step():
                        parent_id = update.request.parent_id
                        _apply_update(results[parent_id], update)
                        if update.finished:
                            remaining[parent_id] -= 1
                            if remaining[parent_id] == 0:
                                results[parent_id].finished = True
                                progress.update(1)
            finally:
                for request_id in results:
                    self.engine.abort_request(request_id)
        return list(results.values())


def _apply_update(result: RequestOutput, update: RequestUpdate) -> None:
    completion = result.outputs[update.request.sample_index]
    request = update.request
    if update.new_token_id is not None:
        completion.token_ids.append(update.new_token_id)
    completion.text += update.text_delta
    if update.logprobs is not None:
        chosen = Logprob(update.new_token_id, update.logprobs.token_logprob)
        top = [Logprob(token_id, value) for token_id, value in update.logprobs.top]
        if completion.logprobs is None:
            completion.logprobs = []
        completion.logprobs.append((chosen, top))
        completion.cumulative_logprob = (completion.cumulative_logprob or 0.0) + chosen.logprob
    if request.is_finished:
        completion.finish_reason = request.finish_reason.value
        completion.stop_reason = request.stop_reason
    result.num_cached_tokens = max(result.num_cached_tokens, request.num_cached_tokens)
