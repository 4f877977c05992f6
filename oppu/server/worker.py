"""The training worker: one background thread runs queued train/update jobs, many users at once.

A job is a row of the store's jobs table (queued -> running -> done | failed). The worker takes
the first waiting job and every other one arriving within `max_wait_s` (one per user) and starts
a training session (oppu.train_session): one batched run of the engine's trainer in which every
user gets a mini-batch per step. While it runs, newly queued jobs join it (when the trainer has
its own copy of the base; with a shared base a session takes only the jobs it started with, so
generation is not held up longer), so a small job never waits for a big one to finish: it
trains beside it and is published as soon as it is done. A user's first adapter starts from
the seeded start, an update from the active version on the new items plus a replay sample. The
version a job made carries the note "<kind> via job <id>", so `version_of` finds it after a
restart too. `cancel_user` (a delete) drops the user's running job, module and data at the
next step; a queued job of a deleted user fails harmlessly when its turn comes. Before every
step, and between the forward chunks of a step, the worker calls `yield_to` (the service: wait,
at most `train_yield_ms`, until no generate request is open), so another user's training never
shares the cores with a request for long.

    w = TrainWorker(personalizer, replay=0.5); w.start()
    w.submit(job)                      # a queued store Job
    w.cancel_user(uid)                 # True once no session holds the user
    w.close()
"""
from __future__ import annotations

import logging
import os
import queue
import threading
import time
from typing import Callable

from oppu.personalizer import Personalizer
from oppu.store import AdapterStore, Job, JobError, StoreError
from oppu.train_session import TrainSession

log = logging.getLogger("oppu.server")


def job_note(kind: str, job_id: str) -> str:
    return f"{kind} via job {job_id}"


def version_of(store: AdapterStore, job: Job) -> int | None:
    """The adapter version a done job published (None while it is not done, or for a deleted user)."""
    if job.status != "done":
        return None
    try:
        versions = store.versions(job.user_id)
    except StoreError:
        return None
    return next((v.version for v in versions if v.note == job_note(job.kind, job.job_id)), None)


def lower_priority(step: int = 10) -> None:
    """Make the calling thread nicer by `step` (Linux: per thread), so background work (training,
    scrypt) yields the CPU to request handling when cores are short. A no-op where unsupported."""
    try:
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + step))
    except (AttributeError, OSError):
        pass


class TrainWorker:
    def __init__(self, personalizer: Personalizer, replay: float = 0.5, max_jobs: int = 16, max_wait_s: float = 0.2,
                 on_finish: Callable[[Job, BaseException | None], None] = lambda job, err: None,
                 yield_to: Callable[[], object] = lambda: None):
        self.p, self.replay, self.max_jobs, self.on_finish = personalizer, replay, max_jobs, on_finish
        self.yield_to = yield_to  # called before every step: waits (bounded) while generation runs
        self.max_wait_s = max_wait_s  # after the first job, how long to gather others into its session
        self.join_running = personalizer.train_model is not personalizer.model
        self._q: queue.Queue[Job | None] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="oppu-trainer", daemon=True)
        self._closing = threading.Event()
        self._lock = threading.Lock()
        self._cancels: dict[str, threading.Event] = {}
        self._jobs: dict[str, tuple[Job, float]] = {}   # job id -> (job, when it started) in the session
        self.current: list[str] = []   # job ids of the session in progress

    def start(self) -> None:
        self._thread.start()

    def submit(self, job: Job) -> None:
        self._q.put(job)

    def close(self, timeout: float = 0.0) -> bool:
        """Start no further session, admit no more jobs; wait up to `timeout` s for the running ones.
        Jobs left queued or running are marked failed by the next start. True when the thread stopped."""
        self._closing.set()
        self._q.put(None)
        if self._thread.is_alive():
            self._thread.join(timeout)
        return not self._thread.is_alive()

    def pending(self) -> int:
        return self._q.qsize()

    def cancel_user(self, user_id: str, timeout: float = 5.0) -> bool:
        """Drop the user's running job (module and data) at the session's next step. True once no
        session holds the user (at once when none does), False when `timeout` s passed first."""
        ev = threading.Event()
        with self._lock:
            if not any(job.user_id == user_id for job, _ in self._jobs.values()):
                return True
            self._cancels[user_id] = ev
        return ev.wait(timeout)

    def _take(self) -> list[Job] | None:
        """A new session's jobs: the first waiting job, plus every other one arriving within
        max_wait_s (one per user, at most max_jobs)."""
        first = self._q.get()
        if first is None or self._closing.is_set():
            return None
        jobs, users, later = [first], {first.user_id}, []
        deadline = time.monotonic() + self.max_wait_s
        while len(jobs) < self.max_jobs:
            try:
                j = self._q.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            if j is None:
                self._q.put(None)
                break
            (later if j.user_id in users else jobs).append(j)
            users.add(j.user_id)
        for j in later:  # a user's second job waits for the next session
            self._q.put(j)
        return jobs

    def _drain(self) -> list[Job]:
        """Jobs queued meanwhile (without waiting); none once closing."""
        out: list[Job] = []
        while not self._closing.is_set():
            try:
                j = self._q.get_nowait()
            except queue.Empty:
                break
            if j is None:
                self._q.put(None)
                break
            out.append(j)
        return out

    def _run(self) -> None:
        lower_priority()
        while True:
            jobs = self._take()
            if jobs is None:
                return
            deferred: list[Job] = []
            try:
                self._session(jobs, deferred)
            except BaseException as e:  # the job rows say why; the worker goes on
                for j in jobs + [job for job, _ in self._jobs.values()]:
                    self._fail(j, e)
            finally:
                with self._lock:
                    self._jobs.clear()
                    for ev in self._cancels.values():
                        ev.set()
                    self._cancels.clear()
                self.current = []
            for j in deferred:  # other shapes, or a user's second job: the next session
                self._q.put(j)

    def _session(self, jobs: list[Job], deferred: list[Job]) -> None:
        with TrainSession(self.p, self.replay, on_result=self._ended, pause=self.yield_to) as s:
            self._admit(s, jobs, deferred)
            while s.busy:
                with self._lock:
                    cancels, self._cancels = self._cancels, {}
                for uid, ev in cancels.items():
                    s.cancel(uid)
                    ev.set()
                if self.join_running:
                    self._admit(s, self._drain(), deferred)
                self.current = s.job_ids()
                if s.busy:
                    self.yield_to()
                    s.step()

    def _admit(self, s: TrainSession, jobs: list[Job], deferred: list[Job]) -> None:
        for j in jobs:
            s.notes[j.job_id] = job_note(j.kind, j.job_id)
            with self._lock:
                self._jobs[j.job_id] = (j, time.monotonic())
            if not s.admit(j):
                with self._lock:
                    self._jobs.pop(j.job_id, None)
                deferred.append(j)

    def _ended(self, job_id: str, result) -> None:
        with self._lock:
            job, t0 = self._jobs.pop(job_id, (None, time.monotonic()))
        if job is None:
            return
        err = result if isinstance(result, BaseException) else None
        log.info("job %s (%s, user %s) %s in %.1fs%s", job_id, job.kind, job.user_id, "failed" if err else "done",
                 time.monotonic() - t0, f": {err}" if err else "")
        self.on_finish(job, err)

    def _fail(self, job: Job, e: BaseException) -> None:
        """The session marks its own failures; this covers errors outside it."""
        try:
            if self.p.store.jobs.get(job.job_id).status in ("queued", "running"):
                self.p.store.jobs.set(job.job_id, "failed", error=f"{type(e).__name__}: {e}")
        except JobError:
            pass  # the job went with its user
