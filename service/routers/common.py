"""What the caption and VQA endpoints share: reading multipart or JSON bodies, decoding the image off the event
loop, submitting to the batcher with what is left of the request's time budget."""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import time
from dataclasses import dataclass, field

from fastapi import Request
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartException

from ..batcher import RequestTimeoutError
from ..errors import ClientGone, InputError, ServiceUnavailable
from ..images import ImageRejected, decode_base64, load_upload
from ..schemas import ModelRef, Timings
from ..state import ServiceState

log = logging.getLogger("service")

MAX_FORM_FIELDS = 64
MAX_FIELD_BYTES = 64 * 1024  # one form field other than the image (questions and choices are far shorter)


async def service(request: Request) -> ServiceState:
    """The running service, or 503 while the model loads / after shutdown began. Async, so FastAPI runs it on the
    event loop: a plain-def dependency runs in its thread pool, a hand-off there and back for every request."""
    svc: ServiceState = request.app.state.svc
    if not svc.ready:
        if svc.status == "error":
            raise ServiceUnavailable(f"model failed to load: {svc.error}", retry_after=60)
        if svc.status in ("shutting down", "stopped"):
            raise ServiceUnavailable("server is shutting down", retry_after=5)
        raise ServiceUnavailable(f"model is not ready yet ({svc.status})", retry_after=2)
    return svc


@dataclass
class RequestInput:
    image: bytes
    fields: dict  # scalar parameters, as sent (strings for multipart)
    lists: dict[str, object] = field(default_factory=dict)  # list fields (e.g. choices), as sent
    received: float = 0.0  # perf_counter when the handler started
    json: bool = False  # fields came typed (JSON), not as form strings


async def read_input(request: Request, svc: ServiceState, list_fields: tuple[str, ...] = ()) -> RequestInput:
    """multipart/form-data (``image`` file + fields, list fields repeated) or JSON ({"image": base64, ...})."""
    t0 = time.perf_counter()
    max_bytes = svc.settings.max_upload_bytes
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype in ("multipart/form-data", "application/x-www-form-urlencoded"):  # urlencoded: image as base64
        async with read_form(request, svc) as form:
            images = form.getlist("image")
            if not images:
                raise InputError(422, ("body", "image"), "field required: an image file", "missing")
            if len(images) > 1:
                raise InputError(422, ("body", "image"), "send exactly one image", "too_many")
            img = images[0]
            if isinstance(img, UploadFile):
                data = await img.read(max_bytes + 1)
                if len(data) > max_bytes:
                    raise ImageRejected(413, f"image is larger than the {max_bytes}-byte upload limit")
            else:  # a plain form field: base64 text
                data = decode_base64(img, max_bytes)
            fields: dict = {}
            for k, v in form.multi_items():
                if k == "image" or k in list_fields:
                    continue
                if isinstance(v, UploadFile):
                    raise InputError(422, ("body", k), "must be a form field, not a file")
                if k in fields:
                    raise InputError(422, ("body", k), "given more than once")
                check_field_size(k, v)
                if v.strip() != "":  # HTML forms send empty strings for blank inputs: use the default
                    fields[k] = v.strip()
            lists: dict[str, object] = {}
            for k in list_fields:
                vals = form.getlist(k)
                if any(isinstance(v, UploadFile) for v in vals):
                    raise InputError(422, ("body", k), "must be form fields, not files")
                for v in vals:
                    check_field_size(k, v)
                if len(vals) == 1 and vals[0].lstrip().startswith("["):  # one field holding a JSON list
                    vals = parse_json(vals[0].encode(), ("body", k))
                lists[k] = vals if vals else None
    elif ctype == "application/json" or ctype.endswith("+json"):
        body = parse_json(await request.body(), ("body",))
        if not isinstance(body, dict):
            raise InputError(422, ("body",), "JSON body must be an object", "model_attributes_type")
        if "image" not in body:
            raise InputError(422, ("body", "image"), "field required: base64-encoded image data", "missing")
        data = decode_base64(body.pop("image"), max_bytes)
        lists = {k: body.pop(k, None) for k in list_fields}
        fields = body
    else:
        raise InputError(415, ("header", "content-type"),
                         f"unsupported content type {ctype or '(none)'!r}: send multipart/form-data or application/json",
                         "unsupported_media_type")
    return RequestInput(data, fields, lists, t0, ctype.endswith("json"))


@contextlib.asynccontextmanager
async def read_form(request: Request, svc: ServiceState):
    """The parsed form; Starlette's 400s (too many files or fields, a part too large, malformed data) become the
    413/422 the API documents. A text field may hold the whole base64 image, so parts may be as large as the body
    limit; every field but the image is then held to MAX_FIELD_BYTES (check_field_size)."""
    try:
        form = await request.form(max_files=1, max_fields=MAX_FORM_FIELDS, max_part_size=svc.settings.body_limit)
    except (HTTPException, MultiPartException) as e:
        msg = getattr(e, "detail", None) or getattr(e, "message", str(e))
        if msg.startswith("Too many files"):
            raise InputError(422, ("body", "image"), "send exactly one file (the image)", "too_many") from None
        if msg.startswith("Too many fields"):
            raise InputError(422, ("body",), f"at most {MAX_FORM_FIELDS} form fields", "too_many") from None
        if "exceeded maximum size" in msg:
            raise InputError(413, ("body",), f"a form field is larger than the request body limit ({msg})",
                             "too_large") from None
        raise InputError(422, ("body",), f"malformed form data: {msg}", "form_invalid") from None
    except OSError as e:  # the upload could not be spooled (no writable temp dir, disk full): the server's problem
        log.error("cannot spool an upload to a temporary file: %s", e)
        raise ServiceUnavailable("the server cannot store uploads right now (no writable temporary space)",
                                 retry_after=30) from None
    try:
        yield form
    finally:
        await form.close()  # uploaded files spooled to disk


def check_field_size(name: str, value: str) -> None:
    if name != "image" and len(value) > MAX_FIELD_BYTES:
        raise InputError(422, ("body", name), f"is {len(value)} characters long; a form field other than the image "
                                              f"may hold at most {MAX_FIELD_BYTES}", "string_too_long")


def parse_json(raw: bytes, loc: tuple):
    """JSON text -> value, or 422 naming ``loc``: syntax errors, nesting past Python's recursion limit (the C
    parser raises RecursionError: 100,000 brackets cost microseconds) and integers longer than Python parses."""
    try:
        value = json.loads(raw)
    except (ValueError, RecursionError) as e:  # JSONDecodeError and the 4,300-digit integer limit are ValueErrors
        raise InputError(422, loc, f"invalid JSON: {e}", "json_invalid") from None
    # "\ud800" is valid JSON but no text: Python keeps the lone surrogate, and the first UTF-8 encoding of it (a
    # log line, a response) would fail after the model ran. Only escapes (or surrogates that json's decoder passes
    # through from the raw bytes) make one, so most bodies skip the walk.
    if b"\\u" in raw or b"\xed" in raw:
        where = _lone_surrogate(value, loc)
        if where is not None:
            raise InputError(422, where, "text holds a lone UTF-16 surrogate (\\ud800-\\udfff), which is not a "
                                         "character: send valid Unicode", "string_unicode")
    return value


_SURROGATE = re.compile("[\ud800-\udfff]")


def _lone_surrogate(value, loc: tuple) -> tuple | None:
    """Where in ``value`` (a key or a string) a lone surrogate sits, or None."""
    stack = [(value, loc)]
    while stack:
        v, at = stack.pop()
        if isinstance(v, str):
            if _SURROGATE.search(v):
                return at
        elif isinstance(v, dict):
            for k, x in v.items():
                if _SURROGATE.search(k):
                    return (*at, k.encode("utf-8", "backslashreplace").decode())
                stack.append((x, (*at, k)))
        elif isinstance(v, list):
            stack.extend((x, (*at, i)) for i, x in enumerate(v))
    return None


def remaining(svc: ServiceState, received: float) -> float:
    return max(svc.settings.request_timeout_s - (time.perf_counter() - received), 1e-3)


async def decode(svc: ServiceState, data: bytes, received: float):
    """Bytes -> uint8 pixels (S, S, 3) in the decode threads, within the request's time budget (504 past it);
    ImageRejected carries the 413/415/422 reason."""
    s, cap = svc.settings, svc.captioner
    loop = asyncio.get_running_loop()
    budget = remaining(svc, received)
    work = loop.run_in_executor(svc.decode_pool, load_upload, data, cap.cfg.preprocess,
                                s.max_upload_bytes, s.max_image_pixels, s.max_aspect_ratio, svc.decode_budget, budget)
    try:
        return await asyncio.wait_for(work, budget)
    except (asyncio.TimeoutError, TimeoutError):
        raise RequestTimeoutError("decoding the image took longer than the request timeout") from None


async def run(svc: ServiceState, job, request: Request, received: float, arrival=None):
    """Submit a job with the rest of the request's time budget; batcher errors map to 503/504/500. A client that
    disconnects while its job waits withdraws it (the batcher skips cancelled items): nobody would read the answer."""
    submit = asyncio.ensure_future(svc.batcher.submit(job, timeout=remaining(svc, received), arrival=arrival))
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        done, _ = await asyncio.wait({submit, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not submit.done():  # the client went (or this handler was cancelled): withdraw the job
            submit.cancel()
    if submit in done:
        return submit.result()
    raise ClientGone()


async def _disconnected(request: Request) -> None:
    """Returns when the client has gone. The body is fully read by now, so receive() only answers disconnect."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def model_ref(svc: ServiceState) -> ModelRef:
    cfg = svc.captioner.cfg
    return ModelRef(name=cfg.name, version=str(cfg.version))


def timings(received: float, decoded: float, result) -> Timings:
    now = time.perf_counter()
    return Timings(decode_ms=round((decoded - received) * 1000, 3), queue_ms=round(result.queue_s * 1000, 3),
                   inference_ms=round(result.inference_s * 1000, 3), total_ms=round((now - received) * 1000, 3))
