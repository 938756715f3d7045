"""Every route declares its scope, and the Guard holds it from the headers (no Ray: the ASGI app is
called directly)."""

import asyncio

import pytest
from fastapi import APIRouter, FastAPI

from deployments.app import app
from deployments.guard import OPEN, Guard, declared_scopes, needs
from deployments.tokens import Scope, new_token

ADMIN = "the-admin-token-of-24-characters-or-more"

# Every route of the API and the scope it needs (None: open). A new route is added here on purpose.
ROUTES = {
    ("GET", "/healthz"): None,
    ("GET", "/"): None,
    ("GET", "/console/console.js"): None,
    ("GET", "/console/console.css"): None,
    ("GET", "/console/plotly.min.js"): None,
    ("POST", "/v1/telemetry"): "ingest",
    ("POST", "/v1/battery/score"): "read:aggregates",
    ("GET", "/v1/forecast/usage"): "admin",  # exact: no private release yet
    ("GET", "/v1/anomalies/regions"): "admin",  # exact: no private release yet
    ("GET", "/v1/segments"): "admin",  # exact: no private release yet
    ("GET", "/v1/firmware/regressions"): "admin",  # exact: no private release yet
    ("GET", "/v1/analytics/{query}"): "read:aggregates",
    ("GET", "/v1/privacy/budget"): "read:aggregates",
    ("GET", "/v1/cohorts"): "read:aggregates",
    ("POST", "/v1/cohorts"): "admin",  # a write
    ("GET", "/v1/devices/{device_id}/battery-health"): "read:devices",
    ("GET", "/v1/devices/{device_id}/timeline"): "read:devices",
    ("DELETE", "/v1/devices/{device_id}"): "admin",  # erasure
}


def call(asgi, method: str, path: str, token: str | None = None) -> tuple[int, str]:
    """One request through the ASGI app: its status and body."""
    headers = [(b"authorization", f"Bearer {token}".encode())] if token else []
    scope = {"type": "http", "method": method, "path": path, "raw_path": path.encode(), "root_path": "",
             "query_string": b"", "headers": headers, "scheme": "http", "server": ("test", 80),
             "client": ("test", 1), "asgi": {"version": "3.0"}, "http_version": "1.1"}
    sent = []

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message):
        sent.append(message)

    try:
        asyncio.run(asgi(scope, receive, send))
    except Exception:  # past the Guard, a route that needs Serve: Starlette answered 500 first
        pass
    status = next(m["status"] for m in sent if m["type"] == "http.response.start")
    return status, b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body").decode()


@pytest.fixture
def tokens(monkeypatch, tmp_path):
    """An admin token, and one token per other scope in a tokens file."""
    import yaml

    made = {s: new_token(s.value, [s]) for s in Scope if s is not Scope.admin}
    (tmp_path / "tokens.yaml").write_text(yaml.safe_dump([entry for _, entry in made.values()]))
    monkeypatch.setenv("PODPULSE_API_TOKEN", ADMIN)
    monkeypatch.setenv("PODPULSE_API_TOKENS_FILE", str(tmp_path / "tokens.yaml"))
    return {"admin": ADMIN} | {s.value: token for s, (token, _) in made.items()}


def test_every_route_declares_its_scope():
    assert declared_scopes(app.routes) == ROUTES


def test_each_route_answers_only_a_token_with_its_scope(tokens):
    for (method, path), need in ROUTES.items():
        path = path.format(device_id="ap-1", query="usage_trend")
        if need is None:
            continue
        assert call(app, method, path)[0] == 401, path
        for scope, token in tokens.items():
            status, body = call(app, method, path, token)
            if scope in (need, "admin"):
                assert status != 403, (path, scope, body)  # past the Guard (the route itself needs Serve)
            else:
                assert status == 403 and repr(need) in body, (path, scope, status, body)
    assert call(app, "GET", "/healthz") == (200, '{"status":"ok"}')
    assert call(app, "GET", "/console/console.js")[0] == 200
    assert call(app, "GET", "/console/secrets.txt")[0] == 401  # not a console file: an unknown path
    assert call(app, "GET", "/v1/no-such-route")[0] == 401  # no token: nothing is said of what exists
    assert call(app, "GET", "/v1/no-such-route", tokens["ingest"])[0] == 404


def test_a_route_without_a_declared_scope_is_refused(tokens):
    router = APIRouter()

    @router.get("/declared", dependencies=[needs(Scope.read_aggregates)])
    def declared() -> dict:
        return {}

    @router.get("/open", dependencies=[OPEN])
    def open_() -> dict:
        return {}

    @router.get("/forgotten")
    def forgotten() -> dict:
        return {}

    made = FastAPI()
    made.include_router(router)
    made.add_middleware(Guard)
    with pytest.raises(ValueError, match="routes without one declared scope .*: GET /forgotten"):
        declared_scopes(made.routes)
    assert call(made, "GET", "/declared", tokens["admin"])[0] == 200
    assert call(made, "GET", "/open")[0] == 200
    assert call(made, "GET", "/forgotten")[0] == 401
    status, body = call(made, "GET", "/forgotten", tokens["admin"])  # fail closed: not even admin
    assert status == 403 and "declares no scope" in body
