"""The gateway's API: keys and their refusals, limits, auto routing, usage, feedback, models, health."""
import pytest
from gateway_harness import (GatewayThread, config_dict, create_key, database_text, fast_pool, ledger_rows,
                             sse_data)

from tokenmill.bench.fake_server import FakeScript, FakeServerThread

CHAT = {"model": "small", "messages": [{"role": "user", "content": "hello there"}], "max_tokens": 4}


@pytest.fixture
def upstreams():
    with FakeServerThread(FakeScript(model="small-model")) as small, \
            FakeServerThread(FakeScript(model="frontier-model")) as frontier:
        yield small, frontier


def two_tier(database_url, small, frontier, **extra) -> dict:
    return config_dict(database_url, {
        "local": fast_pool([small.base_url], model="small-model", cost={"gpu_hourly_usd": 2.0}),
        "api": fast_pool([frontier.base_url], tier="external", model="frontier-model",
                         cost={"price_per_1m_input": 1000.0, "price_per_1m_output": 2000.0}),
    }, {"small": {"pool": "local", "overflow": "api"}, "frontier": {"pool": "api"}},
        auto={"small": "small", "frontier": "frontier", "threshold": 1.0}, **extra)


def assert_error(response, status: int, code: str | None = None) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    if code is not None:
        assert error["code"] == code, error
    return error


def test_keys_models_and_budgets_are_refused_with_clear_errors(upstreams, database_url):
    small, frontier = upstreams
    _, secret = create_key(database_url, allowed_models=["small", "auto"])
    _, broke = create_key(database_url, name="broke", monthly_budget_usd=0.001)
    with GatewayThread(two_tier(database_url, small, frontier)) as gateway, gateway.client() as client:
        assert_error(client.post("/v1/chat/completions", json=CHAT), 401, "missing_api_key")
        wrong = client.post("/v1/chat/completions", json=CHAT, headers={"authorization": "Bearer tm-nope"})
        assert "invalid API key" in assert_error(wrong, 401, "invalid_api_key")["message"]
        forged = secret[:-4] + ("AAAA" if not secret.endswith("AAAA") else "BBBB")
        assert_error(client.post("/v1/chat/completions", json=CHAT, headers={"authorization": f"Bearer {forged}"}),
                     401)
        auth = {"authorization": f"Bearer {secret}"}
        denied = client.post("/v1/chat/completions", json={**CHAT, "model": "frontier"}, headers=auth)
        assert "may not use the model 'frontier'" in assert_error(denied, 403, "model_not_allowed")["message"]
        unknown = client.post("/v1/chat/completions", json={**CHAT, "model": "gpt-9"}, headers=auth)
        assert "gpt-9" in assert_error(unknown, 404, "model_not_found")["message"]
        assert_error(client.post("/v1/chat/completions", content=b"{not json", headers=auth), 400, "invalid_json")
        assert_error(client.post("/v1/chat/completions", json={"model": "small"}, headers=auth), 400)
        assert_error(client.post("/v1/chat/completions", json={**CHAT, "max_tokens": 0}, headers=auth), 400)
        assert client.post("/v1/chat/completions", json=CHAT, headers=auth).status_code == 200
        # the budget: the first request is admitted (nothing spent yet) and costs more than the budget
        broke_auth = {"authorization": f"Bearer {broke}"}
        first = client.post("/v1/chat/completions", json={**CHAT, "model": "frontier"}, headers=broke_auth)
        assert first.status_code == 200
        gateway.flush_ledger()
        for _ in range(50):  # the settle runs just after the response
            over = client.post("/v1/chat/completions", json={**CHAT, "model": "frontier"}, headers=broke_auth)
            if over.status_code != 200:
                break
        error = assert_error(over, 402, "budget_exceeded")
        assert "budget" in error["message"]
        gateway.flush_ledger()
    # no table of the database holds a secret or its random part after the traffic
    dump = database_text(database_url)
    for key in (secret, broke):
        _, key_id, random_part = key.split("-", 2)
        assert dump.count(key_id) >= 2  # the search does look at the key's row and its usage rows
        assert key not in dump and random_part not in dump
    statuses = sorted(row.status_code for row in ledger_rows(database_url))
    # authenticated requests each have one row; the three 401s have none
    assert statuses.count(403) == 1 and statuses.count(404) == 1 and statuses.count(400) == 3
    assert statuses.count(402) == 1


def test_tokens_per_minute_are_reserved_at_admission_and_refused_with_headers(upstreams, sqlite_url):
    small, frontier = upstreams
    _, secret = create_key(sqlite_url, tokens_per_minute=30)
    with GatewayThread(two_tier(sqlite_url, small, frontier)) as gateway, gateway.client(secret) as client:
        first = client.post("/v1/chat/completions", json={**CHAT, "max_tokens": 20})
        assert first.status_code == 200
        assert first.headers["x-ratelimit-limit-tokens"] == "30"
        # 3 prompt tokens + 20 reserved: another 20 do not fit in the minute
        refused = client.post("/v1/chat/completions", json={**CHAT, "max_tokens": 20})
        error = assert_error(refused, 429, "tokens_per_minute")
        assert "tokens" in error["message"] and int(refused.headers["retry-after"]) >= 1
        assert refused.headers["x-request-id"]


def test_auto_routes_by_score_or_header_and_says_so(upstreams, sqlite_url):
    small, frontier = upstreams
    _, secret = create_key(sqlite_url)
    with GatewayThread(two_tier(sqlite_url, small, frontier)) as gateway, gateway.client(secret) as client:
        easy = client.post("/v1/chat/completions", json={**CHAT, "model": "auto"})
        assert easy.status_code == 200
        assert easy.headers["x-tokenmill-route"] == "auto:small" and easy.json()["model"] == "small-model"
        hard_prompt = ("Explain why this fails, step by step, and prove the fix is optimal:\n"
                       "```python\ndef f(x):\n    return x / 0\n```")
        hard = client.post("/v1/chat/completions", json={
            "model": "auto", "messages": [{"role": "user", "content": hard_prompt}], "max_tokens": 4})
        assert hard.headers["x-tokenmill-route"] == "auto:frontier" and hard.json()["model"] == "frontier-model"
        assert float(hard.headers["x-tokenmill-route-score"]) >= 1.0 > float(easy.headers["x-tokenmill-route-score"])
        forced = client.post("/v1/chat/completions", json={**CHAT, "model": "auto"},
                             headers={"x-tokenmill-route": "frontier"})
        assert forced.headers["x-tokenmill-route"] == "auto:frontier"
        bad = client.post("/v1/chat/completions", json={**CHAT, "model": "auto"},
                          headers={"x-tokenmill-route": "medium"})
        assert_error(bad, 400, "invalid_route")
        metrics = client.get("/metrics").text
        assert 'tokenmill_gateway_route_decisions_total{forced="false",route="auto:frontier"} 1.0' in metrics
        assert 'tokenmill_gateway_requests_total{pool="api",route="auto:frontier",status="200"' in metrics
        gateway.flush_ledger()
    routes = [(row.route, row.tier) for row in ledger_rows(sqlite_url) if row.status_code == 200]
    assert routes == [("auto:small", "self_hosted"), ("auto:frontier", "external"), ("auto:frontier", "external")]


def test_usage_feedback_and_models_belong_to_the_calling_key(upstreams, sqlite_url):
    small, frontier = upstreams
    key_id, secret = create_key(sqlite_url, allowed_models=["small"])
    _, other = create_key(sqlite_url, name="other")
    with GatewayThread(two_tier(sqlite_url, small, frontier)) as gateway, gateway.client(secret) as client:
        models = client.get("/v1/models").json()
        assert [m["id"] for m in models["data"]] == ["small"]
        with gateway.client(other) as other_client:
            assert [m["id"] for m in other_client.get("/v1/models").json()["data"]] == ["small", "frontier", "auto"]
            other_client.post("/v1/chat/completions", json=CHAT)
        answers = [client.post("/v1/chat/completions", json={**CHAT, "stream": stream}) for stream in (False, True)]
        assert sse_data(answers[1].text)[-1] == "[DONE]"
        request_id = answers[0].headers["x-request-id"]
        ok = client.post("/v1/feedback", json={"request_id": request_id, "score": "down", "comment": "too short"})
        assert ok.status_code == 200 and ok.json()["score"] == -1
        assert_error(client.post("/v1/feedback", json={"request_id": request_id, "score": 5}), 400)
        assert_error(client.post("/v1/feedback", json={"score": 1}), 400)
        gateway.flush_ledger()
        usage = client.get("/v1/usage").json()
        assert usage["key_id"] == key_id and usage["totals"]["requests"] == 2  # not the other key's request
        assert usage["totals"]["completion_tokens"] == 8 and usage["feedback"] == {"up": 0, "down": 1}
        assert client.get("/v1/usage", params={"since": "1"}).json()["totals"]["requests"] == 2
        assert_error(client.get("/v1/usage", params={"since": "yesterday"}), 400)
        assert client.get("/health").json()["pools"]["local"] == {
            "tier": "self_hosted", "healthy_upstreams": 1, "upstreams": 1, "queued": 0}


def test_the_admin_api_is_mounted_behind_the_admin_key(upstreams, sqlite_url, monkeypatch):
    small, frontier = upstreams
    monkeypatch.setenv("GATEWAY_TEST_ADMIN_KEY", "admin-secret-for-tests")
    config = two_tier(sqlite_url, small, frontier, admin_key_env="GATEWAY_TEST_ADMIN_KEY")
    with GatewayThread(config) as gateway, gateway.client() as client:
        assert client.get("/admin/keys").status_code == 401
        created = client.post("/admin/keys", json={"name": "made-by-admin", "allowed_models": ["small"]},
                              headers={"authorization": "Bearer admin-secret-for-tests"})
        assert created.status_code == 201, created.text
        secret = created.json()["secret"]
        answer = client.post("/v1/chat/completions", json=CHAT, headers={"authorization": f"Bearer {secret}"})
        assert answer.status_code == 200
