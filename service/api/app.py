"""The FastAPI application: one router per resource, one Settings object, one error mapping."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi_offline import FastAPIOffline

from service.api.audit import AuditMiddleware
from service.serve.channel import DeviceServer
from service.api.errors import install_error_handlers
from service.api.limits import BodyLimit
from service.common.metrics import RequestMetrics
from service.api.openapi import install_openapi
from service.jobs.queues import JobQueue
from service.api.routes import compositions, datasets, health, jobs, keys, oip, paths, tenants, ui, zoo
from service.api.state import Services

FRONT_HEADER = "x-zoo-front"  # set by the HTTP workers of `zoo serve` on what they pass through
from zoo_store.store.blobs import BlobStore
from zoo_store.core.settings import Settings


def create_app(settings: Settings | None = None, blobs: BlobStore | None = None, queue: JobQueue | None = None) -> FastAPI:
    settings = settings or Settings()
    services = Services.create(settings, blobs=blobs, queue=queue)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        services.start()
        device = DeviceServer(services, settings.ipc_dir / "device.sock") if settings.ipc_dir else None
        if device:  # the inference process of `zoo serve`: HTTP workers hand it their tensors
            await device.start()
        try:
            yield
        finally:
            if device:
                await device.stop()
            services.stop()

    app = FastAPIOffline(title="zoo", version="0.1.0", lifespan=lifespan,  # /docs, /redoc: packaged files, no CDN
                         description="Compose new models out of a zoo of frozen networks; serve them lazily.")  # fmt: skip
    app.state.services = services
    install_error_handlers(app)
    app.add_middleware(BodyLimit, settings=settings)
    app.add_middleware(AuditMiddleware, log=services.audit)
    app.add_middleware(RequestMetrics, metrics=services.metrics, skip_header=FRONT_HEADER)
    for r in (health, zoo, datasets, compositions, jobs, paths, keys, tenants, oip, ui):
        app.include_router(r.router)
    app.mount("/ui", ui.static_files(), name="ui")
    install_openapi(app)

    return app
