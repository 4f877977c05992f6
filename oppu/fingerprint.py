"""Content hashes for cache keys and same-data checks (stdlib only, no torch).

    from oppu.fingerprint import data_fingerprint, fingerprint
    key = fingerprint({"task": "LaMP_2M", "seed": 0})   # any JSON-able object (str() for the rest)
    data_fingerprint(users)                             # every item, input and gold of these users
    data_fingerprint(users, golds=False)                # the same without the golds

Both return the first 16 hex digits of a SHA-256. Users are hashed in user-id order, so the
order of the list does not matter; item and query order within a user does.
"""
from __future__ import annotations

import hashlib
import json
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from oppu.data.users import User


def fingerprint(obj: Any) -> str:
    """Hash of json.dumps(obj) with sorted keys (non-JSON values via str)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def data_fingerprint(users: list[User], golds: bool = True) -> str:
    """Content hash of users (every item, input and, with golds, gold)."""
    h = hashlib.sha256()
    for u in sorted(users, key=lambda u: u.user_id):
        qs = [(q.id, q.input, q.gold if golds else None, q.visible) for q in u.queries]
        h.update(json.dumps([u.user_id, list(u.items_by_id.values()), qs], sort_keys=True, default=str).encode())
    return h.hexdigest()[:16]
