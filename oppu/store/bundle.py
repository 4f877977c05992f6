"""A user's export payload: JSON only (adapter files base64-encoded), never a pickle. Pure bytes.

    {"format": "oppu.user-export", "format_version": 1, "exported": <unix time>,
     "user": {"user_id": ..., "task": ...},
     "adapter": {"version", "peft_type", "created", "note", "parent_version", "history_seq", "meta",
                 "files": {"adapter_config.json": {"sha256": ..., "data": <base64>},
                           "adapter_model.safetensors": {...}}},
     "history": [{"seq": 1, "item": {...}}, ...] | null}

`unpack` checks every field and every file's checksum before anything is written anywhere.
Encryption is oppu.crypto's job; this module only shapes the plaintext.
"""
from __future__ import annotations

import base64
import binascii
import json
import time
from dataclasses import dataclass
from typing import Any

from oppu.store.errors import StoreError
from oppu.store.files import ADAPTER_FILES, sha256_bytes

FORMAT = "oppu.user-export"
FORMAT_VERSION = 1


class BundleError(StoreError, ValueError):
    """A decrypted export whose content is not a valid oppu user export."""


@dataclass(frozen=True)
class Bundle:
    user_id: str
    task: str
    adapter: dict[str, Any]                        # version, peft_type, created, note, ...
    files: dict[str, bytes]
    history: list[tuple[int, dict[str, Any]]] | None


def pack(user_id: str, task: str, version, files: dict[str, bytes], history) -> bytes:
    """version: an oppu.store.Version; history: list of HistoryItem or None."""
    doc = {"format": FORMAT, "format_version": FORMAT_VERSION, "exported": time.time(),
           "user": {"user_id": user_id, "task": task},
           "adapter": {"version": version.version, "peft_type": version.peft_type, "created": version.created,
                       "note": version.note, "parent_version": version.parent_version,
                       "history_seq": version.history_seq, "meta": version.meta,
                       "files": {n: {"sha256": sha256_bytes(d), "data": base64.b64encode(d).decode()}
                                 for n, d in files.items()}},
           "history": None if history is None else [{"seq": h.seq, "item": h.item} for h in history]}
    return json.dumps(doc, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def _need(cond: bool, what: str) -> None:
    if not cond:
        raise BundleError(f"invalid oppu user export: {what}")


def unpack(data: bytes) -> Bundle:
    try:
        doc = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise BundleError("invalid oppu user export: the payload is not UTF-8 JSON") from None
    _need(isinstance(doc, dict) and doc.get("format") == FORMAT, f"'format' must be {FORMAT!r}")
    _need(doc.get("format_version") == FORMAT_VERSION,
          f"format_version {doc.get('format_version')!r} is not {FORMAT_VERSION}")
    user, ad = doc.get("user"), doc.get("adapter")
    _need(isinstance(user, dict) and isinstance(user.get("user_id"), str) and isinstance(user.get("task"), str),
          "'user' needs string 'user_id' and 'task'")
    _need(isinstance(ad, dict) and isinstance(ad.get("peft_type"), str) and isinstance(ad.get("files"), dict),
          "'adapter' needs 'peft_type' and 'files'")
    _need(sorted(ad["files"]) == sorted(ADAPTER_FILES), f"adapter files must be exactly {list(ADAPTER_FILES)}, "
          f"got {sorted(ad['files'])}")
    files = {}
    for name, f in ad["files"].items():
        _need(isinstance(f, dict) and isinstance(f.get("data"), str) and isinstance(f.get("sha256"), str),
              f"file {name!r} needs 'data' and 'sha256'")
        try:
            raw = base64.b64decode(f["data"], validate=True)
        except (binascii.Error, ValueError):
            raise BundleError(f"invalid oppu user export: file {name!r} is not valid base64") from None
        _need(sha256_bytes(raw) == f["sha256"], f"file {name!r} does not match its sha256")
        files[name] = raw
    history = None
    if doc.get("history") is not None:
        _need(isinstance(doc["history"], list), "'history' must be a list or null")
        history, seqs, ids = [], set(), set()
        for i, h in enumerate(doc["history"]):
            ok = isinstance(h, dict) and isinstance(h.get("seq"), int) and not isinstance(h.get("seq"), bool) \
                and h["seq"] > 0 and isinstance(h.get("item"), dict) and isinstance(h["item"].get("id"), str)
            _need(ok, f"history entry #{i} needs a positive int 'seq' and an 'item' with a string 'id'")
            _need(h["seq"] not in seqs and h["item"]["id"] not in ids, f"history entry #{i} repeats a seq or item id")
            seqs.add(h["seq"])
            ids.add(h["item"]["id"])
            history.append((h["seq"], h["item"]))
    adapter = {k: ad.get(k) for k in ("version", "peft_type", "created", "note", "parent_version", "history_seq",
                                      "meta")}
    _need(isinstance(adapter["history_seq"], int) and isinstance(adapter["meta"], dict),
          "'adapter' needs int 'history_seq' and object 'meta'")
    return Bundle(user["user_id"], user["task"], adapter, files, history)
