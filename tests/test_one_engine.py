"""One engine: the pipeline, an experiment and the server all train through oppu.engine's Trainer
and generate through its one decoder (greedy_rows); PEFT's own model/generation path is never
taken by the product (PeftModel.from_pretrained and HF generate are made to fail here)."""
from __future__ import annotations

import time

import pytest

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def spies(monkeypatch):
    import peft
    import transformers

    from oppu.engine import decode, train

    calls = {"train": [], "decode": 0, "sessions": {}}
    run, add, rows = train.Trainer.run, train.Trainer.add, decode.greedy_rows

    def spy_run(self):
        calls["train"].append(sorted(r.uid for r in self.waiting))
        return run(self)

    def spy_add(self, uid, *a, **kw):  # a training session (the server's) adds its users one by one
        calls["sessions"].setdefault(id(self), []).append(uid)
        return add(self, uid, *a, **kw)

    def spy_rows(*a, **kw):
        calls["decode"] += 1
        return rows(*a, **kw)

    def refuse(*a, **kw):
        raise AssertionError("a second path: the product must not call this")

    monkeypatch.setattr(train.Trainer, "run", spy_run)
    monkeypatch.setattr(train.Trainer, "add", spy_add)
    monkeypatch.setattr(decode, "greedy_rows", spy_rows)
    monkeypatch.setattr(transformers.GenerationMixin, "generate", refuse)
    monkeypatch.setattr(peft.PeftModel, "from_pretrained", refuse)
    return calls


def test_pipeline_trains_and_generates_through_the_engine(spies, tmp_path):
    from oppu.config import load_config
    from oppu.pipeline import run

    cfg = load_config(None, task="LaMP_2M", out=str(tmp_path / "out"), base="tiny:micro", test_users=3,
                      cache_dir=str(tmp_path / "cache"), max_users_per_batch=3,
                      **{"base_train.epochs": 1, "user_train.epochs": 1})
    res = run(cfg)
    assert spies["train"] == [sorted(res.info["users"])]  # the three test users in one pass
    assert spies["decode"] >= 2                               # plain rows and adapter rows
    assert set(res.metrics) == set(cfg.methods)


def test_an_experiment_trains_and_generates_through_the_engine(spies, tmp_path, monkeypatch):
    from oppu.experiments import ExpOptions, run_experiment

    monkeypatch.setenv("OPPU_CACHE", str(tmp_path / "cache"))
    res = run_experiment(ExpOptions("k", task="LaMP_2M", synth=True, base="tiny:micro", seeds=1, test_users=3,
                                    other_users=8, base_epochs=1, levels=(0, 1), out=str(tmp_path / "k"),
                                    overrides={"user_train.epochs": 1}))
    assert res["rows"] and spies["train"] and all(len(users) == 3 for users in spies["train"])
    assert spies["decode"] >= 1


def test_the_server_trains_queued_users_in_one_session_and_serves_through_the_engine(spies, tmp_path):
    from oppu.model.base import build_tiny_base, load_base
    from oppu.server import ServeConfig, Service
    from oppu.store import AdapterStore

    d = build_tiny_base(["description: a film about robots tag: sci-fi"] * 40, tmp_path / "base", preset="micro")
    model, tok = load_base(d)
    store = AdapterStore(tmp_path / "store")
    svc = Service(store, model, tok, ServeConfig(task="LaMP_2M", max_wait_ms=50), admin_token="x" * 32)
    users = []
    for n in range(2):
        uid, _ = svc.create_user()
        svc.add_history(uid, "LaMP_2M", [{"id": f"m{i}", "description": f"robots {i} in space", "tag": "sci-fi"}
                                         for i in range(3)])
        users.append(uid)
    svc.start()
    try:
        jobs = [svc.start_training(uid) for uid in users]   # both within the trainer's gathering window
        deadline = time.monotonic() + 120
        while any(svc.job(j.job_id)["status"] in ("queued", "running") for j in jobs):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert [svc.job(j.job_id)["status"] for j in jobs] == ["done", "done"]
        assert [sorted(u) for u in spies["sessions"].values()] == [sorted(users)]  # one batched session for both
        futs = [svc.submit_generate(uid, "LaMP_2M", "description: robots again") for uid in users]
        assert [f.result(60)[1] for f in futs] == [1, 1]
        assert spies["decode"] >= 1
    finally:
        svc.close()
        store.close()
