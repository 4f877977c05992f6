"""The HTTP service in process (fastapi TestClient) on a micro base: the auth matrix, validation
errors that name the field, the OpenAPI spec, the /metrics exposition and the user CLI.
Training and generation flows: tests/test_server_training.py."""
from __future__ import annotations

import json
import re

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("httpx")

from oppu.server.metrics import Histogram  # noqa: E402
from oppu.store import AdapterStore  # noqa: E402
from server_common import (A, ADMIN, base, bearer, client, items, new_user, query, svc_client,  # noqa: E402,F401
                           trained_user, wait_job)


# -- auth ----------------------------------------------------------------------------------------
def test_auth_matrix(client):
    a, ta = new_user(client)
    b, tb = new_user(client)
    job_b = client.post(f"/v1/users/{b}/history", json={"task": "LaMP_2M", "items": items("x", 2)}, headers=A)
    job_b = client.post(f"/v1/users/{b}/train", headers=A).json()["job_id"]
    gen = {"task": "LaMP_2M", "input": query("space robot")}
    routes = [("post", "/v1/users/{u}/history", {"task": "LaMP_2M", "items": items("y", 1)}),
              ("post", "/v1/users/{u}/train", None), ("post", "/v1/users/{u}/generate", gen),
              ("post", "/v1/users/{u}/adapter", {"passphrase": "long enough pass"}), ("get", "/v1/users/{u}", None),
              ("post", "/v1/users/{u}/token", None), ("get", "/v1/users/{u}/versions", None),
              ("post", "/v1/users/{u}/rollback", {"version": 1}), ("delete", "/v1/users/{u}", None)]
    admin_only = [("post", "/v1/users", None), ("post", "/v1/users/import", {"export": "AAAA", "passphrase": "x" * 8})]

    def call(method, path, body, headers):
        return client.request(method, path, json=body, headers=headers)

    def raw(method, path, content, headers):  # a body that is not JSON at all
        return client.request(method, path, content=content, headers={**headers, "Content-Type": "application/json"})

    # no token, a malformed header, an unknown token: 401 everywhere, before the body is even looked at
    for headers in ({}, {"Authorization": "Basic " + ADMIN}, {"Authorization": "Bearer"}, bearer("not-a-token")):
        for method, path, body in routes + admin_only:
            for r in (call(method, path.format(u=a), {"garbage": True} if body else None, headers),
                      raw(method, path.format(u=a), b'{"task": [nope', headers)):
                assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer", (method, path, r.text)
        assert client.get(f"/v1/jobs/{job_b}", headers=headers).status_code == 401
    # a user token on another user's paths: 403, one body whether that user exists or not
    bodies = set()
    for other in (b, "no-such-user", "bad id!", "x" * 80):
        for method, path, body in routes:
            for r in (call(method, path.format(u=other), body, bearer(ta)),
                      raw(method, path.format(u=other), b"[[[ not json", bearer(ta))):
                assert r.status_code == 403, (other, method, path, r.text)
                bodies.add(r.text)
    assert bodies == {json.dumps({"detail": "this token may only access its own user"}, separators=(",", ":"))}
    for method, path, body in admin_only:  # a user token on an admin route: 403, the body unread
        for r in (call(method, path, body, bearer(ta)), raw(method, path, b"{oops", bearer(ta))):
            assert r.status_code == 403 and r.json()["detail"] == "this endpoint needs the admin token", r.text
    # jobs: another user's job and an unknown job look the same to a user token
    r1, r2 = client.get(f"/v1/jobs/{job_b}", headers=bearer(ta)), client.get("/v1/jobs/nope", headers=bearer(ta))
    assert r1.status_code == r2.status_code == 403 and r1.text == r2.text
    assert client.get(f"/v1/jobs/{job_b}", headers=bearer(tb)).status_code == 200
    assert client.get("/v1/jobs/nope", headers=A).status_code == 404
    # own paths and the admin token work; the admin learns what exists
    assert client.get(f"/v1/users/{a}", headers=bearer(ta)).json()["active_version"] is None
    assert client.get(f"/v1/users/{b}", headers=A).status_code == 200
    assert client.get("/v1/users/no-such-user", headers=A).status_code == 404
    assert client.get("/healthz").status_code == 200 and client.get("/metrics").status_code == 200
    wait_job(client, job_b, A)


# -- validation ----------------------------------------------------------------------------------
def test_validation_errors_name_the_problem(client):
    uid, tok = new_user(client)
    h = bearer(tok)
    hist, gen = f"/v1/users/{uid}/history", f"/v1/users/{uid}/generate"
    cases = [
        (hist, {"task": "LaMP_2M"}, 422, "body.items: Field required"),
        (hist, {"task": "LaMP_2M", "items": []}, 422, "body.items: List should have at least 1 item"),
        (hist, {"task": "LaMP_2M", "items": items("m", 1001)}, 422, "body.items: List should have at most 1000"),
        (hist, {"task": "LaMP_2M", "items": items("e", 1), "extra": 1}, 422, "body.extra: Extra inputs"),
        (hist, {"task": "LaMP_2M", "items": [{"id": "z", "description": "d"}]}, 422, "missing field 'tag'"),
        (hist, {"task": "LaMP_2M", "items": [{"id": "z", "description": 3, "tag": "t"}]}, 422,
         "field 'description' must be a string"),
        (hist, {"task": "LaMP_2M", "items": ["x"]}, 422, "body.items.0"),
        (hist, {"task": "LaMP_4", "items": items("t", 1)}, 422, "serves task 'LaMP_2M', not 'LaMP_4'"),
        (hist, {"task": "LaMP_99", "items": items("t", 1)}, 422, "unknown task 'LaMP_99'"),
        (gen, {"task": "LaMP_2M", "input": "x" * 9000}, 422, "body.input: String should have at most 8192"),
        (gen, {"task": "LaMP_2M", "input": ""}, 422, "body.input: String should have at least 1"),
        (gen, {"task": "LaMP_2M", "input": "q", "k": -1}, 422, "body.k: Input should be greater than or equal"),
        (gen, {"task": "LaMP_2M", "input": "q", "k": "many"}, 422, "body.k"),
        (gen, {"task": "LaMP_2M", "input": "q", "k": True}, 422, "body.k: Input should be a valid integer"),
        (gen, {"task": "LaMP_2M", "input": "q", "k": "2"}, 422, "body.k: Input should be a valid integer"),
        (f"/v1/users/{uid}/adapter", {"passphrase": "short"}, 422, "body.passphrase: String should have at least 8"),
        (f"/v1/users/{uid}/adapter", {}, 422, "body.passphrase: Field required"),
        (f"/v1/users/{uid}/adapter", {"passphrase": "long enough", "history": 1}, 422,
         "body.history: Input should be a valid boolean"),
        (f"/v1/users/{uid}/rollback", {"version": True}, 422, "body.version: Input should be a valid integer"),
        (f"/v1/users/{uid}/rollback", {"version": 0}, 422, "body.version: Input should be greater than or equal"),
        (gen, {"task": "LaMP_2M", "input": "q"}, 404, "has no adapter yet"),
        (f"/v1/users/{uid}/train", None, 409, "has no history"),
    ]
    for path, body, status, msg in cases:
        r = client.post(path, json=body, headers=h)
        assert r.status_code == status and msg in r.json()["detail"], (path, body, r.status_code, r.text)
    raw = [(b'{"task": "LaMP_2M", "items": [', 422, "JSON decode error"),
           (b'{"task": "LaMP_2M", "input": "\\ud800 lone"}', 422, "body.input: Input should be a valid string"),
           (b"[" * 100_000, 400, "error parsing the body: RecursionError"),
           (b'{"task": "LaMP_2M", "input": "q", "k": NaN}', 422, "body: NaN is not a JSON number"),
           (b'{"task": "LaMP_2M", "input": "q", "k": -Infinity}', 422, "body: -Infinity is not a JSON number"),
           (b'{"task": "LaMP_2M", "input": "q", "k": 1e999}', 422, "body: number 1e999 is too large to be finite"),
           (b"x" * ((1 << 20) + 1), 413, "limit of 1048576 bytes")]
    for content, status, msg in raw:
        r = client.post(gen, content=content, headers={**h, "Content-Type": "application/json"})
        assert r.status_code == status and msg in r.json()["detail"], (content[:40], r.text)
    item = b'{"task": "LaMP_2M", "items": [{"id": "s", "description": "\\udfff", "tag": "t"}]}'
    r = client.post(hist, content=item, headers={**h, "Content-Type": "application/json"})
    assert r.status_code == 422 and "items[0].description: text must be valid Unicode" in r.json()["detail"]
    streamed = client.post(hist, content=(b"x" * 65536 for _ in range(20)),  # chunked: no Content-Length
                           headers={**h, "Content-Type": "application/json"})
    assert streamed.status_code == 413 and "1048576" in streamed.json()["detail"]
    nan = b'{"task": "LaMP_2M", "items": [{"id": "n", "description": "d", "tag": "t", "score": NaN}]}'
    r = client.post(hist, content=nan, headers={**h, "Content-Type": "application/json"})
    assert r.status_code == 422 and "NaN is not a JSON number" in r.json()["detail"]  # never stored, never exported
    r = client.post("/v1/users/bad%20id/adapter", json={"passphrase": "long enough"}, headers=A)
    assert r.status_code == 422 and r.json()["detail"].startswith("path.user_id: String should match pattern")
    r = client.post("/v1/users/import", json={"export": "not base64!", "passphrase": "long enough"}, headers=A)
    assert r.status_code == 422 and "body.export: Value error, must be the export file in standard base64" in \
        r.json()["detail"], r.text
    assert client.get(f"/v1/users/{uid}", headers=h).json()["history_items"] == 0  # nothing half-stored


# -- spec and metrics ----------------------------------------------------------------------------
def test_openapi_spec_lists_every_route_with_bearer_auth(client):
    spec = client.get("/openapi.json").json()
    assert {"/v1/users", "/v1/users/{user_id}", "/v1/users/{user_id}/history", "/v1/users/{user_id}/train",
            "/v1/jobs/{job_id}", "/v1/users/{user_id}/generate", "/v1/users/{user_id}/adapter", "/healthz",
            "/metrics", "/v1/users/import", "/v1/users/{user_id}/token", "/v1/users/{user_id}/versions",
            "/v1/users/{user_id}/rollback", "/scrub"} == set(spec["paths"])
    assert spec["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"
    assert spec["paths"]["/v1/users/{user_id}/generate"]["post"]["security"] == [{"HTTPBearer": []}]


SAMPLE = re.compile(r'^[a-zA-Z_:][a-zA-Z0-9_:]*(\{([a-zA-Z_][a-zA-Z0-9_]*="([^"\\]|\\.)*",?)*\})? '
                    r'(-?[0-9.]+(e[+-]?[0-9]+)?|\+Inf|-Inf|NaN)$')


def test_metrics_exposition(client):
    uid, tok = trained_user(client)
    client.post(f"/v1/users/{uid}/generate", json={"task": "LaMP_2M", "input": query("dream")}, headers=bearer(tok))
    client.get("/v1/users/nope", headers={})
    r = client.get("/metrics")
    assert r.headers["content-type"].startswith("text/plain; version=0.0.4")
    text = r.text
    for line in text.strip().splitlines():
        assert line.startswith("# HELP ") or line.startswith("# TYPE ") or SAMPLE.match(line), line
    for name in ("oppu_http_requests_total", "oppu_generate_latency_seconds_bucket",
                 "oppu_generate_latency_seconds_sum", "oppu_generate_latency_seconds_count",
                 "oppu_generate_batch_rows_bucket", 'oppu_jobs{status="done"}', 'oppu_jobs{status="failed"}',
                 "oppu_users ", "oppu_adapters_loaded "):
        assert name in text, name
    assert 'oppu_http_requests_total{method="POST",route="/v1/users/{user_id}/generate",status="200"}' in text
    assert 'route="/v1/users/{user_id}",status="401"' in text
    assert uid not in text and tok not in text
    for method in ("BREW", "PROPFIND", "X" * 60):  # made-up methods, unauthenticated: no new series
        client.request(method, "/v1/users/nope")
    text = client.get("/metrics").text
    methods = set(re.findall(r'oppu_http_requests_total\{method="([^"]*)"', text))
    assert methods <= {"GET", "POST", "DELETE", "other"} and "other" in methods, methods


def test_histogram_buckets_are_cumulative():
    h = Histogram("x_seconds", "help", (0.1, 1.0))
    for v in (0.05, 0.1, 0.5, 3.0):
        h.observe(v)
    assert h.render()[2:] == ['x_seconds_bucket{le="0.1"} 2', 'x_seconds_bucket{le="1.0"} 3',
                              'x_seconds_bucket{le="+Inf"} 4', "x_seconds_sum 3.65", "x_seconds_count 4"]


# -- the CLI -------------------------------------------------------------------------------------
def test_user_commands_manage_the_store(tmp_path):
    from typer.testing import CliRunner

    from oppu.cli_serve import app

    run = CliRunner().invoke
    store = str(tmp_path / "store")
    created = json.loads(run(app, ["user", "create", "--store", store]).stdout)
    listed = [json.loads(ln) for ln in run(app, ["user", "list", "--store", store]).stdout.splitlines()]
    assert listed == [{"user_id": created["user_id"], "task": None, "active_version": None, "versions": [],
                       "history_items": 0}]
    fresh = json.loads(run(app, ["user", "token", created["user_id"], "--store", store, "--revoke"]).stdout)
    assert fresh["revoked"] == 1 and fresh["token"] != created["token"]
    with AdapterStore(store) as st:
        assert st.tokens.user_for(created["token"]) is None and st.tokens.user_for(fresh["token"]) == created["user_id"]
    refused = run(app, ["user", "delete", created["user_id"], "--store", store])
    assert refused.exit_code == 2 and "--yes" in refused.output
    assert run(app, ["user", "delete", created["user_id"], "--store", store, "--yes"]).exit_code == 0
    gone = run(app, ["user", "token", created["user_id"], "--store", store])
    assert gone.exit_code == 2 and "unknown user" in gone.output


def test_serve_refuses_to_start_without_a_real_admin_token(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from oppu.cli_serve import app

    monkeypatch.delenv("OPPU_ADMIN_TOKEN", raising=False)
    r = CliRunner().invoke(app, ["serve", "--store", str(tmp_path / "s")])
    assert r.exit_code == 2 and "set OPPU_ADMIN_TOKEN or pass --admin-token-file" in r.output
    (tmp_path / "tok").write_text("short\n")
    r = CliRunner().invoke(app, ["serve", "--store", str(tmp_path / "s"), "--admin-token-file", str(tmp_path / "tok")])
    assert r.exit_code == 2 and "at least 16 characters" in r.output
    r = CliRunner().invoke(app, ["serve", "--store", str(tmp_path / "s"), "--admin-token-file", str(tmp_path / "no")])
    assert r.exit_code == 2 and "cannot read --admin-token-file" in r.output
