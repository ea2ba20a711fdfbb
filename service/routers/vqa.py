"""POST /v1/vqa: image + question + 2-32 choices -> the chosen answer, its index and every choice's probability."""
from __future__ import annotations

import time

from fastapi import APIRouter, Request

from captioner.tokenizer import tokenize

from ..engine import VQAJob, VQAUnsupported, has_vqa
from ..errors import InputError
from ..schemas import MAX_CHOICE_CHARS, MAX_CHOICES, MAX_QUESTION_CHARS, VQAResponse, error_responses
from .common import decode, model_ref, read_input, run, service, timings

router = APIRouter(tags=["vqa"])

# "at least one word" (the model's tokenizer must find one) and "distinct after tokenization" are rules JSON Schema
# cannot state exactly; the descriptions say them and the server answers 422 naming the field
_QUESTION = {"type": "string", "minLength": 1, "maxLength": MAX_QUESTION_CHARS,
             "description": "must contain at least one word"}
_CHOICES = {"type": "array", "minItems": 2, "maxItems": MAX_CHOICES, "uniqueItems": True,
            "items": {"type": "string", "minLength": 1, "maxLength": MAX_CHOICE_CHARS},
            "description": "answers with at least one word each, distinct after tokenization ('Red.' and 'red' "
                           "are the same answer)"}
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


def _norm(text: str) -> str:
    return " ".join(text.split())


def validate_vqa(question: object, choices: object, max_choices: int = MAX_CHOICES,
                 max_chars: int | None = None) -> tuple[str, list[str]]:
    """The question and choices with whitespace collapsed, or InputError (422) naming the field (and item)."""
    q_limit = min(MAX_QUESTION_CHARS, max_chars or MAX_QUESTION_CHARS)
    c_limit = min(MAX_CHOICE_CHARS, max_chars or MAX_CHOICE_CHARS)
    if question is None:
        raise InputError(422, ("body", "question"), "field required", "missing")
    if not isinstance(question, str):
        raise InputError(422, ("body", "question"), "must be a string", "string_type")
    if len(question) > q_limit:
        raise InputError(422, ("body", "question"), f"is {len(question)} characters long; the limit is {q_limit}",
                         "string_too_long")
    question = _norm(question)
    if not question or not tokenize(question):
        raise InputError(422, ("body", "question"), "must contain at least one word", "string_too_short")

    if choices is None:
        raise InputError(422, ("body", "choices"), "field required: 2 or more answers to choose from", "missing")
    if isinstance(choices, str) or not isinstance(choices, list):
        raise InputError(422, ("body", "choices"), "must be a list of strings", "list_type")
    if len(choices) < 2:
        raise InputError(422, ("body", "choices"), f"need at least 2 choices, got {len(choices)}", "too_short")
    if len(choices) > max_choices:
        raise InputError(422, ("body", "choices"), f"at most {max_choices} choices, got {len(choices)}", "too_long")
    out: list[str] = []
    seen: dict[str, int] = {}
    for i, c in enumerate(choices):
        loc = ("body", "choices", i)
        if not isinstance(c, str):
            raise InputError(422, loc, "must be a string", "string_type")
        if len(c) > c_limit:
            raise InputError(422, loc, f"is {len(c)} characters long; the limit is {c_limit}", "string_too_long")
        c = _norm(c)
        words = tokenize(c)
        if not words:
            raise InputError(422, loc, "must contain at least one word", "string_too_short")
        key = " ".join(words)  # "Red." and "red" are the same answer to the model
        if key in seen:
            raise InputError(422, loc, f"{c!r} duplicates choice {seen[key]} ({out[seen[key]]!r})", "duplicate")
        seen[key] = i
        out.append(c)
    return question, out


@router.post("/v1/vqa", response_model=VQAResponse, openapi_extra=_OPENAPI, responses=_ERRORS,
             summary="Answer a multiple-choice question about an image")
async def answer_question(request: Request) -> VQAResponse:
    """Multipart: ``image`` file, ``question`` field, ``choices`` repeated once per answer. JSON: ``{"image": base64,
    "question": "...", "choices": ["...", "..."]}``. Returns the most probable choice and every choice's probability."""
    svc = service(request)
    cap = svc.captioner
    if not has_vqa(cap):
        raise VQAUnsupported("this model has no VQA head")
    with svc.batcher.announce() as arrival:  # a forming batch may wait for this one while it decodes
        inp = await read_input(request, svc, list_fields=("choices",))
        unknown = sorted(set(inp.fields) - {"question"})
        if unknown:
            raise InputError(422, ("body", unknown[0]), "unknown field (expected image, question, choices)",
                             "extra_forbidden")
        vcfg = getattr(cap.cfg, "vqa", None)
        question, choices = validate_vqa(inp.fields.get("question"), inp.lists.get("choices"),
                                         min(MAX_CHOICES, getattr(vcfg, "max_choices", MAX_CHOICES)),
                                         getattr(vcfg, "max_chars", None))
        if vcfg is not None:  # the model's own rules, so nothing the model would reject reaches a batch
            from captioner.vqa import VQAInputError, check_choices, check_question

            for name, check, value in (("question", check_question, question), ("choices", check_choices, choices)):
                try:
                    check(value, vcfg)
                except VQAInputError as e:
                    raise InputError(422, ("body", name), str(e)) from None
        pixels = await decode(svc, inp.image, inp.received)
        decoded = time.perf_counter()
        res = await run(svc, VQAJob(pixels, question, choices), request, inp.received, arrival)
    request.state.batch_size = res.batch_size  # for the access log
    a = res.value
    return VQAResponse(answer=a.text, index=a.index, probs=[float(p) for p in a.probs], question=question,
                       choices=choices, model=model_ref(svc), timings=timings(inp.received, decoded, res),
                       batch_size=res.batch_size)
