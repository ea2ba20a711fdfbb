"""POST /v1/captions: one image -> n-best captions with log-probabilities, model and timings."""
from __future__ import annotations

import time

from fastapi import APIRouter, HTTPException, Request
from pydantic import ValidationError

from ..engine import CaptionJob, GenParams
from ..errors import InputError
from ..schemas import CaptionOut, CaptionParams, CaptionResponse, finite
from .common import decode, model_ref, read_input, run, service, timings

router = APIRouter(tags=["captions"])

_PARAMS_SCHEMA = CaptionParams.model_json_schema()["properties"]
_OPENAPI = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {"schema": {
                "type": "object", "required": ["image"],
                "properties": {"image": {"type": "string", "format": "binary"}, **_PARAMS_SCHEMA}}},
            "application/json": {"schema": {
                "type": "object", "required": ["image"],
                "properties": {"image": {"type": "string", "format": "byte", "description": "base64 image data"},
                               **_PARAMS_SCHEMA}}},
        },
    }
}
_ERRORS = {413: {"description": "image or body too large, or too many pixels"},
           415: {"description": "unsupported image format or content type"},
           422: {"description": "invalid parameter or corrupt image; detail[].loc names the field"},
           401: {"description": "missing or invalid API key"}, 503: {"description": "busy or not ready (Retry-After)"},
           504: {"description": "timed out"}}


@router.post("/v1/captions", response_model=CaptionResponse, openapi_extra=_OPENAPI, responses=_ERRORS,
             summary="Caption an image")
async def create_captions(request: Request) -> CaptionResponse:
    """Send the image as a multipart ``image`` file with optional form fields, or as JSON ``{"image": base64}``
    with the same optional keys. Beam search by default; ``sample=true`` draws ``num_captions`` samples."""
    svc = service(request)
    if "caption" not in getattr(svc.captioner, "tasks", ["caption"]):
        raise HTTPException(501, "this model has no trained caption decoder (VQA-only checkpoint)")
    with svc.batcher.announce() as arrival:  # a forming batch may wait for this one while it decodes
        inp = await read_input(request, svc)
        try:
            p = CaptionParams.model_validate(inp.fields)
        except ValidationError as e:
            raise InputError.from_validation(e) from None
        pixels = await decode(svc, inp.image)
        decoded = time.perf_counter()
        params = GenParams(p.beam_size, p.num_captions, p.max_length, p.sample, p.temperature, p.top_k)
        res = await run(svc, CaptionJob(pixels, params), inp.received, arrival)
    caps = [CaptionOut(caption=c.text, log_prob=finite(c.log_prob), score=finite(c.score)) for c in res.value]
    return CaptionResponse(captions=caps, model=model_ref(svc), timings=timings(inp.received, decoded, res),
                           batch_size=res.batch_size)
