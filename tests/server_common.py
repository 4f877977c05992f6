"""Shared pieces of the in-process HTTP service tests (tests/test_server*.py): a micro base
through the `--base tiny` path, a Service + TestClient over its own copy, users, items and jobs."""
from __future__ import annotations

import copy
import random
import time

import pytest
import torch

from oppu.config import UserTrainConfig
from oppu.server import ServeConfig, Service, create_app, open_base
from oppu.store import AdapterStore
from oppu.tasks import get_task

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
    from fastapi.testclient import TestClient

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


def wait_job_status(c, job_id: str, status: str, timeout: float = 60.0) -> None:
    end = time.monotonic() + timeout
    while (got := c.get(f"/v1/jobs/{job_id}", headers=A).json()["status"]) != status:
        assert got == "queued" and time.monotonic() < end, (job_id, got)
        time.sleep(0.01)


