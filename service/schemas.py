"""Request parameters and response bodies (pydantic): they validate input and document /docs."""
from __future__ import annotations

import math
from dataclasses import fields

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, create_model, field_validator

from captioner.generation import GenerationConfig

MAX_BEAM = 10
MAX_LENGTH = 100
MAX_QUESTION_CHARS = 500
MAX_CHOICE_CHARS = 200
MAX_CHOICES = 32
MIN_TEMPERATURE = 0.01  # below it sampling is greedy decoding in all but name

# what one request may cost, on top of GenerationConfig's own rules
LIMITS = {"beam_size": {"le": MAX_BEAM}, "num_captions": {"le": MAX_BEAM}, "max_length": {"le": MAX_LENGTH},
          "temperature": {"ge": MIN_TEMPERATURE, "le": 10}, "top_k": {"le": 10_000}}
NOTES = {"attention": "; other models answer 422"}


class _GenerationFields(BaseModel):
    model_config = ConfigDict(extra="forbid")

    @field_validator("*", mode="before")
    @classmethod
    def _form_bool(cls, v: object, info: ValidationInfo) -> object:
        # a form field is text: only true/false (any case) mean a boolean, not pydantic's lax 0/1/on/off/yes/no
        if isinstance(v, str) and cls.model_fields[info.field_name].annotation is bool:
            if v.lower() not in ("true", "false"):
                raise ValueError("must be true or false")
            return v.lower() == "true"
        return v

    def generation(self) -> GenerationConfig:
        """The request's GenerationConfig; GenerationConfigError (naming the field) for what the schema cannot
        say, such as num_captions > beam_size without sampling."""
        return GenerationConfig(**self.model_dump())


def _request_field(f) -> tuple:
    """A GenerationConfig field as a request field: its type, default, help and bounds, within LIMITS."""
    base, _, optional = f.type.partition(" | ")
    kind = {"int": int, "float": float, "bool": bool}[base]
    bounds = {k: v for k, v in f.metadata.items() if k in ("ge", "gt")} | LIMITS.get(f.name, {})
    return (kind | None if optional else kind,
            Field(f.default, description=f.metadata["help"] + NOTES.get(f.name, ""), **bounds))


CaptionParams = create_model(
    "CaptionParams", __base__=_GenerationFields,
    __doc__="Generation settings: multipart form fields next to ``image``, or JSON keys next to ``image``.",
    **{f.name: _request_field(f) for f in fields(GenerationConfig)})


def _json_types(prop: dict) -> set[str]:
    return {k["type"] for k in prop.get("anyOf", [prop]) if "type" in k}


_JSON_TYPES = {k: _json_types(v) for k, v in CaptionParams.model_json_schema()["properties"].items()}


def check_json_types(fields: dict) -> None:
    """JSON values come typed and must have the schema's JSON types: "3" is not an integer and 1 is not a boolean
    (pydantic's lax mode would take both), while 3.0 is an integer, as JSON Schema says."""
    errors: list[dict] = []
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
        from .errors import InputError

        raise InputError(422, (), "; ".join(f"{e['loc'][1]}: {e['msg']}" for e in errors), errors=errors)


class CaptionOut(BaseModel):
    caption: str
    log_prob: float | None = Field(description="sum of token log-probabilities, <eos> included")
    score: float | None = Field(description="ranking score (length-normalised when configured)")
    words: list[str] | None = Field(None, description="with attention=true: the caption's word tokens")
    attention: list[list[list[float]]] | None = Field(
        None, description="with attention=true: per word, the attention map that produced it, an S x S grid over the "
                          "centre crop (rows top to bottom), summing to 1")


class ModelRef(BaseModel):
    name: str
    version: str


class Timings(BaseModel):
    decode_ms: float = Field(description="reading the upload, decoding and preprocessing the image")
    queue_ms: float = Field(description="waiting for a batch")
    inference_ms: float = Field(description="the batch on the model")
    total_ms: float = Field(description="request received -> response ready")


class CaptionResponse(BaseModel):
    captions: list[CaptionOut]
    model: ModelRef
    timings: Timings
    batch_size: int = Field(description="requests in the model batch that served this one")


class VQAResponse(BaseModel):
    answer: str
    index: int = Field(description="position of the answer in choices (0-based)")
    probs: list[float] = Field(description="probability of every choice, in the order given")
    question: str
    choices: list[str]
    unknown_words: list[str] = Field(default_factory=list, description="words of the question and choices outside "
                                     "the model's vocabulary: it reads each as the same unknown word")
    model: ModelRef
    timings: Timings
    batch_size: int


def finite(x: float) -> float | None:
    """JSON has no inf/nan."""
    return x if math.isfinite(x) else None


# ---------------------------------------------------------------------------------------------- error bodies

class ErrorItem(BaseModel):
    loc: list[str | int] = Field(description="where: ['body', field, (item)] or ['header', name]")
    msg: str
    type: str


class InputErrorBody(BaseModel):
    """FastAPI's validation shape: input errors (408, 413, 415, 422)."""
    detail: list[ErrorItem]


class ErrorBody(BaseModel):
    """Every other error: a message, and for 500 the id logged with the traceback."""
    detail: str
    error_id: str | None = None


_ERROR_TEXT = {
    401: (ErrorBody, "missing or invalid API key (only when the server has API keys; WWW-Authenticate: Bearer)"),
    408: (InputErrorBody, "the request body paused longer than the client timeout, or was not complete within "
                          "the request timeout"),
    413: (InputErrorBody, "upload, body or a form part too large, or an image with too many pixels"),
    415: (InputErrorBody, "not an image, an image format the service does not take, or an unsupported content type"),
    422: (InputErrorBody, "a bad parameter, question or choice, a missing, corrupt, truncated or too elongated "
                          "image, or malformed JSON/form data; detail[].loc names the field"),
    500: (ErrorBody, "the model raised on this request alone (its batch neighbours were answered); error_id is in "
                     "the server log"),
    501: (ErrorBody, "the model lacks the head this endpoint needs"),
    503: (ErrorBody, "queue full, model loading, or shutting down (Retry-After); an upload cut at shutdown"),
    504: (ErrorBody, "not answered within the request timeout (decoding and queueing included)"),
}


def error_responses(*codes: int) -> dict:
    """OpenAPI ``responses`` for a route's error codes, with their body schemas."""
    return {c: {"model": _ERROR_TEXT[c][0], "description": _ERROR_TEXT[c][1]} for c in codes}
