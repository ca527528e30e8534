"""The background engine thread and its async streams, on a tiny random model."""
import asyncio

import pytest
import torch
import transformers

from tokenmill.config import EngineConfig
from tokenmill.engine.async_engine import AsyncEngine, EngineOverloadedError
from tokenmill.engine.core import EngineCore
from tokenmill.engine.request import SamplingParams


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    path = tmp_path_factory.mktemp("tiny-llama")
    transformers.LlamaForCausalLM(config).save_pretrained(path)
    return str(path)


def make_engine(path, **kwargs):
    config = EngineConfig(model=path, dtype="float32", block_size=4, num_kv_blocks=64, max_model_len=128, **kwargs)
    return EngineCore(config)


async def collect(engine, request_id, prompt, params):
    tokens = {}
    async for deltas in engine.generate(request_id, prompt, params):
        for delta in deltas:
            tokens.setdefault(delta.index, []).append(delta.token_id)
    return tokens


def test_concurrent_streams_match_the_synchronous_engine(tiny_llama):
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    prompts = [[5 + i, 9, 11 + i, 3] * (i + 1) for i in range(6)]
    reference = make_engine(tiny_llama)
    for i, prompt in enumerate(prompts):
        reference.add_request(str(i), prompt, params)
    expected = {}
    while reference.has_unfinished_requests():
        for update in reference.step():
            expected.setdefault(update.request.request_id, []).append(update.new_token_id)

    async def main():
        engine = AsyncEngine(make_engine(tiny_llama))
        engine.start()
        try:
            results = await asyncio.gather(*(collect(engine, str(i), p, params) for i, p in enumerate(prompts)))
            return results, engine
        finally:
            engine.shutdown()

    results, engine = asyncio.run(main())
    assert [r[0] for r in results] == [expected[str(i)] for i in range(len(prompts))]
    assert engine.stats.kv_cache_usage == 0.0


def test_leaving_a_stream_early_aborts_and_frees_blocks(tiny_llama):
    async def main():
        engine = AsyncEngine(make_engine(tiny_llama))
        engine.start()
        try:
            stream = engine.generate("a", [5, 6, 7, 8, 9], SamplingParams(max_tokens=100, ignore_eos=True))
            async for _ in stream:
                assert engine.stats.kv_cache_usage > 0
                break
            await stream.aclose()
            for _ in range(100):
                if engine.stats.kv_cache_usage == 0.0 and engine.stats.num_running == 0:
                    break
                await asyncio.sleep(0.01)
            return engine.stats
        finally:
            engine.shutdown()

    stats = asyncio.run(main())
    assert stats.kv_cache_usage == 0.0 and stats.num_running == 0


def test_full_waiting_queue_is_refused_and_bad_input_raises(tiny_llama):
    async def main():
        engine = AsyncEngine(make_engine(tiny_llama, max_num_seqs=1), max_waiting_requests=1)
        engine.start()
        try:
            params = SamplingParams(max_tokens=120, ignore_eos=True)

            async def until(condition):
                while not condition(engine.stats):
                    await asyncio.sleep(0.001)

            first = asyncio.create_task(collect(engine, "1", [5, 6], params))
            await until(lambda stats: stats.num_running == 1)
            second = asyncio.create_task(collect(engine, "2", [5, 6], params))
            await until(lambda stats: stats.num_waiting == 1)
            with pytest.raises(EngineOverloadedError):
                await collect(engine, "3", [5, 6], params)
            with pytest.raises(ValueError, match="max_model_len"):
                await collect(engine, "4", [5] * 200, params)
            done = await asyncio.gather(first, second)
            assert all(len(tokens[0]) == 120 for tokens in done)
            assert engine.is_alive
        finally:
            engine.shutdown()

    asyncio.run(main())
