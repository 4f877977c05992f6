"""A user's adapter over time in the store: add history, train, update incrementally, roll back,
answer, export/import (encrypted), delete. The store-backed half of `oppu.personalizer.Personalizer`
(a mixin: it uses the Personalizer's model, engine and settings; see that module for the API).

Training jobs of many users run as one batched pass of the engine's trainer (`run_jobs`): first
adapters start from the seeded PEFT state, incremental updates from the active version's tensors
(new items plus a seeded replay sample of older ones). Answers go through the serving slots, so
one decode serves many users' requests (`answer_rows`).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from oppu.data.users import Query
from oppu.history import UserHistory, as_user, replay_sample, validate_items
from oppu.store import (CorruptAdapterError, HistoryError, Job, JobError, NoAdapter, Served, UnknownUser, Version,
                        validate_user_id)
from oppu.store.bundle import BundleError
from oppu.store.records import INSTANT_NOTE, is_instant
from oppu.tasks import get_task
from oppu.train_session import JobPlan, TrainResult, TrainSession, fail_job
from oppu.transfer import check_config, export_blob, import_into, read_export

__all__ = ["Generation", "Lifecycle", "TrainResult"]

log = logging.getLogger("oppu")


@dataclass(frozen=True)
class Generation:
    outputs: list[str]            # raw generated text
    predictions: list[str]        # task.parse(output)
    adapter_version: int          # the version that actually answered
    skipped: list[str] = field(default_factory=list)  # newer versions refused as corrupt, why

    @property
    def fell_back(self) -> bool:
        return bool(self.skipped)


class _Superseded(Exception):
    """A trained version became active while an instant one was being mixed."""


def _meta(exs, mode: str) -> dict[str, Any]:
    return {"mode": mode, "examples": len(exs), "sources": list(dict.fromkeys(e.source for e in exs))}


def _train_plan(job: Job, hist, exs, note: str) -> JobPlan:
    """A fresh module trained on the user's examples (no parent)."""
    if not exs:
        raise HistoryError(f"user {job.user_id!r} has no usable history item to train an adapter on")
    return JobPlan(job.job_id, job.user_id, "train", exs, hist[-1].seq, {**_meta(exs, "train"), "note": note})


class Lifecycle:
    """Store-backed operations of Personalizer (needs self.store)."""

    # -- history -------------------------------------------------------------------------------
    def add_history(self, user_id: str, task: str, items: Sequence[dict[str, Any]], *, max_items: int | None = None,
                    max_bytes: int | None = None) -> list[int]:
        """Validate and append items; QuotaExceeded past max_items / max_bytes (see AdapterStore)."""
        t = get_task(task)
        if t.id != self.task.id:
            raise HistoryError(f"this personalizer serves task {self.task.id!r}, not {t.id!r}")
        return self.store.add_history(user_id, t.id, validate_items(t, items), max_items=max_items,
                                      max_bytes=max_bytes)

    def history(self, user_id: str):
        task = self.store.user(user_id).task
        if task not in (None, self.task.id):
            raise HistoryError(f"user {user_id!r} belongs to task {task!r}; this personalizer serves {self.task.id!r}")
        return self.store.history(user_id)

    # -- training ------------------------------------------------------------------------------
    def train(self, user_id: str, job_id: str | None = None, note: str = "") -> TrainResult:
        """A fresh adapter on the whole history -> a new active version (no parent)."""
        return self._one_job(user_id, "train", job_id, note)

    def update(self, user_id: str, replay: float = 0.5, job_id: str | None = None, note: str = "") -> TrainResult:
        """Continue the active adapter on the items added since it was trained plus a seeded
        replay sample of older items -> a new active version whose parent is the old one."""
        return self._one_job(user_id, "update", job_id, note, replay)

    def _one_job(self, user_id: str, kind: str, job_id: str | None, note: str, replay: float = 0.5) -> TrainResult:
        validate_user_id(user_id)
        if job_id is None:
            job = self.store.jobs.create(user_id, kind, status="queued")
        else:
            job = self.store.jobs.get(job_id)
            if job.user_id != user_id:
                raise JobError(f"job {job_id!r} belongs to another user, not {user_id!r}")
        out = self.run_jobs([job], replay, {job.job_id: note} if note else None)[job.job_id]
        if isinstance(out, BaseException):
            raise out
        return out

    def run_jobs(self, jobs: Sequence[Job], replay: float = 0.5,
                 notes: dict[str, str] | None = None) -> dict[str, TrainResult | BaseException]:
        """Run train/update jobs of different users batched together (oppu.train_session; modules of
        other shapes in a later session); each job is marked running, then done (its version
        published) or failed (the error kept). {job_id: result}."""
        results: dict[str, TrainResult | BaseException] = {}
        pending, users = [], set()
        for job in jobs:
            if job.user_id in users:
                results[job.job_id] = fail_job(self.store, job.job_id, JobError(
                    f"user {job.user_id!r} already has a job in this call"))
            else:
                users.add(job.user_id)
                pending.append(job)
        while pending:
            with TrainSession(self, replay, notes) as session:
                pending = [j for j in pending if not session.admit(j)]
                try:
                    while session.busy:
                        session.step()
                except Exception as e:  # the jobs of this session fail with it; the error is kept
                    for uid in list(session.plans):
                        session.cancel(uid, e)
            results.update(session.results)
        return results

    def plan_job(self, job: Job, replay: float, pause=None) -> JobPlan:
        """What the job trains on (examples, starting module, order seed); raises when it cannot run.
        `pause()` runs now and then while the examples are built."""
        uid = job.user_id
        hist = self.history(uid)
        exs = self.examples(as_user(uid, hist), pause=pause)
        if job.kind == "train":
            return _train_plan(job, hist, exs, "train")
        return self._update_plan(job, hist, exs, replay)

    def _update_plan(self, job: Job, hist, exs, replay: float) -> JobPlan:
        from oppu.engine import read_adapter, user_seed

        uid = job.user_id
        active = self.store.active_version(uid)
        if active is None:
            raise NoAdapter(f"user {uid!r} has no adapter to update; train one first")
        parent = self.store.version(uid, active)
        if is_instant(parent):  # never trained on the user: the first trained module starts afresh
            return _train_plan(job, hist, exs, f"train (replaces instant v{active})")
        if parent.peft_type != self.peft:
            raise ValueError(f"user {uid!r} v{active} is {parent.peft_type}; this personalizer trains {self.peft}")
        path = self.store.verify(uid, active)  # never continue from a corrupt file
        new = [h for h in hist if h.seq > parent.history_seq]
        if not new:
            raise HistoryError(f"user {uid!r}: no history added since v{active}; nothing to update")
        old = [h for h in hist if h.seq <= parent.history_seq]
        tag = f"{uid}:v{active}:{hist[-1].seq}"
        chosen = {f"item:{h.item_id}" for h in new + replay_sample(old, replay, user_seed(self.seed, "replay:" + tag))}
        # RAG contexts come from the whole history (item i sees items before it), so build all, keep some.
        exs = [e for e in exs if e.source in chosen]
        if not exs:
            raise HistoryError(f"user {uid!r}: the items added since v{active} give no training example")
        meta = {**_meta(exs, "update"), "replay": replay, "new_items": len(new),
                "note": f"update of v{active} (replay {replay})"}
        return JobPlan(job.job_id, uid, "update", exs, hist[-1].seq, meta, parent=active, start=read_adapter(path),
                     order_seed=user_seed(self.seed, tag))

    # -- instant modules (oppu.instant.served) ---------------------------------------------------
    def publish_instant(self, user_id: str, bank) -> Version | None:
        """A version marked `instant` mixed from `bank` for the user's own latest items, made active,
        when the user has history and no trained version is active (else None: a trained module
        wins, also one published while this one was being mixed)."""
        from oppu.engine import write_adapter

        if self.store.active_note(user_id) not in (None, INSTANT_NOTE):
            return None
        hist = self.history(user_id)
        if not hist:
            return None
        config, state, facts = bank.module(self, as_user(user_id, hist).history)

        def still_untrained(_conn) -> None:  # inside the publishing transaction
            if self.store.active_note(user_id) not in (None, INSTANT_NOTE):
                raise _Superseded()

        base_name = self.model.__dict__.get("name_or_path") or None
        try:
            return self.store.put_version(user_id, lambda d: write_adapter(d, config, state, base_name),
                                          task=self.task.id, peft_type=bank.peft_type, history_seq=hist[-1].seq,
                                          note=INSTANT_NOTE, meta=facts, before=still_untrained)
        except _Superseded:
            return None

    def rollback(self, user_id: str, version: int) -> Version:
        """Make an older (or any existing) version active again, after checking its files."""
        self.store.verify(user_id, version)
        self.store.set_active(user_id, version)
        self._corrupt.pop(user_id, None)
        return self.store.version(user_id, version)

    def versions(self, user_id: str) -> list[Version]:
        return self.store.versions(user_id)

    # -- answers -------------------------------------------------------------------------------
    def user_prompt(self, user_id: str, text: str, k: int | None = None) -> str:
        """The prompt for one input of this user: the task template, k items retrieved from the
        history (kept in memory per user and grown with the rows added since: oppu.history.UserHistory)."""
        k = self.k if k is None else k
        if k < 0:
            raise ValueError(f"k must be >= 0, got {k}")
        h = self._user_history(user_id)
        with h.lock:  # one user's requests take turns; other users never wait here
            h.extend(self.store.history(user_id, after_seq=h.last_seq))
            q = Query("q0", text, None, h.ids)
            return self.prompt(h.user, q, "rag" if k > 0 else "plain", k, h.cache)

    def _user_history(self, user_id: str) -> UserHistory:
        info = self.store.user(user_id)
        if info.task not in (None, self.task.id):
            raise HistoryError(f"user {user_id!r} belongs to task {info.task!r}; this personalizer serves {self.task.id!r}")
        with self._histories_lock:
            h = self._histories.pop(user_id, None)
            if h is None or h.created != info.created:  # a user deleted and made again under the same id
                h = UserHistory(user_id, info.created, self.task, self.retriever)
            self._histories[user_id] = h  # most recently used last
            held = sum(len(x.ids) for x in self._histories.values())
            while len(self._histories) > 1 and (len(self._histories) > self.max_histories
                                                or held > self.max_history_items_held):
                held -= len(self._histories.pop(next(iter(self._histories))).ids)  # least recently used
        return h

    def answer_rows(self, rows: Sequence[tuple[str, str]]) -> list[tuple[str, int] | BaseException]:
        """(text, version) for each (user, prompt) row, one mixed-adapter decode for all; a row whose
        user has no servable adapter gets its exception, the others their answers."""
        from oppu.engine import generate

        out: list[Any] = [None] * len(rows)
        with self.lock:
            while self._to_drop:
                self.slots.drop(self._to_drop.pop())
            versions: dict[str, int] = {}
            for uid in dict.fromkeys(u for u, _ in rows):
                try:
                    versions[uid] = self._ensure_loaded(uid)
                except Exception as e:
                    for i, (u, _) in enumerate(rows):
                        if u == uid:
                            out[i] = e
            live = [i for i, (u, _) in enumerate(rows) if u in versions]
            texts = generate(self.model, self.tok, [rows[i][1] for i in live], self.task.max_new_tokens,
                             users=[rows[i][0] for i in live], mm=self.slots.mm, batch_size=self.batch_size,
                             max_prompt_tokens=self.max_len) if live else []
        for i, t in zip(live, texts):
            out[i] = (t, versions[rows[i][0]])
        return out

    def _ensure_loaded(self, uid: str) -> int:
        """The version serving `uid` (verified; a corrupt newest one falls back), loaded in the slots."""
        try:
            active = self.store.active_version(uid)
        except UnknownUser:
            self.slots.drop(uid)  # deleted: forget the weights too
            raise
        key = self.slots.key(uid)
        if key is not None and key[0] == active:
            self.slots.ensure(uid, key, None)
            return key[1]
        served = self._resolve(uid, active)
        try:
            self.slots.ensure(uid, (active, served.version.version), served.path)
        except (ValueError, KeyError, RuntimeError, OSError) as e:  # e.g. made for another base
            err = CorruptAdapterError(uid, served.version.version, "adapter_model.safetensors",
                                      f"cannot be served on this base ({type(e).__name__}: {e})")
            self._corrupt[uid] = (active, err)
            log.error("user %s: %s; refused until a rollback or a new version", uid, err)
            raise err from e
        self._skips[uid] = [str(e) for e in served.skipped]
        if served.skipped:
            log.warning("user %s: serving v%d; newer version(s) refused: %s", uid, served.version.version,
                        "; ".join(self._skips[uid]))
        return served.version.version

    def _resolve(self, uid: str, active: int | None) -> Served:
        """resolve_active, remembering a user with no intact version: until their active version
        changes (rollback, a new version) it is refused at once, logged only the first time."""
        known = self._corrupt.get(uid)
        if known is not None and known[0] == active:
            raise known[1]
        try:
            return self.store.resolve_active(uid)  # checksums; NoAdapter when there is none
        except CorruptAdapterError as e:
            self._corrupt[uid] = (active, e)
            log.error("user %s: no intact adapter version (%s); refused until a rollback or a new version", uid, e)
            raise

    def answer(self, user_id: str, inputs: Sequence[str], k: int | None = None) -> Generation:
        """Answer LaMP-style inputs with the user's active adapter (verified; a corrupt one falls
        back to the previous good version), retrieving k history items into each prompt."""
        if isinstance(inputs, str) or not all(isinstance(x, str) for x in inputs):
            raise ValueError("inputs must be a list of strings")
        prompts = [self.user_prompt(user_id, x, k) for x in inputs]
        with self.lock:
            self.slots.drop(user_id)  # load afresh so the fallback facts below are this call's
            got = self.answer_rows([(user_id, p) for p in prompts])
            skipped = list(self._skips.get(user_id, []))
        errors = [g for g in got if isinstance(g, BaseException)]
        if errors:
            raise errors[0]
        version = got[0][1] if got else self.store.resolve_active(user_id).version.version
        outs = [t for t, _ in got]
        return Generation(outs, [self.task.parse(o) for o in outs], version, skipped)

    # -- privacy -------------------------------------------------------------------------------
    def delete_user(self, user_id: str) -> dict[str, Any]:
        """Everything of the user: history, versions and files, jobs, tokens, loaded weights, caches."""
        with self._histories_lock:
            self._histories.pop(user_id, None)
        self._skips.pop(user_id, None)
        self._corrupt.pop(user_id, None)
        out = self.store.delete_user(user_id)
        if self.lock.acquire(timeout=1.0):  # a shared-base training pass may hold it for long
            try:
                self.slots.drop(user_id)
            finally:
                self.lock.release()
        else:
            self._to_drop.add(user_id)  # the next batch drops the weights, under the lock
        return out

    def export_user(self, user_id: str, passphrase: str, include_history: bool = True) -> bytes:
        """One encrypted file: the newest intact version's files (checksum-verified; the active one
        unless it is corrupt), its metadata and, optionally, the history."""
        return self.export_served(user_id, passphrase, include_history)[0]

    def export_served(self, user_id: str, passphrase: str, include_history: bool = True) -> tuple[bytes, Served]:
        """export_user, and which version went out (`.skipped`: corrupt newer ones, why)."""
        return export_blob(self.store, user_id, passphrase, include_history)

    def import_user(self, blob: bytes, passphrase: str, user_id: str | None = None) -> Version:
        """A new user (the exported id, or `user_id`) with the export's adapter as v1 and its
        history. Every check (passphrase, integrity, task, items, loading onto this base through
        the engine) runs before anything is written; a failure leaves the store unchanged."""
        incoming = read_export(blob, passphrase, self.task.id, user_id)
        return import_into(self.store, incoming, check=lambda d: self._check_loads(d, incoming.fields["peft_type"]))

    def _check_loads(self, d: Path, expected: str) -> None:
        """The files must be an adapter the engine runs on this base before they are kept."""
        check_config((d / "adapter_config.json").read_bytes(), expected)
        with self.lock:
            try:
                self.slots.check(d)
            except Exception as e:
                raise BundleError(f"the export's adapter cannot be served on this base: {type(e).__name__}: {e}") from e
