"""Optimisation steps shared by caption, VQA/joint and self-critical training."""
from __future__ import annotations

import math

import torch

from captioner.runtime import DTYPES, resolve_precision


def amp_settings(choice: str, device: torch.device) -> tuple[torch.dtype | None, bool]:
    """(autocast dtype or None, use GradScaler) for --amp: the precision names of captioner.runtime ('off' = fp32)."""
    precision = resolve_precision(choice, device)
    if precision == "fp32":
        return None, False
    dtype = DTYPES[precision]
    return dtype, dtype == torch.float16 and device.type == "cuda"


def lr_lambda(schedule: str, warmup: int, total: int):
    """Linear warm-up over ``warmup`` steps, but never more than a tenth of the run (a short run that is all
    warm-up never reaches its learning rate and learns nothing), then constant or cosine to zero."""
    warmup = min(warmup, total // 10)

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if schedule == "constant":
            return 1.0
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))
    return f


def optimizer_step(loss, optimizer, scheduler, scaler, params, grad_clip: float) -> None:
    """Backward (scaled for fp16), optional gradient clipping, optimizer and schedule step."""
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    if grad_clip > 0:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(params, grad_clip)
    scaler.step(optimizer)
    scaler.update()
    scheduler.step()
