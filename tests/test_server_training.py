"""The HTTP service in process (fastapi TestClient) on a micro base, training and generating: the
full create -> history -> train -> generate -> update -> export -> delete flow, mixed-adapter
batches equal to one-user generation and to PEFT, training beside generation (or on the shared
base), queued jobs of several users trained in one batched pass, and job recovery at startup."""
from __future__ import annotations

import random
import threading
import time

import pytest
import torch

pytest.importorskip("fastapi")
pytest.importorskip("httpx")

from fastapi.testclient import TestClient  # noqa: E402

from oppu import crypto  # noqa: E402
from oppu.server import create_app  # noqa: E402
from oppu.store import AdapterStore  # noqa: E402
from oppu.store.bundle import unpack  # noqa: E402
from server_common import (TASK, WORDS, A, base, bearer, items, make_service, new_user, query,  # noqa: E402,F401
                           svc_client, trained_user, wait_job, wait_job_status)


# -- the whole flow ------------------------------------------------------------------------------
def test_full_flow_create_history_train_generate_update_export_delete(svc_client):
    svc, c = svc_client
    uid, tok = new_user(c)
    h = bearer(tok)
    r = c.post(f"/v1/users/{uid}/history", json={"task": "LaMP_2M", "items": items("a", 6)}, headers=h)
    assert r.json() == {"user_id": uid, "added": 6, "last_seq": 6, "instant_version": None}  # no instant bank on this service
    job = c.post(f"/v1/users/{uid}/train", headers=h)
    assert job.status_code == 202 and job.json()["kind"] == "train" and job.json()["status"] in ("queued", "running")
    assert c.post(f"/v1/users/{uid}/train", headers=h).status_code in (202, 409)  # 409 while the job is unfinished
    done = wait_job(c, job.json()["job_id"], h)
    assert done["status"] == "done" and done["version"] == 1 and done["error"] is None
    q = query("space robot war ship")
    g = c.post(f"/v1/users/{uid}/generate", json={"task": "LaMP_2M", "input": q}, headers=h)
    assert g.status_code == 200 and g.json()["adapter_version"] == 1
    assert g.json()["output"] == svc.p.answer(uid, [q]).outputs[0]  # batcher path == one-user path
    # an incremental update: the server reloads the user's new active version
    assert c.post(f"/v1/users/{uid}/history", json={"task": "LaMP_2M", "items": items("b", 3)},
                  headers=h).status_code == 200
    up = c.post(f"/v1/users/{uid}/train", headers=h).json()
    assert up["kind"] == "update"
    assert wait_job(c, up["job_id"], h)["version"] == 2
    g2 = c.post(f"/v1/users/{uid}/generate", json={"task": "LaMP_2M", "input": q, "k": 0}, headers=h).json()
    assert g2["adapter_version"] == 2 and g2["output"] == svc.p.answer(uid, [q], k=0).outputs[0]
    r = c.post(f"/v1/users/{uid}/train", headers=h)
    assert r.status_code == 409 and "nothing to update" in r.json()["detail"]
    info = c.get(f"/v1/users/{uid}", headers=h).json()
    assert info == {"user_id": uid, "task": "LaMP_2M", "active_version": 2, "versions": [1, 2], "history_items": 9}
    # export: decrypts with the passphrase to the active version's files and the history
    ex = c.post(f"/v1/users/{uid}/adapter", json={"passphrase": "correct horse battery"}, headers=h)
    assert ex.status_code == 200 and ex.headers["content-type"] == "application/octet-stream"
    assert ex.headers["x-oppu-adapter-version"] == "2"
    with pytest.raises(crypto.DecryptionError):
        crypto.decrypt(ex.content, "wrong passphrase")
    bundle = unpack(crypto.decrypt(ex.content, "correct horse battery"))
    assert bundle.user_id == uid and bundle.adapter["version"] == 2
    assert bundle.files == svc.store.read_version_files(uid, 2)
    assert [it["id"] for _, it in bundle.history] == [f"a{i}" for i in range(6)] + [f"b{i}" for i in range(3)]
    nohist = c.post(f"/v1/users/{uid}/adapter", json={"passphrase": "correct horse", "history": False}, headers=h)
    assert unpack(crypto.decrypt(nohist.content, "correct horse")).history is None
    # delete: the token stops working, the admin sees 404, the adapter leaves the serving model
    gone = c.delete(f"/v1/users/{uid}", headers=h).json()
    assert (gone["user_id"], gone["deleted"], gone["scrubbed"]) == (uid, True, True)
    assert c.get(f"/v1/users/{uid}", headers=h).status_code == 401
    for method, path in (("get", f"/v1/users/{uid}"), ("delete", f"/v1/users/{uid}"),
                         ("post", f"/v1/users/{uid}/train")):
        assert c.request(method, path, headers=A).status_code == 404
    assert uid not in svc.p.slots.mm.users and not svc.store.has_user(uid)
    assert uid not in c.get("/metrics").text


def test_concurrent_users_share_batches_and_match_single_user_generation(svc_client):
    svc, c = svc_client
    users = [trained_user(c, n=4 + i, seed=i) for i in range(4)]
    qs = [query(" ".join(random.Random(i).sample(WORDS, 4))) for i in range(8)]
    before = svc.metrics.batch_rows._counts[:]
    futs = [(uid, q, svc.submit_generate(uid, "LaMP_2M", q)) for uid, _ in users for q in qs[:2]]
    for uid, q, f in futs:
        text, version = f.result(timeout=60)
        assert version == 1 and text == svc.p.answer(uid, [q]).outputs[0], uid
    after = svc.metrics.batch_rows._counts
    multi_row_batches = sum(a - b for a, b in zip(after[1:], before[1:]))
    assert multi_row_batches >= 1  # 8 requests submitted at once did not go one by one
    # ... and each answer is what PEFT's own model + HF generate give with that user's files
    from peft_reference import peft_generate
    with svc.p.lock, svc.p.slots.mm.detached() as plain:
        for uid, q, f in futs:
            want = peft_generate(plain, svc.tok, [svc.prompt(uid, "LaMP_2M", q, None)], svc.store.verify(uid, 1),
                                 TASK.max_new_tokens, max_prompt_tokens=svc.cfg.max_len)
            assert f.result()[0] == want[0], uid
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
    assert svc.trainer_base == "copy" and svc.p.train_model is not svc.p.model and svc.p.train_lock is not svc.p.lock
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
    """trainer_base="shared" trains on the serving base under the serving lock. The user id
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
        assert (svc.p.train_model is svc.p.model) == (mode == "shared") == (svc.p.train_lock is svc.p.lock)
        (f,) = (tmp_path / mode).rglob("adapter_model.safetensors")
        tensors[mode] = load_file(str(f))
        svc.store.close()
    assert answers["shared"]["adapter_version"] == 1 and answers["shared"] == answers["copy"]
    assert tensors["shared"].keys() == tensors["copy"].keys()
    for k, t in tensors["shared"].items():
        torch.testing.assert_close(t, tensors["copy"][k], rtol=1e-5, atol=1e-6)


def test_queued_jobs_join_the_running_training_session(base, tmp_path, monkeypatch):
    """Jobs queued while a session runs join it (oppu.train_session, spied on: one session admits
    all three users), and every version is published. The first session is held at the trainer's
    lock so the two jobs queue up behind it."""
    from oppu.train_session import TrainSession

    sessions: list[list[str]] = []
    real_enter, real_admit = TrainSession.__enter__, TrainSession.admit

    def enter(self):
        sessions.append([])
        return real_enter(self)

    def admit(self, job):
        ok = real_admit(self, job)
        sessions[-1].append(job.user_id) if ok else None
        return ok

    monkeypatch.setattr(TrainSession, "__enter__", enter)
    monkeypatch.setattr(TrainSession, "admit", admit)
    svc = make_service(base, tmp_path / "store")
    with TestClient(create_app(svc)) as c:
        (first, _), (a, ta), (b, tb) = (new_user(c) for _ in range(3))
        for i, uid in enumerate((first, a, b)):
            c.post(f"/v1/users/{uid}/history", json={"task": "LaMP_2M", "items": items(f"q{i}-", 4 + i, i)}, headers=A)
        with svc.p.train_lock:  # the worker's first session waits here
            j0 = c.post(f"/v1/users/{first}/train", headers=A).json()["job_id"]
            time.sleep(0.5)  # past the gathering window: the session has started with `first` alone
            ja, jb = (c.post(f"/v1/users/{u}/train", headers=A).json()["job_id"] for u in (a, b))
            assert [c.get(f"/v1/jobs/{j}", headers=A).json()["status"] for j in (ja, jb)] == ["queued", "queued"]
        done = [wait_job(c, j, A) for j in (j0, ja, jb)]
        assert [(d["status"], d["version"]) for d in done] == [("done", 1)] * 3
        assert sessions == [[first, a, b]]  # a and b joined the session `first` was training in
        for uid, tok in ((a, ta), (b, tb)):
            assert c.get(f"/v1/users/{uid}", headers=A).json()["active_version"] == 1
            g = c.post(f"/v1/users/{uid}/generate", json={"task": "LaMP_2M", "input": query("love")},
                       headers=bearer(tok))
            assert g.status_code == 200 and g.json()["adapter_version"] == 1
    svc.store.close()


def test_a_small_job_finishes_beside_a_long_one_and_delete_cancels(base, tmp_path):
    """Fair training: a one-item job queued behind another user's long job trains beside it and is
    done while the long one still runs. Deleting the long job's user drops it from the trainer."""
    svc = make_service(base, tmp_path / "store")
    with TestClient(create_app(svc)) as c:
        (big, tbig), (small, tsmall) = new_user(c), new_user(c)
        c.post(f"/v1/users/{big}/history", json={"task": "LaMP_2M", "items": items("big", 600)}, headers=A)
        c.post(f"/v1/users/{small}/history", json={"task": "LaMP_2M", "items": items("s", 1)}, headers=A)
        jbig = c.post(f"/v1/users/{big}/train", headers=bearer(tbig)).json()["job_id"]
        wait_job_status(c, jbig, "running")
        time.sleep(0.5)
        jsmall = c.post(f"/v1/users/{small}/train", headers=bearer(tsmall)).json()["job_id"]
        assert wait_job(c, jsmall, A)["status"] == "done"
        assert c.get(f"/v1/jobs/{jbig}", headers=A).json()["status"] == "running"  # still training
        t0 = time.monotonic()
        assert c.delete(f"/v1/users/{big}", headers=bearer(tbig)).status_code == 200
        assert time.monotonic() - t0 < 10 and jbig not in svc.worker.current
        assert c.get(f"/v1/jobs/{jbig}", headers=A).status_code == 404
        end = time.monotonic() + 10
        while svc.worker.current and time.monotonic() < end:
            time.sleep(0.05)
        assert svc.worker.current == [] and svc.store.versions(small)[0].version == 1
        assert not svc.store.has_user(big)
    svc.store.close()


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



def test_training_steps_wait_while_a_generate_request_is_open(base, tmp_path, monkeypatch):
    """Generation first: the trainer steps only when no generate request is open (or after
    train_yield_ms). With a request held open and a long yield, a one-item job makes no step;
    once the request is answered, the job finishes."""
    svc = make_service(base, tmp_path / "store", train_yield_ms=60_000)
    release, entered = threading.Event(), threading.Event()
    real = svc.p.answer_rows

    def held(rows):
        entered.set()
        release.wait(30)
        return real(rows)

    with TestClient(create_app(svc)) as c:
        uid, tok = new_user(c)
        c.post(f"/v1/users/{uid}/history", json={"task": "LaMP_2M", "items": items("y", 1)}, headers=A)
        monkeypatch.setattr(svc.p, "answer_rows", held)
        fut = svc.batcher.submit(uid, query("love"))
        assert entered.wait(10) and not svc.batcher.wait_idle(0.05)
        job = c.post(f"/v1/users/{uid}/train", headers=A).json()["job_id"]
        time.sleep(2.0)  # a one-item job on the micro base takes well under a second when it may step
        assert c.get(f"/v1/jobs/{job}", headers=A).json()["status"] in ("queued", "running")
        release.set()
        fut.exception(30)  # answered (this user has no adapter yet: an error or a base answer)
        assert svc.batcher.wait_idle(5) and wait_job(c, job, A)["status"] == "done"
    svc.store.close()
