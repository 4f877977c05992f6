"""SQLite metadata of the adapter store: schema, one connection per thread, transactions, scrubbing.

WAL mode lets any number of readers run beside one writer. Every thread gets its own
connection; writes take a process-wide lock plus SQLite's own write lock (`BEGIN IMMEDIATE`,
which also serialises writers in other processes). `secure_delete` is on for every
connection, so deleted rows (and freed pages) are overwritten with zeros in the db file, and
`checkpoint_now()` (a truncating WAL checkpoint that never waits) removes the WAL's old page
images; the store retries it in the background until it succeeds (oppu.store.scrub).
The db file is created 0600 before SQLite opens it (SQLite gives the WAL and shm files its mode).

    db = Database(root / "store.db")
    with db.write() as c:
        c.execute("INSERT INTO users(user_id, created) VALUES (?, ?)", ("u1", time.time()))
    rows = db.conn().execute("SELECT * FROM users").fetchall()
    db.checkpoint_now()                              # True: the WAL is empty
"""
from __future__ import annotations

import sqlite3
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from oppu.store.files import private_file

SCHEMA_VERSION = 1
JOB_STATUSES = ("queued", "running", "done", "failed")

SCHEMA = f"""
CREATE TABLE IF NOT EXISTS meta(key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS users(
    user_id TEXT PRIMARY KEY,
    created REAL NOT NULL,
    task TEXT,                       -- bound by the first history item or version; one task per user
    active_version INTEGER
);
CREATE TABLE IF NOT EXISTS history_items(
    user_id TEXT NOT NULL REFERENCES users(user_id) ON DELETE CASCADE,
    task TEXT NOT NULL,
    item_id TEXT NOT NULL,
    json TEXT NOT NULL,
    seq INTEGER NOT NULL,            -- per-user insertion order; versions record the last seq they saw
    PRIMARY KEY(user_id, item_id),
    UNIQUE(user_id, seq)
);
CREATE TABLE IF NOT EXISTS adapter_versions(
    user_id TEXT NOT NULL REFERENCES users(user_id) ON DELETE CASCADE,
    version INTEGER NOT NULL,
    task TEXT NOT NULL,
    peft_type TEXT NOT NULL,
    dir TEXT NOT NULL,               -- relative to the store root: adapters/<user dir>/v<N>
    sha256 TEXT NOT NULL,            -- JSON {{file name: hex digest}}
    created REAL NOT NULL,
    parent_version INTEGER,
    note TEXT NOT NULL DEFAULT '',
    history_seq INTEGER NOT NULL DEFAULT 0,
    meta TEXT NOT NULL DEFAULT '{{}}',
    PRIMARY KEY(user_id, version)
);
CREATE TABLE IF NOT EXISTS history_totals(   -- per user: what quotas check, without reading the items
    user_id TEXT PRIMARY KEY REFERENCES users(user_id) ON DELETE CASCADE,
    items INTEGER NOT NULL,
    bytes INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS jobs(
    job_id TEXT PRIMARY KEY,
    user_id TEXT NOT NULL REFERENCES users(user_id) ON DELETE CASCADE,
    kind TEXT NOT NULL,
    status TEXT NOT NULL CHECK(status IN ({", ".join(repr(s) for s in JOB_STATUSES)})),
    error TEXT,
    created REAL NOT NULL,
    updated REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS jobs_user ON jobs(user_id);
CREATE TABLE IF NOT EXISTS tokens(
    token_hash TEXT PRIMARY KEY,     -- sha256 hex of a 32-byte random token
    user_id TEXT NOT NULL REFERENCES users(user_id) ON DELETE CASCADE,
    created REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS tokens_user ON tokens(user_id);
"""
USER_TABLES = ("history_items", "history_totals", "adapter_versions", "jobs", "tokens", "users")  # delete order


class Database:
    def __init__(self, path: str | Path, timeout_s: float = 30.0):
        self.path = Path(path)
        for p in (self.path, *(self.path.with_name(self.path.name + x) for x in ("-wal", "-shm"))):
            if p is self.path or p.exists():  # SQLite gives the WAL and shm files the db file's mode
                private_file(p)
        self.timeout_s = timeout_s
        self._local = threading.local()
        self._conns: list[sqlite3.Connection] = []
        self._conns_lock = threading.Lock()
        self._write_lock = threading.RLock()
        c = self.conn()
        mode = c.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if mode.lower() != "wal":
            raise RuntimeError(f"{self.path}: SQLite refused WAL mode (got {mode!r}); is it on a network filesystem?")
        with self._write_lock:  # executescript would commit an open transaction: it carries its own
            c.executescript("BEGIN IMMEDIATE;" + SCHEMA + "INSERT OR IGNORE INTO meta(key, value) VALUES "
                            f"('schema_version', '{SCHEMA_VERSION}'); COMMIT;")
        found = int(c.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()[0])
        if found != SCHEMA_VERSION:
            raise RuntimeError(f"{self.path}: store schema version {found}, this code reads {SCHEMA_VERSION}")

    def conn(self) -> sqlite3.Connection:
        """This thread's connection (autocommit; transactions are opened explicitly)."""
        c = getattr(self._local, "conn", None)
        if c is None:
            c = sqlite3.connect(self.path, timeout=self.timeout_s, isolation_level=None, check_same_thread=False)
            c.row_factory = sqlite3.Row
            c.execute("PRAGMA foreign_keys=ON")
            c.execute("PRAGMA secure_delete=ON")
            c.execute("PRAGMA synchronous=FULL")  # a committed version survives power loss
            self._local.conn = c
            with self._conns_lock:
                self._conns.append(c)
        return c

    @contextmanager
    def write(self) -> Iterator[sqlite3.Connection]:
        """One write transaction; commits on success, rolls back on any exception."""
        with self._write_lock:
            c = self.conn()
            if c.in_transaction:  # nested use from the same thread: join the outer transaction
                yield c
                return
            c.execute("BEGIN IMMEDIATE")
            try:
                yield c
                c.execute("COMMIT")
            except BaseException:
                c.execute("ROLLBACK")
                raise

    def checkpoint_now(self) -> bool:
        """Copy the WAL into the db and truncate it, without waiting: False at once when a reader
        (or a writer) is in the way (retry later). Run on its own connection with no busy timeout,
        so it never holds the write lock nor keeps other writers waiting."""
        c = sqlite3.connect(self.path, timeout=0, isolation_level=None, check_same_thread=False)
        try:
            c.execute("PRAGMA busy_timeout=0")
            busy, _, _ = c.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
            return not busy
        except sqlite3.OperationalError:  # "database is locked": a writer holds it right now
            return False
        finally:
            c.close()

    def close(self) -> None:
        with self._conns_lock:
            for c in self._conns:
                c.close()
            self._conns.clear()
        self._local = threading.local()
