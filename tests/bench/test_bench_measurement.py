"""SSE parsing, token counting and per-request metrics on hand-made streams (exact arithmetic)."""
import pytest

from tokenmill.bench.client import RequestRecord, error_message
from tokenmill.bench.config import SLO
from tokenmill.bench.metrics import distribution, measure, summarize
from tokenmill.bench.sse import SSEParser
from tokenmill.bench.tokens import resolve_token_counts
from tokenmill.bench.workload import RequestSpec


def test_sse_events_split_anywhere():
    stream = b'data: {"a": 1}\n\ndata: {"b": 2}\r\n\r\n: comment\nevent: x\ndata: one\ndata: two\n\ndata: [DONE]\n\n'
    for size in (1, 2, 3, 7, len(stream)):
        parser = SSEParser()
        events = []
        for i in range(0, len(stream), size):
            events += parser.feed(stream[i:i + size])
        assert events == [b'{"a": 1}', b'{"b": 2}', b"one\ntwo", b"[DONE]"]


def test_sse_event_cut_off_by_the_end_is_dropped():
    parser = SSEParser()
    assert parser.feed(b'data: {"a": 1}\n\ndata: {"partial"') == [b'{"a": 1}']


def test_error_messages_of_common_servers():
    assert error_message(b'{"error": {"message": "no such model", "type": "x"}}') == "no such model"
    assert error_message(b'{"detail": "Not Found"}') == "Not Found"
    assert error_message(b'{"error": "pinned to another model"}') == "pinned to another model"
    assert error_message(b"<html>\n bad gateway </html>") == "<html> bad gateway </html>"


def record(times, texts, logprob_tokens=None, usage=None, start=0.0, end=None):
    r = RequestRecord(index=0, spec=RequestSpec(max_tokens=16, prompt="one two three"), start=start,
                      end=end if end is not None else times[-1], finish_reason="length")
    r.chunk_times, r.chunk_texts = list(times), list(texts)
    if logprob_tokens is not None:
        r.chunk_logprob_tokens, r.saw_logprobs = list(logprob_tokens), True
    else:
        r.chunk_logprob_tokens = [0] * len(times)
    if usage is not None:
        r.usage_prompt_tokens, r.usage_completion_tokens = usage
    return r


class WordTokenizer:
    """Stands in for a Hugging Face tokenizer: one token per word."""

    class _Encoding:
        def __init__(self, ids):
            self.input_ids = ids

    def __call__(self, text, add_special_tokens=True):
        return self._Encoding(list(range(len(text.split()))))


def test_itl_is_per_token_and_tpot_excludes_the_first_token():
    # chunks at 0.3 s (1 token), 0.5 s (2 tokens), 0.6 s (1 token), response ends at 0.7 s
    r = record([0.3, 0.5, 0.6], [" a", " b c", " d"], logprob_tokens=[1, 2, 1], usage=(3, 4), end=0.7)
    resolve_token_counts([r])
    measure(r, SLO(ttft=0.35, itl=0.1))
    assert r.output_tokens == 4 and r.chunk_tokens_source == "logprobs"
    assert r.ttft == pytest.approx(0.3) and r.e2e == pytest.approx(0.7)
    assert r.itl == pytest.approx([0.1, 0.1, 0.1])
    assert r.tpot == pytest.approx((0.7 - 0.3) / 3)
    assert r.meets_slo
    measure(r, SLO(itl=0.09))
    assert not r.meets_slo


@pytest.mark.parametrize("logprobs, usage, tokenizer, output_source, chunk_source, chunk_tokens", [
    ([1, 2, 1], (3, 4), None, "usage", "logprobs", [1, 2, 1]),
    ([1, 2, 1], None, None, "logprobs", "logprobs", [1, 2, 1]),
    (None, (3, 3), None, "usage", "one_per_chunk", [1, 1, 1]),
    (None, (3, 8), WordTokenizer(), "usage", "tokenizer", [1, 6, 1]),
    (None, None, WordTokenizer(), "tokenizer", "tokenizer", [1, 6, 1]),
    (None, (3, 7), None, "usage", "by_characters", [2, 4, 1]),
    (None, None, None, "chunks", "one_per_chunk", [1, 1, 1]),
])
def test_token_count_sources(logprobs, usage, tokenizer, output_source, chunk_source, chunk_tokens):
    r = record([0.1, 0.2, 0.3], [" a", " b c d e f g", " h"], logprob_tokens=logprobs, usage=usage)
    resolve_token_counts([r], tokenizer)
    assert (r.output_tokens_source, r.chunk_tokens_source, r.chunk_tokens) == \
        (output_source, chunk_source, chunk_tokens)
    assert r.prompt_tokens_source == ("usage" if usage else "tokenizer" if tokenizer else None)


def test_speed_percentiles_describe_the_slow_tail():
    speeds = distribution(list(range(1, 101)), higher_is_better=True)
    latencies = distribution(list(range(1, 101)))
    assert speeds["p95"] == pytest.approx(5.95)  # 95% of requests reach or beat it: the 5th percentile
    assert speeds["p50"] == latencies["p50"]
    assert speeds["p99"] < speeds["p95"] < speeds["p50"] and latencies["p99"] > latencies["p95"]


def test_summary_counts_only_successes_and_keeps_failure_reasons():
    good = record([1.3, 1.4], [" a", " b"], logprob_tokens=[1, 1], usage=(5, 2), start=1.0, end=1.5)
    cut = record([1.2], [" a"], logprob_tokens=[1], start=1.0, end=1.25)
    cut.finish_reason, cut.failure = None, "truncated"
    resolve_token_counts([good, cut])
    for r in (good, cut):
        measure(r, SLO(ttft=1.0))
    summary = summarize([good, cut], SLO(ttft=1.0), peak_in_flight=2)
    assert summary["completed"] == 1 and summary["failures"] == {"truncated": 1}
    assert summary["total_output_tokens"] == 2 and summary["duration_s"] == pytest.approx(0.5)
    assert summary["goodput"] == pytest.approx(2.0) and summary["slo_attainment"] == 0.5
    assert summary["ttft_ms"]["count"] == 1 and summary["ttft_ms"]["mean"] == pytest.approx(300.0)
