"""Passphrase encryption of one blob (a user export): scrypt + AES-256-GCM, pure bytes in/out.

File layout (format version 1):

    b"OPPUENC1"                      8 bytes, magic
    header length                    2 bytes, big-endian
    header                           UTF-8 JSON: {"v": 1, "cipher": "AES-256-GCM", "kdf": "scrypt",
                                                  "n": 32768, "r": 8, "p": 1,
                                                  "salt": <16 bytes b64>, "nonce": <12 bytes b64>}
    ciphertext || 16-byte GCM tag

The key is scrypt(passphrase, salt, n, r, p) with a fresh random salt and nonce per file. The
magic, length and header are the GCM associated data, so changing any byte anywhere (including
the KDF parameters) fails authentication. A wrong passphrase and a tampered file are
indistinguishable by design; both raise `DecryptionError`. KDF parameters read from a file are
bounded before any key is derived: n a power of two in [2^15, 2^17], r in [1, 16], p in [1, 2] and
scrypt's memory (128 * n * r bytes) at most MAX_KDF_MEMORY = 64 MiB, so a crafted header cannot
make one decryption attempt allocate more than 64 MiB nor run more than 4x the default's work.

    blob = encrypt(b"payload", "correct horse battery staple")
    decrypt(blob, "correct horse battery staple") == b"payload"
"""
from __future__ import annotations

import base64
import hashlib
import json
import os
import struct
import unicodedata
from typing import Any

MAGIC = b"OPPUENC1"
FORMAT_VERSION = 1
CIPHER = "AES-256-GCM"
KDF = "scrypt"
DEFAULT_N, DEFAULT_R, DEFAULT_P = 2 ** 15, 8, 1
MIN_N, MAX_N, MAX_R, MAX_P = 2 ** 15, 2 ** 17, 16, 2
MAX_KDF_MEMORY = 64 << 20        # bytes: scrypt needs 128 * n * r
SALT_BYTES, NONCE_BYTES, KEY_BYTES = 16, 12, 32
MAX_HEADER = 4096


class CryptoError(ValueError):
    """Base class: the blob cannot be decrypted."""


class FormatError(CryptoError):
    """Not an oppu encrypted file, or one from an unsupported format version."""


class DecryptionError(CryptoError):
    """Authentication failed: wrong passphrase, or the file was modified."""


def _key(passphrase: str, salt: bytes, n: int, r: int, p: int) -> bytes:
    """scrypt through hashlib (OpenSSL), which lets other threads run while it works (the
    `cryptography` package's Scrypt holds the GIL: a server would stall for every export)."""
    if not isinstance(passphrase, str) or not passphrase:
        raise CryptoError("the passphrase must be a non-empty string")
    pw = unicodedata.normalize("NFC", passphrase).encode("utf-8")  # same key however the text was typed
    return hashlib.scrypt(pw, salt=salt, n=n, r=r, p=p, dklen=KEY_BYTES, maxmem=2 * MAX_KDF_MEMORY)


def _check_params(n: Any, r: Any, p: Any) -> None:
    ok = all(isinstance(x, int) and not isinstance(x, bool) for x in (n, r, p)) and \
        MIN_N <= n <= MAX_N and n & (n - 1) == 0 and 1 <= r <= MAX_R and 1 <= p <= MAX_P and \
        128 * n * r <= MAX_KDF_MEMORY
    if not ok:
        raise FormatError(f"scrypt parameters n={n!r} r={r!r} p={p!r} out of range "
                          f"(n a power of two in [{MIN_N}, {MAX_N}], r <= {MAX_R}, p <= {MAX_P}, "
                          f"128*n*r <= {MAX_KDF_MEMORY} bytes)")


def encrypt(plaintext: bytes, passphrase: str, n: int = DEFAULT_N, r: int = DEFAULT_R, p: int = DEFAULT_P) -> bytes:
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    _check_params(n, r, p)
    salt, nonce = os.urandom(SALT_BYTES), os.urandom(NONCE_BYTES)
    header = json.dumps({"v": FORMAT_VERSION, "cipher": CIPHER, "kdf": KDF, "n": n, "r": r, "p": p,
                         "salt": base64.b64encode(salt).decode(), "nonce": base64.b64encode(nonce).decode()},
                        separators=(",", ":")).encode()
    prefix = MAGIC + struct.pack(">H", len(header)) + header
    return prefix + AESGCM(_key(passphrase, salt, n, r, p)).encrypt(nonce, bytes(plaintext), prefix)


def read_header(blob: bytes) -> tuple[dict[str, Any], bytes, bytes]:
    """(header, associated data, ciphertext) of a blob; FormatError when it is not one of ours."""
    if not isinstance(blob, (bytes, bytearray)) or len(blob) < len(MAGIC) + 2 or blob[:len(MAGIC)] != MAGIC:
        raise FormatError("not an oppu encrypted export (bad magic bytes)")
    (hlen,) = struct.unpack(">H", blob[len(MAGIC):len(MAGIC) + 2])
    end = len(MAGIC) + 2 + hlen
    if hlen > MAX_HEADER or len(blob) < end + 16:
        raise FormatError("truncated or malformed oppu export header")
    try:
        header = json.loads(bytes(blob[len(MAGIC) + 2:end]).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise FormatError("oppu export header is not valid JSON") from None
    if not isinstance(header, dict):
        raise FormatError("oppu export header is not a JSON object")
    if header.get("v") != FORMAT_VERSION:
        raise FormatError(f"unsupported export format version {header.get('v')!r}; this code reads {FORMAT_VERSION}")
    if header.get("cipher") != CIPHER or header.get("kdf") != KDF:
        raise FormatError(f"unsupported cipher/kdf {header.get('cipher')!r}/{header.get('kdf')!r}; "
                          f"valid: {CIPHER}/{KDF}")
    return header, bytes(blob[:end]), bytes(blob[end:])


def decrypt(blob: bytes, passphrase: str) -> bytes:
    from cryptography.exceptions import InvalidTag
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    header, aad, ct = read_header(blob)
    _check_params(header.get("n"), header.get("r"), header.get("p"))
    try:
        salt = base64.b64decode(header["salt"], validate=True)
        nonce = base64.b64decode(header["nonce"], validate=True)
    except (KeyError, TypeError, ValueError):
        raise FormatError("oppu export header lacks a valid salt/nonce") from None
    if len(salt) != SALT_BYTES or len(nonce) != NONCE_BYTES:
        raise FormatError(f"salt must be {SALT_BYTES} bytes and nonce {NONCE_BYTES} bytes")
    try:
        return AESGCM(_key(passphrase, salt, header["n"], header["r"], header["p"])).decrypt(nonce, ct, aad)
    except InvalidTag:
        raise DecryptionError("cannot decrypt the export: wrong passphrase, or the file was modified") from None
