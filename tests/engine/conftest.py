"""Helpers for engine tests: invariants after every step, and the end-of-run check."""


def check_every_step(llm):
    """Run the scheduler/KV invariants after every engine step of `llm`."""
    engine = llm.engine
    original_step = engine.step
    stats = {"steps": 0, "batched_tokens": 0}
    original_schedule = engine.scheduler.schedule

    def schedule():
        output = original_schedule()
        stats["batched_tokens"] += output.num_batched_tokens
        return output

    def step():
        updates = original_step()
        engine.check_integrity()
        stats["steps"] += 1
        return updates

    engine.step = step
    engine.scheduler.schedule = schedule
    return stats


def assert_all_blocks_free(llm):
    engine = llm.engine
    engine.check_integrity()
    assert not engine.has_unfinished_requests()
    assert engine.kv_manager.pool.num_free_blocks == engine.kv_manager.num_blocks
