"""A user's adapter over time on a micro base, through the one API object (oppu.personalizer.
Personalizer over an AdapterStore): history validation, train, incremental update with replay (both
equal to the PEFT reference), rollback, corruption fallback, and deletion that leaves nothing.
Export/import: tests/test_lifecycle_export.py."""
from __future__ import annotations

import copy
import math
import sqlite3
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import assert_same_module
from lifecycle_common import (MAX_LEN, PASS, QUERIES, SEED, TASK, UCFG, assert_clean, base,  # noqa: F401
                              make_items, p, peft_answers, snapshot, trained_user, weights)
from oppu import crypto
from oppu.history import as_user, replay_sample, validate_items
from oppu.store import AdapterStore, CorruptAdapterError, HistoryError, HistoryItem, NoAdapter
from oppu.store.bundle import unpack
from oppu.tasks import get_task


# -- history validation ------------------------------------------------------------------------
def test_history_items_are_validated_against_the_task(p):
    uid = p.store.new_user()
    good = make_items("g", 2, 0)
    cases = [([{"id": "x", "description": "d"}], r"#0 \(id='x'\): missing field 'tag'"),
             ([good[0], {"id": "y", "description": 3, "tag": "comedy"}], r"#1 \(id='y'\): field 'description'"),
             ([{"description": "d", "tag": "t"}], r"#0: field 'id'"),
             (["not an object"], r"#0: expected an object"),
             ([good[0], dict(good[0])], r"duplicate item id 'g0'")]
    for items, msg in cases:
        with pytest.raises(HistoryError, match=msg):
            p.add_history(uid, "LaMP_2M", items)
    assert p.store.history(uid) == []
    p.add_history(uid, "LaMP_2M", good)
    with pytest.raises(HistoryError, match="'g1' is already stored"):
        p.add_history(uid, "LaMP_2M", [good[1]])
    with pytest.raises(HistoryError, match="serves task 'LaMP_2M', not 'LaMP_4'"):
        p.add_history(uid, "LaMP_4", [{"id": "t", "text": "x", "title": "y"}])
    assert [h.item_id for h in p.store.history(uid)] == ["g0", "g1"]
    assert validate_items(get_task("LaMP_3"), [{"id": 7, "text": "t", "score": 4}]) == [{"id": "7", "text": "t",
                                                                                          "score": 4}]


def test_replay_sample_is_seeded_sized_and_ordered():
    old = [HistoryItem(i, f"i{i}", {}) for i in range(1, 11)]
    a = replay_sample(old, 0.5, seed=3)
    assert len(a) == 5 and a == replay_sample(old, 0.5, seed=3) and [h.seq for h in a] == sorted(h.seq for h in a)
    assert len(replay_sample(old, 0.01, 0)) == 1 and replay_sample(old, 0.0, 0) == [] and replay_sample([], 1, 0) == []
    with pytest.raises(ValueError, match="replay"):
        replay_sample(old, 1.5, 0)


# -- train, update, rollback -------------------------------------------------------------------
def test_train_update_rollback(p, base):
    model, _ = base
    snap = snapshot(model)
    uid = p.store.new_user()
    with pytest.raises(HistoryError, match="no usable history"):
        p.train(uid)
    assert [j.status for j in p.store.jobs.of_user(uid)] == ["failed"]
    with pytest.raises(NoAdapter):
        p.answer(uid, QUERIES)
    old, new = make_items("o", 8, 1), make_items("n", 4, 2)
    p.add_history(uid, "LaMP_2M", old)
    r1 = p.train(uid)
    assert (r1.version, r1.parent_version, r1.history_seq) == (1, None, 8)
    assert r1.sources == tuple(f"item:{it['id']}" for it in old) and len(r1.losses) == 2
    assert_clean(p, snap)
    with pytest.raises(HistoryError, match="no history added since v1"):
        p.update(uid)
    p.add_history(uid, "LaMP_2M", new)
    r2 = p.update(uid, replay=0.5)
    assert (r2.version, r2.parent_version, r2.history_seq) == (2, 1, 12)
    v2 = p.store.version(uid, 2)
    assert v2.parent_version == 1 and v2.meta["examples"] == 2 * len(r2.sources)  # plain + rag per item
    news = {f"item:{it['id']}" for it in new}
    replayed = set(r2.sources) - news
    assert news <= set(r2.sources) and len(replayed) == 4 and replayed <= {f"item:{it['id']}" for it in old}
    w1, w2 = weights(p, uid, 1), weights(p, uid, 2)
    assert w1.keys() == w2.keys() and any(not torch.equal(w1[k], w2[k]) for k in w1)
    assert_clean(p, snap)
    assert [j.status for j in p.store.jobs.of_user(uid)] == ["failed", "done", "failed", "done"]

    g2 = p.answer(uid, QUERIES)
    assert g2.adapter_version == 2 and not g2.fell_back and len(g2.outputs) == 3
    assert g2.predictions == [TASK.parse(o) for o in g2.outputs]
    assert g2.outputs == peft_answers(p, uid, 2, QUERIES)  # the engine's decode == PEFT's model + generate
    assert p.rollback(uid, 1).version == 1 and p.store.active_version(uid) == 1
    g1 = p.answer(uid, QUERIES)
    assert g1.adapter_version == 1 and g1.outputs == peft_answers(p, uid, 1, QUERIES)
    assert [v.version for v in p.versions(uid)] == [1, 2]
    # An update after the rollback continues v1 on everything v1 has not seen.
    r3 = p.update(uid, replay=0.0)
    assert (r3.version, r3.parent_version) == (3, 1) and set(r3.sources) == news
    assert p.answer(uid, QUERIES).adapter_version == 3  # the slots reload a user whose version changed
    assert_clean(p, snap)


def test_same_history_same_adapter(p):
    a, b = p.store.create_user("twin-a"), p.store.create_user("twin-b")
    for u in (a, b):
        p.add_history(u, "LaMP_2M", make_items("o", 6, 5))
    p.train(a)
    p.train(a)
    wa1, wa2 = weights(p, a, 1), weights(p, a, 2)
    assert all(torch.equal(wa1[k], wa2[k]) for k in wa1)  # seeded by (seed, user id)


def test_train_and_update_equal_the_peft_reference(base, tmp_path):
    """v1 == a fresh PEFT module trained the plain way (tests/peft_reference.py) on the user's
    examples; v2, an update, == PEFT continuing v1's files (PeftModel.from_pretrained, trainable) on
    the examples the update chose (new items + replay), in the order run_jobs seeds for it:
    user_seed(seed, "<uid>:v<active>:<last history seq>"). In fp64 (a copy of the base), so the
    comparison is to 1e-10: the same algorithm, not only close numbers."""
    from peft_reference import peft_train_user

    from oppu.engine import user_seed
    from oppu.personalizer import Personalizer

    model, tok = copy.deepcopy(base[0]).double(), base[1]
    store = AdapterStore(tmp_path / "store")
    p = Personalizer(model, tok, "LaMP_2M", UCFG, peft="lora", seed=SEED, k=2, max_len=MAX_LEN, store=store)
    try:
        uid = store.create_user("ref-user")
        p.add_history(uid, "LaMP_2M", make_items("o", 8, 1))
        r1 = p.train(uid)
        exs1 = p.examples(as_user(uid, store.history(uid)))
        ref1 = peft_train_user(model, tok, exs1, p.pcfg, UCFG, SEED, uid, tmp_path / "ref1", MAX_LEN)
        assert_same_module(weights(p, uid, 1), load_file(str(tmp_path / "ref1" / "adapter_model.safetensors")),
                           "fp64", "v1 (fresh)")
        assert r1.losses == pytest.approx(ref1, rel=1e-6)  # both score fp32 logits

        p.add_history(uid, "LaMP_2M", make_items("n", 4, 2))
        r2 = p.update(uid, replay=0.5)
        hist = store.history(uid)
        exs2 = [e for e in p.examples(as_user(uid, hist)) if e.source in set(r2.sources)]
        assert len(exs2) == store.version(uid, 2).meta["examples"] < len(p.examples(as_user(uid, hist)))
        ref2 = peft_train_user(model, tok, exs2, p.pcfg, UCFG, SEED, uid, tmp_path / "ref2", MAX_LEN,
                               start_dir=store.verify(uid, 1), order_seed=user_seed(SEED, f"{uid}:v1:{hist[-1].seq}"))
        assert_same_module(weights(p, uid, 2), load_file(str(tmp_path / "ref2" / "adapter_model.safetensors")),
                           "fp64", "v2 (update of v1)")
        assert r2.losses == pytest.approx(ref2, rel=1e-6) and all(map(math.isfinite, r2.losses))
        w1 = weights(p, uid, 1)
        assert any(not torch.equal(w1[k], v) for k, v in weights(p, uid, 2).items())  # v2 moved on from v1,
        assert p.rollback(uid, 1).version == 1 and p.answer(uid, QUERIES[:1]).adapter_version == 1  # which loads
    finally:
        p.close()
        store.close()


def test_updates_of_users_with_different_lora_ranks_share_a_pass(p):
    """Any LoRA that loads on the base is a valid version (an import, another rank); a pass of several
    users' jobs must not fail because of one user's shape. Each alone works."""
    import dataclasses

    from oppu.personalizer import Personalizer

    p16 = Personalizer(p.model, p.tok, "LaMP_2M", dataclasses.replace(UCFG, lora_r=16), store=p.store,
                       max_len=MAX_LEN)
    for u, trainer in (("r8", p), ("r16", p16)):
        p.store.create_user(u)
        p.add_history(u, "LaMP_2M", make_items(u, 6, 1))
        trainer.train(u)
        p.add_history(u, "LaMP_2M", make_items(u + "n", 3, 2))
    p16.close()
    jobs = [p.store.jobs.create(u, "update", status="queued") for u in ("r8", "r16")]
    res = p.run_jobs(jobs)
    assert [type(res[j.job_id]).__name__ for j in jobs] == ["TrainResult"] * 2, res
    assert [p.store.active_version(u) for u in ("r8", "r16")] == [2, 2]


def test_corrupt_active_version_falls_back_and_cannot_be_rolled_back_to(p, base):
    model, _ = base
    snap = snapshot(model)
    uid = trained_user(p)
    v2_weights = p.store.path(p.store.version(uid, 2)) / "adapter_model.safetensors"
    data = bytearray(v2_weights.read_bytes())
    data[-1] ^= 0x01
    v2_weights.write_bytes(bytes(data))
    g = p.answer(uid, QUERIES)
    assert g.adapter_version == 1 and g.fell_back and len(g.skipped) == 1
    assert "v2" in g.skipped[0] and "adapter_model.safetensors" in g.skipped[0]
    assert g.outputs == peft_answers(p, uid, 1, QUERIES)  # v1 answered, as PEFT answers with v1's files
    served = p.store.resolve_active(uid)
    assert served.version.version == 1 and [e.version for e in served.skipped] == [2]
    again = p.answer(uid, QUERIES)  # each answer says what it skipped, not only the first
    assert (again.adapter_version, again.skipped, again.outputs) == (1, g.skipped, g.outputs)
    p.rollback(uid, 1)
    with pytest.raises(CorruptAdapterError, match="v2.*adapter_model.safetensors"):
        p.rollback(uid, 2)
    p.store.set_active(uid, 2)  # store level: no check; an export must still refuse the corrupt file
    blob, served = p.export_served(uid, PASS)  # ... and carry the newest intact version, saying so
    assert served.version.version == 1 and [e.version for e in served.skipped] == [2]
    assert unpack(crypto.decrypt(blob, PASS)).adapter["version"] == 1
    assert_clean(p, snap)


# -- deletion ----------------------------------------------------------------------------------
def raw_bytes(root: Path) -> dict[str, bytes]:
    return {str(f.relative_to(root)): f.read_bytes() for f in root.rglob("*") if f.is_file()}


def test_delete_user_leaves_nothing_on_disk_or_in_the_db(p):
    uid, marker = "zq7DeleteMeUser", "xylophone-quasar-7741"
    trained_user(p, uid)
    p.add_history(uid, "LaMP_2M", [{"id": "secret", "description": f"{marker} space", "tag": "comedy"}])
    p.update(uid)
    p.answer(uid, QUERIES)  # fills the in-memory retrieval cache and loads the user's weights
    p.store.tokens.issue(uid)
    (p.store.cache_dir(uid) / "profile.txt").write_text(marker)
    keeper = trained_user(p, "keeper")
    p.add_history(keeper, "LaMP_2M", [{"id": "k", "description": "keeper marker-keep-123", "tag": "comedy"}])
    root = p.store.root
    blobs = raw_bytes(root)
    assert any(marker.encode() in b for b in blobs.values())  # the check below can see data when it is there
    assert uid in p._histories and uid in p.slots.mm.users

    report = p.delete_user(uid)
    assert report["scrubbed"] and report["rows"]["users"] == 1 and report["rows"]["history_items"] == 13
    assert report["rows"]["adapter_versions"] == 3 and report["rows"]["tokens"] == 1 and report["rows"]["jobs"] == 3
    assert uid not in p._histories and uid not in p.slots.mm.users and not p.store.has_user(uid)
    assert not [x for x in root.rglob("*") if uid in str(x.relative_to(root))]
    leaks = [name for name, data in raw_bytes(root).items() if uid.encode() in data or marker.encode() in data]
    assert leaks == []  # store.db, its WAL and every adapter file
    c = sqlite3.connect(root / "store.db")
    try:
        tables = [r[0] for r in c.execute("SELECT name FROM sqlite_master WHERE type='table'")]
        assert {"users", "history_items", "adapter_versions", "jobs", "tokens"} <= set(tables)
        for t in tables:
            assert uid not in repr(c.execute(f"SELECT * FROM {t}").fetchall()), t
    finally:
        c.close()
    # the other user is untouched
    assert p.answer(keeper, QUERIES).adapter_version == 2
    assert any(b"marker-keep-123" in b for b in raw_bytes(root).values())
    reopened = AdapterStore(root)
    try:
        assert reopened.recovered == {"tmp": [], "adapters": [], "cache": []} and reopened.users() == ["keeper"]
    finally:
        reopened.close()


def test_prompts_read_only_new_history_rows_and_never_refit(p, monkeypatch):
    """Serving keeps each user's history and BM25 index in memory: after one item is added, the
    next prompt reads that one row and refits nothing, and equals a prompt built from scratch."""
    from oppu.data.users import Query
    from oppu.retrieval.bm25 import BM25Retriever

    uid = p.store.new_user()
    p.add_history(uid, "LaMP_2M", make_items("h", 300, 3))
    fits, reads = [], []
    real_fit, real_history = BM25Retriever.fit, p.store.history
    monkeypatch.setattr(BM25Retriever, "fit", lambda self, docs: fits.append(len(docs)) or real_fit(self, docs))

    def history(user_id, after_seq=0):
        rows = real_history(user_id, after_seq)
        reads.append(len(rows))
        return rows

    monkeypatch.setattr(p.store, "history", history)
    p.user_prompt(uid, "a first question")
    p.add_history(uid, "LaMP_2M", [{"id": "new", "description": "robots at war in deep space", "tag": "sci-fi"}])
    text = "robots war space"
    got = p.user_prompt(uid, text)
    assert reads == [300, 1] and fits == []
    hist = real_history(uid)
    monkeypatch.setattr(BM25Retriever, "fit", real_fit)
    fresh = p.prompt(as_user(uid, hist), Query("q0", text, None, tuple(h.item_id for h in hist)), "rag", p.k)
    assert got == fresh and "robots at war in deep space" in got
    p.max_history_items_held = 250  # past it, the least recently used history is dropped (rebuilt on demand)
    other = p.store.new_user()
    p.add_history(other, "LaMP_2M", make_items("x", 10, 4))
    p.user_prompt(other, "anything")
    assert uid not in p._histories and other in p._histories
    assert p.user_prompt(uid, text) == got and reads[-1] == 301  # rebuilt from the store, same prompt
