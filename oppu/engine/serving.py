"""Serving slots: users' adapters kept loaded in one MultiUserModel over the serving base.

Least recently used users are evicted past `max_loaded`; a user is reloaded when the key it was
loaded under (e.g. its active version) changes. Files are read through an AdapterCache, so a user
evicted from the model and loaded again costs no disk read while the cache holds them.

    slots = Slots(base, max_loaded=256)
    slots.ensure("u1", key=3, path="store/u1/v3")     # load, or touch when already loaded as key 3
    texts = generate(base, tok, prompts, 8, users=["u1", None], mm=slots.mm)
    slots.drop("u1"); slots.close()                   # close: the base gets its plain modules back
"""
from __future__ import annotations

from collections import OrderedDict
from pathlib import Path
from typing import Hashable

from oppu.engine.cache import AdapterCache
from oppu.engine.model import MultiUserModel

CHECK_USER = "\x00check"   # never a valid user id (oppu.store.USER_ID_PATTERN)


class Slots:
    def __init__(self, base, max_loaded: int = 256, cache: AdapterCache | None = None) -> None:
        if max_loaded < 1:
            raise ValueError(f"max_loaded must be >= 1, got {max_loaded}")
        self.mm = MultiUserModel(base)
        self.max_loaded = max_loaded
        self.cache = cache if cache is not None else AdapterCache(max_bytes=256 << 20)
        self._keys: OrderedDict[str, Hashable] = OrderedDict()

    def ensure(self, uid: str, key: Hashable, path: str | Path) -> None:
        """Have `uid` loaded as `key` (from `path` when it is not)."""
        if self._keys.get(uid, object()) == key and uid in self.mm.users:
            self._keys.move_to_end(uid)
            return
        self.drop(uid)
        config, state = self.cache.get(path)
        self.mm.add_user(uid, config, state)
        self._keys[uid] = key
        while len(self._keys) > self.max_loaded:
            self.drop(next(iter(self._keys)))

    def key(self, uid: str) -> Hashable | None:
        return self._keys.get(uid)

    def check(self, path: str | Path) -> None:
        """Raise unless the adapter at `path` loads onto this base (type, options, shapes)."""
        from oppu.engine.format import read_adapter

        config, state = read_adapter(path)
        self.mm.add_user(CHECK_USER, config, state)
        self.mm.remove_user(CHECK_USER)

    def drop(self, uid: str) -> None:
        self._keys.pop(uid, None)
        if uid in self.mm.users:
            self.mm.remove_user(uid)

    def __len__(self) -> int:
        return len(self._keys)

    def close(self) -> None:
        self._keys.clear()
        self.mm.unwrap()
