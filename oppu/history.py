"""A user's behaviour history as the store and the API object take it: validation, replay, shape.

Pure: no disk, no model.

    items = validate_items(get_task("LaMP_2M"), [{"id": "1", "description": "...", "tag": "comedy"}])
    old = replay_sample(history, fraction=0.5, seed=7)     # seeded share of older items, in order
    user = as_user("u1", history)                          # oppu.data.users.User with no queries
    h = UserHistory("u1", created, task, "bm25")           # kept for answering; grows by new rows only
"""
from __future__ import annotations

import random
import threading
from typing import Any, Sequence

from oppu.data.lamp import ITEM_FIELDS
from oppu.data.users import User
from oppu.store import HistoryError, HistoryItem
from oppu.tasks import Task


def _check_field(where: str, task: Task, fields: Sequence[str], it: dict, f: str) -> None:
    if f not in it:
        raise HistoryError(f"{where}: missing field {f!r} (task {task.id} items need {', '.join(fields)})")
    v = it[f]
    if f == "score":
        if isinstance(v, bool) or not isinstance(v, (str, int, float)):
            raise HistoryError(f"{where}: field 'score' must be a number or string, got {type(v).__name__}")
    elif not isinstance(v, str):
        raise HistoryError(f"{where}: field {f!r} must be a string, got {type(v).__name__}")


def validate_items(task: Task, items: Any) -> list[dict[str, Any]]:
    """The items with string ids, or HistoryError naming the item (index and id) and the field."""
    if not isinstance(items, (list, tuple)):
        raise HistoryError(f"history items must be a list of objects, got {type(items).__name__}")
    fields = ITEM_FIELDS.get(task.id, task.item_fields)
    out, seen = [], set()
    for i, it in enumerate(items):
        where = f"history item #{i}"
        if not isinstance(it, dict):
            raise HistoryError(f"{where}: expected an object, got {type(it).__name__}")
        iid = it.get("id")
        if iid is None or isinstance(iid, bool) or not isinstance(iid, (str, int)) or str(iid) == "":
            raise HistoryError(f"{where}: field 'id' must be a non-empty string, got {iid!r}")
        where = f"{where} (id={str(iid)!r})"
        for f in fields:
            _check_field(where, task, fields, it, f)
        if str(iid) in seen:
            raise HistoryError(f"{where}: duplicate item id {str(iid)!r} in this batch")
        seen.add(str(iid))
        out.append({**it, "id": str(iid)})
    return out


def replay_sample(old: Sequence[HistoryItem], fraction: float, seed: int) -> list[HistoryItem]:
    """round(fraction * len(old)) old items (at least 1 when fraction > 0 and any exist), seeded,
    in history order."""
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"replay must be in [0, 1], got {fraction!r}")
    if not old or fraction == 0.0:
        return []
    n = max(1, round(fraction * len(old)))
    return sorted(random.Random(seed).sample(list(old), n), key=lambda h: h.seq)


def as_user(user_id: str, hist: Sequence[HistoryItem]) -> User:
    items = [h.item for h in hist]
    return User(user_id, items, [], {it["id"]: it for it in items})


class UserHistory:
    """One user's history kept in memory for answering, grown incrementally: `extend` appends the
    rows added since `last_seq` (the store returns only those), and with BM25 the retrieval index
    grows with them (oppu.retrieval.bm25.IncrementalBM25): adding an item re-reads nothing and
    rebuilds nothing. Other retrievers are refit when the history grows (`cache` is reset).

        h = UserHistory(uid, created, task, "bm25")
        h.extend(store.history(uid, after_seq=h.last_seq))
        prompt = query_prompt(task, h.user, Query("q0", text, None, h.ids), "rag", k, ..., h.cache)
    """

    def __init__(self, user_id: str, created: float, task: Task, retriever: str):
        from oppu.retrieval.bm25 import IncrementalBM25

        self.user_id, self.created, self.task, self.last_seq = user_id, created, task, 0
        self.lock = threading.Lock()  # held while extending and while a prompt reads the index
        self.user = User(user_id, [], [], {})
        self.ids: tuple[str, ...] = ()
        self.index = IncrementalBM25() if retriever == "bm25" else None
        self.cache: dict = {}

    def extend(self, rows: Sequence[HistoryItem]) -> None:
        if not rows:
            return
        for h in rows:
            self.user.history.append(h.item)
            self.user.items_by_id[h.item_id] = h.item
            if self.index is not None:
                self.index.add(self.task.item_doc(h.item))
        self.ids = self.ids + tuple(h.item_id for h in rows)
        self.last_seq = rows[-1].seq
        self.cache = {} if self.index is None else {("r", self.user_id, self.ids): self.index}
