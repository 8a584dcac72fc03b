"""The FastAPI application: one router per resource, one Settings object, one error mapping."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager

from fastapi import FastAPI
from fastapi_offline import FastAPIOffline

from service.api.audit import AuditMiddleware
from service.api.errors import install_error_handlers
from service.api.faults import BELOW, known
from service.api.limits import BodyLimit
from service.api.openapi import install_openapi
from service.api.routes import compositions, datasets, health, jobs, keys, oip, paths, tenants, ui, zoo
from service.api.state import Services
from service.common.edge import FRONT_HEADER
from service.common.metrics import RequestMetrics
from service.jobs.queues import JobQueue
from zoo_store.core.settings import Settings
from zoo_store.store.blobs import BlobStore


def create_app(
    settings: Settings | None = None,
    blobs: BlobStore | None = None,
    queue: JobQueue | None = None,
    beside: Callable[[Services], AbstractAsyncContextManager] | None = None,
) -> FastAPI:
    """``beside``: what runs for the app's lifetime once its services started, given them (the
    inference process of `zoo serve` serves the HTTP workers' device channel there)."""
    settings = settings or Settings()
    services = Services.create(settings, blobs=blobs, queue=queue)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        services.start()
        try:
            if beside is None:
                yield
            else:
                async with beside(services):
                    yield
        finally:
            services.stop()

    app = FastAPIOffline(
        title="zoo",
        version="0.1.0",
        lifespan=lifespan,  # /docs, /redoc: packaged files, no CDN
        description="Compose new models out of a zoo of frozen networks; serve them lazily.",
    )
    app.state.services = services
    install_error_handlers(app, below=BELOW, known=known)
    app.add_middleware(BodyLimit, settings=settings)
    app.add_middleware(AuditMiddleware, log=services.audit)
    app.add_middleware(RequestMetrics, metrics=services.metrics, skip_header=FRONT_HEADER)
    for r in (health, zoo, datasets, compositions, jobs, paths, keys, tenants, oip, ui):
        app.include_router(r.router)
    app.mount("/ui", ui.static_files(), name="ui")
    install_openapi(app)

    return app
