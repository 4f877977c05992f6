"""The training worker: one background thread runs queued train/update jobs, many users per pass.

A job is a row of the store's jobs table (queued -> running -> done | failed). The worker takes
the first waiting job and every other one arriving within `max_wait_s` (up to `max_jobs`, one per
user) and runs them as one batched pass
of the engine's trainer (`Personalizer.run_jobs`): a user's first adapter from the seeded start,
an update from the active version on the new items plus a replay sample. Each job's row moves
and its version is published atomically as soon as that user finishes. The version a job made carries the note "<kind> via job <id>", so `version_of`
finds it after a restart too. A job of a user deleted meanwhile fails harmlessly: its rows are
gone and the store refuses to publish for an unknown user.

    w = TrainWorker(personalizer, replay=0.5); w.start()
    w.submit(job)                      # a queued store Job
    w.close()

Whether training runs beside serving (its own copy of the base) or pauses it (the serving base,
its adapters detached for the pass) is the Personalizer's `train_model` choice.
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from typing import Callable

from oppu.personalizer import Personalizer
from oppu.store import AdapterStore, Job, JobError, StoreError

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


class TrainWorker:
    def __init__(self, personalizer: Personalizer, replay: float = 0.5, max_jobs: int = 16, max_wait_s: float = 0.2,
                 on_finish: Callable[[Job, BaseException | None], None] = lambda job, err: None):
        self.p, self.replay, self.max_jobs, self.on_finish = personalizer, replay, max_jobs, on_finish
        self.max_wait_s = max_wait_s  # after the first job, how long to gather others into its pass
        self._q: queue.Queue[Job | None] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="oppu-trainer", daemon=True)
        self._closing = threading.Event()
        self.current: list[str] = []   # job ids of the pass in progress

    def start(self) -> None:
        self._thread.start()

    def submit(self, job: Job) -> None:
        self._q.put(job)

    def close(self, timeout: float = 0.0) -> bool:
        """Start no further pass; wait up to `timeout` s for the running one. Jobs left queued or
        running are marked failed by the next start. True when the thread has stopped."""
        self._closing.set()
        self._q.put(None)
        if self._thread.is_alive():
            self._thread.join(timeout)
        return not self._thread.is_alive()

    def pending(self) -> int:
        return self._q.qsize()

    def _take(self) -> list[Job] | None:
        """The next pass: the first waiting job, plus every other one arriving within max_wait_s (one
        per user, at most max_jobs)."""
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
        for j in later:  # a user's second job waits for the next pass
            self._q.put(j)
        return jobs

    def _run(self) -> None:
        while True:
            jobs = self._take()
            if jobs is None:
                return
            self.current = [j.job_id for j in jobs]
            t0 = time.monotonic()
            try:
                results = self.p.run_jobs(jobs, self.replay, {j.job_id: job_note(j.kind, j.job_id) for j in jobs})
            except BaseException as e:  # the job rows say why; the worker goes on
                results = {j.job_id: e for j in jobs}
                for j in jobs:
                    self._fail(j, e)
            finally:
                self.current = []
            for j in jobs:
                err = results.get(j.job_id)
                err = err if isinstance(err, BaseException) else None
                log.info("job %s (%s, user %s) %s in %.1fs (a pass of %d)%s", j.job_id, j.kind, j.user_id,
                         "failed" if err else "done", time.monotonic() - t0, len(jobs), f": {err}" if err else "")
                self.on_finish(j, err)

    def _fail(self, job: Job, e: BaseException) -> None:
        """run_jobs marks its own failures; this covers errors outside it."""
        try:
            if self.p.store.jobs.get(job.job_id).status in ("queued", "running"):
                self.p.store.jobs.set(job.job_id, "failed", error=f"{type(e).__name__}: {e}")
        except JobError:
            pass  # the job went with its user
