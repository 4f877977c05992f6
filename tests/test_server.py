"""The HTTP service in process (fastapi TestClient) on a micro base: the auth matrix, validation
errors that name the field, the full create -> history -> train -> generate -> update -> export
-> delete flow, mixed-adapter batches equal to one-user generation, training beside generation,
job recovery at startup, and the /metrics exposition."""
from __future__ import annotations

import copy
import json
import random
import re
import threading
import time

import pytest
import torch

pytest.importorskip("fastapi")
pytest.importorskip("httpx")

from fastapi.testclient import TestClient  # noqa: E402

from oppu import crypto  # noqa: E402
from oppu.config import UserTrainConfig  # noqa: E402
from oppu.server import ServeConfig, Service, create_app, open_base  # noqa: E402
from oppu.server.metrics import Histogram  # noqa: E402
from oppu.store import AdapterStore  # noqa: E402
from oppu.store.bundle import unpack  # noqa: E402
from oppu.tasks import get_task  # noqa: E402

TASK = get_task("LaMP_2M")
ADMIN = "test-admin-token-0123456789"
A = {"Authorization": f"Bearer {ADMIN}"}
WORDS = "space robot love city war dream ship crime family future past king magic detective".split()
UCFG = UserTrainConfig(epochs=2, batch_size=8, lr=5e-3)


def items(prefix: str, n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(f"{prefix}{seed}")
    return [{"id": f"{prefix}{i}", "description": " ".join(rng.choice(WORDS) for _ in range(6)),
             "tag": rng.choice(TASK.labels[:4])} for i in range(n)]


def query(desc: str) -> str:
    return TASK.instruction.format(description=desc)


def bearer(token: str) -> dict:
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a shared 2-core machine: more threads only contend
    root = tmp_path_factory.mktemp("bases")
    model, tok, info = open_base("tiny:micro", "LaMP_2M", root, base_epochs=0)  # the `--base tiny` path
    assert info["source"] == "tiny:micro" and (root / "bases").is_dir()
    yield model, tok, info
    torch.set_num_threads(threads)


def make_service(base, root, **kw) -> Service:
    """A service on its own copy of the pristine base: a running service wraps its base's linears."""
    model, tok, info = base
    cfg = ServeConfig(task="LaMP_2M", user_train=UCFG, k=2, max_len=128, **kw)
    return Service(AdapterStore(root), copy.deepcopy(model), tok, cfg, ADMIN, info)


@pytest.fixture(scope="module")
def svc_client(base, tmp_path_factory):
    svc = make_service(base, tmp_path_factory.mktemp("store"))
    with TestClient(create_app(svc)) as c:
        yield svc, c
    svc.store.close()


@pytest.fixture
def client(svc_client):
    return svc_client[1]


def new_user(c) -> tuple[str, str]:
    r = c.post("/v1/users", headers=A)
    assert r.status_code == 201, r.text
    return r.json()["user_id"], r.json()["token"]


def wait_job(c, job_id: str, headers: dict, timeout: float = 60.0) -> dict:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        j = c.get(f"/v1/jobs/{job_id}", headers=headers).json()
        if j["status"] in ("done", "failed"):
            return j
        time.sleep(0.02)
    raise AssertionError(f"job {job_id} did not finish in {timeout}s: {j}")


def trained_user(c, n: int = 6, seed: int = 0) -> tuple[str, str]:
    uid, tok = new_user(c)
    assert c.post(f"/v1/users/{uid}/history", json={"task": "LaMP_2M", "items": items("h", n, seed)},
                  headers=bearer(tok)).status_code == 200
    job = c.post(f"/v1/users/{uid}/train", headers=bearer(tok)).json()
    assert wait_job(c, job["job_id"], bearer(tok))["status"] == "done"
    return uid, tok


# -- auth ----------------------------------------------------------------------------------------
def test_auth_matrix(client):
    a, ta = new_user(client)
    b, tb = new_user(client)
    job_b = client.post(f"/v1/users/{b}/history", json={"task": "LaMP_2M", "items": items("x", 2)}, headers=A)
    job_b = client.post(f"/v1/users/{b}/train", headers=A).json()["job_id"]
    gen = {"task": "LaMP_2M", "input": query("space robot")}
    routes = [("post", "/v1/users/{u}/history", {"task": "LaMP_2M", "items": items("y", 1)}),
              ("post", "/v1/users/{u}/train", None), ("post", "/v1/users/{u}/generate", gen),
              ("get", "/v1/users/{u}/adapter", None), ("get", "/v1/users/{u}", None),
              ("delete", "/v1/users/{u}", None)]

    def call(method, path, body, headers):
        return client.request(method, path, json=body, headers={**headers, "X-Oppu-Passphrase": "long enough pass"})

    # no token, a malformed header, an unknown token: 401 everywhere, before the body is even looked at
    for headers in ({}, {"Authorization": "Basic " + ADMIN}, {"Authorization": "Bearer"}, bearer("not-a-token")):
        for method, path, body in routes + [("post", "/v1/users", None)]:
            r = call(method, path.format(u=a), {"garbage": True} if body else None, headers)
            assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer", (method, path, r.text)
        assert client.get(f"/v1/jobs/{job_b}", headers=headers).status_code == 401
    # a user token on another user's paths: 403, one body whether that user exists or not
    bodies = set()
    for other in (b, "no-such-user", "bad id!", "x" * 80):
        for method, path, body in routes:
            r = call(method, path.format(u=other), body, bearer(ta))
            assert r.status_code == 403, (other, method, path, r.text)
            bodies.add(r.text)
    assert bodies == {json.dumps({"detail": "this token may only access its own user"}, separators=(",", ":"))}
    assert client.post("/v1/users", headers=bearer(ta)).status_code == 403
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
        (gen, {"task": "LaMP_2M", "input": "q"}, 404, "has no adapter yet"),
        (f"/v1/users/{uid}/train", None, 409, "has no history"),
    ]
    for path, body, status, msg in cases:
        r = client.post(path, json=body, headers=h)
        assert r.status_code == status and msg in r.json()["detail"], (path, body, r.status_code, r.text)
    raw = [(b'{"task": "LaMP_2M", "items": [', 422, "JSON decode error"),
           (b'{"task": "LaMP_2M", "input": "\\ud800 lone"}', 422, "body.input: Input should be a valid string"),
           (b"[" * 100_000, 400, "error parsing the body: RecursionError"),
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
    r = client.get(f"/v1/users/{uid}/adapter", headers={**h, "X-Oppu-Passphrase": "short"})
    assert r.status_code == 422 and r.json()["detail"].startswith("header.X-Oppu-Passphrase: String should have")
    r = client.get(f"/v1/users/{uid}/adapter", headers=h)
    assert r.status_code == 422 and "X-Oppu-Passphrase: Field required" in r.json()["detail"]
    r = client.get("/v1/users/bad%20id/adapter", headers={**A, "X-Oppu-Passphrase": "long enough"})
    assert r.status_code == 422 and r.json()["detail"].startswith("path.user_id: String should match pattern")
    assert client.get(f"/v1/users/{uid}", headers=h).json()["history_items"] == 0  # nothing half-stored


# -- the whole flow ------------------------------------------------------------------------------
def test_full_flow_create_history_train_generate_update_export_delete(svc_client):
    svc, c = svc_client
    uid, tok = new_user(c)
    h = bearer(tok)
    r = c.post(f"/v1/users/{uid}/history", json={"task": "LaMP_2M", "items": items("a", 6)}, headers=h)
    assert r.json() == {"user_id": uid, "added": 6, "last_seq": 6}
    job = c.post(f"/v1/users/{uid}/train", headers=h)
    assert job.status_code == 202 and job.json()["kind"] == "train" and job.json()["status"] in ("queued", "running")
    assert c.post(f"/v1/users/{uid}/train", headers=h).status_code in (202, 409)  # 409 while the job is unfinished
    done = wait_job(c, job.json()["job_id"], h)
    assert done["status"] == "done" and done["version"] == 1 and done["error"] is None
    q = query("space robot war ship")
    g = c.post(f"/v1/users/{uid}/generate", json={"task": "LaMP_2M", "input": q}, headers=h)
    assert g.status_code == 200 and g.json()["adapter_version"] == 1
    assert g.json()["output"] == svc.p.generate(uid, [q]).outputs[0]  # batcher path == one-user path
    # an incremental update: the server reloads the user's new active version
    assert c.post(f"/v1/users/{uid}/history", json={"task": "LaMP_2M", "items": items("b", 3)},
                  headers=h).status_code == 200
    up = c.post(f"/v1/users/{uid}/train", headers=h).json()
    assert up["kind"] == "update"
    assert wait_job(c, up["job_id"], h)["version"] == 2
    g2 = c.post(f"/v1/users/{uid}/generate", json={"task": "LaMP_2M", "input": q, "k": 0}, headers=h).json()
    assert g2["adapter_version"] == 2 and g2["output"] == svc.p.generate(uid, [q], k=0).outputs[0]
    r = c.post(f"/v1/users/{uid}/train", headers=h)
    assert r.status_code == 409 and "nothing to update" in r.json()["detail"]
    info = c.get(f"/v1/users/{uid}", headers=h).json()
    assert info == {"user_id": uid, "task": "LaMP_2M", "active_version": 2, "versions": [1, 2], "history_items": 9}
    # export: decrypts with the passphrase to the active version's files and the history
    ex = c.get(f"/v1/users/{uid}/adapter", headers={**h, "X-Oppu-Passphrase": "correct horse battery"})
    assert ex.status_code == 200 and ex.headers["content-type"] == "application/octet-stream"
    assert ex.headers["x-oppu-adapter-version"] == "2"
    with pytest.raises(crypto.DecryptionError):
        crypto.decrypt(ex.content, "wrong passphrase")
    bundle = unpack(crypto.decrypt(ex.content, "correct horse battery"))
    assert bundle.user_id == uid and bundle.adapter["version"] == 2
    assert bundle.files == svc.store.read_version_files(uid, 2)
    assert [it["id"] for _, it in bundle.history] == [f"a{i}" for i in range(6)] + [f"b{i}" for i in range(3)]
    nohist = c.get(f"/v1/users/{uid}/adapter?history=false", headers={**h, "X-Oppu-Passphrase": "correct horse"})
    assert unpack(crypto.decrypt(nohist.content, "correct horse")).history is None
    # delete: the token stops working, the admin sees 404, the adapter leaves the serving model
    assert c.delete(f"/v1/users/{uid}", headers=h).json() == {"user_id": uid, "deleted": True}
    assert c.get(f"/v1/users/{uid}", headers=h).status_code == 401
    for method, path in (("get", f"/v1/users/{uid}"), ("delete", f"/v1/users/{uid}"),
                         ("post", f"/v1/users/{uid}/train")):
        assert c.request(method, path, headers=A).status_code == 404
    assert uid not in svc.batcher.mm.users and not svc.store.has_user(uid)
    assert uid not in c.get("/metrics").text


def test_concurrent_users_share_batches_and_match_single_user_generation(svc_client):
    svc, c = svc_client
    users = [trained_user(c, n=4 + i, seed=i) for i in range(4)]
    qs = [query(" ".join(random.Random(i).sample(WORDS, 4))) for i in range(8)]
    before = svc.metrics.batch_rows._counts[:]
    futs = [(uid, q, svc.submit_generate(uid, "LaMP_2M", q)) for uid, _ in users for q in qs[:2]]
    for uid, q, f in futs:
        text, version = f.result(timeout=60)
        assert version == 1 and text == svc.p.generate(uid, [q]).outputs[0], uid
    after = svc.metrics.batch_rows._counts
    multi_row_batches = sum(a - b for a, b in zip(after[1:], before[1:]))
    assert multi_row_batches >= 1  # 8 requests submitted at once did not go one by one
    # concurrent HTTP requests from several users all succeed
    out, errs = [], []

    def hit(uid, tok):
        r = c.post(f"/v1/users/{uid}/generate", json={"task": "LaMP_2M", "input": qs[0]}, headers=bearer(tok))
        (out if r.status_code == 200 else errs).append(r.text)

    ts = [threading.Thread(target=hit, args=u) for u in users for _ in range(2)]
    [t.start() for t in ts]
    [t.join() for t in ts]
    assert not errs and len(out) == 8


def test_training_runs_beside_generation(base, tmp_path):
    """The trainer owns a copy of the base: a generate answers while a long job is running."""
    svc = make_service(base, tmp_path / "store")
    assert svc.trainer_base == "copy" and svc.p.model is not svc.batcher.mm.base
    with TestClient(create_app(svc)) as c:
        uid, tok = trained_user(c)
        other, _ = new_user(c)
        c.post(f"/v1/users/{other}/history", json={"task": "LaMP_2M", "items": items("L", 200)}, headers=A)
        job = c.post(f"/v1/users/{other}/train", headers=A).json()["job_id"]
        while c.get(f"/v1/jobs/{job}", headers=A).json()["status"] == "queued":
            time.sleep(0.01)
        g = c.post(f"/v1/users/{uid}/generate", json={"task": "LaMP_2M", "input": query("love")}, headers=bearer(tok))
        status = c.get(f"/v1/jobs/{job}", headers=A).json()["status"]
        assert g.status_code == 200 and status == "running", status
        assert wait_job(c, job, A)["status"] == "done"
    svc.store.close()


def test_shared_trainer_base_gives_the_same_answers(base, tmp_path, monkeypatch):
    """trainer_base="shared" trains on the serving base under the batcher's lock. The user id
    seeds the module's initialisation, so both services get the same id."""
    from safetensors.torch import load_file
    monkeypatch.setattr(AdapterStore, "new_user", lambda self, task=None: self.create_user("same-user", task))
    answers, tensors = {}, {}
    for mode in ("shared", "copy"):
        svc = make_service(base, tmp_path / mode, trainer_base=mode)
        with TestClient(create_app(svc)) as c:
            uid, tok = trained_user(c, n=5, seed=7)
            r = c.post(f"/v1/users/{uid}/generate", json={"task": "LaMP_2M", "input": query("crime king")},
                       headers=bearer(tok))
            answers[mode] = r.json()
        assert (svc.p.model is svc.batcher.mm.base) == (mode == "shared")
        (f,) = (tmp_path / mode).rglob("adapter_model.safetensors")
        tensors[mode] = load_file(str(f))
        svc.store.close()
    assert answers["shared"]["adapter_version"] == 1 and answers["shared"] == answers["copy"]
    assert tensors["shared"].keys() == tensors["copy"].keys()
    for k, t in tensors["shared"].items():
        torch.testing.assert_close(t, tensors["copy"][k], rtol=1e-5, atol=1e-6)


def test_startup_marks_unfinished_jobs_failed(base, tmp_path):
    store = AdapterStore(tmp_path / "store")
    uid = store.new_user()
    running = store.jobs.create(uid, "train", status="running").job_id
    store.close()
    svc = make_service(base, tmp_path / "store")
    with TestClient(create_app(svc)) as c:
        j = c.get(f"/v1/jobs/{running}", headers=A).json()
    assert j["status"] == "failed" and "interrupted" in j["error"] and j["version"] is None
    svc.store.close()


# -- spec and metrics ----------------------------------------------------------------------------
def test_openapi_spec_lists_every_route_with_bearer_auth(client):
    spec = client.get("/openapi.json").json()
    assert {"/v1/users", "/v1/users/{user_id}", "/v1/users/{user_id}/history", "/v1/users/{user_id}/train",
            "/v1/jobs/{job_id}", "/v1/users/{user_id}/generate", "/v1/users/{user_id}/adapter", "/healthz",
            "/metrics"} == set(spec["paths"])
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
