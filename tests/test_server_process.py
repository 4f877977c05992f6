"""The service as a real process on 127.0.0.1 (`python -m oppu.cli_serve serve`, any free port,
always killed in teardown): every line of the README's walkthrough run with curl, SIGKILL
during a training job then a restart on the same store, a short bounded load of 8 clients of
different users, and schemathesis fuzzing of the API from its OpenAPI spec (no 5xx)."""
from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from oppu.tasks import get_task  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
ADMIN = "process-test-admin-token-0123456789"
TASK = get_task("LaMP_2M")
WORDS = "space robot love city war dream ship crime family future past king magic detective".split()
THREADS_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def items(prefix: str, n: int) -> list[dict]:
    import random
    rng = random.Random(prefix)
    return [{"id": f"{prefix}{i}", "description": " ".join(rng.choice(WORDS) for _ in range(6)),
             "tag": rng.choice(TASK.labels[:4])} for i in range(n)]


class LiveServer:
    """One `oppu serve` process; `start` blocks until /healthz answers."""

    def __init__(self, argv: list[str], workdir: Path):
        self.argv, self.workdir = argv, workdir
        self.proc: subprocess.Popen | None = None
        self.url = ""

    def start(self, timeout: float = 120.0) -> "LiveServer":
        port_file = self.workdir / f"port.{time.monotonic_ns()}"
        self.log = self.workdir / f"server.{time.monotonic_ns()}.log"
        env = {**os.environ, **THREADS_ENV, "OPPU_ADMIN_TOKEN": ADMIN, "PYTHONUNBUFFERED": "1"}
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "oppu.cli_serve", *self.argv,
                                          "--port", "0", "--port-file", str(port_file), "--threads", "1"],
                                         cwd=self.workdir, env=env, stdout=log, stderr=subprocess.STDOUT)
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited with {self.proc.returncode}:\n{self.tail()}")
            if port_file.exists():
                self.url = f"http://127.0.0.1:{port_file.read_text().strip()}"
                try:
                    if httpx.get(self.url + "/healthz", timeout=2).status_code == 200:
                        return self
                except httpx.TransportError:
                    pass
            time.sleep(0.1)
        self.stop()
        raise AssertionError(f"server not healthy after {timeout}s:\n{self.tail()}")

    def tail(self, n: int = 4000) -> str:
        return self.log.read_text(errors="replace")[-n:] if self.log.exists() else ""

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.kill()


class Api:
    def __init__(self, url: str, token: str = ADMIN):
        self.c = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=60)

    def ok(self, method: str, path: str, status: int = 200, **kw) -> dict:
        r = self.c.request(method, path, **kw)
        assert r.status_code == status, f"{method} {path}: {r.status_code} {r.text}"
        return r.json()

    def user(self, n_items: int, prefix: str = "h") -> tuple[str, str]:
        u = self.ok("POST", "/v1/users", 201)
        self.ok("POST", f"/v1/users/{u['user_id']}/history", json={"task": "LaMP_2M", "items": items(prefix, n_items)})
        return u["user_id"], u["token"]

    def wait(self, job_id: str, until=("done", "failed"), timeout: float = 120.0) -> dict:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            j = self.ok("GET", f"/v1/jobs/{job_id}")
            if j["status"] in until:
                return j
            time.sleep(0.01)
        raise AssertionError(f"job {job_id} still {j['status']} after {timeout}s")

    def train(self, uid: str) -> dict:
        return self.wait(self.ok("POST", f"/v1/users/{uid}/train", 202)["job_id"])


@pytest.fixture(scope="module")
def micro_base(tmp_path_factory) -> Path:
    from oppu.model.base import build_tiny_base
    d = tmp_path_factory.mktemp("micro") / "base"
    corpus = [TASK.render_item(it) for it in items("c", 80)] + [TASK.cue + " " + " ".join(TASK.labels)]
    build_tiny_base(corpus, d, preset="micro")
    return d


# -- README walkthrough -----------------------------------------------------------------------------
def walkthrough() -> list[str]:
    text = (ROOT / "README.md").read_text()
    block = re.search(r"<!-- walkthrough: executed by tests/test_server_process.py -->\n```sh\n(.*?)```",
                      text, flags=re.S)
    assert block, "README.md lost its walkthrough block"
    return [ln for ln in block.group(1).splitlines() if ln.strip()]


def strip_comment(line: str) -> str:
    return line.split("  #")[0].strip()


@pytest.fixture(scope="module")
def server(micro_base, tmp_path_factory):
    """Started from the walkthrough's own `oppu serve` line (base, store and port substituted)."""
    serve = next(strip_comment(ln) for ln in walkthrough() if ln.startswith("oppu serve"))
    argv = shlex.split(serve.rstrip("&").strip())[1:]
    assert argv[:1] == ["serve"] and "--base" in argv and "--port" in argv, serve
    opts = dict(zip(argv[1::2], argv[2::2]))
    opts.update({"--base": str(micro_base), "--store": "store", "--user-epochs": "2", "--max-len": "128"})
    opts.pop("--port")
    work = tmp_path_factory.mktemp("served")
    s = LiveServer(["serve", *[x for kv in opts.items() for x in kv]], work)
    s.start()
    yield s
    s.stop()


def test_docs_walkthrough_runs_against_the_live_server(server):
    port = server.url.rsplit(":", 1)[1]
    env = {**os.environ, "PORT": port, "OPPU_ADMIN_TOKEN": ADMIN}
    last: dict = {}
    seen = []
    for line in walkthrough():
        cmd = strip_comment(line)
        if cmd.startswith("oppu serve") or cmd.startswith("export OPPU_ADMIN_TOKEN") or cmd.startswith("export PORT"):
            continue  # the fixture started the server with this line; port and token are the test's
        if cmd.startswith("export "):  # NAME=<key>: the key of the previous JSON answer
            for name, key in re.findall(r"(\w+)=<(\w+)>", cmd):
                env[name] = str(last[key])
            continue
        assert cmd.startswith("curl ") or "| curl " in cmd, f"unexpected walkthrough line: {line}"
        end = time.monotonic() + 60
        while True:
            r = subprocess.run(["bash", "-c", cmd], cwd=server.workdir, env=env, capture_output=True, text=True,
                               timeout=60)
            assert r.returncode == 0, f"{cmd}\n{r.stdout}\n{r.stderr}"
            out = r.stdout.strip()
            last = json.loads(out) if out.startswith("{") else {"raw": out}
            if "repeat until" not in line or last.get("status") in ("done", "failed") or time.monotonic() > end:
                break
            time.sleep(0.2)
        seen.append((cmd, last))
    by_path = {re.search(r"\$PORT(\S+)", c).group(1): a for c, a in seen}  # the last answer per path
    assert by_path["/healthz"]["status"] == "ok"
    assert by_path["/v1/users/$USER_ID/history"]["added"] == 1
    assert by_path["/v1/jobs/$JOB_ID"]["status"] == "done" and by_path["/v1/jobs/$JOB_ID"]["version"] == 2
    assert by_path["/v1/users/$USER_ID/generate"]["adapter_version"] == 1
    listed = by_path["/v1/users/$USER_ID/versions"]
    assert listed["active_version"] == 2 and [(v["version"], v["intact"]) for v in listed["versions"]] == \
        [(1, True), (2, True)]
    assert by_path["/v1/users/$USER_ID/rollback"]["active_version"] == 1
    rotated = by_path["/v1/users/$USER_ID/token"]
    assert rotated["revoked"] == 1 and rotated["token"] == env["TOKEN"]
    restored = by_path["/v1/users/import"]
    assert (restored["user_id"], restored["active_version"], restored["history_items"]) == ("restored", 1, 5)
    deleted = seen[-2][1]
    assert (deleted["user_id"], deleted["deleted"], deleted["scrubbed"]) == (env["USER_ID"], True, True)
    assert seen[-1][1] == {"raw": "401"}
    from oppu import crypto
    from oppu.store.bundle import unpack
    bundle = unpack(crypto.decrypt((server.workdir / "user.oppu").read_bytes(), "correct horse battery staple"))
    assert bundle.user_id == env["USER_ID"] and bundle.adapter["version"] == 1 and len(bundle.history) == 5
    api = Api(server.url, restored["token"])  # the restored user answers with the exported v1
    assert api.ok("POST", "/v1/users/restored/generate",
                  json={"task": "LaMP_2M", "input": "robots at war"})["adapter_version"] == 1


# -- crash safety --------------------------------------------------------------------------------
def test_sigkill_during_training_then_restart(tmp_path):
    from oppu.store import AdapterStore

    argv = ["serve", "--store", "store", "--base", "tiny:micro", "--base-epochs", "0", "--task", "LaMP_2M",
            "--user-epochs", "2", "--max-len", "128"]
    s = LiveServer(argv, tmp_path).start()
    try:
        api = Api(s.url)
        uid, _ = api.user(8)
        assert api.train(uid)["version"] == 1
        api.ok("POST", f"/v1/users/{uid}/history", json={"task": "LaMP_2M", "items": items("n", 100)})
        job = api.ok("POST", f"/v1/users/{uid}/train", 202)
        assert job["kind"] == "update"
        assert api.wait(job["job_id"], until=("running", "done", "failed"))["status"] == "running"
        s.kill()  # SIGKILL mid-update: no shutdown code runs
    finally:
        s.kill()
    with AdapterStore(tmp_path / "store") as st:  # consistent on disk before any restart
        assert [v.version for v in st.versions(uid)] == [1] and st.active_version(uid) == 1
        st.verify(uid, 1)
        assert len(st.history(uid)) == 108
        assert [j.status for j in st.jobs.of_user(uid)] == ["done", "running"]
        assert not any((tmp_path / "store" / "tmp").iterdir())  # a half-written version is gone
    bases = sorted((tmp_path / "store" / "bases").iterdir())
    s2 = LiveServer(argv, tmp_path).start()
    try:
        assert sorted((tmp_path / "store" / "bases").iterdir()) == bases  # same cached base, not rebuilt
        api = Api(s2.url)
        j = api.ok("GET", f"/v1/jobs/{job['job_id']}")
        assert j["status"] == "failed" and "interrupted" in j["error"] and j["version"] is None
        g = api.ok("POST", f"/v1/users/{uid}/generate", json={"task": "LaMP_2M", "input": "robots at war"})
        assert g["adapter_version"] == 1
        assert api.ok("GET", f"/v1/users/{uid}") == {"user_id": uid, "task": "LaMP_2M", "active_version": 1,
                                                      "versions": [1], "history_items": 108}
        again = api.train(uid)  # the interrupted update can simply be asked for again
        assert again["status"] == "done" and again["version"] == 2
        assert api.ok("POST", f"/v1/users/{uid}/generate",
                      json={"task": "LaMP_2M", "input": "robots at war"})["adapter_version"] == 2
    finally:
        s2.stop()
    assert s2.proc.returncode in (0, -signal.SIGTERM), s2.tail()  # a clean stop (uvicorn re-raises SIGTERM)


# -- bounded load --------------------------------------------------------------------------------
def percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def test_bounded_load_8_clients_of_different_users(server):
    api = Api(server.url)
    users = [api.user(5, prefix=f"u{i}-") for i in range(8)]
    jobs = [api.ok("POST", f"/v1/users/{uid}/train", 202)["job_id"] for uid, _ in users]
    assert all(api.wait(j)["status"] == "done" for j in jobs)
    lat: list[float] = []
    errors: list[str] = []
    versions: set[int] = set()
    lock = threading.Lock()
    deadline = time.monotonic() + 5.0

    def client(uid: str, token: str, i: int) -> None:
        with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {token}"}, timeout=30) as c:
            while time.monotonic() < deadline:
                t0 = time.perf_counter()
                try:
                    r = c.post(f"/v1/users/{uid}/generate", json={"task": "LaMP_2M", "input": f"{WORDS[i]} robot"})
                    ok = r.status_code == 200
                except httpx.HTTPError as e:
                    ok, r = False, e
                with lock:
                    if ok:
                        lat.append(time.perf_counter() - t0)
                        versions.add(r.json()["adapter_version"])
                    else:
                        errors.append(getattr(r, "text", str(r)))

    ts = [threading.Thread(target=client, args=(uid, tok, i)) for i, (uid, tok) in enumerate(users)]
    t0 = time.monotonic()
    [t.start() for t in ts]
    [t.join(60) for t in ts]
    wall = time.monotonic() - t0
    p50, p99 = percentile(lat, 0.5) * 1000, percentile(lat, 0.99) * 1000
    rows = re.search(r"oppu_generate_batch_rows_sum (\S+)\noppu_generate_batch_rows_count (\S+)",
                     httpx.get(server.url + "/metrics").text)
    print(f"\nload: 8 clients x {wall:.1f}s: {len(lat)} ok, {len(errors)} errors, p50 {p50:.1f} ms, "
          f"p99 {p99:.1f} ms, {len(lat) / wall:.1f} req/s, mean batch rows "
          f"{float(rows.group(1)) / max(1.0, float(rows.group(2))):.2f}")
    assert not errors, errors[:3]
    assert len(lat) >= 8 and versions == {1}


# -- fuzzing from the OpenAPI spec ---------------------------------------------------------------
def test_fuzz_api_from_openapi_spec_no_5xx(server):
    """schemathesis cases (positive and negative) for every operation of /openapi.json, sent to
    the live server with the admin token. Every other generated user id is replaced by a trained
    user's, so fuzzed requests also reach real history/train/generate/export/delete code paths.
    (schemathesis' pytest integration, `from_fixture`, breaks on pytest 9 (`Function._nodeid`),
    so each operation's hypothesis strategy is driven here directly.)"""
    schemathesis = pytest.importorskip("schemathesis")
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis.errors import Unsatisfiable

    api = Api(server.url)
    uid, _ = api.user(4, prefix="fz")
    api.train(uid)
    schema = schemathesis.openapi.from_url(server.url + "/openapi.json")
    ops = sorted((r.ok() for r in schema.get_all_operations()), key=lambda op: op.method.upper() == "DELETE")
    assert len(ops) == 15
    statuses: dict[str, set[int]] = {}
    n = {"calls": 0}

    def send(case) -> None:
        n["calls"] += 1
        if case.path_parameters and "user_id" in case.path_parameters and n["calls"] % 2:
            case.path_parameters["user_id"] = uid
        r = case.call(headers={"Authorization": f"Bearer {ADMIN}"}, timeout=60)
        statuses.setdefault(f"{case.operation.method.upper()} {case.operation.path}", set()).add(r.status_code)
        assert r.status_code < 500, f"{case.method} {case.formatted_path}: {r.status_code} {r.text[:300]}"

    for op in ops:
        for mode in (schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE):
            fuzz = settings(max_examples=25, deadline=None, derandomize=True, database=None,
                            suppress_health_check=list(HealthCheck),
                            phases=[Phase.explicit, Phase.generate])(given(case=op.as_strategy(mode))(send))
            try:
                fuzz()
            except Unsatisfiable:  # negative mode on an operation without inputs (GET /healthz)
                assert mode == schemathesis.GenerationMode.NEGATIVE, op.path
    print(f"\nfuzz: {n['calls']} requests; statuses per operation: "
          f"{ {k: sorted(v) for k, v in sorted(statuses.items())} }")
    assert httpx.get(server.url + "/healthz").status_code == 200


# -- strictness, owner operations and limits over real HTTP ----------------------------------------
def test_strict_input_limits_and_private_files_on_the_live_server(server):
    import stat

    from oppu import crypto

    api = Api(server.url)
    uid, tok = api.user(4, prefix="st")
    api.train(uid)
    other, other_tok = api.user(2, prefix="so")
    mine = Api(server.url, tok)
    json_h = {"Content-Type": "application/json"}
    for headers, status in (({}, 401), ({"Authorization": "Bearer nope"}, 401),
                            ({"Authorization": f"Bearer {other_tok}"}, 403)):  # auth before the body is read
        r = httpx.post(f"{server.url}/v1/users/{uid}/history", content=b'{"task": [oops', headers={**json_h, **headers})
        assert r.status_code == status, r.text
    for raw in (b'{"task": "LaMP_2M", "input": "q", "k": NaN}', b'{"task": "LaMP_2M", "input": "q", "k": true}'):
        r = mine.c.post(f"/v1/users/{uid}/generate", content=raw, headers=json_h)
        assert r.status_code == 422, r.text
    typed = " pässwörd-ünïcode "
    ex = mine.c.post(f"/v1/users/{uid}/adapter", json={"passphrase": typed})
    assert ex.status_code == 200 and ex.headers["cache-control"] == "no-store"
    assert crypto.decrypt(ex.content, typed) and crypto.decrypt(ex.content, unicodedata_nfd(typed))
    codes = [mine.c.post(f"/v1/users/{uid}/adapter", json={"passphrase": typed}) for _ in range(3)]
    assert [r.status_code for r in codes] == [200, 200, 429] and int(codes[-1].headers["retry-after"]) >= 1
    assert Api(server.url, other_tok).ok("POST", f"/v1/users/{other}/history", json={
        "task": "LaMP_2M", "items": items("more", 1)})["added"] == 1  # the other user is not limited
    httpx.request("BREW", f"{server.url}/v1/users/{uid}")
    methods = set(re.findall(r'oppu_http_requests_total\{method="([^"]*)"', httpx.get(server.url + "/metrics").text))
    assert "other" in methods and "BREW" not in methods
    rotated = mine.ok("POST", f"/v1/users/{uid}/token")
    assert mine.c.get(f"/v1/users/{uid}").status_code == 401
    assert Api(server.url, rotated["token"]).ok("GET", f"/v1/users/{uid}/versions")["versions"][0]["intact"]
    store = server.workdir / "store"
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in (store, store / "store.db", store / "adapters")}
    assert modes == {"store": 0o700, "store.db": 0o600, "adapters": 0o700}, modes


def unicodedata_nfd(text: str) -> str:
    import unicodedata
    return unicodedata.normalize("NFD", text)


def test_fair_training_and_a_delete_under_a_read_snapshot_on_the_live_server(server):
    """A one-item job trains beside another user's long job and is done first; deleting the long
    job's user while a reader holds an old snapshot answers at once (scrubbed: false), does not
    hold up another user's write, cancels the job, and the scrub finishes once the reader goes."""
    import sqlite3

    api = Api(server.url)
    big, big_tok = api.user(600, prefix="big")
    small, _ = api.user(1, prefix="one")
    jbig = api.ok("POST", f"/v1/users/{big}/train", 202)["job_id"]
    assert api.wait(jbig, until=("running", "done", "failed"))["status"] == "running"
    time.sleep(0.5)
    assert api.train(small)["status"] == "done"
    assert api.ok("GET", f"/v1/jobs/{jbig}")["status"] == "running"
    reader = sqlite3.connect(server.workdir / "store" / "store.db", isolation_level=None)
    reader.execute("BEGIN")
    reader.execute("SELECT COUNT(*) FROM history_items").fetchone()
    try:
        t0 = time.monotonic()
        gone = Api(server.url, big_tok).ok("DELETE", f"/v1/users/{big}")
        assert time.monotonic() - t0 < 5 and gone["deleted"] and not gone["scrubbed"], gone
        t0 = time.monotonic()
        api.ok("POST", f"/v1/users/{small}/history", json={"task": "LaMP_2M", "items": items("late", 1)})
        assert time.monotonic() - t0 < 3
        assert api.c.get(f"/v1/jobs/{jbig}").status_code == 404
    finally:
        reader.rollback()
        reader.close()
    end = time.monotonic() + 30
    while httpx.get(server.url + "/scrub").json()["done"] < gone["scrub"]:
        assert time.monotonic() < end
        time.sleep(0.1)
