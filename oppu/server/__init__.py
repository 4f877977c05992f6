"""The personal adapter service: an HTTP API over the adapter store, one adapter per user.

    oppu serve --store var/oppu --base tiny --task LaMP_2M --port 8000     # docs/serving.md

    from oppu.server import ServeConfig, Service, create_app, open_base
    model, tok, info = open_base("tiny", "LaMP_2M", "var/oppu")
    svc = Service(AdapterStore("var/oppu"), model, tok, ServeConfig(task="LaMP_2M"), admin_token, info)
    app = create_app(svc)                                                  # FastAPI; uvicorn.run(app)

Files (needs the `serve` extra: fastapi, uvicorn):
    app.py      routes, auth dependencies, per-user limits, error mapping
    owner_routes.py  export, import, token rotation, versions, rollback, delete
    guard.py    the route class: auth before the body is read, strict JSON
    limits.py   per-user token buckets and in-flight caps per route class (pure)
    middleware.py    body limit, request counters
    schemas.py  request/response bodies and their limits (the OpenAPI spec comes from these)
    service.py  Service: store + Personalizer (training) + batcher (generation); ServeConfig
    batcher.py  mixed-adapter generation batches over a warm MultiUserModel
    worker.py   the background training thread (jobs join a running training session)
    bases.py    --base tiny | tiny:<preset> | checkpoint dir | `oppu run` output
    metrics.py  Prometheus text exposition
"""
from oppu.server.bases import open_base
from oppu.server.service import ServeConfig, Service

__all__ = ["ServeConfig", "Service", "create_app", "open_base"]


def create_app(service: Service):
    """The FastAPI app (imported lazily: fastapi is an optional dependency)."""
    from oppu.server.app import create_app as _create

    return _create(service)
