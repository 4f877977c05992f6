"""An in-memory LRU of users' adapter tensors, bounded in bytes, in front of the on-disk adapters.

The engine's serving slots (engine/serving.py, under the server and Personalizer) read every
adapter they load through this cache: a hit skips the safetensors read and the config parse (it
costs two `stat` calls, which also catch a file rewritten on disk: its entry is reloaded, never
served stale).
Entries are evicted least-recently-used first until the held tensor bytes fit `max_bytes`.

    cache = AdapterCache(max_bytes=256 << 20)                  # 256 MiB of adapter tensors
    config, tensors = cache.get("runs/x/adapters/u1")        # miss: read; next time: hit
    mm.add_user("u1", config, tensors)                       # MultiUserModel copies them into its banks
    cache.stats()  # {"hits": .., "misses": .., "evictions": .., "reloads": .., "bytes": .., ...}

Storage in bf16: `save_adapter_bf16(dir)` rewrites an adapter's safetensors in bfloat16 (half the
bytes on disk; PEFT and the engine load it back into their fp32 adapter tensors), and
`AdapterCache(dtype=torch.bfloat16)` holds tensors in bf16 in memory (twice the users per byte).
What it costs, measured by benchmarks/adapter_io.py (16 users of a synthetic LaMP_2M world, LoRA r=8
on all linear layers of the tiny base, task-adapted; see docs/benchmarks.md): rounding the adapter
weights to bf16 (relative error <= 2^-9 per element) moved the first-token logits by at most
1.8e-3 (mean 2e-4, logits up to ~8), left all 48 greedy outputs identical and the task accuracy
unchanged (0.50 both). A larger base with sharper logits may flip near-ties: measure (run
benchmarks/adapter_io.py on it) before relying on it.

Tensors handed out are shared with the cache: treat them as read-only (MultiUserModel.add_user
and PEFT's loaders copy them).
"""
from __future__ import annotations

import hashlib
import os
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch

from oppu.engine.format import CONFIG_FILE, WEIGHTS_FILE, read_adapter

FILES = (CONFIG_FILE, WEIGHTS_FILE)
VERIFY = ("stat", "sha256")


@dataclass
class _Entry:
    fingerprint: tuple
    config: Any
    tensors: dict[str, torch.Tensor]
    nbytes: int


def tensor_bytes(tensors: Mapping[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


def fingerprint(user_dir: str | Path, verify: str = "stat") -> tuple:
    """What identifies the adapter's current content: (mtime_ns, size, inode) of both files, or their
    sha256 (reads the files: slower, but blind to timestamps)."""
    d = Path(user_dir)
    if verify == "stat":
        out = []
        for name in FILES:
            st = (d / name).stat()
            out.append((st.st_mtime_ns, st.st_size, st.st_ino))
        return tuple(out)
    if verify == "sha256":
        return tuple(hashlib.sha256((d / name).read_bytes()).hexdigest() for name in FILES)
    raise ValueError(f"unknown verify mode {verify!r}; valid: {', '.join(VERIFY)}")


class AdapterCache:
    """LRU of (PeftConfig, {name: tensor}) per adapter directory, at most `max_bytes` of tensors.

    `dtype` (e.g. torch.bfloat16) casts floating tensors on the way in; None keeps the file's dtype.
    `verify`: "stat" (default) or "sha256", how a hit checks that the files did not change.
    Thread-safe: one lock around the bookkeeping (reads from disk happen outside it).
    """

    def __init__(self, max_bytes: int, dtype: torch.dtype | None = None, verify: str = "stat") -> None:
        if max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0, got {max_bytes}")
        if verify not in VERIFY:
            raise ValueError(f"unknown verify mode {verify!r}; valid: {', '.join(VERIFY)}")
        self.max_bytes, self.dtype, self.verify = max_bytes, dtype, verify
        self._entries: OrderedDict[str, _Entry] = OrderedDict()  # least recently used first
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = self.misses = self.evictions = self.reloads = self.rejected = 0

    @staticmethod
    def key(user_dir: str | Path) -> str:
        return str(Path(user_dir).resolve())

    def get(self, user_dir: str | Path) -> tuple[Any, dict[str, torch.Tensor]]:
        """(config, tensors) of the adapter in user_dir, from memory when its files are unchanged."""
        key = self.key(user_dir)
        fp = fingerprint(key, self.verify)
        with self._lock:
            e = self._entries.get(key)
            if e is not None and e.fingerprint == fp:
                self._entries.move_to_end(key)
                self.hits += 1
                return e.config, e.tensors
            if e is not None:  # the files changed on disk: drop the stale copy
                self._drop(key)
                self.reloads += 1
            self.misses += 1
        config, tensors = read_adapter(key)
        if self.dtype is not None:
            tensors = {k: v.to(self.dtype) if v.is_floating_point() else v for k, v in tensors.items()}
        if fingerprint(key, self.verify) != fp:  # rewritten while we read: serve it, cache nothing
            return config, tensors
        self._put(key, _Entry(fp, config, tensors, tensor_bytes(tensors)))
        return config, tensors

    def _put(self, key: str, e: _Entry) -> None:
        with self._lock:
            if key in self._entries:  # another thread loaded it meanwhile
                self._drop(key)
            if e.nbytes > self.max_bytes:
                self.rejected += 1
                return
            self._entries[key] = e
            self._bytes += e.nbytes
            while self._bytes > self.max_bytes:
                self._drop(next(iter(self._entries)))
                self.evictions += 1

    def _drop(self, key: str) -> None:
        self._bytes -= self._entries.pop(key).nbytes

    def invalidate(self, user_dir: str | Path) -> bool:
        """Forget one adapter (e.g. after retraining it); True if it was cached."""
        with self._lock:
            key = self.key(user_dir)
            if key in self._entries:
                self._drop(key)
                return True
            return False

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._bytes = 0

    def __contains__(self, user_dir: str | Path) -> bool:
        return self.key(user_dir) in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def keys(self) -> list[str]:
        """Cached adapter dirs, least recently used first."""
        with self._lock:
            return list(self._entries)

    @property
    def nbytes(self) -> int:
        return self._bytes

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {"hits": self.hits, "misses": self.misses, "evictions": self.evictions, "reloads": self.reloads,
                    "rejected": self.rejected, "entries": len(self._entries), "bytes": self._bytes,
                    "max_bytes": self.max_bytes}


def save_adapter_as(src_dir: str | Path, dtype: torch.dtype, dst_dir: str | Path | None = None) -> Path:
    """Write the adapter in src_dir with its floating tensors cast to `dtype`, into dst_dir (default:
    in place, atomically). The config is copied unchanged; PEFT reads the file back as usual."""
    import shutil

    from safetensors.torch import load_file, save_file

    src = Path(src_dir)
    dst = Path(dst_dir) if dst_dir is not None else src
    tensors = load_file(str(src / FILES[1]))
    tensors = {k: (v.to(dtype) if v.is_floating_point() else v).contiguous() for k, v in tensors.items()}
    dst.mkdir(parents=True, exist_ok=True)
    if dst != src:
        shutil.copyfile(src / FILES[0], dst / FILES[0])
    tmp = dst / f".{FILES[1]}.{os.getpid()}.tmp"
    save_file(tensors, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, dst / FILES[1])
    return dst


def save_adapter_bf16(src_dir: str | Path, dst_dir: str | Path | None = None) -> Path:
    """`save_adapter_as(src_dir, torch.bfloat16, dst_dir)`; see the module docstring for its score cost."""
    return save_adapter_as(src_dir, torch.bfloat16, dst_dir)
