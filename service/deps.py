"""What the routes take, as FastAPI dependencies (the FastAPI template's deps.py): the running service (503 while it
loads or stops), with the head the route needs (501 otherwise), a place announced in the forming batch, and the
parsed, validated request. The routers then only submit the job and shape the answer.

    async def create_captions(request: Request, svc: CaptionService, arrival: Arrival, inp: CaptionInput): ...
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, HTTPException, Request
from pydantic import ValidationError

from captioner.config import VQAConfig
from captioner.generation import GenerationConfig, GenerationConfigError
from captioner.tokenizer import Vocabulary
from captioner.vqa import VQAInputError, check_choices, check_question

from .engine import VQAUnsupported
from .errors import InputError
from .routers.common import RequestInput, read_input, service
from .schemas import MAX_CHOICE_CHARS, MAX_CHOICES, MAX_QUESTION_CHARS, CaptionParams, check_json_types
from .state import ServiceState


# async, so FastAPI runs them on the event loop (a sync dependency runs in a worker thread; the batcher's counters
# and events are the loop's own)
async def _captioning(svc: Annotated[ServiceState, Depends(service)]) -> ServiceState:
    if not svc.captioner.can_caption:
        raise HTTPException(501, "this model has no trained caption decoder (VQA-only checkpoint)")
    return svc


async def _answering(svc: Annotated[ServiceState, Depends(service)]) -> ServiceState:
    if not svc.captioner.can_answer:
        raise VQAUnsupported("this model has no VQA head")
    return svc


CaptionService = Annotated[ServiceState, Depends(_captioning)]
VQAService = Annotated[ServiceState, Depends(_answering)]


async def _announce(svc: Annotated[ServiceState, Depends(service)]):
    """The request counts as 'on its way' while it uploads and decodes, so a forming batch may wait for it;
    submitting it (or failing first) ends that."""
    with svc.batcher.announce() as arrival:
        yield arrival


Arrival = Annotated[object, Depends(_announce)]


@dataclass
class CaptionRequest:
    raw: RequestInput
    generation: GenerationConfig


async def _caption_input(request: Request, svc: Annotated[ServiceState, Depends(service)]) -> CaptionRequest:
    inp = await read_input(request, svc)
    if inp.json:
        check_json_types(inp.fields)
    try:
        params = CaptionParams.model_validate(inp.fields)
    except ValidationError as e:
        raise InputError.from_validation(e) from None
    try:
        return CaptionRequest(inp, params.generation())
    except GenerationConfigError as e:  # the rules across fields, in the words every interface uses
        raise InputError(422, ("body", e.field), str(e)) from None


CaptionInput = Annotated[CaptionRequest, Depends(_caption_input)]


@dataclass
class VQARequest:
    raw: RequestInput
    question: str
    choices: list[str]


def validate_vqa(question: object, choices: object, cfg: VQAConfig | None = None,
                 vocab: Vocabulary | None = None) -> tuple[str, list[str]]:
    """The question and choices, whitespace collapsed, by the model's own checks (captioner.vqa) under the API's
    stricter limits, choices the model cannot tell apart included; a VQAInputError becomes the 422 naming the
    field (and the choice)."""
    cfg = cfg or VQAConfig()
    try:
        return (check_question(question, cfg, max_chars=MAX_QUESTION_CHARS),
                check_choices(choices, cfg, max_chars=MAX_CHOICE_CHARS, max_choices=MAX_CHOICES, vocab=vocab))
    except VQAInputError as e:
        loc = ("body", e.field or "body", *(() if e.index is None else (e.index,)))
        raise InputError(422, loc, str(e), e.kind) from None


async def _vqa_input(request: Request, svc: Annotated[ServiceState, Depends(service)]) -> VQARequest:
    inp = await read_input(request, svc, list_fields=("choices",))
    unknown = sorted(set(inp.fields) - {"question"})
    if unknown:
        raise InputError(422, ("body", unknown[0]), "unknown field (expected image, question, choices)",
                         "extra_forbidden")
    question, choices = validate_vqa(inp.fields.get("question"), inp.lists.get("choices"),
                                     svc.captioner.cfg.vqa, svc.captioner.vocab)
    return VQARequest(inp, question, choices)


VQAInput = Annotated[VQARequest, Depends(_vqa_input)]
