"""POST /v1/captions: one image -> n-best captions with log-probabilities, model and timings."""
from __future__ import annotations

import time

from fastapi import APIRouter, HTTPException, Request
from pydantic import ValidationError

from ..engine import CaptionJob, GenParams
from ..errors import InputError
from ..schemas import CaptionOut, CaptionParams, CaptionResponse, error_responses, finite
from .common import decode, model_ref, read_input, run, service, timings

router = APIRouter(tags=["captions"])

_PARAMS_SCHEMA = CaptionParams.model_json_schema()["properties"]


def _not_null(prop: dict) -> dict:
    """A form field has no null: it is sent (a value) or left out (the default)."""
    kinds = [k for k in prop.get("anyOf", []) if k.get("type") != "null"]
    if len(kinds) != 1:
        return prop
    return {**{k: v for k, v in prop.items() if k not in ("anyOf", "default")}, **kinds[0]}


def _json_types(prop: dict) -> set[str]:
    return {k["type"] for k in prop.get("anyOf", [prop]) if "type" in k}


_JSON_TYPES = {k: _json_types(v) for k, v in _PARAMS_SCHEMA.items()}


def check_json_types(fields: dict) -> None:
    """JSON values come typed and must have the schema's JSON types: "3" is not an integer and 1 is not a boolean
    (pydantic's lax mode would take both), while 3.0 is an integer, as JSON Schema says."""
    errors = []
    for k, v in fields.items():
        kinds = _JSON_TYPES.get(k)
        if kinds is None or v is None:
            continue  # unknown fields and nulls: the model's own validation answers
        number = isinstance(v, (int, float)) and not isinstance(v, bool)
        if "boolean" in kinds:
            ok, want = isinstance(v, bool), "boolean"
        elif "integer" in kinds:  # (not float(v): a 400-digit int overflows it; the range check comes next)
            ok, want = number and (isinstance(v, int) or v.is_integer()), "integer"
        else:
            ok, want = number, "number"
        if not ok:
            errors.append({"loc": ["body", k], "msg": f"must be a JSON {want}", "type": f"{want}_type"})
    if errors:
        raise InputError(422, (), "; ".join(f"{e['loc'][1]}: {e['msg']}" for e in errors), errors=errors)


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
async def create_captions(request: Request) -> CaptionResponse:
    """Send the image as a multipart ``image`` file with optional form fields, or as JSON ``{"image": base64}``
    with the same optional keys. Beam search by default; ``sample=true`` draws ``num_captions`` samples."""
    svc = service(request)
    if "caption" not in getattr(svc.captioner, "tasks", ["caption"]):
        raise HTTPException(501, "this model has no trained caption decoder (VQA-only checkpoint)")
    with svc.batcher.announce() as arrival:  # a forming batch may wait for this one while it decodes
        inp = await read_input(request, svc)
        if inp.json:
            check_json_types(inp.fields)
        try:
            p = CaptionParams.model_validate(inp.fields)
        except ValidationError as e:
            raise InputError.from_validation(e) from None
        pixels = await decode(svc, inp.image, inp.received)
        decoded = time.perf_counter()
        params = GenParams(p.beam_size, p.num_captions, p.max_length, p.sample, p.temperature, p.top_k)
        res = await run(svc, CaptionJob(pixels, params), request, inp.received, arrival)
    request.state.batch_size = res.batch_size  # for the access log
    caps = [CaptionOut(caption=c.text, log_prob=finite(c.log_prob), score=finite(c.score)) for c in res.value]
    return CaptionResponse(captions=caps, model=model_ref(svc), timings=timings(inp.received, decoded, res),
                           batch_size=res.batch_size)
