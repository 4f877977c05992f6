"""ASGI middleware of the app: the request body limit and the request counters of /metrics.

    app.add_middleware(BodyLimit, max_bytes=1 << 20, overrides={"/v1/users/import": 64 << 20})
    app.add_middleware(RequestMetrics, metrics=service.metrics)

Both run before routing and before auth: a body over the limit is refused (413) before it is read,
and every response is counted by method (Metrics.request bounds the label to the standard
methods), route template and status.
"""
from __future__ import annotations

from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

def problem(status: int, detail: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"detail": detail}, status_code=status, headers=headers)


class BodyLimit:
    """413 with the sizes named, before the body is read when Content-Length says so, else as
    soon as the streamed body passes the limit. `overrides` maps a path to its own limit."""

    def __init__(self, app, max_bytes: int, overrides: dict[str, int] | None = None):
        self.app, self.max_bytes, self.overrides = app, max_bytes, dict(overrides or {})

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit = self.overrides.get(scope.get("path", ""), self.max_bytes)
        msg = f"request body larger than the limit of {limit} bytes"
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None:
            if not length.isdigit():
                return await problem(400, f"invalid Content-Length header {length.decode('latin-1')!r}")(
                    scope, receive, send)
            if int(length) > limit:
                return await problem(413, f"{msg} (Content-Length: {int(length)})")(scope, receive, send)
        seen = 0

        async def limited():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise HTTPException(413, msg)  # FastAPI re-raises middleware HTTPExceptions as is
            return message

        await self.app(scope, limited, send)


class RequestMetrics:
    """Counts every response by method, route template and status."""

    def __init__(self, app, metrics):
        self.app, self.metrics = app, metrics

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
