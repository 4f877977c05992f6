"""The FastAPI app over a Service: routes, bearer-token auth, error mapping, body limit, metrics.

    app = create_app(service)          # uvicorn.run(app) or fastapi.testclient.TestClient(app)

Auth: `Authorization: Bearer <token>`. The admin token (OPPU_ADMIN_TOKEN) works on every route;
a user's token only on /v1/users/<that user>/... and that user's jobs. No or an unknown token:
401. A user token on another user's path or job: 403 with the same body whether or not the other
user or job exists, so a token learns nothing about other users. /healthz and /metrics are open
(no user data: counts only, route templates, never ids).

Errors are JSON {"detail": "..."} naming the problem: 422 for invalid bodies (field path first,
e.g. "body.items: List should have at most 1000 items"), 413 for oversized bodies, 404 unknown
user/job/no adapter, 409 state conflicts (a job already running, nothing new to train on).
"""
import asyncio
import logging
import time
from typing import Annotated

from fastapi import Depends, FastAPI, Header, Path, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.exceptions import HTTPException

import oppu.server.schemas as S
from oppu.crypto import CryptoError
from oppu.server.service import Conflict, Service
from oppu.store import (USER_ID_PATTERN, CorruptAdapterError, HistoryError, InvalidUserId, JobError, NoAdapter,
                        UnknownUser, UnknownVersion, UserExists)

log = logging.getLogger("oppu.server")
STATUS = [(InvalidUserId, 422), (HistoryError, 422), (CryptoError, 422), (UnknownUser, 404), (NoAdapter, 404),
          (UnknownVersion, 404), (JobError, 404), (UserExists, 409), (Conflict, 409),
          (CorruptAdapterError, 500)]
UserId = Annotated[str, Path(pattern=USER_ID_PATTERN, description="a user id (the one POST /v1/users returned)")]
JobId = Annotated[str, Path(min_length=1, max_length=64)]
AUTH_ERRORS = {401: {"model": S.Problem, "description": "no, malformed or unknown bearer token"},
               403: {"model": S.Problem, "description": "the token may not access this resource"},
               422: {"description": "invalid request; detail names the field"}}
NOT_OWN = "this token may only access its own user"


class Caller:
    def __init__(self, admin: bool, user_id: str | None = None):
        self.admin, self.user_id = admin, user_id


def _problem(status: int, detail: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"detail": detail}, status_code=status, headers=headers)


class BodyLimit:
    """413 with the sizes named, before the body is read when Content-Length says so, else as
    soon as the streamed body passes the limit."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        msg = f"request body larger than the limit of {self.max_bytes} bytes"
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None:
            if not length.isdigit():
                return await _problem(400, f"invalid Content-Length header {length.decode('latin-1')!r}")(
                    scope, receive, send)
            if int(length) > self.max_bytes:
                return await _problem(413, f"{msg} (Content-Length: {int(length)})")(scope, receive, send)
        seen = 0

        async def limited():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise HTTPException(413, msg)  # FastAPI re-raises middleware HTTPExceptions as is
            return message

        await self.app(scope, limited, send)


class RequestMetrics:
    """Counts every response by method, route template and status."""

    def __init__(self, app, service: Service):
        self.app, self.metrics = app, service.metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = 500

        async def send_status(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            route = getattr(scope.get("route"), "path", None) or "unmatched"
            self.metrics.request(scope.get("method", ""), route, status)


def _handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        errors = []
        for e in exc.errors():
            msg = e.get("msg", "invalid")
            ctx_err = (e.get("ctx") or {}).get("error")
            if isinstance(ctx_err, str) and ctx_err not in msg:
                msg = f"{msg}: {ctx_err}"
            errors.append({"loc": [str(x) for x in e.get("loc", ())], "msg": msg, "type": e.get("type", "")})
        first = errors[0] if errors else {"loc": [], "msg": "invalid request"}
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        return JSONResponse({"detail": f"{'.'.join(first['loc'])}: {first['msg']}{more}", "errors": errors},
                            status_code=422)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException):
        from fastapi.exception_handlers import http_exception_handler

        cause = exc.__cause__  # FastAPI's "error parsing the body" hides why (nesting depth, huge ints)
        if exc.status_code == 400 and cause is not None and not isinstance(cause, HTTPException):
            exc = HTTPException(400, f"{exc.detail}: {type(cause).__name__}: {str(cause)[:200]}")
        return await http_exception_handler(request, exc)

    for exc_type, status in STATUS:
        def handler(request: Request, exc: Exception, status=status):
            if status >= 500:
                log.error("%s %s: %s", request.method, request.url.path, exc)
            return _problem(status, str(exc))
        app.add_exception_handler(exc_type, handler)

    @app.exception_handler(Exception)
    async def crashed(request: Request, exc: Exception):
        log.exception("%s %s failed", request.method, request.url.path)
        return _problem(500, f"internal error ({type(exc).__name__}); see the server log")


def _document_task(app: FastAPI, task) -> None:
    """The spec states the one task this server serves (aliases such as "2M" are accepted too) and
    the fields its history items need (checked in code, oppu.lifecycle.validate_items)."""
    from fastapi.openapi.utils import get_openapi

    from oppu.data.lamp import ITEM_FIELDS

    fields = ITEM_FIELDS.get(task.id, task.item_fields)
    text, number = {"type": "string"}, {"anyOf": [{"type": "number"}, {"type": "string"}]}
    item = {"type": "object", "required": ["id", *fields], "additionalProperties": True,
            "properties": {"id": {"anyOf": [{"type": "string", "minLength": 1}, {"type": "integer"}]},
                           **{f: number if f == "score" else text for f in fields}}}

    def openapi():
        if app.openapi_schema is None:
            spec = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
            schemas = spec["components"]["schemas"]
            for model in ("HistoryIn", "GenerateIn"):
                schemas[model]["properties"]["task"]["enum"] = [task.id]
            schemas["HistoryIn"]["properties"]["items"]["items"] = item
            app.openapi_schema = spec
        return app.openapi_schema

    app.openapi = openapi


def create_app(svc: Service) -> FastAPI:
    from contextlib import asynccontextmanager

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        svc.start()
        try:
            yield
        finally:
            svc.close()

    app = FastAPI(title="oppu", version="1", lifespan=lifespan,
                  description="One PEFT Per User: each user owns a PEFT adapter trained on their own history. "
                              f"Task: {svc.task.id}.")
    app.state.service = svc
    _document_task(app, svc.task)
    app.add_middleware(BodyLimit, max_bytes=svc.cfg.max_body_bytes)
    app.add_middleware(RequestMetrics, service=svc)
    _handlers(app)
    caller, admin, owner = _auth(svc)
    # Registration order is the route and OpenAPI path order.
    _ops_routes(app, svc)
    _account_routes(app, svc, admin, owner)
    _training_routes(app, svc, caller, owner)
    _inference_routes(app, svc, owner)
    _user_data_routes(app, svc, owner)
    return app


def _auth(svc: Service):
    """The three auth dependencies: caller (any valid token), admin (the admin token) and owner
    (admin, or the token of the user named in the path; returns that user id)."""
    bearer = HTTPBearer(auto_error=False, description="the admin token, or a user's token for that user's routes")

    def caller(cred: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]) -> Caller:
        unauthorized = {"WWW-Authenticate": "Bearer"}
        if cred is None or not cred.credentials:
            raise HTTPException(401, "missing or malformed Authorization header; expected 'Bearer <token>'",
                                headers=unauthorized)
        if svc.is_admin(cred.credentials):
            return Caller(admin=True)
        uid = svc.user_for_token(cred.credentials)
        if uid is None:
            raise HTTPException(401, "invalid or revoked token", headers=unauthorized)
        return Caller(admin=False, user_id=uid)

    def admin(c: Annotated[Caller, Depends(caller)]) -> Caller:
        if not c.admin:
            raise HTTPException(403, "this endpoint needs the admin token")
        return c

    def owner(request: Request, c: Annotated[Caller, Depends(caller)]) -> str:
        uid = request.path_params.get("user_id", "")
        if not c.admin and uid != c.user_id:  # checked before the id is even parsed: reveals nothing
            raise HTTPException(403, NOT_OWN)
        return uid

    return caller, admin, owner


def _ops_routes(app: FastAPI, svc: Service) -> None:
    """/healthz and /metrics: open, no user data."""
    @app.get("/healthz", response_model=S.Health, tags=["ops"])
    def healthz():
        return S.Health(status="ok", task=svc.task.id, base=str(svc.base_info.get("source", "")),
                        trainer_base=svc.trainer_base, uptime_s=round(time.time() - svc.started, 3))

    @app.get("/metrics", response_class=PlainTextResponse, tags=["ops"],
             responses={200: {"content": {"text/plain": {}}, "description": "Prometheus text format 0.0.4"}})
    def metrics():
        return PlainTextResponse(svc.metrics.render(svc.gauges()), media_type="text/plain; version=0.0.4")


def _account_routes(app: FastAPI, svc: Service, admin, owner) -> None:
    """Create a user (admin), read a user, append to a user's history."""
    Owner = Annotated[str, Depends(owner)]

    @app.post("/v1/users", status_code=201, response_model=S.UserCreated, responses=AUTH_ERRORS, tags=["users"])
    def create_user(_: Annotated[Caller, Depends(admin)]):
        """Admin: a new user with a random id and a bearer token (shown once, stored hashed)."""
        uid, token = svc.create_user()
        return S.UserCreated(user_id=uid, token=token)

    @app.get("/v1/users/{user_id}", response_model=S.UserOut, responses=AUTH_ERRORS, tags=["users"])
    def get_user(user_id: UserId, _: Owner):
        info = svc.store.user(user_id)
        return S.UserOut(user_id=info.user_id, task=info.task, active_version=info.active_version,
                         versions=[v.version for v in svc.store.versions(user_id)],
                         history_items=len(svc.store.history(user_id)))

    @app.post("/v1/users/{user_id}/history", response_model=S.HistoryAdded, responses=AUTH_ERRORS,
              tags=["users"])
    def add_history(user_id: UserId, body: S.HistoryIn, _: Owner):
        """Append history items (all or nothing); they feed the next train/update job."""
        seqs = svc.add_history(user_id, body.task, body.items)
        return S.HistoryAdded(user_id=user_id, added=len(seqs), last_seq=seqs[-1])


def _training_routes(app: FastAPI, svc: Service, caller, owner) -> None:
    """Queue a train/update job, poll a job."""
    Owner = Annotated[str, Depends(owner)]

    @app.post("/v1/users/{user_id}/train", status_code=202, response_model=S.JobOut, responses=AUTH_ERRORS,
              tags=["training"])
    def train(user_id: UserId, _: Owner):
        """Queue a training job: a full train when the user has no adapter yet, else an incremental
        update on the history added since the active version. Poll GET /v1/jobs/{job_id}."""
        return svc.job(svc.start_training(user_id).job_id)

    @app.get("/v1/jobs/{job_id}", response_model=S.JobOut, responses=AUTH_ERRORS, tags=["training"])
    def get_job(job_id: JobId, c: Annotated[Caller, Depends(caller)]):
        if not c.admin and svc.job_owner(job_id) != c.user_id:
            raise HTTPException(403, "this token may only read its own user's jobs")
        return svc.job(job_id)


def _inference_routes(app: FastAPI, svc: Service, owner) -> None:
    """Generate with the user's active adapter (batched across users)."""
    Owner = Annotated[str, Depends(owner)]

    @app.post("/v1/users/{user_id}/generate", response_model=S.Generated, responses=AUTH_ERRORS,
              tags=["inference"])
    async def generate(user_id: UserId, body: S.GenerateIn, _: Owner):
        """Answer with the user's active adapter; concurrent requests of many users share one
        mixed-adapter batch."""
        from starlette.concurrency import run_in_threadpool

        t0 = time.perf_counter()
        fut = await run_in_threadpool(svc.submit_generate, user_id, body.task, body.input, body.k)
        try:
            text, version = await asyncio.wait_for(asyncio.wrap_future(fut), svc.cfg.generate_timeout_s)
        except TimeoutError:
            raise HTTPException(503, f"generation did not finish within {svc.cfg.generate_timeout_s}s") from None
        svc.metrics.generate_latency.observe(time.perf_counter() - t0)
        return S.Generated(output=text, prediction=svc.task.parse(text), adapter_version=version)


def _user_data_routes(app: FastAPI, svc: Service, owner) -> None:
    """A user's data out: the encrypted export, and deletion of everything."""
    Owner = Annotated[str, Depends(owner)]

    @app.get("/v1/users/{user_id}/adapter", response_class=Response, tags=["users"],
             responses={**AUTH_ERRORS, 200: {"content": {"application/octet-stream": {}},
                                             "description": "the encrypted export (oppu.crypto format)"}})
    def export(user_id: UserId, _: Owner,
               passphrase: Annotated[str, Header(alias="X-Oppu-Passphrase", min_length=S.MIN_PASSPHRASE,
                                                 max_length=S.MAX_PASSPHRASE,
                                                 description="encrypts the export (scrypt + AES-256-GCM)")],
               history: Annotated[bool, Query(description="include the history items")] = True):
        """The active adapter (checksum-verified), its metadata and the history, encrypted."""
        blob, version = svc.export(user_id, passphrase, history)
        return Response(blob, media_type="application/octet-stream",
                        headers={"Content-Disposition": f'attachment; filename="{user_id}.v{version}.oppu"',
                                 "X-Oppu-Adapter-Version": str(version)})

    @app.delete("/v1/users/{user_id}", response_model=S.Deleted, responses=AUTH_ERRORS, tags=["users"])
    def delete(user_id: UserId, _: Owner):
        """Everything of the user: history, adapter versions and files, jobs, tokens, caches; the
        db and WAL are scrubbed and the adapter leaves the serving model."""
        svc.delete(user_id)
        return S.Deleted(user_id=user_id, deleted=True)
