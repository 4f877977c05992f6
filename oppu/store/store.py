"""AdapterStore: users, their history items and their adapter versions, on disk under one root.

    root/store.db                               SQLite metadata (WAL; see db.py)
    root/adapters/<user dir>/v<N>/              adapter_config.json + adapter_model.safetensors
    root/cache/<user dir>/                      derived per-user data (retrieval index, profile)
    root/tmp/<pid>.<random>/                    versions being written (never visible)

Folders are created 0700 and files 0600 (the root too, when a store opens): nothing in a store
is readable by another local account.

A version becomes visible only when its DB row commits, and the row commits only after its
files were fsynced, hashed and renamed into place (see `put_version`): a crash at any point
leaves either no version or a complete one. Leftovers (temp dirs, version dirs without a row,
dirs of deleted users) are removed when a store opens. Every load re-hashes the files.

    store = AdapterStore("var/oppu")
    uid = store.new_user()
    store.add_history(uid, "LaMP_2M", [{"id": "1", "description": "...", "tag": "comedy"}])
    v = store.put_version(uid, lambda d: peft_model.save_pretrained(d), task="LaMP_2M", peft_type="lora")
    served = store.resolve_active(uid)          # verified; falls back to an older good version
"""
from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Iterable

from oppu.store.db import USER_TABLES, Database
from oppu.store.errors import (CorruptAdapterError, HistoryError, InvalidUserId, NoAdapter, QuotaExceeded, StoreError,
                               UnknownUser, UnknownVersion, UserExists)
from oppu.store.files import (ADAPTER_FILES, check_file, clean_temp_dirs, fsync_dir, new_temp_dir,
                              private_dir, read_checked, release_temp_dir, safe_user_dir, seal, write_files)
from oppu.store.jobs import Jobs, Tokens
from oppu.store.scrub import Scrubber
from oppu.store.records import HistoryItem, Served, UserInfo, Version, version_from_row

USER_ID_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"
_USER_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")


def validate_user_id(user_id: Any) -> str:
    """The id itself when it matches USER_ID_PATTERN; it then cannot name a path outside the store."""
    if not isinstance(user_id, str) or not _USER_ID.fullmatch(user_id):
        raise InvalidUserId(f"invalid user id {user_id!r}: must match {USER_ID_PATTERN}")
    return user_id


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    else:
        p.unlink(missing_ok=True)


class AdapterStore:
    def __init__(self, root: str | Path):
        self.root = private_dir(Path(root).resolve())  # 0700: history and adapters are the user's
        self._adapters = self.root / "adapters"
        self._cache = self.root / "cache"
        self._tmp = self.root / "tmp"
        self.db = Database(self.root / "store.db")
        self.jobs = Jobs(self.db, self._require_user)
        self.tokens = Tokens(self.db, self._require_user)
        self.scrubber = Scrubber(self.db)
        self.recovered = self._recover()
        if self.scrubber.pending():  # a scrub an earlier process could not finish
            self.scrubber.kick(self.scrubber.status()["requested"])

    # -- users ---------------------------------------------------------------------------------
    def new_user(self, task: str | None = None) -> str:
        """Create a user with a random url-safe id (128 bits) and return the id."""
        while True:
            uid = secrets.token_urlsafe(16)
            if uid[0] != "-":  # ids starting with '-' read as options on command lines
                try:
                    return self.create_user(uid, task)
                except UserExists:
                    continue

    def create_user(self, user_id: str, task: str | None = None) -> str:
        user_id = validate_user_id(user_id)
        with self.db.write() as c:
            if c.execute("SELECT 1 FROM users WHERE user_id=?", (user_id,)).fetchone():
                raise UserExists(f"user {user_id!r} already exists")
            c.execute("INSERT INTO users(user_id, created, task) VALUES (?, ?, ?)", (user_id, time.time(), task))
        return user_id

    def user(self, user_id: str) -> UserInfo:
        user_id = validate_user_id(user_id)
        row = self.db.conn().execute("SELECT * FROM users WHERE user_id=?", (user_id,)).fetchone()
        if row is None:
            raise UnknownUser(f"unknown user {user_id!r}")
        return UserInfo(row["user_id"], row["created"], row["task"], row["active_version"])

    def _require_user(self, user_id: str) -> str:
        return self.user(user_id).user_id

    def users(self) -> list[str]:
        return [r[0] for r in self.db.conn().execute("SELECT user_id FROM users ORDER BY created, user_id")]

    def count_users(self) -> int:
        return self.db.conn().execute("SELECT COUNT(*) FROM users").fetchone()[0]

    def has_user(self, user_id: str) -> bool:
        try:
            self.user(user_id)
            return True
        except UnknownUser:
            return False

    def user_dir(self, user_id: str) -> Path:
        return self._inside(self._adapters / safe_user_dir(validate_user_id(user_id)), self._adapters)

    def cache_dir(self, user_id: str) -> Path:
        """A folder for derived per-user data (retrieval index, profile); delete_user removes it."""
        d = self._inside(self._cache / safe_user_dir(self._require_user(user_id)), self._cache)
        return private_dir(d)

    def delete_user(self, user_id: str) -> dict[str, Any]:
        """Remove every row, file and cache of the user at once (one transaction: the user is gone
        for every request), then scrub the WAL: at once when no reader is in the way, else in the
        background (oppu.store.scrub). "scrubbed": whether it is done; "scrub": its generation."""
        user_id = self._require_user(user_id)
        with self.db.write() as c:
            rows = {t: c.execute(f"DELETE FROM {t} WHERE user_id=?", (user_id,)).rowcount for t in USER_TABLES}
            generation = self.scrubber.requested_in(c)
        # Files after the rows: a crash in between leaves invisible files that the next open removes.
        for d in (self.user_dir(user_id), self._inside(self._cache / safe_user_dir(user_id), self._cache)):
            shutil.rmtree(d, ignore_errors=True)
        return {"user_id": user_id, "rows": rows, "scrubbed": self.scrubber.kick(generation), "scrub": generation}

    # -- history -------------------------------------------------------------------------------
    def add_history(self, user_id: str, task: str, items: Iterable[dict[str, Any]], *, max_items: int | None = None,
                    max_bytes: int | None = None) -> list[int]:
        """Append items (each a dict with a unique "id"); all or nothing. Returns their seqs.
        QuotaExceeded when the user would then hold more than max_items items or max_bytes bytes
        of item JSON (checked against per-user totals: nothing is read)."""
        user_id = validate_user_id(user_id)
        items = list(items)
        seen: set[str] = set()
        for i, it in enumerate(items):
            if not isinstance(it, dict) or not isinstance(it.get("id"), (str, int)) or isinstance(it.get("id"), bool) \
                    or str(it.get("id")) == "":
                raise HistoryError(f"history item #{i}: expected an object with a non-empty string 'id'")
            if str(it["id"]) in seen:
                raise HistoryError(f"history item #{i}: duplicate item id {str(it['id'])!r} in this batch")
            seen.add(str(it["id"]))
        with self.db.write() as c:
            self._bind_task(c, user_id, task)
            dup = [r[0] for r in c.execute(
                f"SELECT item_id FROM history_items WHERE user_id=? AND item_id IN ({','.join('?' * len(seen))})",
                (user_id, *seen))] if seen else []
            if dup:
                raise HistoryError(f"user {user_id!r}: history item id {sorted(dup)[0]!r} is already stored")
            last = c.execute("SELECT COALESCE(MAX(seq), 0) FROM history_items WHERE user_id=?",
                             (user_id,)).fetchone()[0]
            seqs = list(range(last + 1, last + 1 + len(items)))
            docs = [json.dumps({**it, "id": str(it["id"])}, ensure_ascii=False) for it in items]
            self._charge(c, user_id, len(docs), sum(len(d.encode("utf-8")) for d in docs), max_items, max_bytes)
            c.executemany("INSERT INTO history_items(user_id, task, item_id, json, seq) VALUES (?, ?, ?, ?, ?)",
                          [(user_id, task, str(it["id"]), d, s) for it, d, s in zip(items, docs, seqs)])
        return seqs

    def _charge(self, c, user_id: str, n: int, size: int, max_items: int | None, max_bytes: int | None) -> None:
        """Add n items of `size` bytes to the user's totals, or QuotaExceeded naming the limit."""
        row = c.execute("SELECT items, bytes FROM history_totals WHERE user_id=?", (user_id,)).fetchone()
        if row is None:  # a store from before the totals: counted once
            row = c.execute("SELECT COUNT(*), COALESCE(SUM(LENGTH(CAST(json AS BLOB))), 0) FROM history_items "
                            "WHERE user_id=?", (user_id,)).fetchone()
        items, size_now = row[0] + n, row[1] + size
        if max_items is not None and items > max_items:
            raise QuotaExceeded(f"user {user_id!r}: {n} more item(s) would make {items} history items, over the "
                                f"limit of {max_items} (max_history_items)")
        if max_bytes is not None and size_now > max_bytes:
            raise QuotaExceeded(f"user {user_id!r}: {n} more item(s) would make {size_now} bytes of history, over "
                                f"the limit of {max_bytes} (max_history_bytes)")
        c.execute("INSERT INTO history_totals(user_id, items, bytes) VALUES (?, ?, ?) ON CONFLICT(user_id) DO UPDATE "
                  "SET items=excluded.items, bytes=excluded.bytes", (user_id, items, size_now))

    def history(self, user_id: str, after_seq: int = 0) -> list[HistoryItem]:
        """The user's items in insertion order, those with seq > after_seq."""
        self._require_user(user_id)
        rows = self.db.conn().execute("SELECT seq, item_id, json FROM history_items WHERE user_id=? AND seq>? "
                                      "ORDER BY seq", (user_id, after_seq))
        return [HistoryItem(r["seq"], r["item_id"], json.loads(r["json"])) for r in rows]

    def count_history(self, user_id: str) -> int:
        """How many items the user has (one SQL count; nothing is read)."""
        self._require_user(user_id)
        return self.db.conn().execute("SELECT COUNT(*) FROM history_items WHERE user_id=?", (user_id,)).fetchone()[0]

    def _bind_task(self, c, user_id: str, task: str) -> None:
        row = c.execute("SELECT task FROM users WHERE user_id=?", (user_id,)).fetchone()
        if row is None:
            raise UnknownUser(f"unknown user {user_id!r}")
        if row["task"] is None:
            c.execute("UPDATE users SET task=? WHERE user_id=?", (task, user_id))
        elif row["task"] != task:
            raise HistoryError(f"user {user_id!r} belongs to task {row['task']!r}, not {task!r}; "
                               "use another user id for another task")

    # -- versions ------------------------------------------------------------------------------
    def put_version(self, user_id: str, write: Callable[[Path], Any], *, task: str, peft_type: str,
                    parent_version: int | None = None, history_seq: int = 0, note: str = "",
                    meta: dict[str, Any] | None = None, activate: bool = True,
                    before: Callable[[Any], None] | None = None) -> Version:
        """Publish a new version: `write(dir)` fills a private temp dir with the adapter files
        (e.g. `peft_model.save_pretrained`) and may return a dict merged into `meta`; the files
        are fsynced, hashed, renamed into place and only then recorded. `before(conn)` runs first
        inside the publishing transaction (raise to publish nothing). Returns the committed version."""
        self._require_user(user_id)
        tmp = new_temp_dir(self._tmp)
        try:
            extra = write(tmp)
            sums = seal(tmp)
            fields = dict(task=task, peft_type=peft_type, parent_version=parent_version, note=note,
                          history_seq=history_seq, meta={**(meta or {}), **(extra if isinstance(extra, dict) else {})})
            return self._publish(user_id, tmp, sums, fields, activate, before)
        finally:
            release_temp_dir(tmp)

    def _publish(self, user_id: str, tmp: Path, sums: dict[str, str], fields: dict[str, Any], activate: bool,
                 before: Callable[[Any], None] | None = None) -> Version:
        final: Path | None = None
        renamed = False
        try:
            with self.db.write() as c:
                if before:
                    before(c)
                self._bind_task(c, user_id, fields["task"])
                parent = fields["parent_version"]
                if parent is not None and not c.execute("SELECT 1 FROM adapter_versions WHERE user_id=? AND "
                                                        "version=?", (user_id, parent)).fetchone():
                    raise UnknownVersion(f"user {user_id!r} has no version {parent} to be the parent")
                n = c.execute("SELECT COALESCE(MAX(version), 0) + 1 FROM adapter_versions WHERE user_id=?",
                              (user_id,)).fetchone()[0]
                rel = f"adapters/{safe_user_dir(user_id)}/v{n}"
                final = self._inside(self.root / rel, self._adapters)
                if final.exists():  # left by a crash after the rename (no row): not a version
                    shutil.rmtree(final)
                private_dir(final.parent)
                os.rename(tmp, final)
                renamed = True
                fsync_dir(final.parent)
                v = Version(user_id, n, created=time.time(), dir=rel, sha256=sums, **fields)
                self._insert_version(c, v)
                if activate:
                    c.execute("UPDATE users SET active_version=? WHERE user_id=?", (n, user_id))
            return v
        except BaseException:
            if renamed:  # the row did not commit: the folder must not outlive it
                shutil.rmtree(final, ignore_errors=True)
            raise

    def _insert_version(self, c, v: Version) -> None:
        c.execute("INSERT INTO adapter_versions(user_id, version, task, peft_type, dir, sha256, created, "
                  "parent_version, note, history_seq, meta) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                  (v.user_id, v.version, v.task, v.peft_type, v.dir, json.dumps(v.sha256), v.created,
                   v.parent_version, v.note, v.history_seq, json.dumps(v.meta)))

    def versions(self, user_id: str) -> list[Version]:
        self._require_user(user_id)
        return [version_from_row(r) for r in self.db.conn().execute(
            "SELECT * FROM adapter_versions WHERE user_id=? ORDER BY version", (user_id,))]

    def version(self, user_id: str, version: int) -> Version:
        self._require_user(user_id)
        row = self.db.conn().execute("SELECT * FROM adapter_versions WHERE user_id=? AND version=?",
                                     (user_id, version)).fetchone()
        if row is None:
            have = [v.version for v in self.versions(user_id)]
            raise UnknownVersion(f"user {user_id!r} has no adapter version {version!r}; versions: {have}")
        return version_from_row(row)

    def active_version(self, user_id: str) -> int | None:
        return self.user(user_id).active_version

    def active_note(self, user_id: str) -> str | None:
        """The note of the user's active version (None when none is active). On this thread's
        connection, so inside put_version's `before` it reads within the publishing transaction."""
        active = self.active_version(user_id)
        return None if active is None else self.version(user_id, active).note

    def set_active(self, user_id: str, version: int) -> None:
        self.version(user_id, version)
        with self.db.write() as c:
            c.execute("UPDATE users SET active_version=? WHERE user_id=?", (version, user_id))

    def path(self, v: Version) -> Path:
        return self._inside(self.root / v.dir, self._adapters)

    def verify(self, user_id: str, version: int) -> Path:
        """The version's folder after re-hashing every file; CorruptAdapterError names the bad file."""
        v = self.version(user_id, version)
        d = self.path(v)
        if sorted(v.sha256) != sorted(ADAPTER_FILES):
            raise CorruptAdapterError(user_id, version, ",".join(sorted(v.sha256)), "manifest is not the adapter set")
        for name in ADAPTER_FILES:
            reason = check_file(d / name, v.sha256[name])
            if reason:
                raise CorruptAdapterError(user_id, version, name, reason)
        return d

    def read_version_files(self, user_id: str, version: int) -> dict[str, bytes]:
        """The version's files as bytes, each checked against its recorded sha256."""
        v = self.version(user_id, version)
        d, out = self.path(v), {}
        for name in ADAPTER_FILES:
            data, reason = read_checked(d / name, v.sha256.get(name, ""))
            if reason:
                raise CorruptAdapterError(user_id, version, name, reason)
            out[name] = data
        return out

    def resolve_active(self, user_id: str) -> Served:
        """The active version if its files verify, else the newest older version that does."""
        active = self.active_version(user_id)
        if active is None:
            raise NoAdapter(f"user {user_id!r} has no adapter yet; train one first")
        older = sorted((v.version for v in self.versions(user_id) if v.version < active), reverse=True)
        skipped: list[CorruptAdapterError] = []
        for n in [active, *older]:
            try:
                path = self.verify(user_id, n)
            except CorruptAdapterError as e:
                skipped.append(e)
                continue
            return Served(self.version(user_id, n), path, tuple(skipped))
        raise skipped[0]

    def import_user(self, user_id: str, task: str, history: list[tuple[int, dict[str, Any]]],
                    files: dict[str, bytes], fields: dict[str, Any],
                    check: Callable[[Path], Any] | None = None) -> Version:
        """Create a user with history and one active version in a single transaction (an import).
        `check(dir)` may inspect the sealed files first (e.g. load them onto the base) and raise."""
        user_id = validate_user_id(user_id)
        if self.has_user(user_id):
            raise UserExists(f"user {user_id!r} already exists; import under another id or delete it first")
        tmp = new_temp_dir(self._tmp)
        try:
            write_files(tmp, files)
            sums = seal(tmp)
            if check is not None:
                check(tmp)

            def create(c) -> None:
                if c.execute("SELECT 1 FROM users WHERE user_id=?", (user_id,)).fetchone():
                    raise UserExists(f"user {user_id!r} already exists")
                c.execute("INSERT INTO users(user_id, created, task) VALUES (?, ?, ?)", (user_id, time.time(), task))
                docs = [json.dumps(it, ensure_ascii=False) for _, it in history]
                c.executemany("INSERT INTO history_items(user_id, task, item_id, json, seq) VALUES (?, ?, ?, ?, ?)",
                              [(user_id, task, str(it["id"]), d, seq) for (seq, it), d in zip(history, docs)])
                self._charge(c, user_id, len(docs), sum(len(d.encode("utf-8")) for d in docs), None, None)
            return self._publish(user_id, tmp, sums, {**fields, "task": task}, True, before=create)
        finally:
            release_temp_dir(tmp)

    # -- housekeeping --------------------------------------------------------------------------
    def _inside(self, p: Path, parent: Path) -> Path:
        rp = p.resolve()
        if not rp.is_relative_to(parent.resolve()) or rp == parent.resolve():
            raise StoreError(f"path {p} escapes {parent}")
        return rp

    def _recover(self) -> dict[str, list[str]]:
        """Remove what crashed writes and deletes left behind: none of it is a visible version."""
        out: dict[str, list[str]] = {"tmp": clean_temp_dirs(self._tmp), "adapters": [], "cache": []}
        with self.db.write() as c:  # under the write lock no other writer is between rename and commit
            users = {safe_user_dir(r[0]) for r in c.execute("SELECT user_id FROM users")}
            dirs = {r[0] for r in c.execute("SELECT dir FROM adapter_versions")}
            for top, key in ((self._adapters, "adapters"), (self._cache, "cache")):
                if not top.is_dir():
                    continue
                for ud in top.iterdir():
                    if ud.name not in users or not ud.is_dir() or ud.is_symlink():
                        _remove(ud)
                        out[key].append(ud.name)
                    elif key == "adapters":
                        for vd in ud.iterdir():
                            if f"adapters/{ud.name}/{vd.name}" not in dirs:
                                _remove(vd)
                                out[key].append(f"{ud.name}/{vd.name}")
        return out

    def close(self) -> None:
        self.scrubber.close()
        self.db.close()

    def __enter__(self) -> "AdapterStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
