"""Service: what the HTTP layer calls. One store, one serving base, a batcher and a trainer.

    svc = Service(AdapterStore("var/oppu"), model, tok, ServeConfig(task="LaMP_2M"), admin_token="...")
    svc.start()                                    # fails unfinished jobs, starts both threads
    uid, token = svc.create_user()
    svc.add_history(uid, "LaMP_2M", items)
    job = svc.start_training(uid)                  # queued; the worker trains (or updates)
    text, version = svc.submit_generate(uid, "LaMP_2M", query, k=None).result()
    blob, served = svc.export(uid, "a passphrase") # oppu.crypto; the newest intact version
    version, token = svc.import_user(blob, "a passphrase", "copy")
    svc.rollback(uid, 1); svc.rotate_token(uid)
    svc.delete(uid); svc.close()

Everything that trains, generates, builds prompts or touches adapters is the one Personalizer's
(`svc.p`); this class adds users and tokens, job queueing rules and observability on top.
Training never blocks generation by default: the trainer gets its own deep copy of the base
(`trainer_base="copy"`, chosen by "auto" below 1B parameters), so serving and training never
touch the same modules and each side keeps its own lock. A bigger base would double its memory
that way; `trainer_base="shared"` then trains on the serving base under the serving lock, with
the serving adapters detached for the pass (generation waits while it runs). Both are correct;
"copy" is the concurrent one.
"""
from __future__ import annotations

import copy
import hashlib
import hmac
import logging
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from oppu.config import TRAINER_BASES, UserTrainConfig
from oppu.personalizer import Personalizer
from oppu.server.batcher import Batcher
from oppu.server.limits import Limits
from oppu.server.metrics import Metrics
from oppu.server.schemas import MAX_K
from oppu.server.worker import TrainWorker, lower_priority, version_of
from oppu.store import (AdapterStore, CorruptAdapterError, HistoryError, Job, JobError, NoAdapter, Served, Version,
                        validate_user_id)
from oppu.store.records import is_instant
from oppu.tasks import get_task

log = logging.getLogger("oppu.server")
COPY_BELOW_PARAMS = 1_000_000_000


@dataclass(frozen=True)
class Caller:
    """Who a bearer token stands for: the admin, or one user."""
    admin: bool
    user_id: str | None = None


class Conflict(Exception):
    """The request is valid but the user's state does not allow it now (HTTP 409)."""


@dataclass(frozen=True)
class ServeConfig:
    task: str = "LaMP_2M"
    peft: str = "lora"
    k: int = 2                          # retrieved history items per prompt (requests may override)
    seed: int = 0
    max_len: int = 256                  # prompt tokens (left-truncated) for training and generation
    user_train: UserTrainConfig = field(default_factory=UserTrainConfig)
    replay: float = 0.5                 # incremental updates: share of older items replayed
    style: str = "compact"              # prompt style (config.PROMPT_STYLES); "full" for checkpoints
    trainer_base: str = "auto"          # auto | copy | shared (see the module docstring)
    max_batch: int = 32                 # rows per mixed-adapter batch
    max_wait_ms: float = 10.0           # how long the batcher waits to fill a batch
    max_loaded: int = 256               # users kept warm in the serving slots
    max_train_users: int = 16           # queued jobs trained together in one batched pass
    train_wait_ms: float = 200.0        # how long the trainer gathers queued jobs into one pass
    train_yield_ms: float = 500.0       # the most a training step waits for open generate requests
    max_body_bytes: int = 1 << 20       # HTTP request bodies (per-field limits: oppu/server/schemas.py)
    max_import_bytes: int = 64 << 20    # POST /v1/users/import bodies (the export, base64)
    max_history_items: int = 20_000     # per user (413 past it; see AdapterStore.add_history)
    max_history_bytes: int = 32 << 20   # per user, item JSON
    generate_timeout_s: float = 120.0
    limits: dict = field(default_factory=dict)  # route class -> limits.Limit, over limits.DEFAULT_LIMITS
    crypto_workers: int = 1             # threads for scrypt (export, import), shared by every user
    refuse_delay_s: float = 1.0         # a 429 is sent after this idle pause (at most its Retry-After)
    shutdown_grace_s: float = 30.0      # how long a shutdown waits for a running training job

    def __post_init__(self) -> None:
        if self.trainer_base not in TRAINER_BASES:
            raise ValueError(f"unknown trainer_base {self.trainer_base!r}; valid: {', '.join(TRAINER_BASES)}")
        if not 0 <= self.k <= MAX_K:
            raise ValueError(f"k must be in [0, {MAX_K}], got {self.k}")
        if self.crypto_workers < 1:
            raise ValueError(f"crypto_workers must be >= 1, got {self.crypto_workers}")


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest()


class Service:
    def __init__(self, store: AdapterStore, model, tok, cfg: ServeConfig, admin_token: str,
                 base_info: dict[str, Any] | None = None, instant=None):
        """instant: an oppu.instant.served.ServedBank; users with history and no trained version are
        then served by a module mixed from it (a version marked `instant`), refreshed as history is
        added, until their first training job publishes a trained one."""
        if not isinstance(admin_token, str) or len(admin_token) < 16:
            raise ValueError("the admin token must be at least 16 characters (e.g. "
                             "python -c 'import secrets; print(secrets.token_urlsafe(32))')")
        self.store, self.cfg, self.tok = store, cfg, tok
        self.task = get_task(cfg.task)
        if instant is not None and instant.peft_type != cfg.peft:
            raise ValueError(f"the instant bank holds {instant.peft_type} modules; this server trains {cfg.peft}")
        self.instant = instant
        self.base_info = base_info or {}
        self.metrics = Metrics()
        self._admin = _digest(admin_token)
        self.started = time.time()
        mode = cfg.trainer_base
        if mode == "auto":
            mode = "copy" if sum(p.numel() for p in model.parameters()) < COPY_BELOW_PARAMS else "shared"
        self.trainer_base = mode
        train_model = copy.deepcopy(model) if mode == "copy" else None  # a copy shares no module with serving
        self.p = Personalizer(model, tok, self.task, cfg.user_train, peft=cfg.peft, seed=cfg.seed, k=cfg.k,
                              max_len=cfg.max_len, style=cfg.style, batch_size=cfg.max_batch, store=store, max_loaded=cfg.max_loaded,
                              train_model=train_model)
        self.batcher = Batcher(self.p, max_batch=cfg.max_batch, max_wait_s=cfg.max_wait_ms / 1000,
                               on_batch=self.metrics.batch_rows.observe)
        self.worker = TrainWorker(self.p, cfg.replay, cfg.max_train_users, cfg.train_wait_ms / 1000,
                                  yield_to=lambda: self.batcher.wait_idle(cfg.train_yield_ms / 1000))
        self._jobs_lock = threading.Lock()
        self.limits = Limits(cfg.limits)
        self.crypto = ThreadPoolExecutor(max_workers=cfg.crypto_workers, thread_name_prefix="oppu-crypto",
                                         initializer=lower_priority)

    # -- lifecycle -----------------------------------------------------------------------------
    def start(self) -> None:
        failed = self.store.jobs.fail_unfinished()
        if failed:
            log.warning("marked %d unfinished job(s) of a previous run failed: %s", len(failed), ", ".join(failed))
        self.batcher.start()
        self.worker.start()

    def close(self) -> bool:
        """Stop both threads. False when a training job was still running after shutdown_grace_s
        (it stays 'running' in the store and the next start marks it failed)."""
        stopped = self.worker.close(self.cfg.shutdown_grace_s)
        if not stopped:
            log.warning("training job %s still running at shutdown; the next start marks it failed",
                        self.worker.current)
        self.batcher.close()
        self.crypto.shutdown(wait=False, cancel_futures=True)
        return stopped

    # -- auth ----------------------------------------------------------------------------------
    def is_admin(self, token: str) -> bool:
        return hmac.compare_digest(_digest(token), self._admin)

    def user_for_token(self, token: str) -> str | None:
        return self.store.tokens.user_for(token)

    def authenticate(self, token: str) -> Caller | None:
        """The caller a bearer token stands for: the admin, a user, or None (unknown/revoked)."""
        if self.is_admin(token):
            return Caller(admin=True)
        uid = self.user_for_token(token)
        return None if uid is None else Caller(admin=False, user_id=uid)

    def rotate_token(self, uid: str) -> tuple[str, int]:
        """(a new token for the user, how many older ones stopped working)."""
        return self.store.tokens.rotate(validate_user_id(uid))

    # -- users and history ---------------------------------------------------------------------
    def create_user(self) -> tuple[str, str]:
        uid = self.store.new_user(self.task.id)
        return uid, self.store.tokens.issue(uid)

    def add_history(self, uid: str, task: str, items: list[dict[str, Any]]) -> list[int]:
        """Append the items (their seqs); with an instant bank, a user with no trained version gets a
        fresh instant version for the new history in the same call (see `refresh_instant`)."""
        return self.add_history_and_instant(uid, task, items)[0]

    def add_history_and_instant(self, uid: str, task: str,
                                items: list[dict[str, Any]]) -> tuple[list[int], Version | None]:
        """add_history, and the instant version it made (None when it made none)."""
        self._check_task(task)
        seqs = self.p.add_history(validate_user_id(uid), task, items, max_items=self.cfg.max_history_items,
                                  max_bytes=self.cfg.max_history_bytes)
        return seqs, self.refresh_instant(uid)

    def refresh_instant(self, uid: str) -> Version | None:
        """The user's new instant version (active at once), or None: no bank, or a trained version
        is active (the client trains or updates it with POST /train)."""
        if self.instant is None:
            return None
        t0 = time.perf_counter()
        v = self.p.publish_instant(uid, self.instant)
        if v is not None:
            self.metrics.instant_s.observe(time.perf_counter() - t0)
        return v

    def delete(self, uid: str) -> dict[str, Any]:
        uid = validate_user_id(uid)
        self.store.user(uid)  # UnknownUser before anything else happens
        out = self.p.delete_user(uid)  # one transaction: gone for every request at once; scrub in the background
        self.worker.cancel_user(uid)  # the running job, its module and data leave the trainer at its next step
        self.limits.forget(uid)
        return out

    def export(self, uid: str, passphrase: str, include_history: bool = True) -> tuple[bytes, Served]:
        """The encrypted export of the newest intact version; `Served.skipped`: corrupt newer ones."""
        return self.p.export_served(validate_user_id(uid), passphrase, include_history)

    def import_user(self, blob: bytes, passphrase: str, user_id: str | None = None) -> tuple[Version, str]:
        """A new user from an export (checked, loaded onto this base first) and a token for them."""
        v = self.p.import_user(blob, passphrase, user_id)
        return v, self.store.tokens.issue(v.user_id)

    # -- versions ------------------------------------------------------------------------------
    def versions(self, uid: str) -> list[tuple[Version, str | None]]:
        """Every version of the user with None when its files verify, else why they do not."""
        out = []
        for v in self.store.versions(validate_user_id(uid)):
            try:
                self.store.verify(uid, v.version)
                out.append((v, None))
            except CorruptAdapterError as e:
                out.append((v, f"file {e.file!r} {e.reason}"))
        return out

    def rollback(self, uid: str, version: int) -> Version:
        """Make an existing, intact version active (the next generate serves it). Conflict while a
        job of the user is unfinished: its new version would replace the rollback at once."""
        uid = validate_user_id(uid)
        with self._jobs_lock:
            busy = [j for j in self.store.jobs.of_user(uid) if j.status in ("queued", "running")]
            if busy:
                raise Conflict(f"user {uid!r} has job {busy[-1].job_id!r} {busy[-1].status}; roll back after it "
                               "finishes (its version becomes active when it does)")
            return self.p.rollback(uid, version)

    def _check_task(self, task: str) -> None:
        try:
            t = get_task(task)
        except ValueError as e:
            raise HistoryError(str(e)) from None
        if t.id != self.task.id:
            raise HistoryError(f"this server serves task {self.task.id!r}, not {task!r}")

    # -- training ------------------------------------------------------------------------------
    def start_training(self, uid: str) -> Job:
        """Queue a full train (no adapter yet) or an incremental update (new history since the
        active version). Conflict when a job of the user is unfinished or there is nothing new."""
        uid = validate_user_id(uid)
        with self._jobs_lock:  # check-then-create must not interleave for one user
            info = self.store.user(uid)
            busy = [j for j in self.store.jobs.of_user(uid) if j.status in ("queued", "running")]
            if busy:
                raise Conflict(f"user {uid!r} already has job {busy[-1].job_id!r} {busy[-1].status}; "
                               f"poll GET /v1/jobs/{busy[-1].job_id}")
            active = None if info.active_version is None else self.store.version(uid, info.active_version)
            if active is None or is_instant(active):
                if not self.store.history(uid):
                    raise Conflict(f"user {uid!r} has no history; POST items to /v1/users/{uid}/history first")
                kind = "train"
            else:
                seen = self.store.version(uid, info.active_version).history_seq
                if not self.store.history(uid, after_seq=seen):
                    raise Conflict(f"user {uid!r}: no history added since active adapter "
                                   f"v{info.active_version}; nothing to update")
                kind = "update"
            job = self.store.jobs.create(uid, kind)
        self.worker.submit(job)
        return job

    def job(self, job_id: str) -> dict[str, Any]:
        j = self.store.jobs.get(job_id)
        return {"job_id": j.job_id, "user_id": j.user_id, "kind": j.kind, "status": j.status,
                "version": version_of(self.store, j), "error": j.error, "created": j.created, "updated": j.updated}

    def job_owner(self, job_id: str) -> str | None:
        try:
            return self.store.jobs.get(job_id).user_id
        except JobError:
            return None

    # -- generation ----------------------------------------------------------------------------
    def prompt(self, uid: str, task: str, text: str, k: int | None) -> str:
        """The prompt the Personalizer builds for this user's input (checks task and adapter first)."""
        self._check_task(task)
        info = self.store.user(validate_user_id(uid))
        if info.task not in (None, self.task.id):
            raise HistoryError(f"user {uid!r} belongs to task {info.task!r}; this server serves {self.task.id!r}")
        if info.active_version is None:
            raise NoAdapter(f"user {uid!r} has no adapter yet; train one first")
        return self.p.user_prompt(uid, text, k)

    def submit_generate(self, uid: str, task: str, text: str, k: int | None = None) -> Future:
        return self.batcher.submit(uid, self.prompt(uid, task, text, k))

    # -- observability -------------------------------------------------------------------------
    def gauges(self) -> dict[str, tuple[str, list]]:
        return {"oppu_users": ("Users in the store.", [({}, self.store.count_users())]),
                "oppu_jobs": ("Training jobs in the store by status.",
                              [({"status": s}, n) for s, n in self.store.jobs.count_by_status().items()]),
                "oppu_adapters_loaded": ("User adapters loaded in the serving model.", [({}, self.batcher.loaded())]),
                "oppu_generate_queue_depth": ("Generate requests waiting for a batch.",
                                              [({}, self.batcher.queue_depth())])}
