"""Instant adapters in the service (oppu.instant.served): a user with history and no trained version
is served at once by a version marked `instant`, refreshed as history grows, replaced by training."""
from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from oppu.engine import read_adapter
from oppu.instant.served import ServedBank
from oppu.server import ServeConfig, Service, create_app, open_base
from oppu.store import AdapterStore
from server_common import ADMIN, UCFG, A, bearer, items, query, wait_job

N_BANK = 4


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("bases")
    model, tok, info = open_base("tiny:micro", "LaMP_2M", root, base_epochs=0, instant="on", user_train=UCFG,
                                 instant_bank_users=N_BANK)
    yield model, tok, info
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def served(base, tmp_path_factory):
    from fastapi.testclient import TestClient

    model, tok, info = base
    info = dict(info)
    bank = info.pop("instant")
    cfg = ServeConfig(task="LaMP_2M", user_train=UCFG, k=2, max_len=128)
    svc = Service(AdapterStore(tmp_path_factory.mktemp("store")), copy.deepcopy(model), tok, cfg, ADMIN, info,
                  instant=bank)
    with TestClient(create_app(svc)) as c:
        yield svc, c
    svc.store.close()


def _user(c, n_items: int, prefix: str):
    r = c.post("/v1/users", headers=A)
    uid, token = r.json()["user_id"], r.json()["token"]
    r = c.post(f"/v1/users/{uid}/history", json={"task": "LaMP_2M", "items": items(prefix, n_items)},
               headers=bearer(token))
    assert r.status_code == 200, r.text
    return uid, token, r.json()


def test_the_tiny_server_builds_a_bank_of_the_asked_size(base):
    bank = base[2]["instant"]
    assert isinstance(bank, ServedBank) and len(bank.ids) == N_BANK and bank.peft_type == "lora"
    assert bank.mix == "knn" and 1 <= bank.top_k and bank.temperature > 0


def test_first_request_after_history_is_served_by_an_instant_version(served):
    svc, c = served
    uid, token, added = _user(c, 10, "ia")
    assert added["instant_version"] == 1
    vs = c.get(f"/v1/users/{uid}/versions", headers=bearer(token)).json()["versions"]
    assert [(v["version"], v["note"], v["active"]) for v in vs] == [(1, "instant", True)]
    r = c.post(f"/v1/users/{uid}/generate", json={"task": "LaMP_2M", "input": query("a robot in space")},
               headers=bearer(token))
    assert r.status_code == 200, r.text
    assert r.json()["adapter_version"] == 1

    # The stored module is the bank's mixture for this user's own items, bit for bit.
    v = svc.store.version(uid, 1)
    config, state, facts = svc.instant.module(svc.p, [h.item for h in svc.store.history(uid)])
    stored = load_file(str(svc.store.path(v) / "adapter_model.safetensors"))
    assert sorted(stored) == sorted(state) and all(torch.equal(stored[k], state[k]) for k in state)
    assert v.meta["mixed"] == facts["mixed"] and len(facts["mixed"]) == min(svc.instant.top_k, N_BANK)
    assert abs(sum(w for _, w in facts["mixed"]) - 1.0) < 1e-3


def test_another_users_history_leaves_a_users_module_unchanged(served):
    svc, c = served
    uid, token, _ = _user(c, 8, "own")
    before = read_adapter(svc.store.path(svc.store.version(uid, 1)))[1]
    _user(c, 9, "other")  # someone else adds history (and gets their own instant version)
    again = svc.instant.module(svc.p, [h.item for h in svc.store.history(uid)])[1]
    assert all(torch.equal(before[k], again[k]) for k in before)


def test_history_refreshes_the_instant_version_until_training_replaces_it(served):
    svc, c = served
    uid, token, added = _user(c, 6, "life")
    h = bearer(token)
    more = c.post(f"/v1/users/{uid}/history", json={"task": "LaMP_2M", "items": items("life2", 4)}, headers=h)
    assert more.json()["instant_version"] == 2
    v2 = svc.store.version(uid, 2)
    assert v2.note == "instant" and v2.history_seq == more.json()["last_seq"] and v2.parent_version is None

    job = c.post(f"/v1/users/{uid}/train", headers=h).json()
    assert job["kind"] == "train"  # an instant version is never the start of a trained one
    done = wait_job(c, job["job_id"], h)
    assert done["status"] == "done" and done["version"] == 3
    v3 = svc.store.version(uid, 3)
    assert v3.note != "instant" and v3.parent_version is None and svc.store.active_version(uid) == 3

    # Trained now: new history waits for an update job instead of replacing the trained module.
    later = c.post(f"/v1/users/{uid}/history", json={"task": "LaMP_2M", "items": items("life3", 3)}, headers=h)
    assert later.json()["instant_version"] is None and svc.store.active_version(uid) == 3
    job = c.post(f"/v1/users/{uid}/train", headers=h).json()
    assert job["kind"] == "update"
    assert wait_job(c, job["job_id"], h)["status"] == "done"
    assert svc.store.version(uid, 4).parent_version == 3


def test_a_run_output_brings_its_bank_and_a_plain_checkpoint_none(base, tmp_path):
    model, tok, info = base
    bank = info["instant"]
    run = tmp_path / "run"
    run.mkdir()
    (run / "run.json").write_text(json.dumps({
        "base": {"path": info["path"]}, "config": {"instant": {"probe_items": 5}},
        "instant": {"bank": {"dir": bank.info["dir"], "top_k": 2, "temperature": 0.5, "mix": "knn", "select": "grad"}}}))
    got = ServedBank.from_run(run)
    assert (got.ids, got.top_k, got.temperature, got.probe_items) == (bank.ids, 2, 0.5, 5)
    assert got.router is None and got.describe()["select"] == "grad"
    # a bank that ranks by its router: the service loads the router file run.json names
    from oppu.instant.router import Router
    hid = model.config.hidden_size
    rng = np.random.default_rng(0)
    Router(rng.normal(size=hid * hid), np.ones(hid * hid), rng.normal(size=(hid * hid, len(bank.ids))),
           np.zeros(len(bank.ids)), 0.1).save(tmp_path / "router.npz")
    (run / "run.json").write_text(json.dumps({
        "base": {"path": info["path"]}, "config": {"instant": {}},
        "instant": {"bank": {"dir": bank.info["dir"], "top_k": 2, "temperature": 0.5, "select": "router",
                             "router": {"file": str(tmp_path / "router.npz"), "users": 9}}}}))
    routed = ServedBank.from_run(run)
    assert routed.describe()["select"] == "router" and routed.router.info["users"] == 9
    assert np.array_equal(routed.router.w, Router.load(tmp_path / "router.npz").w)
    assert open_base(str(run), "LaMP_2M", tmp_path, instant="auto")[2]["instant"].ids == bank.ids
    assert open_base(info["path"], "LaMP_2M", tmp_path, instant="auto")[2]["instant"] is None
    with pytest.raises(ValueError, match="brings no instant bank"):
        open_base(info["path"], "LaMP_2M", tmp_path, instant="on")
    with pytest.raises(ValueError, match="unknown instant mode 'sometimes'"):
        open_base("tiny:micro", "LaMP_2M", tmp_path, instant="sometimes")
