"""POST /v1/captions: one image -> n-best captions with log-probabilities, model and timings."""
from __future__ import annotations

import time

from fastapi import APIRouter, Request

from ..deps import Arrival, CaptionInput, CaptionService
from ..engine import CaptionJob
from ..errors import InputError
from ..schemas import CaptionOut, CaptionParams, CaptionResponse, error_responses, finite
from .common import decode, model_ref, run, timings

router = APIRouter(tags=["captions"])

_PARAMS_SCHEMA = CaptionParams.model_json_schema()["properties"]


def _not_null(prop: dict) -> dict:
    """A form field has no null: it is sent (a value) or left out (the default)."""
    kinds = [k for k in prop.get("anyOf", []) if k.get("type") != "null"]
    if len(kinds) != 1:
        return prop
    return {**{k: v for k, v in prop.items() if k not in ("anyOf", "default")}, **kinds[0]}


_FORM = {"type": "object", "required": ["image"], "additionalProperties": False,
         "properties": {"image": {"type": "string", "format": "binary", "minLength": 1},
                        **{k: _not_null(v) for k, v in _PARAMS_SCHEMA.items()}}}
_OPENAPI = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {"schema": _FORM},
            "application/x-www-form-urlencoded": {"schema": {**_FORM, "properties": {
                **_FORM["properties"], "image": {"type": "string", "minLength": 1, "description": "base64 image data"}}}},
            "application/json": {"schema": {
                "type": "object", "required": ["image"], "additionalProperties": False,
                "properties": {"image": {"type": "string", "format": "byte", "minLength": 1,
                                         "description": "base64 image data (or a data:image/...;base64, URL)"},
                               **_PARAMS_SCHEMA}}},
        },
    }
}
_ERRORS = error_responses(401, 408, 413, 415, 422, 500, 501, 503, 504)


@router.post("/v1/captions", response_model=CaptionResponse, openapi_extra=_OPENAPI, responses=_ERRORS,
             summary="Caption an image")
async def create_captions(request: Request, svc: CaptionService, arrival: Arrival,
                          inp: CaptionInput) -> CaptionResponse:
    """Send the image as a multipart ``image`` file with optional form fields, or as JSON ``{"image": base64}``
    with the same optional keys. Beam search by default; ``sample=true`` draws ``num_captions`` samples;
    ``attention=true`` (attention models) adds each caption's words and per-word attention maps."""
    gen = inp.generation
    if gen.attention and not svc.captioner.has_attention:
        raise InputError(422, ("body", "attention"),
                         f"model {svc.captioner.cfg.name!r} has no attention decoder, so it has no attention maps; "
                         "serve a model trained with `captioner train --inject attention`, or leave attention out")
    pixels = await decode(svc, inp.raw.image, inp.raw.received)
    decoded = time.perf_counter()
    res = await run(svc, CaptionJob(pixels, gen), request, inp.raw.received, arrival)
    request.state.batch_size = res.batch_size  # for the access log
    caps = [CaptionOut(caption=c.text, log_prob=finite(c.log_prob), score=finite(c.score),
                       words=c.words if gen.attention else None, attention=c.attention if gen.attention else None)
            for c in res.value]
    return CaptionResponse(captions=caps, model=model_ref(svc), timings=timings(inp.raw.received, decoded, res),
                           batch_size=res.batch_size)
