"""The personal adapter store: SQLite metadata + standard PEFT files, one folder per version.

    from oppu.store import AdapterStore
    store = AdapterStore("var/oppu")

Files: store.py (AdapterStore: users, history, versions, delete, crash recovery), db.py (schema,
connections, transactions, scrubbing), files.py (user dir names, temp dirs, fsync, checksums),
jobs.py (jobs and access tokens), bundle.py (the JSON export payload), scrub.py (the WAL scrub after
deletes, retried in the background), errors.py.
"""
from oppu.store.bundle import Bundle, BundleError
from oppu.store.errors import (CorruptAdapterError, HistoryError, InvalidUserId, JobError, NoAdapter, QuotaExceeded,
                               StoreError, UnknownUser, UnknownVersion, UserExists)
from oppu.store.files import ADAPTER_FILES, safe_user_dir
from oppu.store.jobs import Job
from oppu.store.store import (USER_ID_PATTERN, AdapterStore, HistoryItem, Served, UserInfo, Version,
                              validate_user_id)

__all__ = ["ADAPTER_FILES", "USER_ID_PATTERN", "AdapterStore", "Bundle", "BundleError", "CorruptAdapterError",
           "HistoryError", "HistoryItem", "InvalidUserId", "Job", "JobError", "NoAdapter", "QuotaExceeded", "Served",
           "StoreError", "UnknownUser", "UnknownVersion", "UserExists", "UserInfo", "Version",
           "safe_user_dir", "validate_user_id"]
