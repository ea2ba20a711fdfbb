"""What the caption and VQA endpoints share: reading multipart or JSON bodies, decoding the image off the event
loop, submitting to the batcher with what is left of the request's time budget."""
from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field

from fastapi import Request
from starlette.datastructures import UploadFile

from ..errors import InputError, ServiceUnavailable
from ..images import ImageRejected, decode_base64, load_upload
from ..schemas import ModelRef, Timings
from ..state import ServiceState

MAX_FORM_FIELDS = 64
MAX_FIELD_BYTES = 64 * 1024  # one non-file multipart field (questions and choices are far shorter)


def service(request: Request) -> ServiceState:
    """The running service, or 503 while the model loads / after shutdown began."""
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


async def read_input(request: Request, svc: ServiceState, list_fields: tuple[str, ...] = ()) -> RequestInput:
    """multipart/form-data (``image`` file + fields, list fields repeated) or JSON ({"image": base64, ...})."""
    t0 = time.perf_counter()
    max_bytes = svc.settings.max_upload_bytes
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype in ("multipart/form-data", "application/x-www-form-urlencoded"):  # urlencoded: image as base64
        async with request.form(max_files=1, max_fields=MAX_FORM_FIELDS, max_part_size=MAX_FIELD_BYTES) as form:
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
                if v.strip() != "":  # HTML forms send empty strings for blank inputs: use the default
                    fields[k] = v.strip()
            lists: dict[str, object] = {}
            for k in list_fields:
                vals = form.getlist(k)
                if any(isinstance(v, UploadFile) for v in vals):
                    raise InputError(422, ("body", k), "must be form fields, not files")
                if len(vals) == 1 and vals[0].lstrip().startswith("["):  # one field holding a JSON list
                    try:
                        vals = json.loads(vals[0])
                    except json.JSONDecodeError:
                        pass
                lists[k] = vals if vals else None
    elif ctype == "application/json" or ctype.endswith("+json"):
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise InputError(422, ("body",), f"invalid JSON: {e}", "json_invalid") from None
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
    return RequestInput(data, fields, lists, t0)


async def decode(svc: ServiceState, data: bytes):
    """Bytes -> (3, S, S) tensor in the decode threads; ImageRejected carries the 413/415/422 reason."""
    s, cap = svc.settings, svc.captioner
    loop = asyncio.get_running_loop()
    return await loop.run_in_executor(svc.decode_pool, load_upload, data, cap.cfg.preprocess, cap.transform,
                                      s.max_upload_bytes, s.max_image_pixels)


async def run(svc: ServiceState, job, received: float, arrival=None):
    """Submit a job with the rest of the request's time budget; batcher errors map to 503/504/500."""
    remaining = svc.settings.request_timeout_s - (time.perf_counter() - received)
    return await svc.batcher.submit(job, timeout=max(remaining, 1e-3), arrival=arrival)


def model_ref(svc: ServiceState) -> ModelRef:
    cfg = svc.captioner.cfg
    return ModelRef(name=cfg.name, version=str(cfg.version))


def timings(received: float, decoded: float, result) -> Timings:
    now = time.perf_counter()
    return Timings(decode_ms=round((decoded - received) * 1000, 3), queue_ms=round(result.queue_s * 1000, 3),
                   inference_ms=round(result.inference_s * 1000, 3), total_ms=round((now - received) * 1000, 3))
