"""Distributed set-up in one place: torchrun sets RANK/WORLD_SIZE/LOCAL_RANK; nothing else is needed."""
from __future__ import annotations

import os

import torch
import torch.distributed as dist

from captioner.runtime import resolve_device


def init_distributed(device: str | None = None) -> tuple[int, int, torch.device]:
    """Return (rank, world_size, device); joins the process group when launched by torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device, local if world > 1 else None)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", rank=rank, world_size=world)
    return rank, world, dev


def is_main() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def cleanup() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


@torch.no_grad()
def average_buffers(module: torch.nn.Module) -> None:
    """Average floating-point buffers (BatchNorm running statistics) over ranks.

    DDP keeps parameters in step but each rank updates its own BN statistics; averaging them at the
    end of an epoch makes every rank (and the checkpoint) hold the same model.
    """
    if not dist.is_initialized():
        return
    world = dist.get_world_size()
    for b in module.buffers():
        if b.is_floating_point():
            dist.all_reduce(b)
            b.div_(world)
