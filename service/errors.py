"""Errors the routers raise and how each becomes an HTTP answer.

Input errors all have FastAPI's validation shape, so clients find the field in one place:
    {"detail": [{"loc": ["body", "choices", 2], "msg": "...", "type": "..."}]}
Other errors: {"detail": "message"} (+ "error_id" for 500, the id that is also in the server log).
"""
from __future__ import annotations

import logging

from fastapi import FastAPI
from starlette.requests import ClientDisconnect, Request
from fastapi.responses import JSONResponse

from .batcher import BatchFailedError, QueueFullError, RequestTimeoutError, ShuttingDownError
from .engine import VQAUnsupported
from .images import ImageRejected

log = logging.getLogger("service")


class InputError(Exception):
    """Bad input: status (413/415/422) and the field(s) at fault; loc starts with 'body' or 'header'."""

    def __init__(self, status: int, loc: tuple, msg: str, type_: str = "value_error",
                 errors: list[dict] | None = None) -> None:
        super().__init__(msg)
        self.status = status
        self.errors = errors if errors is not None else [{"loc": list(loc), "msg": msg, "type": type_}]

    @classmethod
    def from_validation(cls, e, prefix: tuple = ("body",)) -> "InputError":
        """A pydantic ValidationError -> 422 naming each field (without unserialisable ctx)."""
        errors = [{"loc": [*prefix, *err["loc"]], "msg": err["msg"], "type": err["type"]} for err in e.errors()]
        return cls(422, (), "; ".join(f"{'.'.join(map(str, x['loc']))}: {x['msg']}" for x in errors), errors=errors)


class ClientGone(Exception):
    """The client disconnected before its answer: its queued work was withdrawn. The 499 it gets (nginx's
    'client closed request') is never read by anyone; it is there for the request metrics."""


class ServiceUnavailable(Exception):
    def __init__(self, msg: str, retry_after: int = 1) -> None:
        super().__init__(msg)
        self.retry_after = retry_after


def install_handlers(app: FastAPI) -> None:
    @app.exception_handler(InputError)
    async def _input(request: Request, e: InputError) -> JSONResponse:
        return JSONResponse({"detail": e.errors}, status_code=e.status)

    @app.exception_handler(ImageRejected)
    async def _image(request: Request, e: ImageRejected) -> JSONResponse:
        return JSONResponse({"detail": [{"loc": ["body", e.field], "msg": e.message, "type": e.kind}]},
                            status_code=e.status)

    @app.exception_handler(ServiceUnavailable)
    async def _unavailable(request: Request, e: ServiceUnavailable) -> JSONResponse:
        return JSONResponse({"detail": str(e)}, status_code=503, headers={"Retry-After": str(e.retry_after)})

    @app.exception_handler(QueueFullError)
    async def _full(request: Request, e: QueueFullError) -> JSONResponse:
        return JSONResponse({"detail": f"server busy: {e}"}, status_code=503, headers={"Retry-After": "1"})

    @app.exception_handler(ShuttingDownError)
    async def _stopping(request: Request, e: ShuttingDownError) -> JSONResponse:
        return JSONResponse({"detail": "server is shutting down"}, status_code=503, headers={"Retry-After": "5"})

    @app.exception_handler(RequestTimeoutError)
    async def _timeout(request: Request, e: RequestTimeoutError) -> JSONResponse:
        return JSONResponse({"detail": f"request timed out: {e}"}, status_code=504)

    @app.exception_handler(BatchFailedError)
    async def _failed(request: Request, e: BatchFailedError) -> JSONResponse:
        # the traceback was logged once per batch by the batcher, under the same id
        return JSONResponse({"detail": "internal error while running the model", "error_id": e.error_id},
                            status_code=500)

    @app.exception_handler(ClientGone)
    @app.exception_handler(ClientDisconnect)  # gone while uploading (or cut by the server's bounds): no one to answer
    async def _gone(request: Request, e: Exception) -> JSONResponse:
        return JSONResponse({"detail": "client closed the connection before the answer"}, status_code=499)

    @app.exception_handler(VQAUnsupported)
    async def _no_vqa(request: Request, e: VQAUnsupported) -> JSONResponse:
        return JSONResponse({"detail": "this model has no VQA head"}, status_code=501)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, e: Exception) -> JSONResponse:
        import uuid

        error_id = uuid.uuid4().hex[:12]
        log.error("unhandled error on %s %s, error id %s", request.method, request.url.path, error_id, exc_info=e)
        return JSONResponse({"detail": "internal error", "error_id": error_id}, status_code=500)

    try:
        from captioner.vqa import VQAInputError
    except ImportError:  # a captioner without VQA: /v1/vqa answers 501 before any model call
        return

    @app.exception_handler(VQAInputError)
    async def _vqa_input(request: Request, e: VQAInputError) -> JSONResponse:
        return JSONResponse({"detail": [{"loc": ["body"], "msg": str(e), "type": "value_error"}]}, status_code=422)
