"""POST /v1/vqa: image + question + 2-32 choices -> the chosen answer, its index and every choice's probability."""
from __future__ import annotations

import time

from fastapi import APIRouter, Request

from captioner.vqa import unknown_words

from ..deps import Arrival, VQAInput, VQAService
from ..engine import VQAJob
from ..schemas import MAX_CHOICE_CHARS, MAX_CHOICES, MAX_QUESTION_CHARS, VQAResponse, error_responses
from .common import decode, model_ref, run, timings

router = APIRouter(tags=["vqa"])

# "at least one word" (the model's tokenizer must find one) and "distinct after tokenization" are rules JSON Schema
# cannot state exactly; the descriptions say them and the server answers 422 naming the field
_QUESTION = {"type": "string", "minLength": 1, "maxLength": MAX_QUESTION_CHARS,
             "description": "must contain at least one word"}
_CHOICES = {"type": "array", "minItems": 2, "maxItems": MAX_CHOICES, "uniqueItems": True,
            "items": {"type": "string", "minLength": 1, "maxLength": MAX_CHOICE_CHARS},
            "description": "answers with at least one word each, distinct after tokenization ('Red.' and 'red', "
                           "'café' composed and decomposed are the same answer) and to the model (two answers "
                           "made only of words outside its vocabulary, like 'giraffe' and 'zebra' for a model "
                           "that knows neither, are one answer to it; the 422 names the unknown words)"}
_FORM = {"type": "object", "required": ["image", "question", "choices"], "additionalProperties": False,
         "properties": {"image": {"type": "string", "format": "binary", "minLength": 1}, "question": _QUESTION,
                        "choices": {**_CHOICES, "description": "repeat the field once per choice, or send one "
                                                                "field holding a JSON list"}}}
_OPENAPI = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {"schema": _FORM, "encoding": {"choices": {"style": "form", "explode": True}}},
            "application/x-www-form-urlencoded": {
                "schema": {**_FORM, "properties": {**_FORM["properties"], "image": {
                    "type": "string", "minLength": 1, "description": "base64 image data"}}},
                "encoding": {"choices": {"style": "form", "explode": True}}},
            "application/json": {"schema": {
                "type": "object", "required": ["image", "question", "choices"], "additionalProperties": False,
                "properties": {
                    "image": {"type": "string", "format": "byte", "minLength": 1,
                              "description": "base64 image data (or a data:image/...;base64, URL)"},
                    "question": _QUESTION, "choices": _CHOICES}}},
        },
    }
}
_ERRORS = error_responses(401, 408, 413, 415, 422, 500, 501, 503, 504)


@router.post("/v1/vqa", response_model=VQAResponse, openapi_extra=_OPENAPI, responses=_ERRORS,
             summary="Answer a multiple-choice question about an image")
async def answer_question(request: Request, svc: VQAService, arrival: Arrival, inp: VQAInput) -> VQAResponse:
    """Multipart: ``image`` file, ``question`` field, ``choices`` repeated once per answer. JSON: ``{"image": base64,
    "question": "...", "choices": ["...", "..."]}``. Returns the most probable choice and every choice's probability."""
    pixels = await decode(svc, inp.raw.image, inp.raw.received)
    decoded = time.perf_counter()
    res = await run(svc, VQAJob(pixels, inp.question, inp.choices), request, inp.raw.received, arrival)
    request.state.batch_size = res.batch_size  # for the access log
    a = res.value
    return VQAResponse(answer=a.text, index=a.index, probs=[float(p) for p in a.probs], question=inp.question,
                       choices=inp.choices, unknown_words=unknown_words(svc.captioner.vocab, [inp.question,
                                                                                              *inp.choices]),
                       model=model_ref(svc), timings=timings(inp.raw.received, decoded, res), batch_size=res.batch_size)
