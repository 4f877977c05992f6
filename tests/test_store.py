"""The adapter store without a model: ids, atomic versions (also across a hard crash), checksums
and fallback, concurrent readers beside a writer, history, jobs and tokens."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from oppu.store import (ADAPTER_FILES, AdapterStore, CorruptAdapterError, HistoryError, InvalidUserId, JobError,
                        NoAdapter, UnknownUser, UnknownVersion, UserExists, validate_user_id)

TASK = "LaMP_2M"


def fake_adapter(payload: bytes = b"weights"):
    """A writer that puts the two standard files (plus PEFT's README) into a version dir."""
    def write(d: Path) -> None:
        (d / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 8}))
        (d / "adapter_model.safetensors").write_bytes(payload)
        (d / "README.md").write_text("model card")
    return write


@pytest.fixture
def store(tmp_path):
    s = AdapterStore(tmp_path / "store")
    yield s
    s.close()


def flip_byte(path: Path, at: int = 0) -> None:
    data = bytearray(path.read_bytes())
    data[at] ^= 0xFF
    path.write_bytes(bytes(data))


def visible_files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


# -- user ids ----------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", ["../x", "a/b", "", "..", ".", "/etc", "a\\b", "a b", "x\n", "é", "a" * 65,
                                 "a.b", None, 5, b"abc"])
def test_bad_user_ids_are_rejected_by_name(store, bad):
    with pytest.raises(InvalidUserId) as e:
        validate_user_id(bad)
    assert repr(bad) in str(e.value) and "[A-Za-z0-9_-]" in str(e.value)
    for call in (lambda: store.create_user(bad), lambda: store.add_history(bad, TASK, []),
                 lambda: store.put_version(bad, fake_adapter(), task=TASK, peft_type="lora"),
                 lambda: store.delete_user(bad), lambda: store.user_dir(bad)):
        with pytest.raises(InvalidUserId):
            call()
    assert not any(p.name not in ("store.db", "store.db-wal", "store.db-shm") for p in store.root.iterdir())


def test_good_ids_and_generated_ids_stay_inside_the_store(store):
    for uid in ("a", "A-b_9", "x" * 64, "-dash"):
        store.create_user(uid)
        assert store.user_dir(uid).parent == store.root / "adapters"
    generated = {store.new_user() for _ in range(20)}
    assert len(generated) == 20 and all(validate_user_id(u) == u and not u.startswith("-") for u in generated)
    with pytest.raises(UserExists, match="'a'"):
        store.create_user("a")
    with pytest.raises(UnknownUser, match="'nobody'"):
        store.history("nobody")


# -- atomic versions ---------------------------------------------------------------------------
def test_put_version_writes_standard_files_with_checksums(store):
    uid = store.new_user()
    v = store.put_version(uid, fake_adapter(), task=TASK, peft_type="lora", note="first")
    assert (v.version, v.parent_version, store.active_version(uid)) == (1, None, 1)
    d = store.path(v)
    assert d == store.root / "adapters" / uid / "v1"
    assert sorted(p.name for p in d.iterdir()) == sorted(ADAPTER_FILES)  # README dropped
    assert set(v.sha256) == set(ADAPTER_FILES)
    assert list((store.root / "tmp").iterdir()) == []


def test_writer_refusing_pickles_and_missing_files(store):
    uid = store.new_user()

    def pickled(d):
        fake_adapter()(d)
        (d / "adapter_model.bin").write_bytes(b"\x80\x04pickle")
    with pytest.raises(ValueError, match="adapter_model.bin"):
        store.put_version(uid, pickled, task=TASK, peft_type="lora")
    with pytest.raises(ValueError, match="adapter_model.safetensors"):
        store.put_version(uid, lambda d: (d / "adapter_config.json").write_text("{}"), task=TASK, peft_type="lora")
    assert store.versions(uid) == [] and list((store.root / "tmp").iterdir()) == []


def test_exception_after_files_before_row_leaves_no_version(store, monkeypatch):
    uid = store.new_user()

    def boom(*a, **k):
        raise RuntimeError("disk full while recording")
    monkeypatch.setattr(store, "_insert_version", boom)  # files written, fsynced, renamed; row fails
    with pytest.raises(RuntimeError, match="disk full"):
        store.put_version(uid, fake_adapter(), task=TASK, peft_type="lora")
    assert store.versions(uid) == [] and store.active_version(uid) is None
    assert visible_files(store.root / "adapters") == [] and list((store.root / "tmp").iterdir()) == []
    monkeypatch.undo()
    assert store.put_version(uid, fake_adapter(), task=TASK, peft_type="lora").version == 1


CRASH = """
import os, sys
from pathlib import Path
from oppu.store import AdapterStore
s = AdapterStore(sys.argv[1])
uid = s.create_user("crashy") if not s.has_user("crashy") else "crashy"
def die(*a, **k):
    os._exit(17)  # a hard crash: no finally, no cleanup, no rollback
setattr(s, sys.argv[2], die)
def write(d):
    (d / "adapter_config.json").write_text("{}")
    (d / "adapter_model.safetensors").write_bytes(b"w")
s.put_version(uid, write, task="LaMP_2M", peft_type="lora")
"""


@pytest.mark.parametrize("crash_in, leftover", [("_publish", "tmp"), ("_insert_version", "adapters")])
def test_hard_crash_never_shows_a_half_version_and_next_open_cleans(tmp_path, crash_in, leftover):
    root = tmp_path / "store"
    r = subprocess.run([sys.executable, "-c", textwrap.dedent(CRASH), str(root), crash_in], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 17, r.stderr
    assert visible_files(root / leftover), "the crash should have left files behind"
    store = AdapterStore(root)
    try:
        assert store.versions("crashy") == [] and store.active_version("crashy") is None
        assert list((root / "tmp").iterdir()) == [] and visible_files(root / "adapters") == []
        assert store.recovered["tmp" if leftover == "tmp" else "adapters"]
        v = store.put_version("crashy", fake_adapter(), task=TASK, peft_type="lora")
        assert v.version == 1 and store.verify("crashy", 1)
    finally:
        store.close()


# -- checksums and fallback --------------------------------------------------------------------
def test_corrupt_file_is_named_and_serving_falls_back(store):
    uid = store.new_user()
    for i in range(3):
        store.put_version(uid, fake_adapter(b"w%d" % i), task=TASK, peft_type="lora")
    assert store.resolve_active(uid).version.version == 3
    flip_byte(store.path(store.version(uid, 3)) / "adapter_model.safetensors")
    with pytest.raises(CorruptAdapterError) as e:
        store.verify(uid, 3)
    assert (e.value.version, e.value.file) == (3, "adapter_model.safetensors")
    assert "v3" in str(e.value) and "adapter_model.safetensors" in str(e.value) and "checksum" in str(e.value)
    with pytest.raises(CorruptAdapterError, match="v3"):
        store.read_version_files(uid, 3)
    served = store.resolve_active(uid)
    assert served.version.version == 2 and served.fell_back and served.skipped[0].version == 3
    (store.path(store.version(uid, 2)) / "adapter_config.json").unlink()
    served = store.resolve_active(uid)
    assert served.version.version == 1 and [e.version for e in served.skipped] == [3, 2]
    assert "is missing" in str(served.skipped[1])
    flip_byte(store.path(store.version(uid, 1)) / "adapter_config.json")
    with pytest.raises(CorruptAdapterError, match="v3"):
        store.resolve_active(uid)
    assert store.active_version(uid) == 3  # serving never rewrites the active pointer


def test_no_adapter_and_unknown_version(store):
    uid = store.new_user()
    with pytest.raises(NoAdapter, match=uid):
        store.resolve_active(uid)
    with pytest.raises(UnknownVersion, match="version 4"):
        store.set_active(uid, 4)
    with pytest.raises(UnknownVersion, match="parent"):
        store.put_version(uid, fake_adapter(), task=TASK, peft_type="lora", parent_version=9)


# -- concurrency -------------------------------------------------------------------------------
def test_concurrent_readers_see_only_complete_versions_while_a_writer_adds(store):
    uid = store.new_user()
    store.put_version(uid, fake_adapter(b"v0"), task=TASK, peft_type="lora")
    stop, errors, reads = threading.Event(), [], [0]

    def reader():
        try:
            while not stop.is_set():
                vs = store.versions(uid)
                for v in vs:  # every visible version is whole
                    store.verify(uid, v.version)
                served = store.resolve_active(uid)
                assert not served.fell_back and served.version.version >= vs[-1].version - 1
                reads[0] += 1
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=reader, daemon=True) for _ in range(4)]
    for t in threads:
        t.start()
    t0 = time.time()
    for i in range(15):
        store.put_version(uid, fake_adapter(b"v%d" % (i + 1)), task=TASK, peft_type="lora", parent_version=i + 1)
    stop.set()
    for t in threads:
        t.join(timeout=30)
    assert not any(t.is_alive() for t in threads) and time.time() - t0 < 30
    assert errors == [] and reads[0] > 0
    assert [v.version for v in store.versions(uid)] == list(range(1, 17)) and store.active_version(uid) == 16


def test_concurrent_writers_get_distinct_versions(store):
    uid = store.new_user()
    errors = []

    def writer(k):
        try:
            for i in range(5):
                store.put_version(uid, fake_adapter(b"%d-%d" % (k, i)), task=TASK, peft_type="lora")
        except Exception as e:  # pragma: no cover
            errors.append(e)
    threads = [threading.Thread(target=writer, args=(k,)) for k in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert errors == [] and [v.version for v in store.versions(uid)] == list(range(1, 16))
    assert all(store.verify(uid, n) for n in range(1, 16))


# -- history, jobs, tokens ---------------------------------------------------------------------
def test_history_is_all_or_nothing_with_named_duplicates(store):
    uid = store.new_user()
    assert store.add_history(uid, TASK, [{"id": "a", "x": 1}, {"id": 2, "x": 2}]) == [1, 2]
    with pytest.raises(HistoryError, match="'b'.*this batch"):
        store.add_history(uid, TASK, [{"id": "b"}, {"id": "b"}])
    with pytest.raises(HistoryError, match="'a'.*already stored"):
        store.add_history(uid, TASK, [{"id": "c"}, {"id": "a"}])
    with pytest.raises(HistoryError, match="LaMP_2M"):
        store.add_history(uid, "LaMP_4", [{"id": "z"}])
    hist = store.history(uid)
    assert [(h.seq, h.item_id) for h in hist] == [(1, "a"), (2, "2")] and hist[1].item == {"id": "2", "x": 2}
    assert [h.item_id for h in store.history(uid, after_seq=1)] == ["2"]


def test_jobs_follow_their_lifecycle(store):
    uid = store.new_user()
    job = store.jobs.create(uid, "train")
    assert job.status == "queued"
    assert store.jobs.set(job.job_id, "running").status == "running"
    with pytest.raises(JobError, match="cannot become queued"):
        store.jobs.set(job.job_id, "queued")
    done = store.jobs.set(job.job_id, "failed", error="boom")
    assert (done.status, done.error) == ("failed", "boom")
    with pytest.raises(JobError, match="unknown job status 'weird'"):
        store.jobs.set(job.job_id, "weird")
    other = store.jobs.create(uid, "update", status="running")
    assert store.jobs.fail_unfinished() == [other.job_id]
    assert [j.status for j in store.jobs.of_user(uid)] == ["failed", "failed"]


def test_tokens_are_stored_hashed(store):
    uid = store.new_user()
    tok = store.tokens.issue(uid)
    assert len(tok) >= 43 and store.tokens.user_for(tok) == uid
    assert store.tokens.user_for(tok + "x") is None and store.tokens.user_for("") is None
    raw = [tuple(r) for r in store.db.conn().execute("SELECT * FROM tokens")]
    assert tok not in repr(raw)
    assert store.tokens.revoke(uid) == 1 and store.tokens.user_for(tok) is None


# -- file modes ----------------------------------------------------------------------------------
def test_store_files_are_private_whatever_the_umask(tmp_path):
    import os
    import stat

    root = tmp_path / "older" / "store"
    root.mkdir(parents=True, mode=0o755)  # a store made before: opening it makes it private
    old = os.umask(0o022)
    try:
        with AdapterStore(root) as st:
            uid = st.new_user()
            st.add_history(uid, TASK, [{"id": "1", "description": "d", "tag": "t"}])
            v = st.put_version(uid, fake_adapter(), task=TASK, peft_type="lora")
            st.cache_dir(uid)
            paths = [root, root / "store.db", root / "store.db-wal", root / "adapters", st.path(v).parent,
                     st.path(v), *(st.path(v) / n for n in ADAPTER_FILES), root / "tmp", root / "cache"]
            modes = {str(p.relative_to(tmp_path)): oct(stat.S_IMODE(p.stat().st_mode)) for p in paths}
    finally:
        os.umask(old)
    assert modes == {k: "0o700" if (tmp_path / k).is_dir() else "0o600" for k in modes}, modes


# -- quotas --------------------------------------------------------------------------------------
def test_history_quotas_name_the_limit_and_store_nothing(store):
    from oppu.store import QuotaExceeded

    uid = store.new_user()
    item = lambda i: {"id": str(i), "description": "d" * 10, "tag": "t"}  # noqa: E731
    store.add_history(uid, TASK, [item(i) for i in range(3)], max_items=4)
    with pytest.raises(QuotaExceeded, match=r"2 more item\(s\) would make 5 history items, over the limit of 4 "
                                            r"\(max_history_items\)"):
        store.add_history(uid, TASK, [item(3), item(4)], max_items=4)
    assert store.count_history(uid) == 3  # all or nothing
    size = store.db.conn().execute("SELECT bytes FROM history_totals WHERE user_id=?", (uid,)).fetchone()[0]
    assert size == sum(len(json.dumps(item(i)).encode()) for i in range(3))
    with pytest.raises(QuotaExceeded, match=f"over the limit of {size + 10} \\(max_history_bytes\\)"):
        store.add_history(uid, TASK, [item(9)], max_bytes=size + 10)
    with store.db.write() as c:  # a store from before the totals: counted once from the rows
        c.execute("DELETE FROM history_totals")
    with pytest.raises(QuotaExceeded, match="would make 4 history items, over the limit of 3"):
        store.add_history(uid, TASK, [item(5)], max_items=3)
    store.add_history(uid, TASK, [item(5)], max_items=4)
    assert store.count_history(uid) == 4
    assert store.delete_user(uid)["rows"]["history_totals"] == 1
