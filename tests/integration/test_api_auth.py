"""Tokens on the HTTP API (issue 24): every route refuses no token and a wrong token
with 401 and a too-low role with 403, in the error envelope; /health and /metrics (the
default STREAMETL_API_OPEN_PATHS) stay open; tokens never reach the log."""

from __future__ import annotations

import secrets

import pytest

from app.api_auth import RANK, required_role
from app.settings import Settings
from tests.support import Worker, http, unique

TOKENS = {role: f"{role}-{secrets.token_hex(12)}" for role in ("read", "write", "admin")}
PARAMS = {"{window_id}": "w", "{name}": "users", "{key}": "1"}
#: Open without a token by default (a Prometheus scrape, a load balancer's check).
OPEN_PATHS = set(Settings().api_open_paths.split(","))


@pytest.fixture(scope="module")
def worker(kafka):
    name = unique("auth")
    env = {"STREAMETL_API_TOKENS": ",".join(f"{r}:{t}" for r, t in TOKENS.items())}
    w = Worker(app_id=name, topic_prefix=f"{name}.", env=env).start(timeout=150)
    yield w
    w.kill()


def call(worker: Worker, method: str, path: str, token: str | None) -> tuple[int, object]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    body = {} if method in {"POST", "PUT"} else None
    return http(method, worker.url + path, body, headers=headers)


def routes(worker: Worker) -> list[tuple[str, str]]:
    status, index = call(worker, "GET", "/api/v1", TOKENS["read"])
    assert status == 200, index
    found = []
    for endpoint in index["endpoints"]:
        path = endpoint["path"]
        for placeholder, value in PARAMS.items():
            path = path.replace(placeholder, value)
        found += [(method, path) for method in endpoint["methods"]]
    return found


def test_every_route_refuses_a_missing_or_wrong_token_and_a_low_role(worker):
    checked = 0
    for method, path in routes(worker):
        if path in OPEN_PATHS:
            continue
        for token in (None, "not-a-token", TOKENS["read"] + "x"):
            status, reply = call(worker, method, path, token)
            assert status == 401, (method, path, token, reply)
            assert reply["error"]["code"] == "unauthorized"
        needed = required_role(method, path)
        for role, token in TOKENS.items():
            status, reply = call(worker, method, path, token)
            if RANK[role] < RANK[needed]:
                assert status == 403, (method, path, role, reply)
                assert reply["error"]["code"] == "forbidden"
            else:
                assert status not in (401, 403), (method, path, role, reply)
        checked += 1
    assert checked >= 12


def test_a_read_token_cannot_produce_and_a_write_token_can(worker):
    body = {"topic": worker.topic_prefix + "events", "messages": [{"user_id": "u1"}]}
    headers = {"Authorization": f"Bearer {TOKENS['read']}"}
    assert http("POST", worker.url + "/api/v1/produce", body, headers=headers)[0] == 403
    headers = {"Authorization": f"Bearer {TOKENS['write']}"}
    status, reply = http("POST", worker.url + "/api/v1/produce", body, headers=headers)
    assert status == 200 and reply["count"] == 1, reply


def test_health_stays_open_and_faust_routes_are_closed(worker):
    assert OPEN_PATHS == {"/health", "/metrics"}
    assert http("GET", worker.url + "/health")[0] == 200
    assert http("GET", worker.url + "/metrics")[0] == 200
    assert http("GET", worker.url + "/")[0] == 401


def test_tokens_never_reach_the_log(worker):
    log = worker.log_path.read_text(errors="replace")
    for token in TOKENS.values():
        assert token not in log
