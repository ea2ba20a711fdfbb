"""Pure ASGI middlewares (no BaseHTTPMiddleware: it buffers and breaks streaming): request metrics, API keys,
request body size."""
from __future__ import annotations

import hmac
import json
import time
from collections.abc import Iterable

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .metrics import Metrics

PUBLIC_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})


async def send_json(send: Send, status: int, body: dict, headers: Iterable[tuple[bytes, bytes]] = ()) -> None:
    data = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode()),
                            *headers]})
    await send({"type": "http.response.body", "body": data})


class MetricsMiddleware:
    """Counts every HTTP request by endpoint (the route's path template; 'other' for unknown paths) and status."""

    def __init__(self, app: ASGIApp, metrics: Metrics, paths: Iterable[str]) -> None:
        self.app = app
        self.metrics = metrics
        self.paths = frozenset(paths)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = 500
        start = time.perf_counter()

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            endpoint = _endpoint(scope, self.paths)
            self.metrics.requests.labels(endpoint, scope["method"], str(status)).inc()
            self.metrics.request_seconds.labels(endpoint).observe(time.perf_counter() - start)


def _endpoint(scope: Scope, known: frozenset[str]) -> str:
    """The route's path template, never the raw path (unbounded label values); 'other' when nothing matches.
    Requests answered before routing (401, 413) have no route yet: their path is looked up in ``known``."""
    path = getattr(scope.get("route"), "path", None) or scope["path"]
    if path in known:
        return path
    return "/static" if path.startswith("/static/") else "other"


class APIKeyMiddleware:
    """With keys configured, every path but health and metrics needs ``Authorization: Bearer KEY`` or
    ``X-API-Key: KEY`` (401 otherwise). CORS preflights are answered further out and never reach here."""

    def __init__(self, app: ASGIApp, keys: list[str]) -> None:
        self.app = app
        self.keys = [k.encode() for k in keys]

    def _allowed(self, scope: Scope) -> bool:
        headers = dict(scope["headers"])
        candidates = []
        auth = headers.get(b"authorization", b"")
        if auth[:7].lower() == b"bearer ":
            candidates.append(auth[7:].strip())
        if b"x-api-key" in headers:
            candidates.append(headers[b"x-api-key"].strip())
        # compare with every key, in constant time per key, so timing tells nothing about which part matched
        ok = False
        for c in candidates:
            for k in self.keys:
                ok |= hmac.compare_digest(c, k)
        return ok

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in PUBLIC_PATHS or self._allowed(scope):
            return await self.app(scope, receive, send)
        await send_json(send, 401, {"detail": "missing or invalid API key: send 'Authorization: Bearer <key>' "
                                              "or 'X-API-Key: <key>'"},
                        [(b"www-authenticate", b'Bearer realm="captioner"')])


class BodyLimitMiddleware:
    """Refuses request bodies over ``max_bytes`` with 413: at once from Content-Length, or while streaming."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        detail = {"detail": [{"loc": ["body"], "type": "too_large",
                              "msg": f"request body is larger than the {self.max_bytes}-byte limit"}]}
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            return await send_json(send, 413, detail)

        received, too_large, started = 0, False, False

        async def limited_receive() -> Message:
            nonlocal received, too_large
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    too_large = True
                    # stop the app reading; whatever it answers is replaced by the 413 below
                    raise BodyTooLarge()
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal started
            if too_large:
                if message["type"] == "http.response.start" and not started:
                    started = True
                    await send_json(send, 413, detail)
                return
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited_receive, guarded_send)
        except BodyTooLarge:
            if not started:
                await send_json(send, 413, detail)


class BodyTooLarge(Exception):
    pass
