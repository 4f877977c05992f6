"""Adapter files on disk: user dir names, private temp dirs, fsync, checksums, verification.
No database here.

A version is written into `root/tmp/<pid>.<random>` (same filesystem as its final place, so the
rename is atomic), every file is fsynced and hashed, and only then renamed into
`root/adapters/<user dir>/v<N>`. Temp dirs of dead processes (and of this process, when no
write owns them) are removed when a store opens.

Everything the store creates is private to the account running it: folders 0700, files 0600
(`private_dir`, `seal`), whatever the umask.

Only the standard PEFT files are accepted: adapter_config.json + adapter_model.safetensors.
PEFT's auto-written README.md model card is dropped; anything else (a pickled
adapter_model.bin, a subfolder) is refused, so nothing that could be unpickled is ever stored.
"""
from __future__ import annotations

import hashlib
import os
import re
import secrets
import shutil
import stat
import threading
from pathlib import Path

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
ADAPTER_FILES = (CONFIG_FILE, WEIGHTS_FILE)
DROPPED_FILES = ("README.md",)

_ACTIVE: set[str] = set()   # temp dirs owned by in-flight writes of this process
_ACTIVE_LOCK = threading.Lock()


def safe_user_dir(user_id: str) -> str:
    """A directory name that cannot escape its parent; a hash suffix keeps it unique."""
    s = re.sub(r"[^A-Za-z0-9_.-]", "_", user_id)[:64].lstrip(".")
    if s != user_id or not s:
        s = f"{s or 'user'}-{hashlib.sha256(user_id.encode()).hexdigest()[:8]}"
    return s


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


DIR_MODE, FILE_MODE = 0o700, 0o600


def private_dir(path: Path) -> Path:
    """mkdir -p with every folder it creates (and `path` itself) readable by the owner only. An
    existing `path` is made 0700 only when this account owns it and it is not a shared sticky
    folder such as /tmp (whatever the store puts inside it is private either way)."""
    missing = [p for p in (path, *path.parents) if not p.exists()]
    for p in reversed(missing):
        p.mkdir(mode=DIR_MODE, exist_ok=True)
    st = path.stat()
    if st.st_uid == os.getuid() and not st.st_mode & stat.S_ISVTX:
        os.chmod(path, DIR_MODE)
    return path


def private_file(path: Path) -> None:
    """Create `path` empty with mode 0600 if missing, and make it 0600 if it exists."""
    os.close(os.open(path, os.O_CREAT | os.O_RDWR, FILE_MODE))
    os.chmod(path, FILE_MODE)


def new_temp_dir(tmp_root: Path) -> Path:
    private_dir(tmp_root)
    d = tmp_root / f"{os.getpid()}.{secrets.token_hex(8)}"
    d.mkdir(mode=DIR_MODE)
    with _ACTIVE_LOCK:
        _ACTIVE.add(str(d))
    return d


def release_temp_dir(d: Path) -> None:
    """Remove a temp dir (if still there) and forget it."""
    shutil.rmtree(d, ignore_errors=True)
    with _ACTIVE_LOCK:
        _ACTIVE.discard(str(d))


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_temp_dirs(tmp_root: Path) -> list[str]:
    """Remove temp dirs left by crashed writes; never one an in-flight write still owns."""
    removed = []
    if not tmp_root.is_dir():
        return removed
    me = os.getpid()
    for d in tmp_root.iterdir():
        pid_s = d.name.split(".", 1)[0]
        pid = int(pid_s) if pid_s.isdigit() else None
        with _ACTIVE_LOCK:
            owned = str(d) in _ACTIVE
        if pid is None or (pid == me and not owned) or (pid != me and not _pid_alive(pid)):
            if d.is_dir() and not d.is_symlink():
                shutil.rmtree(d, ignore_errors=True)
            else:
                d.unlink(missing_ok=True)
            removed.append(d.name)
    return removed


def seal(d: Path) -> dict[str, str]:
    """Check that d holds exactly the standard adapter files, fsync them, return their sha256."""
    for name in DROPPED_FILES:
        (d / name).unlink(missing_ok=True)
    present = sorted(p.name for p in d.iterdir())
    extra = [n for n in present if n not in ADAPTER_FILES]
    if extra:
        raise ValueError(f"adapter dir {d} holds unexpected file(s) {extra}; only {', '.join(ADAPTER_FILES)} "
                         "are stored (safetensors + JSON, never pickles)")
    missing = [n for n in ADAPTER_FILES if n not in present]
    if missing:
        raise ValueError(f"adapter dir {d} lacks {missing}; a PEFT adapter is {', '.join(ADAPTER_FILES)}")
    sums = {}
    for name in ADAPTER_FILES:
        p = d / name
        if p.is_symlink() or not p.is_file():
            raise ValueError(f"adapter file {p} is not a regular file")
        os.chmod(p, FILE_MODE)
        with open(p, "rb") as f:
            os.fsync(f.fileno())
        sums[name] = sha256_file(p)
    os.chmod(d, DIR_MODE)
    fsync_dir(d)
    return sums


def write_files(d: Path, files: dict[str, bytes]) -> None:
    """Write already-validated adapter files (an import) into a temp dir."""
    for name, data in files.items():
        if name not in ADAPTER_FILES:
            raise ValueError(f"refusing adapter file {name!r}; valid: {', '.join(ADAPTER_FILES)}")
        (d / name).write_bytes(data)


def check_file(path: Path, expected: str) -> str | None:
    """None when the file matches its checksum, else the reason it does not."""
    if path.is_symlink() or not path.is_file():
        return "is missing"
    got = sha256_file(path)
    return None if got == expected else f"fails its checksum (sha256 {got[:12]}..., recorded {expected[:12]}...)"


def read_checked(path: Path, expected: str) -> tuple[bytes | None, str | None]:
    """The file's bytes if they match the checksum (hash of exactly the bytes returned)."""
    if path.is_symlink() or not path.is_file():
        return None, "is missing"
    data = path.read_bytes()
    got = sha256_bytes(data)
    return (data, None) if got == expected else \
        (None, f"fails its checksum (sha256 {got[:12]}..., recorded {expected[:12]}...)")
