"""Auth first, then strict JSON: the route class of the /v1 API.

Every /v1 request is authenticated from its headers alone before a byte of its body is read:
no or a malformed `Authorization: Bearer` header, or an unknown token: 401; a user token on
another user's path (or on an admin path): 403 with one body whatever that user is. Only then is
the body looked at, and JSON carrying NaN, Infinity or a number too large to be finite is
refused (422) before pydantic sees it (Python's json module would accept all three). The caller
is left in `request.state.caller` for the route's own dependencies.

    app.router.route_class = guarded_route(authenticate, admin_paths={"/v1/users"})
"""
from __future__ import annotations

import json
import math
from typing import Annotated, Callable

from fastapi import Path
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException

import oppu.server.schemas as S
from oppu.server.service import Caller
from oppu.store import USER_ID_PATTERN

NOT_OWN = "this token may only access its own user"
NEEDS_ADMIN = "this endpoint needs the admin token"
UNAUTHORIZED = {"WWW-Authenticate": "Bearer"}
NO_STORE = {"Cache-Control": "no-store"}  # answers carrying a token or an export: never cached
UserId = Annotated[str, Path(pattern=USER_ID_PATTERN, description="a user id (the one POST /v1/users returned)")]
AUTH_ERRORS = {401: {"model": S.Problem, "description": "no, malformed or unknown bearer token"},
               403: {"model": S.Problem, "description": "the token may not access this resource"},
               422: {"description": "invalid request; detail names the field"}}


def bearer_token(header: str | None) -> str | None:
    """The credential of an `Authorization: Bearer <token>` header, None when there is none."""
    scheme, _, cred = (header or "").partition(" ")
    return cred.strip() or None if scheme.lower() == "bearer" else None


class NotFinite(ValueError):
    pass


def _constant(name: str) -> float:
    raise NotFinite(f"{name} is not a JSON number (numbers must be finite)")


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise NotFinite(f"number {text[:40]} is too large to be finite")
    return value


def check_finite_json(body: bytes) -> None:
    """RequestValidationError when `body` is JSON with NaN, Infinity or a non-finite number; any
    other body (valid or not) is left to FastAPI's own parsing and its errors."""
    try:
        json.loads(body, parse_constant=_constant, parse_float=_finite)
    except NotFinite as e:
        raise RequestValidationError([{"type": "json_invalid", "loc": ("body",), "msg": str(e), "input": None}])
    except Exception:  # noqa: BLE001  (not JSON, too deep, ...: FastAPI reports it)
        return


def guarded_route(authenticate: Callable[[str], Caller | None], admin_paths: frozenset[str] | set[str],
                  admit: Callable | None = None) -> type[APIRoute]:
    """An APIRoute class checking auth (then `admit(request, caller, route_path)`, which may raise,
    e.g. 429) before the body of any /v1 route is read. `authenticate(token)`: the Caller or None."""

    class GuardedRoute(APIRoute):
        def get_route_handler(self):
            handler = super().get_route_handler()
            if not self.path.startswith("/v1/"):
                return handler
            path, needs_admin, has_body = self.path, self.path in admin_paths, self.body_field is not None

            async def guarded(request):
                token = bearer_token(request.headers.get("authorization"))
                if token is None:
                    raise HTTPException(401, "missing or malformed Authorization header; expected 'Bearer <token>'",
                                        headers=UNAUTHORIZED)
                caller = authenticate(token)
                if caller is None:
                    raise HTTPException(401, "invalid or revoked token", headers=UNAUTHORIZED)
                uid = request.path_params.get("user_id")
                if not caller.admin and (needs_admin or (uid is not None and uid != caller.user_id)):
                    raise HTTPException(403, NEEDS_ADMIN if needs_admin else NOT_OWN)
                request.state.caller = caller
                if admit is not None:
                    return await admit(request, caller, path, lambda: _run(request, handler, has_body))
                return await _run(request, handler, has_body)

            return guarded

    return GuardedRoute


async def _run(request, handler, has_body: bool):
    if has_body:
        check_finite_json(await request.body())
    return await handler(request)
