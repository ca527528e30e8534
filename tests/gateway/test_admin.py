"""The admin HTTP API: guarded by the admin key, keys managed end to end, errors in the OpenAI shape."""
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from tokenmill.gateway.admin import build_admin_router
from tokenmill.gateway.keys import KeyStore
from tokenmill.gateway.ledger import Ledger, UsageRecord
from tokenmill.gateway.store import open_database
from tokenmill.server.errors import install_error_handlers

ADMIN_KEY = "admin-key-for-tests-0123456789"
AUTH = {"Authorization": f"Bearer {ADMIN_KEY}"}


def build(database_url: str, admin_key: str | None = ADMIN_KEY):
    database = open_database(database_url)
    store, ledger = KeyStore(database), Ledger(database, flush_interval_s=0.01)
    app = FastAPI()
    install_error_handlers(app)
    app.include_router(build_admin_router(store, ledger, admin_key))
    return TestClient(app), store, ledger


def assert_error(response, status: int, text: str) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert text in error["message"]
    return error


def test_without_an_admin_key_the_api_is_disabled(sqlite_url):
    client, _, _ = build(sqlite_url, admin_key=None)
    for method, path in (("GET", "/admin/keys"), ("POST", "/admin/keys"), ("DELETE", "/admin/keys/abc")):
        response = client.request(method, path, headers={"Authorization": "Bearer anything"})
        assert_error(response, 403, "the admin API is disabled")


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": ADMIN_KEY},
                                     {"Authorization": f"Basic {ADMIN_KEY}"}])
def test_a_missing_or_wrong_admin_key_gets_401(sqlite_url, headers):
    client, store, _ = build(sqlite_url)
    response = client.post("/admin/keys", json={"name": "x"}, headers=headers)
    assert_error(response, 401, "a valid admin key is required")
    assert response.headers["www-authenticate"] == "Bearer"
    assert store.list(include_revoked=True) == []


def test_create_returns_the_secret_once_and_it_authenticates(database_url):
    client, store, _ = build(database_url)
    response = client.post("/admin/keys", headers=AUTH, json={
        "name": "team-a", "allowed_models": ["gemma-3-270m", "auto"],
        "limits": {"requests_per_minute": 60, "tokens_per_minute": 10000, "monthly_budget_usd": 25},
        "allow_overflow": False})
    assert response.status_code == 201
    created = response.json()
    secret = created["secret"]
    assert "shown only once" in created["warning"]
    assert store.authenticate(secret).key_id == created["id"]
    assert created["limits"] == {"requests_per_minute": 60, "tokens_per_minute": 10000, "max_concurrent": None,
                                 "monthly_budget_usd": 25.0, "max_tokens": None}
    assert created["allowed_models"] == ["gemma-3-270m", "auto"] and created["allow_overflow"] is False

    shown = client.get(f"/admin/keys/{created['id']}", headers=AUTH)
    assert shown.status_code == 200
    listed = client.get("/admin/keys", headers=AUTH).json()
    assert [key["id"] for key in listed["data"]] == [created["id"]]
    random_part = secret.split("-", 2)[2]
    for body in (shown.text, client.get("/admin/keys", headers=AUTH).text):
        assert random_part not in body and "secret" not in body


def test_patch_changes_only_what_it_names(sqlite_url):
    client, store, _ = build(sqlite_url)
    created = client.post("/admin/keys", headers=AUTH, json={
        "name": "team-a", "limits": {"requests_per_minute": 60, "max_concurrent": 4}}).json()
    response = client.patch(f"/admin/keys/{created['id']}", headers=AUTH,
                            json={"limits": {"max_concurrent": None, "tokens_per_minute": 500}})
    assert response.status_code == 200
    assert response.json()["limits"] == {"requests_per_minute": 60, "tokens_per_minute": 500, "max_concurrent": None,
                                         "monthly_budget_usd": None, "max_tokens": None}
    response = client.patch(f"/admin/keys/{created['id']}", headers=AUTH,
                            json={"allowed_models": ["gpt-4o*"], "allow_overflow": False})
    updated = response.json()
    assert updated["allowed_models"] == ["gpt-4o*"] and updated["allow_overflow"] is False
    assert updated["limits"]["tokens_per_minute"] == 500
    assert store.authenticate(created["secret"]).allows_model("gpt-4o-mini")


def test_delete_revokes_at_once(database_url):
    client, store, _ = build(database_url)
    created = client.post("/admin/keys", headers=AUTH, json={"name": "leaving"}).json()
    assert store.authenticate(created["secret"]) is not None
    response = client.delete(f"/admin/keys/{created['id']}", headers=AUTH)
    assert response.status_code == 200 and response.json()["revoked_at"] is not None
    assert store.authenticate(created["secret"]) is None
    assert client.get("/admin/keys", headers=AUTH).json()["data"] == []
    assert len(client.get("/admin/keys?include_revoked=true", headers=AUTH).json()["data"]) == 1


def test_usage_of_a_key(sqlite_url):
    client, _, ledger = build(sqlite_url)
    created = client.post("/admin/keys", headers=AUTH, json={"name": "user"}).json()
    ledger.start()
    for index, status in enumerate((200, 200, 429)):
        ledger.record(UsageRecord(f"r{index}", created["id"], "gemma", "direct", "r1", "self", status, 10, 20, 0.1,
                                  0.3, 0.01))
    ledger.record(UsageRecord("other", "someone-else", "gemma", "direct", "r1", "self", 200, 1, 1, 0.1, 0.3, 5.0))
    ledger.close()
    response = client.get(f"/admin/keys/{created['id']}/usage", headers=AUTH)
    assert response.status_code == 200
    totals = response.json()["totals"]
    assert totals["requests"] == 3 and totals["errors"] == 1 and totals["total_tokens"] == 90
    assert totals["cost_usd"] == pytest.approx(0.03)
    future = client.get(f"/admin/keys/{created['id']}/usage", params={"since": "2999-01-01T00:00:00"},
                        headers=AUTH).json()
    assert future["totals"]["requests"] == 0
    assert_error(client.get(f"/admin/keys/{created['id']}/usage", params={"since": "yesterday"}, headers=AUTH),
                 400, "since")


def test_unknown_keys_and_bad_bodies_get_clear_errors(sqlite_url):
    client, _, _ = build(sqlite_url)
    for method, path in (("GET", "/admin/keys/nope"), ("PATCH", "/admin/keys/nope"), ("DELETE", "/admin/keys/nope"),
                         ("GET", "/admin/keys/nope/usage")):
        error = assert_error(client.request(method, path, headers=AUTH, json={}), 404, "no API key with id 'nope'")
        assert error["type"] == "not_found_error"
    assert_error(client.post("/admin/keys", headers=AUTH, json={"name": ""}), 400, "name")
    assert_error(client.post("/admin/keys", headers=AUTH, json={"name": "x", "limits": {"requests_per_minute": 0}}),
                 400, "requests_per_minute")
    assert_error(client.post("/admin/keys", headers=AUTH, json={"name": "x", "limits": {"rpm": 5}}), 400, "rpm")
    assert_error(client.post("/admin/keys", headers={**AUTH, "Content-Type": "application/json"},
                             content=b"{not json"), 400, "not valid JSON")
