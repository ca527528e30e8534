"""`/metrics` moves by exactly what a known workload did."""
import httpx
from server_harness import MODEL, metric

NO_EOS = {"ignore_eos": True}


def test_metrics_count_a_known_workload(server, client):
    server.wait_idle()
    before = server.metrics()
    usages = []
    for max_tokens in (2, 3, 5):
        response = client.completions.create(model=MODEL, prompt=f"Count to {max_tokens}:", max_tokens=max_tokens,
                                             temperature=0, extra_body=NO_EOS)
        assert response.choices[0].finish_reason == "length"
        usages.append(response.usage)
    stream = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=4,
                                            stream=True, stream_options={"include_usage": True}, extra_body=NO_EOS)
    [usage] = [chunk.usage for chunk in stream if chunk.usage is not None]  # read to the end: one usage chunk
    usages.append(usage)
    server.wait_idle()
    after = server.metrics()

    def delta(name, **labels):
        return metric(after, name, **labels) - metric(before, name, **labels)

    requests = len(usages)
    assert delta("tokenmill_request_success_total", finished_reason="length") == requests
    assert delta("tokenmill_request_success_total", finished_reason="stop") == 0
    assert delta("tokenmill_generation_tokens_total") == sum(u.completion_tokens for u in usages) == 2 + 3 + 5 + 4
    assert delta("tokenmill_prompt_tokens_total") == sum(u.prompt_tokens for u in usages)
    for histogram in ("time_to_first_token_seconds", "e2e_request_latency_seconds", "request_queue_time_seconds",
                      "request_prompt_tokens", "request_generation_tokens"):
        assert delta(f"tokenmill_{histogram}_count") == requests, histogram
    assert delta("tokenmill_request_generation_tokens_sum") == 14
    assert delta("tokenmill_request_prompt_tokens_sum") == sum(u.prompt_tokens for u in usages)
    # Every token after a completion's first one is one inter-token gap.
    assert delta("tokenmill_inter_token_latency_seconds_count") == sum(u.completion_tokens - 1 for u in usages)
    assert delta("tokenmill_time_to_first_token_seconds_sum") > 0


def test_n_completions_count_the_prompt_once(server, client):
    server.wait_idle()
    before = server.metrics()
    response = client.completions.create(model=MODEL, prompt="Roses are", max_tokens=3, n=3, temperature=1.0, seed=1,
                                         extra_body=NO_EOS)
    server.wait_idle()
    after = server.metrics()
    assert metric(after, "tokenmill_request_success_total", finished_reason="length") - \
        metric(before, "tokenmill_request_success_total", finished_reason="length") == 3
    assert metric(after, "tokenmill_generation_tokens_total") - metric(before, "tokenmill_generation_tokens_total") \
        == response.usage.completion_tokens == 9
    assert metric(after, "tokenmill_prompt_tokens_total") - metric(before, "tokenmill_prompt_tokens_total") \
        == response.usage.prompt_tokens


def test_stop_finish_reason_is_counted(server, client):
    server.wait_idle()
    before = metric(server.metrics(), "tokenmill_request_success_total", finished_reason="stop")
    response = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=12,
                                         temperature=0, stop=[" of"])
    assert response.choices[0].finish_reason == "stop"
    server.wait_idle()
    assert metric(server.metrics(), "tokenmill_request_success_total", finished_reason="stop") == before + 1


def test_metrics_are_prometheus_text_with_the_engine_gauges(server):
    response = httpx.get(f"{server.base_url}/metrics", timeout=10)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    values = server.metrics()
    for gauge in ("tokenmill_num_requests_running", "tokenmill_num_requests_waiting", "tokenmill_kv_cache_usage_perc"):
        assert (gauge, ()) in values
    assert f'model_name="{MODEL}"' in response.text
