"""The FastAPI app over a Service: routes, bearer-token auth, error mapping, body limit, metrics.

    app = create_app(service)          # uvicorn.run(app) or fastapi.testclient.TestClient(app)

Auth: `Authorization: Bearer <token>`. The admin token (OPPU_ADMIN_TOKEN) works on every route;
a user's token only on /v1/users/<that user>/... and that user's jobs. No or an unknown token:
401. A user token on another user's path or job: 403 with the same body whether or not the other
user or job exists, so a token learns nothing about other users. Auth is checked before the body
is read (oppu.server.guard). /healthz and /metrics are open (no user data: counts only, route
templates, never ids).

Errors are JSON {"detail": "..."} naming the problem: 422 for invalid bodies (field path first,
e.g. "body.items: List should have at most 1000 items"; JSON is strict: no NaN/Infinity, no
true for a number), 413 for oversized bodies and for history past a user's quota, 429 past a per-user limit (with Retry-After), 404 unknown user/job/version/no adapter, 409 state
conflicts (a job already running, nothing new to train on, no intact adapter version).
The owner's own operations (export, import, token rotation, versions, rollback, delete):
oppu/server/owner_routes.py.
"""
import asyncio
import logging
import time
from typing import Annotated

from fastapi import Depends, FastAPI, Path, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.exceptions import HTTPException

import oppu.server.schemas as S
from oppu.crypto import CryptoError
from oppu.server.guard import AUTH_ERRORS, NEEDS_ADMIN, NO_STORE, NOT_OWN, UserId, guarded_route
from oppu.server.limits import Refused
from oppu.server.middleware import BodyLimit, RequestMetrics, problem
from oppu.server.owner_routes import owner_routes
from oppu.server.service import Caller, Conflict, Service
from oppu.store import (BundleError, CorruptAdapterError, HistoryError, InvalidUserId, JobError,
                        NoAdapter, QuotaExceeded, UnknownUser, UnknownVersion, UserExists)

log = logging.getLogger("oppu.server")
STATUS = [(QuotaExceeded, 413), (InvalidUserId, 422), (HistoryError, 422), (CryptoError, 422), (BundleError, 422),
          (UnknownUser, 404), (NoAdapter, 404), (UnknownVersion, 404), (JobError, 404), (UserExists, 409),
          (Conflict, 409)]
ADMIN_PATHS = frozenset({"/v1/users", "/v1/users/import"})
ROUTE_CLASS = {("POST", "/v1/users/{user_id}/generate"): "generate", ("POST", "/v1/users/{user_id}/adapter"): "export",
               ("POST", "/v1/users/import"): "export", ("POST", "/v1/users/{user_id}/train"): "train",
               ("POST", "/v1/users/{user_id}/history"): "history", ("POST", "/v1/users/{user_id}/token"): "account",
               ("POST", "/v1/users/{user_id}/rollback"): "account", ("DELETE", "/v1/users/{user_id}"): "account",
               ("POST", "/v1/users"): "account"}  # anything else under /v1: "read"
JobId = Annotated[str, Path(min_length=1, max_length=64)]


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
            return problem(status, str(exc))
        app.add_exception_handler(exc_type, handler)

    @app.exception_handler(CorruptAdapterError)
    def corrupt(request: Request, exc: CorruptAdapterError):  # logged once by the Personalizer, not here
        return problem(409, f"{exc}; no intact adapter version to use: see GET /v1/users/{{user_id}}/versions, "
                            "then POST /v1/users/{user_id}/rollback to an intact one, or train again")

    @app.exception_handler(Exception)
    async def crashed(request: Request, exc: Exception):
        log.exception("%s %s failed", request.method, request.url.path)
        return problem(500, f"internal error ({type(exc).__name__}); see the server log")


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
    app.add_middleware(BodyLimit, max_bytes=svc.cfg.max_body_bytes,
                       overrides={"/v1/users/import": svc.cfg.max_import_bytes})
    app.add_middleware(RequestMetrics, metrics=svc.metrics)
    _handlers(app)
    app.router.route_class = guarded_route(svc.authenticate, ADMIN_PATHS, _admit(svc))
    caller, admin, owner = _auth(svc)
    # Registration order is the route and OpenAPI path order.
    _ops_routes(app, svc)
    _account_routes(app, svc, admin, owner)
    _training_routes(app, svc, caller, owner)
    _inference_routes(app, svc, owner)
    owner_routes(app, svc, admin, owner)
    return app


def _admit(svc: Service):
    """Per-user limits (oppu.server.limits) on every /v1 route, by route class: past them, 429 with
    Retry-After before the body is read, sent after `refuse_delay_s` (an idle wait, no CPU), so a
    client that ignores Retry-After costs the server one cheap refusal a second per connection.
    The admin token is the operator's: not limited."""
    async def admit(request: Request, caller: Caller, path: str, call_next):
        if caller.admin:
            return await call_next()
        cls = ROUTE_CLASS.get((request.method, path), "read")
        got = svc.limits.admit(request.path_params.get("user_id") or caller.user_id, cls, time.monotonic())
        if isinstance(got, Refused):  # answered after a pause: a client ignoring Retry-After cannot spin
            await asyncio.sleep(min(svc.cfg.refuse_delay_s, got.retry_after_s))
            raise HTTPException(429, got.reason, headers={"Retry-After": str(got.retry_after_s)})
        try:
            return await call_next()
        finally:
            svc.limits.release(got)

    return admit


def _auth(svc: Service):
    """The three auth dependencies: caller (any valid token), admin (the admin token) and owner
    (admin, or the token of the user named in the path; returns that user id). The route class
    (oppu.server.guard) has already checked all three before the body was read; these hand the
    result to the routes and put the bearer scheme into the OpenAPI spec."""
    bearer = HTTPBearer(auto_error=False, description="the admin token, or a user's token for that user's routes")

    def caller(request: Request, cred: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]) -> Caller:
        c = getattr(request.state, "caller", None)
        if c is None:  # not a guarded route: never the case for /v1 routes
            raise HTTPException(401, "missing or malformed Authorization header; expected 'Bearer <token>'",
                                headers={"WWW-Authenticate": "Bearer"})
        return c

    def admin(c: Annotated[Caller, Depends(caller)]) -> Caller:
        if not c.admin:
            raise HTTPException(403, NEEDS_ADMIN)
        return c

    def owner(request: Request, c: Annotated[Caller, Depends(caller)]) -> str:
        uid = request.path_params.get("user_id", "")
        if not c.admin and uid != c.user_id:  # checked before the id is even parsed: reveals nothing
            raise HTTPException(403, NOT_OWN)
        return uid

    return caller, admin, owner


def _ops_routes(app: FastAPI, svc: Service) -> None:
    """/healthz, /scrub and /metrics: open, no user data."""
    @app.get("/healthz", response_model=S.Health, tags=["ops"])
    def healthz():
        return S.Health(status="ok", task=svc.task.id, base=str(svc.base_info.get("source", "")),
                        trainer_base=svc.trainer_base, uptime_s=round(time.time() - svc.started, 3))

    @app.get("/scrub", response_model=S.ScrubStatus, tags=["ops"])
    def scrub():
        """Deletes' scrub generations (counters only): a delete answered `scrub: g` is scrubbed
        once `done >= g`."""
        return S.ScrubStatus(**svc.store.scrubber.status())

    @app.get("/metrics", response_class=PlainTextResponse, tags=["ops"],
             responses={200: {"content": {"text/plain": {}}, "description": "Prometheus text format 0.0.4"}})
    def metrics():
        return PlainTextResponse(svc.metrics.render(svc.gauges()), media_type="text/plain; version=0.0.4")


def _account_routes(app: FastAPI, svc: Service, admin, owner) -> None:
    """Create a user (admin), read a user, append to a user's history."""
    Owner = Annotated[str, Depends(owner)]

    @app.post("/v1/users", status_code=201, response_model=S.UserCreated, responses=AUTH_ERRORS, tags=["users"])
    def create_user(response: Response, _: Annotated[Caller, Depends(admin)]):
        """Admin: a new user with a random id and a bearer token (shown once, stored hashed)."""
        uid, token = svc.create_user()
        response.headers.update(NO_STORE)
        return S.UserCreated(user_id=uid, token=token)

    @app.get("/v1/users/{user_id}", response_model=S.UserOut, responses=AUTH_ERRORS, tags=["users"])
    def get_user(user_id: UserId, _: Owner):
        info = svc.store.user(user_id)
        return S.UserOut(user_id=info.user_id, task=info.task, active_version=info.active_version,
                         versions=[v.version for v in svc.store.versions(user_id)],
                         history_items=svc.store.count_history(user_id))

    @app.post("/v1/users/{user_id}/history", response_model=S.HistoryAdded, responses=AUTH_ERRORS,
              tags=["users"])
    def add_history(user_id: UserId, body: S.HistoryIn, _: Owner):
        """Append history items (all or nothing); they feed the next train/update job. With an instant
        bank (`oppu serve --instant`), a user with no trained version is served at once by an instant
        adapter mixed for this history (`instant_version`), until a training job replaces it."""
        seqs, made = svc.add_history_and_instant(user_id, body.task, body.items)
        return S.HistoryAdded(user_id=user_id, added=len(seqs), last_seq=seqs[-1],
                              instant_version=None if made is None else made.version)


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
