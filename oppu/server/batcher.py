"""Mixed-adapter generation batches: concurrent requests of many users, one `generate_with` each.

A daemon thread takes the first waiting request, collects more for up to `max_wait_s` or until
`max_batch` rows, and answers them all with one batched greedy decode in which every row uses its
own user's adapter (oppu.multi). Users stay loaded in one MultiUserModel over the serving base
(least recently used evicted past `max_loaded`); before each batch the batcher reads every
user's active version from the store and reloads a user whose active version changed (a new
train/update, a rollback). Loading goes through `store.resolve_active`, so files are checksummed
and a corrupt newest version falls back to the previous good one.

    b = Batcher(model, tok, store, max_new_tokens=16, max_prompt_tokens=256)
    b.start()
    text, version = b.submit("u1", prompt).result()   # concurrent.futures.Future
    b.close()                                           # the base gets its plain modules back

Everything that touches the model runs on the batcher thread under `lock`, which the trainer
shares when it trains on this same base (ServeConfig.trainer_base="shared").
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from collections import OrderedDict
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Callable

from oppu.multi import MultiUserModel, generate_with, read_adapter
from oppu.store import AdapterStore, UnknownUser

log = logging.getLogger("oppu.server")


@dataclass
class Request:
    user_id: str
    prompt: str
    future: Future = field(default_factory=Future)


class Batcher:
    def __init__(self, model, tok, store: AdapterStore, max_new_tokens: int, max_prompt_tokens: int, *,
                 max_batch: int = 32, max_wait_s: float = 0.01, max_loaded: int = 256,
                 lock: threading.RLock | None = None, on_batch: Callable[[int], None] | None = None):
        if max_batch < 1 or max_loaded < 1 or max_wait_s < 0:
            raise ValueError(f"need max_batch >= 1, max_loaded >= 1, max_wait_s >= 0; got {max_batch}, "
                             f"{max_loaded}, {max_wait_s}")
        self.tok, self.store = tok, store
        self.max_new_tokens, self.max_prompt_tokens = max_new_tokens, max_prompt_tokens
        self.max_batch, self.max_wait_s, self.max_loaded = max_batch, max_wait_s, max_loaded
        self.lock = lock or threading.RLock()
        self.mm = MultiUserModel(model)
        self._loaded: OrderedDict[str, tuple[int, int]] = OrderedDict()  # user -> (active seen, version served)
        self._q: queue.Queue[Request | None] = queue.Queue()
        self._on_batch = on_batch or (lambda n: None)
        self._thread = threading.Thread(target=self._run, name="oppu-batcher", daemon=True)
        self._stopped = threading.Event()

    # -- public --------------------------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def submit(self, user_id: str, prompt: str) -> Future:
        """The Future resolves to (generated text, adapter version that answered)."""
        if self._stopped.is_set():
            raise RuntimeError("the batcher is closed")
        r = Request(user_id, prompt)
        self._q.put(r)
        return r.future

    def evict(self, user_id: str) -> None:
        """Drop a user's adapter from memory (deleted users must not linger in the GPU/CPU banks)."""
        with self.lock:
            self._drop(user_id)

    def loaded(self) -> int:
        return len(self._loaded)

    def queue_depth(self) -> int:
        return self._q.qsize()

    def close(self, timeout: float = 30.0) -> None:
        self._stopped.set()
        self._q.put(None)
        if self._thread.is_alive():
            self._thread.join(timeout)
        with self.lock:
            self.mm.unwrap()
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
        with self.lock:
            versions: dict[str, int] = {}
            for uid in dict.fromkeys(r.user_id for r in batch):
                try:
                    versions[uid] = self._ensure(uid)
                except Exception as e:  # this user's requests fail; the other users still get answers
                    for r in batch:
                        if r.user_id == uid:
                            r.future.set_exception(e)
            rows = [r for r in batch if r.user_id in versions]
            if not rows:
                return
            self._on_batch(len(rows))
            texts = generate_with(self.mm, self.tok, [r.prompt for r in rows], [r.user_id for r in rows],
                                  self.max_new_tokens, self.max_batch, self.max_prompt_tokens)
        for r, text in zip(rows, texts):
            r.future.set_result((text, versions[r.user_id]))

    def _ensure(self, uid: str) -> int:
        """The version serving `uid`, loading or reloading it when the store's active one changed."""
        try:
            active = self.store.active_version(uid)
        except UnknownUser:
            self._drop(uid)  # deleted (by the API or `oppu user delete`): forget the weights too
            raise
        got = self._loaded.get(uid)
        if got is not None and got[0] == active and uid in self.mm.users:
            self._loaded.move_to_end(uid)
            return got[1]
        served = self.store.resolve_active(uid)  # checksums; NoAdapter when there is none
        self._drop(uid)
        config, state = read_adapter(served.path)
        self.mm.add_user(uid, config, state)
        self._loaded[uid] = (active, served.version.version)
        if served.skipped:
            log.warning("user %s: serving v%d; newer version(s) refused: %s", uid, served.version.version,
                        "; ".join(str(e) for e in served.skipped))
        while len(self._loaded) > self.max_loaded:
            self._drop(next(iter(self._loaded)))
        return served.version.version

    def _drop(self, uid: str) -> None:
        self._loaded.pop(uid, None)
        if uid in self.mm.users:
            self.mm.remove_user(uid)
