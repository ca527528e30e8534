"""The step profiler accounts for the whole step and leaves the engine as it was."""
import pytest

from tokenmill import LLM, SamplingParams
from tokenmill.engine.profiler import CATEGORIES, profile_steps
from tests.models.tiny_models import tiny_model


def test_profile_breaks_the_step_down_and_removes_its_marks(tmp_path):
    tiny_model("llama").save_pretrained(tmp_path)
    engine = LLM(str(tmp_path), dtype="float32", block_size=4, num_kv_blocks=128).engine
    params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
    for i in range(4):
        engine.add_request(str(i), [1, 2, 3, 4 + i], params)
    schedule, sample = engine.scheduler.schedule, engine.runner.model.compute_logits
    result = profile_steps(engine, num_steps=8, warmup_steps=2)
    assert set(result.ms_per_step) == set(CATEGORIES)
    assert result.batch_sizes == [4] * 8
    for name in ("matmuls (decoder projections)", "attention", "sampling", "scheduling", "output layer (logits)"):
        assert result.ms_per_step[name] > 0, name
    # Every category together is the profiled step (Python overhead is the remainder, never negative).
    assert sum(result.ms_per_step.values()) == pytest.approx(result.profiled_ms_per_step, rel=0.02)
    assert "Python overhead" in result.table()
    # The marks are gone: the engine's own methods are back.
    assert engine.scheduler.schedule == schedule and engine.runner.model.compute_logits == sample
    assert "schedule" not in vars(engine.scheduler)
    with pytest.raises(ValueError, match="ran out"):
        profile_steps(engine, num_steps=100)
