"""Every knob of the service in one object: environment (CAPTIONER_*) and `captioner serve` flags fill the same fields.

    CAPTIONER_CHECKPOINT=/models/default CAPTIONER_MAX_BATCH_SIZE=64 CAPTIONER_API_KEYS=k1,k2 captioner serve
    captioner serve --checkpoint /models/default --max-batch-size 64 --api-key k1 --api-key k2

Flags win over the environment (pydantic-settings gives init arguments priority over env).
"""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from captioner.preprocess import MAX_ASPECT_RATIO


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="CAPTIONER_", extra="ignore")

    # model
    checkpoint: Path | None = Field(None, description="checkpoint directory (default: the model shipped in the package)")
    device: str | None = Field(None, description="cpu, cuda, cuda:1 ... (default: CUDA when available)")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="auto: bf16 where the CPU/GPU has it natively, fp16 on older GPUs, else fp32")
    warmup: bool = Field(True, description="run batches through the model before /readyz reports ready")
    channels_last: bool = Field(True, description="NHWC convolutions (faster on CPU oneDNN and GPU tensor cores)")
    torch_threads: int | None = Field(None, ge=1, le=256, description="torch intra-op threads in all (default: "
                                                                      "torch's), split among the model workers")
    encode_batch_size: int | None = Field(
        None, ge=1, le=1024, description="images per encoder call within a batch (Captioner's encode_chunk); the "
                                         "decoder always gets the whole batch (default: 8 on CPU, where small conv "
                                         "batches stay in cache; all on GPU)")

    encoder_backend: Literal["torch", "onnxruntime"] = Field(
        "torch", description="what runs the image encoder: torch, or onnxruntime on CPU (pip install "
                             "\"captioner[onnx]\"; exported in memory at load; bench/onnxrt.py compares them)")

    # HTTP
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    log_level: Literal["critical", "error", "warning", "info", "debug"] = "info"
    log_format: Literal["text", "json"] = Field("text", description="text lines, or one JSON object per line")
    access_log: bool = Field(True, description="one log line per request, with its id (also the X-Request-ID "
                                               "response header)")
    api_keys: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="accepted keys (env: comma-separated); empty = no authentication")
    cors_origins: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="origins allowed by CORS (env: comma-separated); '*' = any")

    # dynamic batching
    max_batch_size: int = Field(32, ge=1, le=1024)
    model_workers: int | None = Field(
        None, ge=1, le=64, description="batches the model runs at once, each in its own thread (default: 2 on a CPU "
                                       "with 2 or more torch threads, which are then split between them; 1 on GPU)")
    max_delay_ms: float = Field(5.0, ge=0, le=10_000,
                                description="after a batch's first request, wait at most this long for requests already "
                                            "received (still uploading/decoding); a lone request runs at once")
    max_queue: int = Field(256, ge=1, description="requests waiting beyond this are refused with 503")
    request_timeout_s: float = Field(30.0, gt=0, le=3600, description="a request not answered this long after its "
                                     "headers arrived gets 504 (408 if its body had not arrived) and is dropped")

    # slow clients and shutdown
    client_timeout_s: float = Field(10.0, gt=0, le=600, description="a connection whose request headers are not "
                                    "complete after this long is closed; a body that pauses this long gets 408")
    shutdown_timeout_s: float = Field(
        20.0, ge=0, le=600, description="after SIGTERM, uploads still arriving after this long are cut (503); "
                                        "requests already queued are answered, each within its request timeout")

    # input limits
    max_upload_bytes: int = Field(10 * 1024 * 1024, ge=1024)
    max_image_pixels: int = Field(40_000_000, ge=1, description="width x height above this is refused (413)")
    max_aspect_ratio: float = Field(MAX_ASPECT_RATIO, ge=1, le=10_000,
                                    description="longer side / shorter side above this is refused (422): "
                                                "preprocessing would resize a thin strip to millions of pixels")
    decode_workers: int = Field(4, ge=1, le=64, description="threads that decode and preprocess uploaded images")
    decode_memory_mb: int = Field(512, ge=16, le=1 << 20,
                                  description="decoded pixels in flight across requests, in MiB: decodes past it wait "
                                              "(an image needing more than it is decoded alone)")

    @field_validator("api_keys", "cors_origins", mode="before")
    @classmethod
    def _split_commas(cls, v: object) -> object:
        if isinstance(v, str):
            return [s.strip() for s in v.split(",") if s.strip()]
        return v

    @field_validator("checkpoint", "device", mode="before")
    @classmethod
    def _empty_is_none(cls, v: object) -> object:
        # docker-compose passes unset variables as "", which means "use the default"
        return None if isinstance(v, str) and not v.strip() else v

    @field_validator("api_keys")
    @classmethod
    def _keys_not_trivial(cls, v: list[str]) -> list[str]:
        for k in v:
            if len(k) < 8:
                raise ValueError("API keys must be at least 8 characters long")
        return v

    @property
    def body_limit(self) -> int:
        """The largest request body: an image at the upload limit, base64-encoded (4/3), plus the form fields."""
        return self.max_upload_bytes * 4 // 3 + 256 * 1024

    def public_dict(self) -> dict:
        """The settings without secrets, for logs."""
        d = self.model_dump(mode="json")
        d["api_keys"] = f"<{len(self.api_keys)} keys>"
        return d
