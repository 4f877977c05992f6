"""Encrypted export/import of a user through the Personalizer on a micro base: a round trip gives
identical answers, a wrong passphrase or any flipped byte writes nothing, the KDF header is bounded,
and an adapter the engine cannot serve on this base (wrong shapes, lora_dropout) is refused with
the store unchanged."""
from __future__ import annotations

import base64
import copy
import json

import pytest
import torch

from lifecycle_common import (PASS, QUERIES, SEED, assert_clean, base, make_items, p, snapshot,  # noqa: F401
                              trained_user)
from oppu import crypto
from oppu.store import ADAPTER_FILES, UserExists
from oppu.store.bundle import BundleError, pack, unpack


def listing(p) -> list[str]:
    return sorted(str(x.relative_to(p.store.root)) for x in p.store.root.rglob("*") if "store.db" not in x.name)


def test_export_import_round_trip_gives_identical_generations(p):
    uid = trained_user(p)
    blob = p.export_user(uid, PASS)
    assert blob.startswith(crypto.MAGIC) and b"description" not in blob and uid.encode() not in blob
    v = p.import_user(blob, PASS, user_id="copy")
    assert (v.version, v.parent_version, v.history_seq) == (1, None, 12)
    assert p.store.read_version_files("copy", 1) == p.store.read_version_files(uid, 2)
    assert [h.item for h in p.store.history("copy")] == [h.item for h in p.store.history(uid)]
    for k in (0, 2):
        a, b = p.answer(uid, QUERIES, k=k), p.answer("copy", QUERIES, k=k)
        assert a.outputs == b.outputs and (a.adapter_version, b.adapter_version) == (2, 1)
    # the copy keeps evolving like the original: an update trains on what came after the export
    p.add_history("copy", "LaMP_2M", make_items("later", 2, 9))
    assert p.update("copy").parent_version == 1
    with pytest.raises(UserExists, match="'copy'"):
        p.import_user(blob, PASS, user_id="copy")
    with pytest.raises(UserExists, match=uid):
        p.import_user(blob, PASS)

    lean = p.import_user(p.export_user(uid, PASS, include_history=False), PASS, user_id="lean")
    assert lean.history_seq == 0 and p.store.history("lean") == []
    assert p.answer("lean", QUERIES, k=0).outputs == p.answer(uid, QUERIES, k=0).outputs


def test_wrong_passphrase_or_any_flipped_byte_fails_cleanly_and_writes_nothing(p):
    uid = trained_user(p)
    blob = p.export_user(uid, PASS)
    before = listing(p)
    users = p.store.users()
    with pytest.raises(crypto.DecryptionError, match="wrong passphrase, or the file was modified"):
        p.import_user(blob, PASS + "!", user_id="intruder")
    for at in (3, len(crypto.MAGIC) + 1, len(crypto.MAGIC) + 40, len(blob) // 2, len(blob) - 1):
        bad = bytearray(blob)
        bad[at] ^= 0x01
        with pytest.raises(crypto.CryptoError):
            p.import_user(bytes(bad), PASS, user_id="intruder")
    with pytest.raises(crypto.CryptoError):
        p.import_user(blob[:-20], PASS, user_id="intruder")
    assert p.store.users() == users
    assert listing(p) == before


def test_crypto_header_and_kdf_bounds():
    blob = crypto.encrypt(b"payload", PASS)
    header, _, _ = crypto.read_header(blob)
    assert (header["kdf"], header["n"], header["r"], header["p"], header["cipher"]) == ("scrypt", 2 ** 15, 8, 1,
                                                                                        "AES-256-GCM")
    assert len(base64.b64decode(header["salt"])) == 16 and len(base64.b64decode(header["nonce"])) == 12
    assert crypto.decrypt(blob, PASS) == b"payload" and crypto.encrypt(b"payload", PASS) != blob  # fresh salt
    hlen = int.from_bytes(blob[8:10], "big")
    greedy = json.dumps({**header, "n": 2 ** 30}, separators=(",", ":")).encode()
    with pytest.raises(crypto.FormatError, match="out of range"):  # refused before any key derivation
        crypto.decrypt(crypto.MAGIC + len(greedy).to_bytes(2, "big") + greedy + blob[10 + hlen:], PASS)
    for n, r, p in ((2 ** 20, 16, 1), (2 ** 17, 16, 1), (2 ** 16, 8, 4)):  # 2 GiB, 256 MiB, 4 lanes: refused
        big = json.dumps({**header, "n": n, "r": r, "p": p}, separators=(",", ":")).encode()
        with pytest.raises(crypto.FormatError, match="out of range"):
            crypto.decrypt(crypto.MAGIC + len(big).to_bytes(2, "big") + big + blob[10 + hlen:], PASS)
        with pytest.raises(crypto.FormatError, match="out of range"):
            crypto.encrypt(b"x", PASS, n=n, r=r, p=p)
    edge = crypto.encrypt(b"edge", PASS, n=2 ** 16, r=8, p=2)  # 64 MiB, twice the default's lanes: the bound
    assert crypto.decrypt(edge, PASS) == b"edge"
    with pytest.raises(crypto.FormatError, match="magic"):
        crypto.decrypt(b"PK\x03\x04" + blob, PASS)
    with pytest.raises(crypto.CryptoError, match="passphrase"):
        crypto.encrypt(b"x", "")


def test_import_refuses_an_adapter_that_does_not_fit_this_base(p, base):
    from safetensors.torch import load, save

    model, _ = base
    snap = snapshot(model)
    uid = trained_user(p)
    b = unpack(crypto.decrypt(p.export_user(uid, PASS), PASS))
    w = load(b.files["adapter_model.safetensors"])
    key = next(k for k in w if "lora_A" in k)
    w[key] = torch.zeros(w[key].shape[0], w[key].shape[1] * 2)  # made for a wider base
    files = {**b.files, "adapter_model.safetensors": save(w)}
    v = p.store.version(uid, 2)
    hist = p.store.history(uid)
    forged = crypto.encrypt(pack("forged", b.task, v, files, hist), PASS)
    with pytest.raises(BundleError, match="cannot be served on this base"):
        p.import_user(forged, PASS)
    assert not p.store.has_user("forged") and list((p.store.root / "tmp").iterdir()) == []
    assert_clean(p, snap)
    payload = json.loads(pack("forged", b.task, v, b.files, hist))
    payload["adapter"]["files"]["adapter_model.bin"] = payload["adapter"]["files"].pop("adapter_model.safetensors")
    with pytest.raises(BundleError, match="exactly"):
        p.import_user(crypto.encrypt(json.dumps(payload).encode(), PASS), PASS)


def test_import_refuses_an_adapter_saved_with_lora_dropout(p, base, tmp_path):
    """PEFT saves lora_dropout in the config; the engine's batched rows cannot apply it, so the import
    (checked by loading the adapter into the engine) is refused, naming the option, and writes nothing."""
    from peft_reference import peft_attach, peft_detach

    model, _ = base
    snap = snapshot(model)
    uid = trained_user(p)
    pcfg = copy.deepcopy(p.pcfg)
    pcfg.lora_dropout = 0.1
    with p.lock, p.slots.mm.detached():
        pm = peft_attach(model, pcfg, SEED, "dropout")
        try:
            pm.save_pretrained(str(tmp_path / "dropout"))
        finally:
            peft_detach(pm)
    files = {name: (tmp_path / "dropout" / name).read_bytes() for name in ADAPTER_FILES}
    assert json.loads(files["adapter_config.json"])["lora_dropout"] == 0.1
    forged = crypto.encrypt(pack("dropout", "LaMP_2M", p.store.version(uid, 2), files, p.store.history(uid)), PASS)
    before, users = listing(p), p.store.users()
    with pytest.raises(BundleError, match="lora_dropout"):
        p.import_user(forged, PASS)
    assert not p.store.has_user("dropout") and p.store.users() == users and listing(p) == before
    assert list((p.store.root / "tmp").iterdir()) == []
    assert_clean(p, snap)
    # the same adapter saved with lora_dropout=0 (all else equal) is accepted
    cfg = json.loads(files["adapter_config.json"])
    ok = {**files, "adapter_config.json": json.dumps({**cfg, "lora_dropout": 0.0}).encode()}
    v = p.import_user(crypto.encrypt(pack("dropout", "LaMP_2M", p.store.version(uid, 2), ok, None), PASS), PASS)
    assert v.version == 1 and len(p.answer("dropout", QUERIES, k=0).outputs) == 3
