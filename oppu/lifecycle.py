"""A user's adapter over time: add history, train, update incrementally, roll back, generate,
export/import (encrypted), delete. One `Personalizer` serves the CLI and the server.

    store = AdapterStore("var/oppu")
    p = Personalizer(store, model, tok, "LaMP_2M", UserTrainConfig(), peft="lora", seed=0, k=2)
    uid = store.new_user()
    p.add_history(uid, "LaMP_2M", items)     # validated against the task's item fields
    p.train(uid)                              # v1: a fresh module on the whole history
    p.add_history(uid, "LaMP_2M", more)
    p.update(uid, replay=0.5)                 # v2 (parent v1): new items + a seeded replay sample
    p.generate(uid, [query]).adapter_version  # 2; a corrupt v2 file -> serves v1, says so
    p.rollback(uid, 1)
    blob = p.export_user(uid, "passphrase"); p.import_user(blob, "passphrase", user_id="copy")
    p.delete_user(uid)                        # rows, files, caches; db and WAL scrubbed

The base model is shared and every adapter is plugged into it in place, so model work (train,
update, generate, import check) is serialised by one lock; store-only calls never take it.
"""
from __future__ import annotations

import json
import random
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

from oppu import crypto
from oppu.config import PEFT_TYPES, UserTrainConfig
from oppu.data.lamp import ITEM_FIELDS
from oppu.data.users import Query, User
from oppu.examples import history_examples, query_prompt
from oppu.store import AdapterStore, HistoryError, HistoryItem, JobError, NoAdapter, Version, validate_user_id
from oppu.store.bundle import BundleError, pack, unpack
from oppu.tasks import Task, get_task


@dataclass(frozen=True)
class TrainResult:
    user_id: str
    version: int
    parent_version: int | None
    job_id: str
    losses: list[float]
    sources: tuple[str, ...]      # the examples' sources ("item:<id>"), in history order
    history_seq: int


@dataclass(frozen=True)
class Generation:
    outputs: list[str]            # raw generated text
    predictions: list[str]        # task.parse(output)
    adapter_version: int          # the version that actually answered
    skipped: list[str] = field(default_factory=list)  # newer versions refused as corrupt, why

    @property
    def fell_back(self) -> bool:
        return bool(self.skipped)


def strip_adapter_layers(base) -> int:
    """Put back the original modules wherever a failed PEFT load left adapter layers behind."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    n = 0
    for module in list(base.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, BaseTunerLayer):
                setattr(module, name, child.get_base_layer())
                n += 1
    if hasattr(base, "peft_config"):  # set by injection; a clean unload deletes it too
        del base.peft_config
    return n


@contextmanager
def plugged(base, path: str | Path, trainable: bool = False):
    """The base with the adapter at `path` plugged in (a PeftModel); the base is clean again on
    exit, and also when loading fails half-way (e.g. an adapter made for another base)."""
    from peft import PeftModel

    from oppu.adapters import detach

    try:
        pm = PeftModel.from_pretrained(base, str(path), is_trainable=trainable)
    except Exception:
        strip_adapter_layers(base)
        raise
    if not trainable:
        pm.eval()
    try:
        yield pm
    finally:
        detach(pm)


def validate_items(task: Task, items: Any) -> list[dict[str, Any]]:
    """The items with string ids, or HistoryError naming the item (index and id) and the field."""
    if not isinstance(items, (list, tuple)):
        raise HistoryError(f"history items must be a list of objects, got {type(items).__name__}")
    fields = ITEM_FIELDS.get(task.id, task.item_fields)
    out, seen = [], set()
    for i, it in enumerate(items):
        where = f"history item #{i}"
        if not isinstance(it, dict):
            raise HistoryError(f"{where}: expected an object, got {type(it).__name__}")
        iid = it.get("id")
        if iid is None or isinstance(iid, bool) or not isinstance(iid, (str, int)) or str(iid) == "":
            raise HistoryError(f"{where}: field 'id' must be a non-empty string, got {iid!r}")
        where = f"{where} (id={str(iid)!r})"
        for f in fields:
            if f not in it:
                raise HistoryError(f"{where}: missing field {f!r} (task {task.id} items need {', '.join(fields)})")
            v = it[f]
            if f == "score":
                if isinstance(v, bool) or not isinstance(v, (str, int, float)):
                    raise HistoryError(f"{where}: field 'score' must be a number or string, got {type(v).__name__}")
            elif not isinstance(v, str):
                raise HistoryError(f"{where}: field {f!r} must be a string, got {type(v).__name__}")
        if str(iid) in seen:
            raise HistoryError(f"{where}: duplicate item id {str(iid)!r} in this batch")
        seen.add(str(iid))
        out.append({**it, "id": str(iid)})
    return out


def replay_sample(old: Sequence[HistoryItem], fraction: float, seed: int) -> list[HistoryItem]:
    """round(fraction * len(old)) old items (at least 1 when fraction > 0 and any exist), seeded,
    in history order."""
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"replay must be in [0, 1], got {fraction!r}")
    if not old or fraction == 0.0:
        return []
    n = max(1, round(fraction * len(old)))
    return sorted(random.Random(seed).sample(list(old), n), key=lambda h: h.seq)


class Personalizer:
    def __init__(self, store: AdapterStore, model, tok, task: str | Task, ucfg: UserTrainConfig = UserTrainConfig(),
                 peft: str = "lora", seed: int = 0, k: int = 2, retriever: str = "bm25", max_len: int = 384,
                 style: str = "compact", batch_size: int = 32):
        from oppu.adapters import peft_config

        if peft not in PEFT_TYPES:
            raise ValueError(f"unknown PEFT type {peft!r}; valid: {', '.join(PEFT_TYPES)}")
        if k < 0:
            raise ValueError(f"k must be >= 0, got {k}")
        self.store, self.model, self.tok = store, model, tok
        self.task = get_task(task) if isinstance(task, str) else task
        self.ucfg, self.peft, self.seed, self.k = ucfg, peft, seed, k
        self.retriever, self.max_len, self.style, self.batch_size = retriever, max_len, style, batch_size
        self.pcfg = peft_config(peft, ucfg)
        # Adapters train on the prompt shapes they will serve: plain, plus RAG when k > 0.
        self.variants = ("plain", "rag") if k > 0 else ("plain",)
        self.model_lock = threading.RLock()
        self._rag: dict[str, tuple[int, dict]] = {}  # user -> (last history seq, query_prompt cache)

    # -- history -------------------------------------------------------------------------------
    def add_history(self, user_id: str, task: str, items: Sequence[dict[str, Any]]) -> list[int]:
        t = get_task(task)
        if t.id != self.task.id:
            raise HistoryError(f"this personalizer serves task {self.task.id!r}, not {t.id!r}")
        return self.store.add_history(user_id, t.id, validate_items(t, items))

    def _history(self, user_id: str) -> list[HistoryItem]:
        task = self.store.user(user_id).task
        if task not in (None, self.task.id):
            raise HistoryError(f"user {user_id!r} belongs to task {task!r}; this personalizer serves {self.task.id!r}")
        return self.store.history(user_id)

    @staticmethod
    def _as_user(user_id: str, hist: Sequence[HistoryItem]) -> User:
        items = [h.item for h in hist]
        return User(user_id, items, [], {it["id"]: it for it in items})

    # -- training ------------------------------------------------------------------------------
    @contextmanager
    def _job(self, user_id: str, kind: str, job_id: str | None) -> Iterator[str]:
        jobs = self.store.jobs
        if job_id is None:
            job_id = jobs.create(user_id, kind, status="running").job_id
        else:
            job = jobs.get(job_id)
            if job.user_id != user_id:
                raise JobError(f"job {job_id!r} belongs to another user, not {user_id!r}")
            jobs.set(job_id, "running")
        try:
            yield job_id
        except BaseException as e:
            try:
                jobs.set(job_id, "failed", error=f"{type(e).__name__}: {e}")
            except JobError:
                pass  # the job went with its user (deleted meanwhile)
            raise
        try:
            jobs.set(job_id, "done")
        except JobError:
            pass

    def train(self, user_id: str, job_id: str | None = None, note: str = "") -> TrainResult:
        """A fresh adapter on the whole history -> a new active version (no parent)."""
        from oppu.adapters import train_user

        validate_user_id(user_id)
        with self._job(user_id, "train", job_id) as jid:
            hist = self._history(user_id)
            exs = history_examples(self.task, self._as_user(user_id, hist), self.variants, self.k,
                                   self.retriever, None, self.style)
            if not exs:
                raise HistoryError(f"user {user_id!r} has no usable history item to train an adapter on")

            def write(d: Path) -> dict[str, Any]:
                losses = train_user(self.model, self.tok, exs, self.pcfg, self.ucfg, self.seed, user_id, d,
                                    self.max_len)
                return {"losses": losses}

            with self.model_lock:
                v = self.store.put_version(user_id, write, task=self.task.id, peft_type=self.peft,
                                           history_seq=hist[-1].seq, note=note or "train",
                                           meta=self._meta(exs, "train"))
        return self._result(v, jid)

    def update(self, user_id: str, replay: float = 0.5, job_id: str | None = None, note: str = "") -> TrainResult:
        """Continue the active adapter on the items added since it was trained plus a seeded
        replay sample of older items -> a new active version whose parent is the old one."""
        from oppu.adapters import user_seed
        from oppu.train import encode, train_loop

        validate_user_id(user_id)
        with self._job(user_id, "update", job_id) as jid:
            hist = self._history(user_id)
            active = self.store.active_version(user_id)
            if active is None:
                raise NoAdapter(f"user {user_id!r} has no adapter to update; train one first")
            parent = self.store.version(user_id, active)
            if parent.peft_type != self.peft:
                raise ValueError(f"user {user_id!r} v{active} is {parent.peft_type}; "
                                 f"this personalizer trains {self.peft}")
            path = self.store.verify(user_id, active)  # never continue from a corrupt file
            new = [h for h in hist if h.seq > parent.history_seq]
            if not new:
                raise HistoryError(f"user {user_id!r}: no history added since v{active}; nothing to update")
            old = [h for h in hist if h.seq <= parent.history_seq]
            tag = f"{user_id}:v{active}:{hist[-1].seq}"
            replayed = replay_sample(old, replay, user_seed(self.seed, "replay:" + tag))
            chosen = {f"item:{h.item_id}" for h in new + replayed}
            # RAG contexts come from the whole history (item i sees items before it), so build all, keep some.
            exs = [e for e in history_examples(self.task, self._as_user(user_id, hist), self.variants, self.k,
                                               self.retriever, None, self.style) if e.source in chosen]
            if not exs:
                raise HistoryError(f"user {user_id!r}: the items added since v{active} give no training example")

            def write(d: Path) -> dict[str, Any]:
                with plugged(self.model, path, trainable=True) as pm:
                    losses = train_loop(pm, pm.parameters(), encode(self.tok, exs, self.max_len), self.ucfg.epochs,
                                        self.ucfg.lr, self.ucfg.batch_size, user_seed(self.seed, tag),
                                        self.tok.pad_token_id, weight_decay=self.ucfg.weight_decay)
                    pm.save_pretrained(str(d))
                return {"losses": losses}

            with self.model_lock:
                v = self.store.put_version(user_id, write, task=self.task.id, peft_type=self.peft,
                                           parent_version=active, history_seq=hist[-1].seq,
                                           note=note or f"update of v{active} (replay {replay})",
                                           meta={**self._meta(exs, "update"), "replay": replay,
                                                 "new_items": len(new)})
        return self._result(v, jid)

    @staticmethod
    def _meta(exs, mode: str) -> dict[str, Any]:
        return {"mode": mode, "examples": len(exs), "sources": list(dict.fromkeys(e.source for e in exs))}

    @staticmethod
    def _result(v: Version, job_id: str) -> TrainResult:
        return TrainResult(v.user_id, v.version, v.parent_version, job_id, v.meta.get("losses", []),
                           tuple(v.meta.get("sources", [])), v.history_seq)

    def rollback(self, user_id: str, version: int) -> Version:
        """Make an older (or any existing) version active again, after checking its files."""
        self.store.verify(user_id, version)
        self.store.set_active(user_id, version)
        return self.store.version(user_id, version)

    def versions(self, user_id: str) -> list[Version]:
        return self.store.versions(user_id)

    # -- inference -----------------------------------------------------------------------------
    def _prompt_cache(self, user_id: str, hist: Sequence[HistoryItem]) -> dict:
        last = hist[-1].seq if hist else 0
        got = self._rag.get(user_id)
        if got is None or got[0] != last:  # the retrieval index follows the history
            got = (last, {})
            self._rag[user_id] = got
        return got[1]

    def generate(self, user_id: str, inputs: Sequence[str], k: int | None = None) -> Generation:
        """Answer LaMP-style inputs with the user's active adapter (verified; a corrupt one falls
        back to the previous good version), retrieving k history items into each prompt."""
        from oppu.engine import generate

        k = self.k if k is None else k
        if k < 0:
            raise ValueError(f"k must be >= 0, got {k}")
        if isinstance(inputs, str) or not all(isinstance(x, str) for x in inputs):
            raise ValueError("inputs must be a list of strings")
        hist = self._history(user_id)
        user = self._as_user(user_id, hist)
        visible = tuple(h.item_id for h in hist)
        cache = self._prompt_cache(user_id, hist)
        prompts = [query_prompt(self.task, user, Query(f"q{i}", x, None, visible), "rag" if k > 0 else "plain", k,
                                self.retriever, None, self.style, cache) for i, x in enumerate(inputs)]
        with self.model_lock:
            served = self.store.resolve_active(user_id)
            with plugged(self.model, served.path) as pm:
                outs = generate(pm, self.tok, prompts, self.task.max_new_tokens, self.batch_size, self.max_len)
        return Generation(outs, [self.task.parse(o) for o in outs], served.version.version,
                          [str(e) for e in served.skipped])

    # -- privacy -------------------------------------------------------------------------------
    def delete_user(self, user_id: str) -> dict[str, Any]:
        """Everything of the user: history, versions and files, jobs, tokens, caches."""
        self._rag.pop(user_id, None)
        return self.store.delete_user(user_id)

    def export_user(self, user_id: str, passphrase: str, include_history: bool = True) -> bytes:
        """One encrypted file: the active version's files (checksum-verified), its metadata and,
        optionally, the history."""
        info = self.store.user(user_id)
        if info.active_version is None:
            raise NoAdapter(f"user {user_id!r} has no adapter to export; train one first")
        v = self.store.version(user_id, info.active_version)
        files = self.store.read_version_files(user_id, v.version)
        history = self.store.history(user_id) if include_history else None
        return crypto.encrypt(pack(user_id, v.task, v, files, history), passphrase)

    def import_user(self, blob: bytes, passphrase: str, user_id: str | None = None) -> Version:
        """A new user (the exported id, or `user_id`) with the export's adapter as v1 and its
        history. Every check (passphrase, integrity, task, items, loading onto this base) runs
        before anything is written; a failure leaves the store unchanged."""
        b = unpack(crypto.decrypt(blob, passphrase))
        if get_task(b.task).id != self.task.id:
            raise BundleError(f"the export is for task {b.task!r}; this personalizer serves {self.task.id!r}")
        if b.adapter["peft_type"] not in PEFT_TYPES:
            raise BundleError(f"unknown PEFT type {b.adapter['peft_type']!r} in the export; valid: {PEFT_TYPES}")
        uid = validate_user_id(user_id if user_id is not None else b.user_id)
        history = []
        if b.history is not None:
            items = validate_items(self.task, [it for _, it in b.history])
            history = [(seq, it) for (seq, _), it in zip(b.history, items)]
        hseq = b.adapter["history_seq"] if history else 0
        fields = {"peft_type": b.adapter["peft_type"], "parent_version": None, "history_seq": hseq,
                  "note": f"imported (exported as v{b.adapter['version']})",
                  "meta": {**b.adapter["meta"], "imported": True}}
        return self.store.import_user(uid, self.task.id, history, b.files, fields,
                                      check=lambda d: self._check_loads(d, b.adapter["peft_type"]))

    def _check_loads(self, d: Path, expected: str) -> None:
        """The files must load onto this base (right shapes, valid config) before they are kept."""
        try:
            cfg = json.loads((d / "adapter_config.json").read_text())
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise BundleError(f"the export's adapter_config.json is not valid JSON: {e}") from None
        if not isinstance(cfg, dict) or str(cfg.get("peft_type") or "").lower() != expected.lower():
            raise BundleError(f"the export's adapter_config.json says peft_type {cfg.get('peft_type')!r}, "
                              f"its metadata says {expected!r}")
        with self.model_lock:
            try:
                with plugged(self.model, d):
                    pass
            except Exception as e:
                raise BundleError(f"the export's adapter does not load onto this base: {type(e).__name__}: {e}") from e
