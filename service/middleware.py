"""Pure ASGI middlewares (no BaseHTTPMiddleware: it buffers and breaks streaming): request metrics, API keys,
request body size and pace."""
from __future__ import annotations

import asyncio
import hmac
import json
import logging
import re
import time
import uuid
from collections.abc import Iterable

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .metrics import Metrics

PUBLIC_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})
KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


async def send_json(send: Send, status: int, body: dict, headers: Iterable[tuple[bytes, bytes]] = ()) -> None:
    data = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode()),
                            *headers]})
    await send({"type": "http.response.body", "body": data})


class MetricsMiddleware:
    """Counts every HTTP request by endpoint (the route's path template; 'other' for unknown paths) and status,
    gives it an id (the client's X-Request-ID when it is a sane token, else a new one; returned in the response
    header), and writes one access-log line for it."""

    def __init__(self, app: ASGIApp, metrics: Metrics, paths: Iterable[str], access_log: bool = True) -> None:
        self.app = app
        self.metrics = metrics
        self.paths = frozenset(paths)
        self.access_log = access_log

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = 500
        start = time.perf_counter()
        request_id = _request_id(scope)
        scope.setdefault("state", {})["request_id"] = request_id

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message = {**message, "headers": [*message.get("headers", []),
                                                  (b"x-request-id", request_id.encode())]}
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            seconds = time.perf_counter() - start
            endpoint = _endpoint(scope, self.paths)
            method = scope["method"] if scope["method"] in KNOWN_METHODS else "other"  # label values stay bounded
            self.metrics.requests.labels(endpoint, method, str(status)).inc()
            self.metrics.request_seconds.labels(endpoint).observe(seconds)
            if self.access_log:
                batch = scope["state"].get("batch_size")
                fields = {"method": method if method != "other" else scope["method"][:16], "path": scope["path"][:200],
                          "status": status, "ms": round(seconds * 1000, 1), "batch_size": batch,
                          "request_id": request_id, "client": (scope.get("client") or ("-",))[0]}
                access_log.info("%s %s %d %.1f ms%s id=%s", fields["method"], fields["path"], status, fields["ms"],
                                f" batch={batch}" if batch else "", request_id, extra=fields)


access_log = logging.getLogger("service.access")
_SANE_ID = re.compile(rb"[A-Za-z0-9._:-]{1,64}")


def _request_id(scope: Scope) -> str:
    for name, value in scope["headers"]:
        if name == b"x-request-id" and _SANE_ID.fullmatch(value):
            return value.decode()
    return uuid.uuid4().hex[:16]


def _endpoint(scope: Scope, known: frozenset[str]) -> str:
    """The route's path template, never the raw path (unbounded label values); 'other' when nothing matches.
    Requests answered before routing (401, 413) have no route yet: their path is looked up in ``known``."""
    path = getattr(scope.get("route"), "path", None) or scope["path"]
    if path in known:
        return path
    return "/static" if path.startswith(("/static/", "/static-offline-docs/")) else "other"


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


class BodyGuardMiddleware:
    """Bounds what a request body may cost: over ``max_bytes`` -> 413 (at once from Content-Length, or while
    streaming); a body that pauses ``idle_s`` or is not complete ``total_s`` after the request began -> 408; after
    ``cut`` is set (shutdown grace over) an upload still arriving -> 503. Once the body is complete, receive()
    passes straight through (the app may wait on it for the client's disconnect)."""

    def __init__(self, app: ASGIApp, max_bytes: int, idle_s: float, total_s: float,
                 cut: "asyncio.Event | None" = None) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.idle_s = idle_s
        self.total_s = total_s
        self.cut = cut

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            return await send_json(send, 413, self._too_large())
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.total_s
        received, complete, started = 0, False, False
        refusal: tuple[int, dict] | None = None

        async def guarded_receive() -> Message:
            nonlocal received, complete, refusal
            if complete:
                return await receive()
            message = await self._next(receive, loop, deadline)
            if isinstance(message, tuple):  # refused: stop the app reading; its answer is replaced below
                refusal = message
                raise BodyRefused()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    refusal = (413, self._too_large())
                    raise BodyRefused()
                complete = not message.get("more_body", False)
                if not complete and loop.time() > deadline:  # on every chunk: a stream that never pauses ends too
                    refusal = self._too_slow(f"the body was not complete {self.total_s:g} s after the request began")
                    raise BodyRefused()
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal started
            if refusal is not None:
                if message["type"] == "http.response.start" and not started:
                    started = True
                    await send_json(send, *refusal, [(b"connection", b"close")])
                return
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, guarded_receive, guarded_send)
        except BodyRefused:
            if not started:
                await send_json(send, *refusal, [(b"connection", b"close")])

    async def _next(self, receive: Receive, loop, deadline: float) -> Message | tuple[int, dict]:
        """The next body message, or (status, body) when the client is too slow or the shutdown cut came first."""
        timeout = min(self.idle_s, deadline - loop.time())
        recv = asyncio.ensure_future(receive())
        waiters = {recv}
        cut = None
        if self.cut is not None:
            cut = asyncio.ensure_future(self.cut.wait())
            waiters.add(cut)
        done: set = set()
        try:
            done, _ = await asyncio.wait(waiters, timeout=max(timeout, 0), return_when=asyncio.FIRST_COMPLETED)
        finally:  # also when this request is cancelled: no task is left pending
            if cut is not None:
                cut.cancel()
            if recv not in done:
                recv.cancel()
        if recv in done:
            return recv.result()
        if cut is not None and cut in done:
            return 503, {"detail": "server is shutting down: the upload did not finish within the shutdown grace "
                                   "period; send it again to another replica"}
        return self._too_slow(f"no body data for {self.idle_s:g} s" if timeout == self.idle_s
                              else f"the body was not complete {self.total_s:g} s after the request began")

    @staticmethod
    def _too_slow(why: str) -> tuple[int, dict]:
        return 408, {"detail": [{"loc": ["body"], "type": "timeout", "msg": f"request body too slow: {why}"}]}

    def _too_large(self) -> dict:
        return {"detail": [{"loc": ["body"], "type": "too_large",
                            "msg": f"request body is larger than the {self.max_bytes}-byte limit"}]}


class BodyRefused(Exception):
    pass
