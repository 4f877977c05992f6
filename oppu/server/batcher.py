"""Mixed-adapter generation batches: concurrent requests of many users, one decode each.

A daemon thread takes the first waiting request, collects more for up to `max_wait_s` or until
`max_batch` rows, and answers them all with `Personalizer.answer_rows`: one batched greedy decode
of the engine in which every row uses its own user's adapter. The Personalizer keeps users
loaded (least recently used evicted), reloads a user whose active version changed (a new
train/update, a rollback), checksums files and falls back from a corrupt newest version.

    b = Batcher(personalizer, max_batch=32, max_wait_s=0.01)
    b.start()
    text, version = b.submit("u1", prompt).result()   # concurrent.futures.Future
    b.close()
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Callable

log = logging.getLogger("oppu.server")


@dataclass
class Request:
    user_id: str
    prompt: str
    future: Future = field(default_factory=Future)


class Batcher:
    def __init__(self, personalizer, *, max_batch: int = 32, max_wait_s: float = 0.01,
                 on_batch: Callable[[int], None] | None = None):
        if max_batch < 1 or max_wait_s < 0:
            raise ValueError(f"need max_batch >= 1, max_wait_s >= 0; got {max_batch}, {max_wait_s}")
        self.p = personalizer
        self.max_batch, self.max_wait_s = max_batch, max_wait_s
        self._q: queue.Queue[Request | None] = queue.Queue()
        self._on_batch = on_batch or (lambda n: None)
        self._thread = threading.Thread(target=self._run, name="oppu-batcher", daemon=True)
        self._stopped = threading.Event()
        self._open = 0                          # requests submitted and not yet answered
        self._idle = threading.Condition()

    # -- public --------------------------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def submit(self, user_id: str, prompt: str) -> Future:
        """The Future resolves to (generated text, adapter version that answered)."""
        if self._stopped.is_set():
            raise RuntimeError("the batcher is closed")
        r = Request(user_id, prompt)
        with self._idle:
            self._open += 1
        r.future.add_done_callback(self._answered)
        self._q.put(r)
        return r.future

    def wait_idle(self, timeout: float) -> bool:
        """Wait until no request is waiting or being answered, at most `timeout` s (the trainer
        calls this before each step, so generation gets the cores first). True when idle."""
        with self._idle:
            return self._idle.wait_for(lambda: self._open == 0, timeout)

    def _answered(self, fut: Future) -> None:
        with self._idle:
            self._open -= 1
            if self._open == 0:
                self._idle.notify_all()

    def loaded(self) -> int:
        return len(self.p.slots)

    def queue_depth(self) -> int:
        return self._q.qsize()

    def close(self, timeout: float = 30.0) -> None:
        self._stopped.set()
        self._q.put(None)
        if self._thread.is_alive():
            self._thread.join(timeout)
        self.p.close()
        while True:  # whoever still waits gets an answer, not a hang
            try:
                r = self._q.get_nowait()
            except queue.Empty:
                break
            if r is not None and r.future.set_running_or_notify_cancel():
                r.future.set_exception(RuntimeError("the server is shutting down"))

    # -- the thread ----------------------------------------------------------------------------
    def _collect(self) -> list[Request]:
        first = self._q.get()
        if first is None:
            return []
        batch, deadline = [first], time.monotonic() + self.max_wait_s
        while len(batch) < self.max_batch:
            remaining = deadline - time.monotonic()
            try:
                r = self._q.get(timeout=remaining) if remaining > 0 else self._q.get_nowait()
            except queue.Empty:
                break
            if r is None:
                self._q.put(None)  # seen again by the next _collect, which then stops
                break
            batch.append(r)
        return batch

    def _run(self) -> None:
        while not self._stopped.is_set():
            batch = self._collect()
            if not batch:
                continue
            try:
                self._serve(batch)
            except BaseException as e:  # a failed batch fails its requests, never the thread
                log.exception("generation batch of %d rows failed", len(batch))
                for r in batch:
                    if not r.future.done():
                        r.future.set_exception(e)

    def _serve(self, batch: list[Request]) -> None:
        batch = [r for r in batch if r.future.set_running_or_notify_cancel()]  # skip requests given up on
        if not batch:
            return
        self._on_batch(len(batch))
        for r, got in zip(batch, self.p.answer_rows([(r.user_id, r.prompt) for r in batch])):
            if isinstance(got, BaseException):  # this user's requests fail; the other users still get answers
                r.future.set_exception(got)
            else:
                r.future.set_result(got)
