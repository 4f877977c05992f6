"""The routes of what a user owns: their export, an import, their token, their versions, deletion.

    POST   /v1/users/{id}/adapter    {"passphrase": ..., "history": true} -> the encrypted export
    POST   /v1/users/import          admin: {"export": <base64>, "passphrase": ..., "user_id"?} -> a user
    POST   /v1/users/{id}/token      a new token; the user's older tokens stop working
    GET    /v1/users/{id}/versions   every version, which is active, which verify
    POST   /v1/users/{id}/rollback   {"version": N}: make an intact older version active
    DELETE /v1/users/{id}            everything of the user

Passphrases travel in the JSON body, exactly as typed (a header would arrive Latin-1 decoded and
trimmed). Answers carrying a token or an export say `Cache-Control: no-store`. An export whose
active version is corrupt carries the newest intact one and says so (X-Oppu-Fallback). Exports and
imports (a full scrypt each) run on the service's bounded crypto pool, never on the shared threads.
"""

import asyncio
from typing import Annotated

from fastapi import Depends, FastAPI, Response

import oppu.server.schemas as S
from oppu.server.guard import AUTH_ERRORS, NO_STORE, UserId
from oppu.server.service import Caller, Service


async def _on(pool, fn, *args):
    """fn(*args) on a bounded pool (scrypt: one user's exports cannot take every thread)."""
    return await asyncio.wrap_future(pool.submit(fn, *args))


def owner_routes(app: FastAPI, svc: Service, admin, owner) -> None:
    _transfer_routes(app, svc, admin, owner)
    _version_routes(app, svc, owner)


def _transfer_routes(app: FastAPI, svc: Service, admin, owner) -> None:
    Owner = Annotated[str, Depends(owner)]

    @app.post("/v1/users/{user_id}/adapter", response_class=Response, tags=["users"],
              responses={**AUTH_ERRORS, 200: {"content": {"application/octet-stream": {}},
                                              "description": "the encrypted export (oppu.crypto format)"}})
    async def export(user_id: UserId, body: S.ExportIn, _: Owner):
        """The newest intact adapter version (the active one unless its files fail their checksums:
        then X-Oppu-Fallback names it), its metadata and the history, encrypted with the passphrase."""
        blob, served = await _on(svc.crypto, svc.export, user_id, body.passphrase, body.history)
        version = served.version.version
        headers = {**NO_STORE, "Content-Disposition": f'attachment; filename="{user_id}.v{version}.oppu"',
                   "X-Oppu-Adapter-Version": str(version)}
        if served.skipped:
            headers["X-Oppu-Fallback"] = (f"exported v{version}: newer version(s) refused as corrupt: "
                                          + "; ".join(f"v{e.version} file {e.file!r} {e.reason}" for e in served.skipped))
        return Response(blob, media_type="application/octet-stream", headers=headers)

    @app.post("/v1/users/import", status_code=201, response_model=S.Imported, responses=AUTH_ERRORS,
              tags=["users"])
    async def import_user(body: S.ImportIn, response: Response, _: Annotated[Caller, Depends(admin)]):
        """Admin: a new user from an export (checked end to end and loaded onto this base before
        anything is written), with the export's adapter as v1 and its history; and a token."""
        v, token = await _on(svc.crypto, svc.import_user, body.blob(), body.passphrase, body.user_id)
        response.headers.update(NO_STORE)
        return S.Imported(user_id=v.user_id, token=token, active_version=v.version,
                          history_items=svc.store.count_history(v.user_id))

    @app.post("/v1/users/{user_id}/token", response_model=S.TokenOut, responses=AUTH_ERRORS, tags=["users"])
    def rotate_token(user_id: UserId, response: Response, _: Owner):
        """A new bearer token for the user; every older one stops working at the same moment."""
        token, revoked = svc.rotate_token(user_id)
        response.headers.update(NO_STORE)
        return S.TokenOut(user_id=user_id, token=token, revoked=revoked)

    @app.delete("/v1/users/{user_id}", response_model=S.Deleted, responses=AUTH_ERRORS, tags=["users"])
    def delete(user_id: UserId, _: Owner):
        """Everything of the user at once: history, adapter versions and files, jobs (a running one
        is cancelled), tokens, caches; the adapter leaves the serving model. The WAL is scrubbed at
        once when no reader is in the way, else in the background: `scrubbed` says which."""
        report = svc.delete(user_id)
        return S.Deleted(user_id=user_id, deleted=True, scrubbed=report["scrubbed"], scrub=report["scrub"])


def _version_routes(app: FastAPI, svc: Service, owner) -> None:
    Owner = Annotated[str, Depends(owner)]

    @app.get("/v1/users/{user_id}/versions", response_model=S.VersionsOut, responses=AUTH_ERRORS,
             tags=["users"])
    def versions(user_id: UserId, _: Owner):
        """Every adapter version of the user, oldest first: which one is active and whether its
        files still match their checksums (what a rollback may choose)."""
        active = svc.store.active_version(user_id)
        return S.VersionsOut(user_id=user_id, active_version=active, versions=[
            S.VersionOut(version=v.version, created=v.created, parent_version=v.parent_version, note=v.note,
                         history_seq=v.history_seq, peft_type=v.peft_type, active=v.version == active,
                         intact=problem is None, problem=problem) for v, problem in svc.versions(user_id)])

    @app.post("/v1/users/{user_id}/rollback", response_model=S.UserOut, responses=AUTH_ERRORS, tags=["users"])
    def rollback(user_id: UserId, body: S.RollbackIn, _: Owner):
        """Make an existing version active again after checking its files (409 when corrupt, or
        while a job of the user is unfinished); the next generate answers with it."""
        svc.rollback(user_id, body.version)
        info = svc.store.user(user_id)
        return S.UserOut(user_id=user_id, task=info.task, active_version=info.active_version,
                         versions=[v.version for v in svc.store.versions(user_id)],
                         history_items=svc.store.count_history(user_id))
