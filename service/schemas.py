"""Request parameters and response bodies (pydantic): they validate input and document /docs."""
from __future__ import annotations

import math

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

MAX_BEAM = 10
MAX_LENGTH = 100
MAX_QUESTION_CHARS = 500
MAX_CHOICE_CHARS = 200
MAX_CHOICES = 32


class CaptionParams(BaseModel):
    """Generation settings: multipart form fields next to ``image``, or JSON keys next to ``image``."""
    model_config = ConfigDict(extra="forbid")

    beam_size: int = Field(3, ge=1, le=MAX_BEAM, description="beam width (1 = greedy)")
    # declared before num_captions: fields validate in order and the num_captions check reads these two
    sample: bool = Field(False, description="sample instead of beam search (num_captions independent samples)")
    num_captions: int = Field(1, ge=1, le=MAX_BEAM, description="captions returned, best first (<= beam_size)")
    max_length: int | None = Field(None, ge=1, le=MAX_LENGTH, description="most words (default: the model's)")
    temperature: float = Field(1.0, gt=0, le=10, description="sampling temperature")
    top_k: int = Field(0, ge=0, le=10_000, description="sample from the k most likely words (0 = all)")

    @field_validator("num_captions")
    @classmethod
    def _not_more_than_beam(cls, v: int, info: ValidationInfo) -> int:
        beam = info.data.get("beam_size")
        if not info.data.get("sample", False) and beam is not None and v > beam:
            raise ValueError(f"num_captions ({v}) must be <= beam_size ({beam}) unless sample is true")
        return v


class CaptionOut(BaseModel):
    caption: str
    log_prob: float | None = Field(description="sum of token log-probabilities, <eos> included")
    score: float | None = Field(description="ranking score (length-normalised when configured)")


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
    model: ModelRef
    timings: Timings
    batch_size: int


def finite(x: float) -> float | None:
    """JSON has no inf/nan."""
    return x if math.isfinite(x) else None
