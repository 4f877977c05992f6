"""The store's records: plain frozen dataclasses, what AdapterStore methods return."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from oppu.store.errors import CorruptAdapterError


@dataclass(frozen=True)
class UserInfo:
    user_id: str
    created: float
    task: str | None
    active_version: int | None


@dataclass(frozen=True)
class HistoryItem:
    seq: int
    item_id: str
    item: dict[str, Any]


@dataclass(frozen=True)
class Version:
    user_id: str
    version: int
    task: str
    peft_type: str
    dir: str                      # relative to the store root
    sha256: dict[str, str]
    created: float
    parent_version: int | None
    note: str
    history_seq: int              # the last history seq this version was trained on
    meta: dict[str, Any] = field(default_factory=dict)


INSTANT_NOTE = "instant"  # the note of a version mixed from a bank (oppu.instant.served), not trained on the user


def is_instant(version: Version | None) -> bool:
    """Whether a version is an instant module (mixed from a bank, never trained on the user)."""
    return version is not None and version.note == INSTANT_NOTE


@dataclass(frozen=True)
class Served:
    """The version actually served, and the newer ones skipped because they were corrupt."""
    version: Version
    path: Path
    skipped: tuple[CorruptAdapterError, ...] = ()

    @property
    def fell_back(self) -> bool:
        return bool(self.skipped)


def version_from_row(row) -> Version:
    return Version(row["user_id"], row["version"], row["task"], row["peft_type"], row["dir"],
                   json.loads(row["sha256"]), row["created"], row["parent_version"], row["note"],
                   row["history_seq"], json.loads(row["meta"]))
