"""GET /v1/models: what the service runs (name, version, architecture, vocabulary, model card metrics, limits)."""
from __future__ import annotations

from dataclasses import asdict

from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from captioner.checkpoint import CARD

from ..schemas import MAX_BEAM, MAX_CHOICES, MAX_LENGTH, ErrorBody, error_responses
from .common import service

router = APIRouter(tags=["models"])


def describe(svc) -> dict:
    cap = svc.captioner
    cfg = cap.cfg
    enc, dec = cfg.encoder, cfg.decoder
    vqa_cfg = cfg.vqa if cap.can_answer else None
    return {
        "name": cfg.name,
        "version": str(cfg.version),
        "tasks": cap.tasks,
        "architecture": {
            "encoder": {"arch": enc.arch, "batch_norm": enc.batch_norm, "feature_dim": enc.feature_dim},
            "decoder": {"cell": dec.cell, "inject": dec.inject, "embed_dim": dec.embed_dim,
                        "hidden_dim": dec.hidden_dim, "num_layers": dec.num_layers, "members": dec.members},
            "vqa": asdict(vqa_cfg) if vqa_cfg is not None else None,
            "image_size": cfg.preprocess.image_size,
            "resize": cfg.preprocess.resize,  # the crop is the centre image_size/resize of the shorter side
            # attention models: the side of the grid each word's map covers (the centre crop)
            "attention_grid": cfg.grid_size if cfg.attention else None,
            "parameters": sum(p.numel() for p in cap.model.parameters()),
        },
        "vocab_size": cfg.vocab_size,
        "max_length": cfg.max_length,
        "metrics": cap.metrics,  # the model card's numbers (metrics.json), None when the checkpoint has none
        "device": str(cap.device),
        "precision": cap.precision,  # what runs: 'auto' resolved for this device
        "precision_setting": svc.settings.precision,
        "limits": {"beam_size": MAX_BEAM, "max_length": MAX_LENGTH,
                   "choices": min(MAX_CHOICES, vqa_cfg.max_choices) if vqa_cfg else MAX_CHOICES,
                   "max_upload_bytes": svc.settings.max_upload_bytes,
                   "max_image_pixels": svc.settings.max_image_pixels},
        "batching": {"max_batch_size": svc.settings.max_batch_size, "max_delay_ms": svc.settings.max_delay_ms,
                     "encode_batch_size": cap.encode_chunk, "channels_last": svc.settings.channels_last,
                     "model_workers": svc.model_workers},
    }


# response_class=Response: errors are documented as JSON, the card itself as text/markdown
@router.get("/v1/models/card", summary="The served model's card (Markdown)", response_class=Response,
            responses={200: {"description": "the card", "content": {"text/markdown": {"schema": {"type": "string"}}}},
                       **error_responses(401, 503),
                       404: {"model": ErrorBody, "description": "the model directory has no README.md card"}})
async def model_card(request: Request):
    svc = await service(request)
    card = Path(svc.captioner.path or "") / CARD
    if not svc.captioner.path or not card.is_file():
        return JSONResponse({"detail": "this model has no card (README.md)"}, status_code=404)
    return Response(card.read_text(encoding="utf-8"), media_type="text/markdown; charset=utf-8")


@router.get("/v1/models", summary="The served model", responses=error_responses(401, 503))
async def list_models(request: Request) -> dict:
    return {"models": [describe(await service(request))]}
