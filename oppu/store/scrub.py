"""Scrubbing after deletes: the WAL checkpoint that removes old page images of deleted rows,
retried in the background until it succeeds, never holding the write lock nor waiting on readers.

A delete commits (the user is gone for every request at once), then asks for a scrub: generation
g = requested + 1, kept in the db's meta table with the delete itself. The scrubber tries at once
and, when a reader holds an old snapshot, again after a growing pause (up to `max_pause_s`), for
as long as it takes. `done` is the last generation a successful checkpoint covered; both numbers
persist, so a status survives a restart (the next open retries what was left).

    g = scrubber.requested_in(c)        # inside the delete's transaction
    scrubber.kick(g)                    # after it commits: True when already scrubbed
    scrubber.status()                   # {"requested": 7, "done": 7}
    scrubber.wait(g, timeout=30)        # a command-line delete waits; a server does not
"""
from __future__ import annotations

import logging
import threading
import time

log = logging.getLogger("oppu.store")
REQUESTED, DONE = "scrub_requested", "scrub_done"


class Scrubber:
    def __init__(self, db, max_pause_s: float = 2.0):
        self.db, self.max_pause_s = db, max_pause_s
        self._wake = threading.Condition()
        self._thread: threading.Thread | None = None
        self._closing = False

    def _get(self, key: str, c=None) -> int:
        row = (c or self.db.conn()).execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        return int(row[0]) if row else 0

    def requested_in(self, c) -> int:
        """A new scrub generation, recorded in the caller's write transaction `c`."""
        g = self._get(REQUESTED, c) + 1
        c.execute("INSERT INTO meta(key, value) VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET value=excluded.value",
                  (REQUESTED, str(g)))
        return g

    def status(self) -> dict[str, int]:
        return {"requested": self._get(REQUESTED), "done": self._get(DONE)}

    def pending(self) -> bool:
        s = self.status()
        return s["done"] < s["requested"]

    def try_once(self) -> bool:
        """One checkpoint attempt (never waits); on success every generation requested before it
        is done. True when nothing is left pending."""
        target = self._get(REQUESTED)
        if self._get(DONE) >= target:
            return True
        if not self.db.checkpoint_now():
            return False
        with self.db.write() as c:  # writes only the meta page: no deleted data comes back
            c.execute("INSERT INTO meta(key, value) VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET "
                      "value=MAX(CAST(value AS INTEGER), CAST(excluded.value AS INTEGER))", (DONE, str(target)))
        self.db.checkpoint_now()  # and the WAL is emptied again if no reader is in the way
        return self._get(DONE) >= self._get(REQUESTED)

    def kick(self, generation: int) -> bool:
        """Try now; True when `generation` is scrubbed, else the background thread retries."""
        if self.try_once() or self._get(DONE) >= generation:
            return True
        with self._wake:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="oppu-scrubber", daemon=True)
                self._thread.start()
            self._wake.notify()
        return False

    def wait(self, generation: int, timeout: float) -> bool:
        """Retry until `generation` is scrubbed or `timeout` s passed (for a process about to exit)."""
        end, pause = time.monotonic() + timeout, 0.05
        while not (self.try_once() or self._get(DONE) >= generation):
            if time.monotonic() >= end:
                return False
            time.sleep(pause)
            pause = min(self.max_pause_s, pause * 2)
        return True

    def _run(self) -> None:
        pause = 0.05
        while not self._closing:
            try:
                if self.try_once():
                    log.info("scrub done through generation %d", self._get(DONE))
                    return
            except Exception as e:  # noqa: BLE001  (the store may be closing; the next open retries)
                log.warning("scrub attempt failed: %s", e)
            with self._wake:
                self._wake.wait(pause)
            pause = min(self.max_pause_s, pause * 2)

    def close(self) -> None:
        self._closing = True
        with self._wake:
            self._wake.notify()
        if self._thread is not None:
            self._thread.join(5)
