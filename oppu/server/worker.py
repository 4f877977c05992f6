"""The training worker: one background thread runs queued train/update jobs, one at a time.

A job is a row of the store's jobs table (queued -> running -> done | failed); the worker runs
`Personalizer.train` (a user's first adapter) or `Personalizer.update` (continue the active one
on the new items plus a replay sample), which move the row and publish the new version
atomically. The version a job made carries the note "<kind> via job <id>", so `version_of`
finds it after a restart too. A job of a user deleted meanwhile fails harmlessly: its rows are
gone and the store refuses to publish for an unknown user.

    w = TrainWorker(personalizer, replay=0.5); w.start()
    w.submit(job)                      # a queued store Job
    w.close()

`guard` wraps each run: with a trainer that has its own copy of the base it is a no-op; when the
trainer shares the serving base it takes the batcher's lock and unwraps the serving modules
(Service builds it), so generation pauses while that job runs.
"""
from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from typing import Callable, ContextManager

from oppu.lifecycle import Personalizer
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
    def __init__(self, personalizer: Personalizer, replay: float = 0.5,
                 guard: Callable[[], ContextManager] = contextlib.nullcontext,
                 on_finish: Callable[[Job, BaseException | None], None] = lambda job, err: None):
        self.p, self.replay, self.guard, self.on_finish = personalizer, replay, guard, on_finish
        self._q: queue.Queue[Job | None] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="oppu-trainer", daemon=True)
        self._closing = threading.Event()
        self.current: str | None = None

    def start(self) -> None:
        self._thread.start()

    def submit(self, job: Job) -> None:
        self._q.put(job)

    def close(self, timeout: float = 0.0) -> bool:
        """Start no further job; wait up to `timeout` s for the running one. Jobs left queued or
        running are marked failed by the next start. True when the thread has stopped."""
        self._closing.set()
        self._q.put(None)
        if self._thread.is_alive():
            self._thread.join(timeout)
        return not self._thread.is_alive()

    def pending(self) -> int:
        return self._q.qsize()

    def _run(self) -> None:
        while True:
            job = self._q.get()
            if job is None or self._closing.is_set():
                return
            self.current = job.job_id
            t0, err = time.monotonic(), None
            try:
                self._one(job)
            except BaseException as e:  # the job row says why; the worker goes on
                err = e
                self._fail(job, e)
            finally:
                self.current = None
            log.info("job %s (%s, user %s) %s in %.1fs%s", job.job_id, job.kind, job.user_id,
                     "failed" if err else "done", time.monotonic() - t0, f": {err}" if err else "")
            self.on_finish(job, err)

    def _one(self, job: Job) -> None:
        note = job_note(job.kind, job.job_id)
        with self.guard():
            if job.kind == "train":
                self.p.train(job.user_id, job_id=job.job_id, note=note)
            else:
                self.p.update(job.user_id, replay=self.replay, job_id=job.job_id, note=note)

    def _fail(self, job: Job, e: BaseException) -> None:
        """Personalizer marks its own failures; this covers errors before it took the job."""
        try:
            if self.p.store.jobs.get(job.job_id).status in ("queued", "running"):
                self.p.store.jobs.set(job.job_id, "failed", error=f"{type(e).__name__}: {e}")
        except JobError:
            pass  # the job went with its user
