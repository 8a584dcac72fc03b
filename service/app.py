"""The FastAPI application: one router per resource, one Settings object, one error mapping."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request, Response

from service.errors import install_error_handlers
from service.limits import BodyLimit
from service.queues import JobQueue
from service.routes import compositions, datasets, health, jobs, paths, zoo
from service.state import Services
from zoo_store.blobs import BlobStore
from zoo_store.settings import Settings


def create_app(settings: Settings | None = None, blobs: BlobStore | None = None, queue: JobQueue | None = None) -> FastAPI:
    settings = settings or Settings()
    services = Services.create(settings, blobs=blobs, queue=queue)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        services.start()
        yield
        services.stop()

    app = FastAPI(title="zoo", version="0.1.0", lifespan=lifespan,
                  description="Compose new models out of a zoo of frozen networks; serve them lazily.")  # fmt: skip
    app.state.services = services
    install_error_handlers(app)
    app.add_middleware(BodyLimit, settings=settings)
    for r in (health, zoo, datasets, compositions, jobs, paths):
        app.include_router(r.router)

    @app.middleware("http")
    async def limits_and_metrics(request: Request, call_next) -> Response:
        start = time.perf_counter()
        response = await call_next(request)
        route = request.scope.get("route")
        name = getattr(route, "path", "unmatched")
        services.metrics.requests.labels(request.method, name, str(response.status_code)).inc()
        services.metrics.latency.labels(name).observe(time.perf_counter() - start)
        return response

    return app
