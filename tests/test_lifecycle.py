"""A user's adapter over time on a micro base: history validation, train, incremental update with
replay, rollback, corruption fallback, encrypted export/import, and deletion that leaves nothing."""
from __future__ import annotations

import base64
import json
import random
import sqlite3
from pathlib import Path

import pytest
import torch

from oppu import crypto
from oppu.config import UserTrainConfig
from oppu.lifecycle import Personalizer, replay_sample, validate_items
from oppu.store import AdapterStore, CorruptAdapterError, HistoryError, HistoryItem, NoAdapter, UserExists
from oppu.store.bundle import BundleError, pack, unpack
from oppu.tasks import get_task

TASK = get_task("LaMP_2M")
WORDS = "space robot love city war dream ship crime family future past king magic detective".split()
PASS = "correct horse battery staple"


def make_items(prefix: str, n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    return [{"id": f"{prefix}{i}", "description": " ".join(rng.choice(WORDS) for _ in range(8)),
             "tag": rng.choice(TASK.labels[:4])} for i in range(n)]


def query(desc: str) -> str:
    return TASK.instruction.format(description=desc)


QUERIES = [query("space robot war ship"), query("love family dream"), query("crime detective city king")]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    from oppu.model.base import build_tiny_base, load_base

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a shared 2-core machine: more threads only contend
    d = tmp_path_factory.mktemp("base")
    corpus = [TASK.render_item(it) for it in make_items("c", 60, 0)] + [" ".join(TASK.labels)]
    build_tiny_base(corpus, d / "base", preset="micro")
    model, tok = load_base(d / "base")
    yield model, tok
    torch.set_num_threads(threads)


@pytest.fixture
def p(base, tmp_path):
    model, tok = base
    store = AdapterStore(tmp_path / "store")
    yield Personalizer(store, model, tok, "LaMP_2M", UserTrainConfig(epochs=2, batch_size=4, lr=5e-3), peft="lora",
                       seed=0, k=2, max_len=128)
    store.close()


def snapshot(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_clean(model, snap) -> None:
    from peft.tuners.tuners_utils import BaseTunerLayer

    assert not any(isinstance(m, BaseTunerLayer) for m in model.modules()) and not hasattr(model, "peft_config")
    sd = model.state_dict()
    assert sd.keys() == snap.keys() and all(torch.equal(sd[k], snap[k]) for k in sd)


def weights(p: Personalizer, uid: str, version: int) -> dict[str, torch.Tensor]:
    from safetensors.torch import load

    return load(p.store.read_version_files(uid, version)["adapter_model.safetensors"])


def trained_user(p: Personalizer, uid: str | None = None, n_old: int = 8, n_new: int = 4, seed: int = 1) -> str:
    uid = p.store.create_user(uid) if uid else p.store.new_user()
    p.add_history(uid, "LaMP_2M", make_items("o", n_old, seed))
    p.train(uid)
    p.add_history(uid, "LaMP_2M", make_items("n", n_new, seed + 1))
    p.update(uid, replay=0.5)
    return uid


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
        p.generate(uid, QUERIES)
    old, new = make_items("o", 8, 1), make_items("n", 4, 2)
    p.add_history(uid, "LaMP_2M", old)
    r1 = p.train(uid)
    assert (r1.version, r1.parent_version, r1.history_seq) == (1, None, 8)
    assert r1.sources == tuple(f"item:{it['id']}" for it in old) and len(r1.losses) == 2
    assert_clean(model, snap)
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
    assert_clean(model, snap)
    assert [j.status for j in p.store.jobs.of_user(uid)] == ["failed", "done", "failed", "done"]

    g2 = p.generate(uid, QUERIES)
    assert g2.adapter_version == 2 and not g2.fell_back and len(g2.outputs) == 3
    assert g2.predictions == [TASK.parse(o) for o in g2.outputs]
    assert p.rollback(uid, 1).version == 1 and p.store.active_version(uid) == 1
    g1 = p.generate(uid, QUERIES)
    assert g1.adapter_version == 1
    assert [v.version for v in p.versions(uid)] == [1, 2]
    # An update after the rollback continues v1 on everything v1 has not seen.
    r3 = p.update(uid, replay=0.0)
    assert (r3.version, r3.parent_version) == (3, 1) and set(r3.sources) == news
    assert_clean(model, snap)


def test_same_history_same_adapter(p):
    a, b = p.store.create_user("twin-a"), p.store.create_user("twin-b")
    for u in (a, b):
        p.add_history(u, "LaMP_2M", make_items("o", 6, 5))
    p.train(a)
    p.train(a)
    wa1, wa2 = weights(p, a, 1), weights(p, a, 2)
    assert all(torch.equal(wa1[k], wa2[k]) for k in wa1)  # seeded by (seed, user id)


def test_corrupt_active_version_falls_back_and_cannot_be_rolled_back_to(p, base):
    model, _ = base
    snap = snapshot(model)
    uid = trained_user(p)
    v2_weights = p.store.path(p.store.version(uid, 2)) / "adapter_model.safetensors"
    data = bytearray(v2_weights.read_bytes())
    data[-1] ^= 0x01
    v2_weights.write_bytes(bytes(data))
    from oppu.adapters import detach
    pm, served = p.store.load_active_with_fallback(uid, model)
    try:
        assert served.version.version == 1 and served.skipped[0].version == 2
    finally:
        detach(pm)
    g = p.generate(uid, QUERIES)
    assert g.adapter_version == 1 and g.fell_back
    assert "v2" in g.skipped[0] and "adapter_model.safetensors" in g.skipped[0]
    p.rollback(uid, 1)
    with pytest.raises(CorruptAdapterError, match="v2.*adapter_model.safetensors"):
        p.rollback(uid, 2)
    p.store.set_active(uid, 2)  # store level: no check; an export must still refuse the corrupt file
    with pytest.raises(CorruptAdapterError, match="v2"):
        p.export_user(uid, PASS)
    assert_clean(model, snap)


# -- export / import ---------------------------------------------------------------------------
def test_export_import_round_trip_gives_identical_generations(p):
    uid = trained_user(p)
    blob = p.export_user(uid, PASS)
    assert blob.startswith(crypto.MAGIC) and b"description" not in blob and uid.encode() not in blob
    v = p.import_user(blob, PASS, user_id="copy")
    assert (v.version, v.parent_version, v.history_seq) == (1, None, 12)
    assert p.store.read_version_files("copy", 1) == p.store.read_version_files(uid, 2)
    assert [h.item for h in p.store.history("copy")] == [h.item for h in p.store.history(uid)]
    for k in (0, 2):
        a, b = p.generate(uid, QUERIES, k=k), p.generate("copy", QUERIES, k=k)
        assert a.outputs == b.outputs and (a.adapter_version, b.adapter_version) == (2, 1)
    # the copy keeps evolving like the original: an update trains on what came after the export
    p.add_history("copy", "LaMP_2M", make_items("later", 2, 9))
    assert p.update("copy").parent_version == 1
    with pytest.raises(UserExists, match="'copy'"):
        p.import_user(blob, PASS, user_id="copy")
    with pytest.raises(UserExists, match=uid):
        p.import_user(blob, PASS)

    lean = p.import_user(p.export_user(uid, PASS, include_history=False), PASS, user_id="lean")
    assert lean.history_seq == 0 and p.store.history("lean") == []
    assert p.generate("lean", QUERIES, k=0).outputs == p.generate(uid, QUERIES, k=0).outputs


def test_wrong_passphrase_or_any_flipped_byte_fails_cleanly_and_writes_nothing(p, tmp_path):
    uid = trained_user(p)
    blob = p.export_user(uid, PASS)
    before = sorted(str(x.relative_to(p.store.root)) for x in p.store.root.rglob("*") if "store.db" not in x.name)
    users = p.store.users()
    with pytest.raises(crypto.DecryptionError, match="wrong passphrase, or the file was modified"):
        p.import_user(blob, PASS + "!", user_id="intruder")
    for at in (3, len(crypto.MAGIC) + 1, len(crypto.MAGIC) + 40, len(blob) // 2, len(blob) - 1):
        bad = bytearray(blob)
        bad[at] ^= 0x01
        with pytest.raises(crypto.CryptoError):
            p.import_user(bytes(bad), PASS, user_id="intruder")
    with pytest.raises(crypto.CryptoError):
        p.import_user(blob[:-20], PASS, user_id="intruder")
    assert p.store.users() == users
    assert sorted(str(x.relative_to(p.store.root)) for x in p.store.root.rglob("*")
                  if "store.db" not in x.name) == before


def test_crypto_header_and_kdf_bounds():
    blob = crypto.encrypt(b"payload", PASS)
    header, _, _ = crypto.read_header(blob)
    assert (header["kdf"], header["n"], header["r"], header["p"], header["cipher"]) == ("scrypt", 2 ** 15, 8, 1,
                                                                                        "AES-256-GCM")
    assert len(base64.b64decode(header["salt"])) == 16 and len(base64.b64decode(header["nonce"])) == 12
    assert crypto.decrypt(blob, PASS) == b"payload" and crypto.encrypt(b"payload", PASS) != blob  # fresh salt
    hlen = int.from_bytes(blob[8:10], "big")
    greedy = json.dumps({**header, "n": 2 ** 30}, separators=(",", ":")).encode()
    with pytest.raises(crypto.FormatError, match="out of range"):  # refused before any key derivation
        crypto.decrypt(crypto.MAGIC + len(greedy).to_bytes(2, "big") + greedy + blob[10 + hlen:], PASS)
    with pytest.raises(crypto.FormatError, match="magic"):
        crypto.decrypt(b"PK\x03\x04" + blob, PASS)
    with pytest.raises(crypto.CryptoError, match="passphrase"):
        crypto.encrypt(b"x", "")


def test_import_refuses_an_adapter_that_does_not_fit_this_base(p, base):
    from safetensors.torch import load, save

    model, _ = base
    snap = snapshot(model)
    uid = trained_user(p)
    b = unpack(crypto.decrypt(p.export_user(uid, PASS), PASS))
    w = load(b.files["adapter_model.safetensors"])
    key = next(k for k in w if "lora_A" in k)
    w[key] = torch.zeros(w[key].shape[0], w[key].shape[1] * 2)  # made for a wider base
    files = {**b.files, "adapter_model.safetensors": save(w)}
    v = p.store.version(uid, 2)
    hist = p.store.history(uid)
    forged = crypto.encrypt(pack("forged", b.task, v, files, hist), PASS)
    with pytest.raises(BundleError, match="does not load onto this base"):
        p.import_user(forged, PASS)
    assert not p.store.has_user("forged") and list((p.store.root / "tmp").iterdir()) == []
    assert_clean(model, snap)
    payload = json.loads(pack("forged", b.task, v, b.files, hist))
    payload["adapter"]["files"]["adapter_model.bin"] = payload["adapter"]["files"].pop("adapter_model.safetensors")
    with pytest.raises(BundleError, match="exactly"):
        p.import_user(crypto.encrypt(json.dumps(payload).encode(), PASS), PASS)


# -- deletion ----------------------------------------------------------------------------------
def raw_bytes(root: Path) -> dict[str, bytes]:
    return {str(f.relative_to(root)): f.read_bytes() for f in root.rglob("*") if f.is_file()}


def test_delete_user_leaves_nothing_on_disk_or_in_the_db(p):
    uid, marker = "zq7DeleteMeUser", "xylophone-quasar-7741"
    trained_user(p, uid)
    p.add_history(uid, "LaMP_2M", [{"id": "secret", "description": f"{marker} space", "tag": "comedy"}])
    p.update(uid)
    p.generate(uid, QUERIES)  # fills the in-memory retrieval cache
    p.store.tokens.issue(uid)
    (p.store.cache_dir(uid) / "profile.txt").write_text(marker)
    keeper = trained_user(p, "keeper")
    p.add_history(keeper, "LaMP_2M", [{"id": "k", "description": "keeper marker-keep-123", "tag": "comedy"}])
    root = p.store.root
    blobs = raw_bytes(root)
    assert any(marker.encode() in b for b in blobs.values())  # the check below can see data when it is there
    assert uid in p._rag

    report = p.delete_user(uid)
    assert report["scrubbed"] and report["rows"]["users"] == 1 and report["rows"]["history_items"] == 13
    assert report["rows"]["adapter_versions"] == 3 and report["rows"]["tokens"] == 1 and report["rows"]["jobs"] == 3
    assert uid not in p._rag and not p.store.has_user(uid)
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
    assert p.generate(keeper, QUERIES).adapter_version == 2
    assert any(b"marker-keep-123" in b for b in raw_bytes(root).values())
    reopened = AdapterStore(root)
    try:
        assert reopened.recovered == {"tmp": [], "adapters": [], "cache": []} and reopened.users() == ["keeper"]
    finally:
        reopened.close()
