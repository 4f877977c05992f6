"""A user's export and import, without a model: the encrypted file out of a store, and the checks
that decide whether a file may come in (passphrase, integrity, task, PEFT type, items).

    blob, served = export_blob(store, uid, "passphrase")        # served.skipped: corrupt newer versions
    incoming = read_export(blob, "passphrase", task="LaMP_2M", user_id=None)
    version = import_into(store, incoming, check=None)          # check(dir): e.g. load onto a base

An export holds the newest intact version of the user (the active one unless its files fail
their checksums; then `served.skipped` says which and why). `oppu.lifecycle` adds the check that
the adapter runs on the serving base; `oppu user import` (no base at hand) runs every other one.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from oppu import crypto
from oppu.config import PEFT_TYPES
from oppu.history import validate_items
from oppu.store import AdapterStore, NoAdapter, Served, Version, validate_user_id
from oppu.store.bundle import BundleError, pack, unpack
from oppu.tasks import get_task


@dataclass(frozen=True)
class Incoming:
    """A decrypted, checked export, ready to be written as a new user."""
    user_id: str
    task: str
    history: list[tuple[int, dict[str, Any]]]
    files: dict[str, bytes]
    fields: dict[str, Any]


def export_blob(store: AdapterStore, user_id: str, passphrase: str,
                include_history: bool = True) -> tuple[bytes, Served]:
    """The encrypted export of the user's newest intact version (and, optionally, history)."""
    info = store.user(user_id)
    if info.active_version is None:
        raise NoAdapter(f"user {user_id!r} has no adapter to export; train one first")
    served = store.resolve_active(user_id)  # CorruptAdapterError when no version is intact
    v = served.version
    files = store.read_version_files(user_id, v.version)
    history = store.history(user_id) if include_history else None
    return crypto.encrypt(pack(user_id, v.task, v, files, history), passphrase), served


def read_export(blob: bytes, passphrase: str, task: str | None = None, user_id: str | None = None) -> Incoming:
    """Decrypt and check an export: `task` (when given) must be the export's; the new user's id is
    `user_id` or the exported one. Raises CryptoError / BundleError / HistoryError naming the problem."""
    b = unpack(crypto.decrypt(blob, passphrase))
    try:
        t = get_task(b.task)
    except ValueError as e:
        raise BundleError(f"the export names an unknown task: {e}") from None
    if task is not None and t.id != get_task(task).id:
        raise BundleError(f"the export is for task {b.task!r}; this personalizer serves {get_task(task).id!r}")
    if b.adapter["peft_type"] not in PEFT_TYPES:
        raise BundleError(f"unknown PEFT type {b.adapter['peft_type']!r} in the export; valid: {PEFT_TYPES}")
    check_config(b.files["adapter_config.json"], b.adapter["peft_type"])
    uid = validate_user_id(user_id if user_id is not None else b.user_id)
    history = []
    if b.history is not None:
        items = validate_items(t, [it for _, it in b.history])
        history = [(seq, it) for (seq, _), it in zip(b.history, items)]
    fields = {"peft_type": b.adapter["peft_type"], "parent_version": None,
              "history_seq": b.adapter["history_seq"] if history else 0,
              "note": f"imported (exported as v{b.adapter['version']})",
              "meta": {**b.adapter["meta"], "imported": True}}
    return Incoming(uid, t.id, history, b.files, fields)


def check_config(data: bytes, expected: str) -> None:
    """The adapter_config.json must be a JSON object naming the PEFT type the metadata names."""
    try:
        cfg = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BundleError(f"the export's adapter_config.json is not valid JSON: {e}") from None
    if not isinstance(cfg, dict) or str(cfg.get("peft_type") or "").lower() != expected.lower():
        got = cfg.get("peft_type") if isinstance(cfg, dict) else cfg
        raise BundleError(f"the export's adapter_config.json says peft_type {got!r}, its metadata says {expected!r}")


def import_into(store: AdapterStore, incoming: Incoming, check: Callable[[Path], Any] | None = None) -> Version:
    """The new user with the export's history and its adapter as v1 (active), in one transaction;
    `check(dir)` may refuse the sealed files first. A failure leaves the store unchanged."""
    return store.import_user(incoming.user_id, incoming.task, incoming.history, incoming.files, incoming.fields,
                             check=check)
