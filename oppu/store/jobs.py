"""Jobs (training/update runs a server queues) and access tokens, both rows of the store's db.

Job status moves queued -> running -> done | failed (queued -> failed too, e.g. cancelled).
A token is 32 random bytes (url-safe text) shown once; only its sha256 is stored. A plain hash
is enough here: the token has 256 bits of entropy, so there is nothing to brute-force, unlike a
human password (which would need scrypt/argon2).

    job = store.jobs.create(uid, "train")
    store.jobs.set(job.job_id, "running")
    token = store.tokens.issue(uid); store.tokens.user_for(token) == uid
"""
from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from dataclasses import dataclass
from typing import Callable

from oppu.store.db import JOB_STATUSES, Database
from oppu.store.errors import JobError

TRANSITIONS = {"queued": ("running", "failed"), "running": ("done", "failed"), "done": (), "failed": ()}


@dataclass(frozen=True)
class Job:
    job_id: str
    user_id: str
    kind: str
    status: str
    error: str | None
    created: float
    updated: float


def _job(row) -> Job:
    return Job(row["job_id"], row["user_id"], row["kind"], row["status"], row["error"], row["created"],
               row["updated"])


class Jobs:
    def __init__(self, db: Database, require_user: Callable[[str], str]):
        self.db, self._require_user = db, require_user

    def create(self, user_id: str, kind: str, status: str = "queued") -> Job:
        user_id = self._require_user(user_id)
        if status not in ("queued", "running"):
            raise JobError(f"a new job starts queued or running, not {status!r}")
        now, job_id = time.time(), secrets.token_urlsafe(12)
        with self.db.write() as c:
            c.execute("INSERT INTO jobs(job_id, user_id, kind, status, error, created, updated) "
                      "VALUES (?, ?, ?, ?, NULL, ?, ?)", (job_id, user_id, kind, status, now, now))
        return self.get(job_id)

    def set(self, job_id: str, status: str, error: str | None = None) -> Job:
        if status not in JOB_STATUSES:
            raise JobError(f"unknown job status {status!r}; valid: {', '.join(JOB_STATUSES)}")
        with self.db.write() as c:
            row = c.execute("SELECT status FROM jobs WHERE job_id=?", (job_id,)).fetchone()
            if row is None:
                raise JobError(f"unknown job {job_id!r}")
            if status not in TRANSITIONS[row["status"]]:
                raise JobError(f"job {job_id!r} is {row['status']}; it cannot become {status} "
                               f"(allowed: {', '.join(TRANSITIONS[row['status']]) or 'none'})")
            c.execute("UPDATE jobs SET status=?, error=?, updated=? WHERE job_id=?",
                      (status, error, time.time(), job_id))
        return self.get(job_id)

    def get(self, job_id: str) -> Job:
        row = self.db.conn().execute("SELECT * FROM jobs WHERE job_id=?", (job_id,)).fetchone()
        if row is None:
            raise JobError(f"unknown job {job_id!r}")
        return _job(row)

    def of_user(self, user_id: str) -> list[Job]:
        user_id = self._require_user(user_id)
        return [_job(r) for r in self.db.conn().execute("SELECT * FROM jobs WHERE user_id=? ORDER BY created",
                                                        (user_id,))]

    def count_by_status(self) -> dict[str, int]:
        """{status: number of jobs} for every status (0 where none)."""
        out = dict.fromkeys(JOB_STATUSES, 0)
        out.update({r[0]: r[1] for r in self.db.conn().execute("SELECT status, COUNT(*) FROM jobs GROUP BY status")})
        return out

    def fail_unfinished(self, error: str = "interrupted: the server stopped before the job finished") -> list[str]:
        """At server start: jobs left queued/running by a previous process can never finish."""
        with self.db.write() as c:
            ids = [r[0] for r in c.execute("SELECT job_id FROM jobs WHERE status IN ('queued', 'running')")]
            c.execute("UPDATE jobs SET status='failed', error=?, updated=? WHERE status IN ('queued', 'running')",
                      (error, time.time()))
        return ids


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class Tokens:
    def __init__(self, db: Database, require_user: Callable[[str], str]):
        self.db, self._require_user = db, require_user

    def issue(self, user_id: str) -> str:
        """A new bearer token for the user; returned once, stored only as its hash."""
        user_id = self._require_user(user_id)
        token = secrets.token_urlsafe(32)
        with self.db.write() as c:
            c.execute("INSERT INTO tokens(token_hash, user_id, created) VALUES (?, ?, ?)",
                      (token_hash(token), user_id, time.time()))
        return token

    def user_for(self, token: str) -> str | None:
        """The user a token belongs to, or None. The lookup is by hash, so timing reveals nothing
        about the token itself."""
        if not isinstance(token, str) or not token or len(token) > 256:
            return None
        h = token_hash(token)
        row = self.db.conn().execute("SELECT token_hash, user_id FROM tokens WHERE token_hash=?", (h,)).fetchone()
        return row["user_id"] if row is not None and hmac.compare_digest(row["token_hash"], h) else None

    def rotate(self, user_id: str) -> tuple[str, int]:
        """(a new token, how many older ones were revoked), in one transaction: the old tokens stop
        working exactly when the new one starts."""
        with self.db.write():
            revoked = self.revoke(user_id)
            return self.issue(user_id), revoked

    def revoke(self, user_id: str) -> int:
        user_id = self._require_user(user_id)
        with self.db.write() as c:
            return c.execute("DELETE FROM tokens WHERE user_id=?", (user_id,)).rowcount
