"""The scheduler alone, fed by a fake runner: no model, no torch."""
import random

import pytest

from tokenmill.engine.kv_manager import KVCacheManager
from tokenmill.engine.outputs import RunnerOutput
from tokenmill.engine.request import Request, RequestStatus, SamplingParams
from tokenmill.engine.scheduler import Scheduler, SchedulerConfig


def fake_next_token(history: list[int]) -> int:
    """Deterministic in the sequence so far, like greedy decoding."""
    return (sum(history) * 31 + len(history)) % 1000 + 2


class FakeRunner:
    """Checks that every scheduled chunk continues exactly where the request was,
    and samples from the full history it has been shown."""

    def __init__(self):
        self.seen: dict[str, list[int]] = {}
        self.computed_tokens = 0

    def execute(self, step):
        sampled = {}
        for request_id in step.preempted_request_ids:
            self.seen.pop(request_id, None)
        for item in step.scheduled:
            history = self.seen.setdefault(item.request_id, [])
            if item.num_computed_tokens < len(history):  # recomputation after preemption or a prefix hit
                history[:] = history[:item.num_computed_tokens]
            assert len(history) >= item.num_computed_tokens or item.new_request is not None
            if len(history) < item.num_computed_tokens:  # prefix-cache hit: tokens not shown to us
                full = item.new_request.prompt_token_ids + item.new_request.output_token_ids
                history[:] = full[:item.num_computed_tokens]
            history.extend(item.token_ids)
            self.computed_tokens += len(item.token_ids)
            if item.sample:
                sampled[item.request_id] = fake_next_token(history)
        return RunnerOutput(sampled_token_ids=sampled)


def make_scheduler(num_blocks=64, block_size=4, max_num_seqs=8, budget=32, max_model_len=256, caching=True,
                   long_prefill=0):
    kv = KVCacheManager(num_blocks, block_size, caching)
    return Scheduler(SchedulerConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=budget,
                                     max_model_len=max_model_len, long_prefill_token_threshold=long_prefill), kv)


def run_to_completion(scheduler, runner, max_steps=10_000):
    finished = {}
    steps = []
    for _ in range(max_steps):
        if scheduler.num_unfinished == 0:
            break
        step = scheduler.schedule()
        steps.append(step)
        assert step.num_batched_tokens <= scheduler.config.max_num_batched_tokens
        assert len(step.scheduled) <= scheduler.config.max_num_seqs
        for request, _ in scheduler.update_from_output(step, runner.execute(step)):
            if request.is_finished:
                finished[request.request_id] = request
        scheduler.check_integrity()
    else:
        raise AssertionError("did not finish: deadlock or livelock")
    return finished, steps


def expected_output(prompt, max_tokens):
    history = list(prompt)
    out = []
    for _ in range(max_tokens):
        token = fake_next_token(history)
        out.append(token)
        history.append(token)
    return out


def test_outputs_do_not_depend_on_batching_chunking_or_preemption():
    rng = random.Random(0)
    prompts = [[rng.randrange(2, 1000) for _ in range(rng.randrange(3, 60))] for _ in range(24)]
    tight = make_scheduler(num_blocks=40, block_size=4, max_num_seqs=16, budget=24)
    for i, prompt in enumerate(prompts):
        tight.add_request(Request(f"r{i}", prompt, SamplingParams(max_tokens=20, ignore_eos=True)))
    finished, steps = run_to_completion(tight, FakeRunner())
    assert tight.num_preemptions > 0, "the test must force preemption"
    assert any(len(s.scheduled) > 1 and any(len(x.token_ids) > 1 for x in s.scheduled)
               and any(len(x.token_ids) == 1 for x in s.scheduled) for s in steps), \
        "prefill chunks and decodes must share steps"
    for i, prompt in enumerate(prompts):
        assert finished[f"r{i}"].output_token_ids == expected_output(prompt, 20)
        assert finished[f"r{i}"].status == RequestStatus.FINISHED_LENGTH
    assert tight.kv.pool.num_free_blocks == tight.kv.num_blocks


def test_long_prompt_is_chunked_and_decodes_keep_running():
    scheduler = make_scheduler(budget=16)
    scheduler.add_request(Request("short", [5, 6, 7], SamplingParams(max_tokens=30, ignore_eos=True)))
    scheduler.schedule_and_run = None
    runner = FakeRunner()
    step = scheduler.schedule()
    scheduler.update_from_output(step, runner.execute(step))
    scheduler.add_request(Request("long", list(range(2, 102)), SamplingParams(max_tokens=2, ignore_eos=True)))
    chunks = []
    while scheduler.requests.get("long") is not None and len(scheduler.requests["long"].output_token_ids) == 0:
        step = scheduler.schedule()
        by_id = {item.request_id: item for item in step.scheduled}
        assert len(by_id["short"].token_ids) == 1, "the decode runs in every step"
        chunks.append(len(by_id["long"].token_ids))
        scheduler.update_from_output(step, runner.execute(step))
        scheduler.check_integrity()
    assert chunks == [15] * 6 + [10]


def test_long_prefill_threshold_caps_each_prompt_only_while_others_decode():
    scheduler = make_scheduler(budget=32, long_prefill=8)
    runner = FakeRunner()
    scheduler.add_request(Request("a", list(range(2, 22)), SamplingParams(max_tokens=6, ignore_eos=True)))
    chunks: dict[str, list[int]] = {"a": [], "b": []}
    finished = {}

    def step():
        output = scheduler.schedule()
        for item in output.scheduled:
            chunks[item.request_id].append(len(item.token_ids))
        for request, _ in scheduler.update_from_output(output, runner.execute(output)):
            if request.is_finished:
                finished[request.request_id] = request
        scheduler.check_integrity()

    step()  # nothing decodes: the whole 20-token prompt in one step
    scheduler.add_request(Request("b", list(range(30, 51)), SamplingParams(max_tokens=2, ignore_eos=True)))
    while scheduler.num_unfinished:
        step()
    # "b" arrives while "a" decodes: read 8 tokens a step, "a" decoding in each of them.
    assert chunks == {"a": [20, 1, 1, 1, 1, 1], "b": [8, 8, 5, 1]}
    assert finished["a"].output_token_ids == expected_output(list(range(2, 22)), 6)
    assert finished["b"].output_token_ids == expected_output(list(range(30, 51)), 2)


def test_outputs_do_not_depend_on_the_long_prefill_threshold():
    rng = random.Random(1)
    prompts = [[rng.randrange(2, 1000) for _ in range(rng.randrange(3, 70))] for _ in range(12)]
    for threshold in (0, 5, 16):
        scheduler = make_scheduler(num_blocks=48, budget=40, long_prefill=threshold)
        for i, prompt in enumerate(prompts):
            scheduler.add_request(Request(f"r{i}", prompt, SamplingParams(max_tokens=10, ignore_eos=True)))
        finished, steps = run_to_completion(scheduler, FakeRunner())
        if threshold:  # a longer chunk only in a step where nothing decodes
            for s in steps:
                if any(len(item.token_ids) == 1 and item.sample for item in s.scheduled):
                    assert all(len(item.token_ids) <= threshold for item in s.scheduled)
        for i, prompt in enumerate(prompts):
            assert finished[f"r{i}"].output_token_ids == expected_output(prompt, 10)


def test_negative_long_prefill_threshold_is_rejected():
    with pytest.raises(ValueError, match="long_prefill_token_threshold"):
        SchedulerConfig(long_prefill_token_threshold=-1)


def test_running_count_never_exceeds_max_num_seqs():
    scheduler = make_scheduler(max_num_seqs=3)
    for i in range(7):
        scheduler.add_request(Request(f"r{i}", [3, 4, 5], SamplingParams(max_tokens=5, ignore_eos=True)))
    finished, steps = run_to_completion(scheduler, FakeRunner())
    assert len(finished) == 7
    assert max(len(s.scheduled) for s in steps) == 3


def test_prefix_hit_computes_only_new_tokens():
    scheduler = make_scheduler(num_blocks=128, budget=512)
    runner = FakeRunner()
    prefix = list(range(2, 202))  # 200 tokens = 50 blocks of 4
    scheduler.add_request(Request("first", prefix + [7, 8, 9], SamplingParams(max_tokens=3, ignore_eos=True)))
    run_to_completion(scheduler, runner)
    before = runner.computed_tokens
    second = Request("second", prefix + [11, 12], SamplingParams(max_tokens=3, ignore_eos=True))
    scheduler.add_request(second)
    finished, _ = run_to_completion(scheduler, runner)
    assert second.num_cached_tokens == 200
    assert runner.computed_tokens - before == 2 + 2  # 2 new prompt tokens, then 2 decodes
    assert finished["second"].output_token_ids == expected_output(prefix + [11, 12], 3)


def test_finished_by_stop_token_and_eos():
    scheduler = make_scheduler()
    history = [5, 6, 7]
    first = fake_next_token(history)
    scheduler.add_request(Request("stop", history, SamplingParams(max_tokens=10, stop_token_ids=[first])))
    scheduler.add_request(Request("eos", history, SamplingParams(max_tokens=10), eos_token_ids=(first,)))
    scheduler.add_request(Request("min", history, SamplingParams(max_tokens=10, min_tokens=2), eos_token_ids=(first,)))
    finished, _ = run_to_completion(scheduler, FakeRunner())
    assert finished["stop"].output_token_ids == [first] and finished["stop"].stop_reason == first
    assert finished["eos"].status == RequestStatus.FINISHED_STOPPED
    assert len(finished["min"].output_token_ids) >= 2


def test_abort_frees_blocks_immediately():
    scheduler = make_scheduler()
    scheduler.add_request(Request("a", list(range(2, 40)), SamplingParams(max_tokens=50)))
    runner = FakeRunner()
    step = scheduler.schedule()
    scheduler.update_from_output(step, runner.execute(step))
    assert scheduler.kv.pool.num_free_blocks < scheduler.kv.num_blocks
    scheduler.finish_request("a", RequestStatus.FINISHED_ABORTED)
    scheduler.check_integrity()
    assert scheduler.kv.pool.num_free_blocks == scheduler.kv.num_blocks
    assert "a" in scheduler.schedule().finished_request_ids


@pytest.mark.parametrize("prompt_len,max_tokens,match", [
    (250, 10, "max_model_len"),
    (0, 10, "empty"),
])
def test_requests_that_can_never_fit_are_rejected(prompt_len, max_tokens, match):
    scheduler = make_scheduler(max_model_len=256)
    with pytest.raises(ValueError, match=match):
        scheduler.add_request(Request("x", [3] * prompt_len, SamplingParams(max_tokens=max_tokens)))
    assert scheduler.num_unfinished == 0


def test_request_larger_than_the_cache_is_rejected():
    scheduler = make_scheduler(num_blocks=4, block_size=4, max_model_len=256)
    with pytest.raises(ValueError, match="KV blocks"):
        scheduler.add_request(Request("x", [3] * 10, SamplingParams(max_tokens=10)))


def test_siblings_share_the_prompt_blocks():
    scheduler = make_scheduler(num_blocks=64, budget=8)
    prompt = list(range(2, 26))  # 24 tokens = 6 blocks, prefilled over several steps
    for i in range(3):
        scheduler.add_request(Request(f"s{i}", prompt, SamplingParams(max_tokens=2, ignore_eos=True), group_id="g"))
    runner = FakeRunner()
    run_to_completion(scheduler, runner)
    # The first sibling computes the prompt; the others reuse its full blocks
    # (all but the block holding the last prompt token).
    assert runner.computed_tokens == 24 + 1 + 2 * (4 + 1)


def test_scheduler_imports_no_torch():
    import subprocess
    import sys
    code = "import sys, tokenmill.engine.scheduler; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)
