"""The FastAPI app: ``create_app(settings)`` builds one service (model, batcher, metrics, routes, web page).

    uvicorn --factory service.app:create_app        # settings from CAPTIONER_* environment variables
    captioner serve --checkpoint DIR                 # the same, with flags

Middlewares, outermost first: request metrics -> CORS -> API keys -> body size and pace -> routes.
"""
from __future__ import annotations

import logging
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI
from fastapi_offline import FastAPIOffline
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

from captioner.api import Captioner

from .errors import install_handlers
from .metrics import Metrics
from .middleware import APIKeyMiddleware, BodyGuardMiddleware, MetricsMiddleware
from .routers import captions, health, models, vqa
from .settings import Settings
from .state import ServiceState

STATIC = Path(__file__).resolve().parent / "static"
log = logging.getLogger("service")

try:
    from importlib.metadata import version as _pkg_version

    VERSION = _pkg_version("captioner")
except Exception:  # noqa: BLE001  (running from a source tree that is not installed)
    VERSION = "0"


def create_app(settings: Settings | None = None, captioner: Captioner | None = None) -> FastAPI:
    """A new app with its own metrics registry. ``captioner``: an already loaded model (tests, notebooks);
    otherwise the app loads ``settings.checkpoint`` in the background once the server is up."""
    settings = settings or Settings()
    metrics = Metrics(settings.max_batch_size)
    svc = ServiceState(settings, metrics, captioner)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await svc.start()
        try:
            yield
        finally:
            log.info("shutting down: draining %d queued requests", svc.batcher.qsize() if svc.batcher else 0)
            await svc.stop()
            log.info("stopped")

    # /docs and /redoc from assets in the fastapi-offline wheel: air-gapped deployments get their API docs too
    app = FastAPIOffline(title="captioner", version=VERSION, lifespan=lifespan, favicon_url="/static/favicon.svg",
                         description="Image captions and multiple-choice answers, dynamically batched. "
                                     "Send images as multipart `image` files or base64 JSON; no URLs are fetched.")
    app.state.svc = svc
    install_handlers(app)
    routers = (captions.router, vqa.router, models.router, health.router)
    for r in routers:
        app.include_router(r)

    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/", include_in_schema=False)
    async def index() -> FileResponse:
        return FileResponse(STATIC / "index.html")

    @app.get("/favicon.ico", include_in_schema=False)
    async def favicon() -> FileResponse:  # browsers ask for it on pages that name none (/metrics, JSON views)
        return FileResponse(STATIC / "favicon.svg", media_type="image/svg+xml")

    # add_middleware wraps: the last added runs first
    app.add_middleware(BodyGuardMiddleware, max_bytes=settings.body_limit, idle_s=settings.client_timeout_s,
                       total_s=settings.request_timeout_s, cut=svc.uploads_cut)
    if settings.api_keys:
        app.add_middleware(APIKeyMiddleware, keys=settings.api_keys)
    if settings.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_origins, allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "X-API-Key", "Content-Type"], max_age=600)
    paths = {"/", "/docs", "/redoc", "/openapi.json", "/favicon.ico", *(r.path for rt in routers for r in rt.routes)}
    app.add_middleware(MetricsMiddleware, metrics=metrics, paths=paths, access_log=settings.access_log)
    return app
