"""What a user owns, over HTTP in process and from the CLI: an export whose passphrase arrives
exactly as typed, never cached; import; token rotation; the version list and rollback; an export
that falls back from a corrupt version and says so; a user whose only version is corrupt (409
naming the version, logged once)."""
from __future__ import annotations

import base64
import json
import logging
import unicodedata

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("httpx")

from oppu import crypto  # noqa: E402
from oppu.server import create_app  # noqa: E402
from oppu.store.bundle import unpack  # noqa: E402
from server_common import (A, base, bearer, client, items, make_service, query, svc_client,  # noqa: E402,F401
                           trained_user, wait_job)

GEN = {"task": "LaMP_2M", "input": query("space robot war")}


def two_versions(c) -> tuple[str, str]:
    uid, tok = trained_user(c)
    assert c.post(f"/v1/users/{uid}/history", json={"task": "LaMP_2M", "items": items("u", 3, seed=1)},
                  headers=bearer(tok)).status_code == 200
    job = c.post(f"/v1/users/{uid}/train", headers=bearer(tok)).json()
    assert wait_job(c, job["job_id"], bearer(tok))["version"] == 2
    return uid, tok


def flip(path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def weights(svc, uid: str, version: int):
    return svc.store.path(svc.store.version(uid, version)) / "adapter_model.safetensors"


def test_export_passphrase_arrives_exactly_as_typed_and_is_never_cached(client):
    uid, tok = trained_user(client)
    typed = "  pässwörd-ünïcode  "  # accents and padding: a header would arrive Latin-1 decoded and trimmed
    r = client.post(f"/v1/users/{uid}/adapter", json={"passphrase": typed}, headers=bearer(tok))
    assert r.status_code == 200 and r.headers["cache-control"] == "no-store", r.text
    assert unpack(crypto.decrypt(r.content, typed)).user_id == uid
    assert crypto.decrypt(r.content, unicodedata.normalize("NFD", typed))  # however the accents were typed
    for altered in (typed.strip(), typed.encode("utf-8").decode("latin-1")):
        with pytest.raises(crypto.DecryptionError):
            crypto.decrypt(r.content, altered)


def test_token_rotation_revokes_the_old_token(client):
    uid, tok = trained_user(client)
    r = client.post(f"/v1/users/{uid}/token", headers=bearer(tok))
    assert r.status_code == 200 and r.headers["cache-control"] == "no-store"
    assert r.json()["revoked"] == 1 and r.json()["user_id"] == uid
    fresh = r.json()["token"]
    assert client.get(f"/v1/users/{uid}", headers=bearer(tok)).status_code == 401
    assert client.get(f"/v1/users/{uid}", headers=bearer(fresh)).status_code == 200
    again = client.post(f"/v1/users/{uid}/token", headers=A).json()  # the admin can rotate it too
    assert again["revoked"] == 1 and client.get(f"/v1/users/{uid}", headers=bearer(fresh)).status_code == 401
    assert client.post("/v1/users", headers=A).headers["cache-control"] == "no-store"


def test_versions_and_rollback_over_http(client):
    uid, tok = two_versions(client)
    h = bearer(tok)
    listed = client.get(f"/v1/users/{uid}/versions", headers=h).json()
    assert listed["active_version"] == 2
    assert [(v["version"], v["active"], v["intact"], v["parent_version"]) for v in listed["versions"]] == \
        [(1, False, True, None), (2, True, True, 1)]
    r = client.post(f"/v1/users/{uid}/rollback", json={"version": 1}, headers=h)
    assert r.status_code == 200 and r.json()["active_version"] == 1 and r.json()["versions"] == [1, 2]
    assert client.post(f"/v1/users/{uid}/generate", json=GEN, headers=h).json()["adapter_version"] == 1
    r = client.post(f"/v1/users/{uid}/rollback", json={"version": 7}, headers=h)
    assert r.status_code == 404 and "no adapter version 7" in r.json()["detail"]
    r = client.post(f"/v1/users/{uid}/rollback", json={"version": 2 ** 63}, headers=h)  # past SQLite's integers
    assert r.status_code == 422, r.text  # found by the schema fuzz: was a 500 (OverflowError)
    assert client.post(f"/v1/users/{uid}/rollback", json={"version": 2}, headers=h).json()["active_version"] == 2
    assert client.post(f"/v1/users/{uid}/generate", json=GEN, headers=h).json()["adapter_version"] == 2


def test_export_falls_back_from_a_corrupt_version_and_says_so(svc_client):
    svc, c = svc_client
    uid, tok = two_versions(c)
    h = bearer(tok)
    flip(weights(svc, uid, 2))
    r = c.post(f"/v1/users/{uid}/adapter", json={"passphrase": "correct horse"}, headers=h)
    assert r.status_code == 200 and r.headers["x-oppu-adapter-version"] == "1", r.text
    assert "v2 file 'adapter_model.safetensors' fails its checksum" in r.headers["x-oppu-fallback"]
    b = unpack(crypto.decrypt(r.content, "correct horse"))
    assert b.adapter["version"] == 1 and b.files == svc.store.read_version_files(uid, 1)
    listed = {v["version"]: v for v in c.get(f"/v1/users/{uid}/versions", headers=h).json()["versions"]}
    assert listed[1]["intact"] and not listed[2]["intact"] and "fails its checksum" in listed[2]["problem"]
    r = c.post(f"/v1/users/{uid}/rollback", json={"version": 2}, headers=h)
    assert r.status_code == 409 and "v2" in r.json()["detail"]
    assert c.post(f"/v1/users/{uid}/rollback", json={"version": 1}, headers=h).json()["active_version"] == 1


def test_a_user_whose_only_version_is_corrupt_gets_409_logged_once(base, tmp_path, caplog):
    from fastapi.testclient import TestClient

    svc = make_service(base, tmp_path / "store")
    with TestClient(create_app(svc)) as c:
        uid, tok = trained_user(c)
        other, other_tok = trained_user(c, seed=3)
    svc.store.close()
    flip(weights(svc, uid, 1))
    svc = make_service(base, tmp_path / "store")  # a restart: nothing of the user is loaded
    with TestClient(create_app(svc)) as c, caplog.at_level(logging.WARNING):
        for _ in range(4):
            r = c.post(f"/v1/users/{uid}/generate", json=GEN, headers=bearer(tok))
            assert r.status_code == 409, r.text
            assert "adapter v1: file 'adapter_model.safetensors' fails its checksum" in r.json()["detail"]
            assert "rollback" in r.json()["detail"]
        r = c.post(f"/v1/users/{uid}/adapter", json={"passphrase": "correct horse"}, headers=bearer(tok))
        assert r.status_code == 409 and "v1" in r.json()["detail"]
        assert c.post(f"/v1/users/{other}/generate", json=GEN, headers=bearer(other_tok)).status_code == 200
    mentions = [rec for rec in caplog.records if uid in rec.getMessage()]
    assert len(mentions) == 1 and "no intact adapter version" in mentions[0].getMessage(), \
        [m.getMessage() for m in mentions]
    svc.store.close()


def test_import_over_http(svc_client):
    svc, c = svc_client
    uid, tok = trained_user(c)
    blob = c.post(f"/v1/users/{uid}/adapter", json={"passphrase": "é correct horse "}, headers=bearer(tok)).content
    body = {"export": base64.b64encode(blob).decode(), "passphrase": "é correct horse ", "user_id": f"{uid[:20]}-copy"}
    r = c.post("/v1/users/import", json=body, headers=A)
    assert r.status_code == 201 and r.headers["cache-control"] == "no-store", r.text
    got = r.json()
    assert (got["user_id"], got["active_version"], got["history_items"]) == (body["user_id"], 1, 6)
    h = bearer(got["token"])
    info = c.get(f"/v1/users/{got['user_id']}", headers=h).json()
    assert info["versions"] == [1] and info["task"] == "LaMP_2M"
    g = c.post(f"/v1/users/{got['user_id']}/generate", json=GEN, headers=h).json()
    assert g["output"] == c.post(f"/v1/users/{uid}/generate", json=GEN, headers=bearer(tok)).json()["output"]
    r = c.post("/v1/users/import", json=body, headers=A)
    assert r.status_code == 409 and "already exists" in r.json()["detail"]
    r = c.post("/v1/users/import", json={**body, "user_id": "other-one", "passphrase": "é correct horse"}, headers=A)
    assert r.status_code == 422 and "wrong passphrase" in r.json()["detail"]
    assert not svc.store.has_user("other-one")


def test_user_commands_list_versions_roll_back_and_import(svc_client, tmp_path):
    from typer.testing import CliRunner

    from oppu.cli_serve import app

    svc, c = svc_client
    uid, tok = two_versions(c)
    store = str(svc.store.root)
    run = CliRunner().invoke
    lines = [json.loads(ln) for ln in run(app, ["user", "versions", uid, "--store", store]).stdout.splitlines()]
    assert [(v["version"], v["active"], v["intact"]) for v in lines] == [(1, False, True), (2, True, True)]
    r = run(app, ["user", "rollback", uid, "1", "--store", store])
    assert r.exit_code == 0 and json.loads(r.stdout) == {"user_id": uid, "active_version": 1}
    assert c.post(f"/v1/users/{uid}/generate", json=GEN, headers=bearer(tok)).json()["adapter_version"] == 1
    bad = run(app, ["user", "rollback", uid, "9", "--store", store])
    assert bad.exit_code == 2 and "no adapter version 9" in bad.output
    (tmp_path / "u.oppu").write_bytes(svc.p.export_user(uid, " pass phrase "))
    (tmp_path / "pass").write_text(" pass phrase \n")
    r = run(app, ["user", "import", str(tmp_path / "u.oppu"), "--store", store, "--user-id", "cli-copy",
                  "--passphrase-file", str(tmp_path / "pass")])
    assert r.exit_code == 0, r.output
    got = json.loads(r.stdout)
    assert (got["user_id"], got["active_version"], got["history_items"]) == ("cli-copy", 1, 9)
    assert c.post("/v1/users/cli-copy/generate", json=GEN, headers=bearer(got["token"])).status_code == 200
    wrong = run(app, ["user", "import", str(tmp_path / "u.oppu"), "--store", store, "--user-id", "cli-2"],
                env={"OPPU_PASSPHRASE": "pass phrase"})
    assert wrong.exit_code == 2 and "wrong passphrase" in wrong.output and not svc.store.has_user("cli-2")


def test_a_user_past_a_limit_gets_429_and_others_do_not(base, tmp_path):
    from fastapi.testclient import TestClient

    from oppu.server.limits import Limit

    svc = make_service(base, tmp_path / "store", limits={"export": Limit(rate=0.01, burst=2, concurrent=1)})
    with TestClient(create_app(svc)) as c:
        (a, ta), (b, tb) = trained_user(c), trained_user(c, seed=2)
        body = {"passphrase": "correct horse"}
        assert [c.post(f"/v1/users/{a}/adapter", json=body, headers=bearer(ta)).status_code for _ in range(2)] == \
            [200, 200]
        r = c.post(f"/v1/users/{a}/adapter", content=b"{not even json", headers=bearer(ta))
        assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1, r.text  # refused before the body
        assert "export rate limit of this user exceeded" in r.json()["detail"]
        assert c.post(f"/v1/users/{b}/adapter", json=body, headers=bearer(tb)).status_code == 200
        assert c.post(f"/v1/users/{a}/generate", json=GEN, headers=bearer(ta)).status_code == 200
        assert c.post(f"/v1/users/{a}/adapter", json=body, headers=A).status_code == 200  # the operator is not limited
        assert 'route="/v1/users/{user_id}/adapter",status="429"' in c.get("/metrics").text
    svc.store.close()


def test_history_quota_gives_413_naming_the_limit(base, tmp_path):
    from fastapi.testclient import TestClient

    from server_common import new_user

    svc = make_service(base, tmp_path / "store", max_history_items=5)
    with TestClient(create_app(svc)) as c:
        uid, tok = new_user(c)
        path = f"/v1/users/{uid}/history"
        assert c.post(path, json={"task": "LaMP_2M", "items": items("q", 4)}, headers=bearer(tok)).status_code == 200
        r = c.post(path, json={"task": "LaMP_2M", "items": items("r", 2)}, headers=bearer(tok))
        assert r.status_code == 413 and "over the limit of 5 (max_history_items)" in r.json()["detail"], r.text
        assert c.get(f"/v1/users/{uid}", headers=bearer(tok)).json()["history_items"] == 4
    svc.store.close()


def test_delete_under_an_open_read_snapshot_blocks_no_one(svc_client):
    """A reader holding an old snapshot keeps the WAL from being truncated: the delete still answers
    at once (scrubbed: false), another user's write goes through at once, and the scrub finishes
    in the background as soon as the reader lets go, leaving no trace of the user."""
    import sqlite3
    import time

    from server_common import new_user

    svc, c = svc_client
    uid, tok = new_user(c)
    marker = "zebra-marker-5150"
    c.post(f"/v1/users/{uid}/history", json={"task": "LaMP_2M", "items": [
        {"id": "s", "description": f"{marker} in space", "tag": "sci-fi"}]}, headers=bearer(tok))
    other, other_tok = new_user(c)
    reader = sqlite3.connect(svc.store.root / "store.db", isolation_level=None)
    reader.execute("BEGIN")
    assert reader.execute("SELECT COUNT(*) FROM history_items").fetchone()[0] >= 1  # a snapshot is held
    try:
        t0 = time.monotonic()
        r = c.delete(f"/v1/users/{uid}", headers=bearer(tok))
        assert r.status_code == 200 and time.monotonic() - t0 < 3, r.text
        got = r.json()
        assert got["deleted"] and not got["scrubbed"] and got["scrub"] >= 1
        assert c.get(f"/v1/users/{uid}", headers=A).status_code == 404  # gone for every request at once
        t0 = time.monotonic()
        assert c.post(f"/v1/users/{other}/history", json={"task": "LaMP_2M", "items": items("o", 2)},
                      headers=bearer(other_tok)).status_code == 200
        assert time.monotonic() - t0 < 3
        status = c.get("/scrub").json()
        assert status["done"] < got["scrub"] <= status["requested"]
    finally:
        reader.rollback()
        reader.close()
    end = time.monotonic() + 20
    while c.get("/scrub").json()["done"] < got["scrub"]:
        assert time.monotonic() < end, c.get("/scrub").json()
        time.sleep(0.05)
    for name in ("store.db", "store.db-wal"):
        path = svc.store.root / name
        data = path.read_bytes() if path.exists() else b""
        assert marker.encode() not in data and uid.encode() not in data, name


def test_an_adapter_imported_without_the_base_check_that_does_not_fit_gets_409_once(svc_client, caplog):
    """`oppu user import` cannot load the adapter onto the base; one made for another base is then
    refused at its first generate: 409 naming the version and why, logged once, not a 500 each time."""
    from safetensors.torch import load, save

    import torch

    from oppu.store.bundle import pack
    from oppu.transfer import import_into, read_export

    svc, c = svc_client
    uid, tok = trained_user(c)
    b = unpack(crypto.decrypt(svc.p.export_user(uid, "correct horse"), "correct horse"))
    w = load(b.files["adapter_model.safetensors"])
    key = next(k for k in w if "lora_A" in k)
    w[key] = torch.zeros(w[key].shape[0], w[key].shape[1] * 2)  # made for a wider base
    files = {**b.files, "adapter_model.safetensors": save(w)}
    blob = crypto.encrypt(pack("wider", b.task, svc.store.version(uid, 1), files, None), "correct horse")
    v = import_into(svc.store, read_export(blob, "correct horse"))  # what `oppu user import` does
    tok2 = svc.store.tokens.issue(v.user_id)
    with caplog.at_level(logging.WARNING):
        for _ in range(3):
            r = c.post("/v1/users/wider/generate", json=GEN, headers=bearer(tok2))
            assert r.status_code == 409 and "v1" in r.json()["detail"] and "cannot be served on this base" in \
                r.json()["detail"], r.text
    assert len([m for m in caplog.records if "wider" in m.getMessage()]) == 1
    assert c.post(f"/v1/users/{uid}/generate", json=GEN, headers=bearer(tok)).status_code == 200
