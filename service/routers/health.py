"""GET /healthz (the process answers), /readyz (model loaded and warmed up), /metrics (Prometheus text)."""
from __future__ import annotations

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse

router = APIRouter(tags=["health"])


@router.get("/healthz", summary="Liveness")
async def healthz() -> dict:
    return {"status": "ok"}


@router.get("/readyz", summary="Readiness: 200 once the model is loaded and warmed up",
            responses={503: {"description": "loading, warming up, failed to load, or shutting down"}})
async def readyz(request: Request) -> JSONResponse:
    svc = request.app.state.svc
    body = {"status": svc.status}
    if svc.error:
        body["error"] = svc.error
    if svc.ready:
        body["queue_depth"] = svc.batcher.qsize()
    return JSONResponse(body, status_code=200 if svc.ready else 503)


@router.get("/metrics", summary="Prometheus metrics", response_class=Response)
async def metrics(request: Request) -> Response:
    m = request.app.state.svc.metrics
    return Response(m.render(), media_type=m.content_type)
