"""Checkpoint directories: config.json + vocab.json + model.safetensors (+ metrics.json, README.md).

Loading never unpickles. Writing builds the directory beside the target and swaps it in with renames,
so a crash leaves either the old checkpoint or the new one, never a mix.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from .config import ModelConfig
from .fileio import atomic_dir, portable
from .model import CaptionModel
from .tokenizer import Vocabulary

CONFIG, VOCAB, WEIGHTS, METRICS, CARD = "config.json", "vocab.json", "model.safetensors", "metrics.json", "README.md"
# metrics.json keys of a VQA head's validation, beside the caption run's own (a joint model has both)
VQA_METRICS = ("vqa_dataset", "vqa_split", "val_accuracy", "val_chance", "val_accuracy_per_type", "val_vqa_loss")


class CheckpointError(ValueError):
    pass


def save_pretrained(
    model: CaptionModel,
    vocab: Vocabulary,
    path: str | Path,
    metrics: dict | None = None,
    card: str | None = None,
    dtype: torch.dtype | None = None,
    extra_files: dict[str, Any] | None = None,
) -> Path:
    """Write a checkpoint directory atomically. ``dtype`` (e.g. torch.float16) shrinks float weights on disk;
    ``extra_files`` maps file names to JSON-able objects (or to a callable(dir) that writes the file). The tasks of
    ``metrics`` (what training trained) are written into config.json too: a model says what it can do."""
    path = Path(path)
    if len(vocab) != model.cfg.vocab_size:
        raise CheckpointError(f"vocab has {len(vocab)} entries but config.vocab_size is {model.cfg.vocab_size}")
    def fill(tmp: Path) -> None:
        tasks = (metrics or {}).get("tasks")
        (tmp / CONFIG).write_text((replace(model.cfg, tasks=list(tasks)) if tasks else model.cfg).to_json())
        vocab.save(tmp / VOCAB)
        state = {}
        for k, t in model.state_dict().items():
            t = t.detach().to("cpu")
            if dtype is not None and t.is_floating_point():
                t = t.to(dtype)
            state[k] = t.contiguous()
        save_file(state, str(tmp / WEIGHTS), metadata={"format": "pt"})
        os.chmod(tmp / WEIGHTS, 0o644)  # safetensors writes 0600; the service may run as another user
        if metrics is not None:
            (tmp / METRICS).write_text(json.dumps(portable(metrics), indent=2))  # no build paths in a model
        if card is not None:
            (tmp / CARD).write_text(card)
        for name, obj in (extra_files or {}).items():
            obj(tmp) if callable(obj) else (tmp / name).write_text(json.dumps(obj, indent=2))

    return atomic_dir(path, fill)


def read_config(path: str | Path) -> ModelConfig:
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a checkpoint directory (expected {CONFIG}, {VOCAB}, {WEIGHTS})")
    for name in (CONFIG, VOCAB, WEIGHTS):
        if not (path / name).is_file():
            raise CheckpointError(f"{path}: missing {name}")
    try:
        d = json.loads((path / CONFIG).read_text())
        if isinstance(d, dict) and "tasks" not in d:  # saved before config.json said it: metrics.json did
            said = (read_metrics(path) or {}).get("tasks")
            if isinstance(said, list):  # a task whose head the config lacks was never true: drop it
                d["tasks"] = [t for t in said if t != "vqa" or d.get("vqa")] or None
        return ModelConfig.from_dict(d)
    except (json.JSONDecodeError, TypeError, ValueError, AttributeError) as e:
        raise CheckpointError(f"{path / CONFIG}: {e}") from None


MAX_PARAMETERS = 2**31  # 8 GiB of fp32 weights: far beyond any model of this design; a config past it is corrupt


class _NoWeightInit(torch.overrides.TorchFunctionMode):
    """Skip the weight fills of module constructors (torch.nn.init.*_, Tensor.normal_ ...) in a meta-device
    build: there is nothing to fill, and normal_ on a meta tensor imports torch._dynamo, 1.5 s of the first model
    load in every process (the CLI, the service, each Ray actor). A mode, unlike patching torch.nn.init, is local
    to this thread."""

    FILLS = frozenset({n for n in dir(torch.nn.init) if n.endswith("_") and not n.startswith("_")}
                      | {"normal_", "uniform_", "random_", "bernoulli_", "exponential_", "log_normal_", "cauchy_",
                         "geometric_"})

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if getattr(func, "__name__", "") in self.FILLS:
            t = args[0] if args else kwargs.get("tensor")
            if isinstance(t, torch.Tensor) and t.is_meta:
                return t
        return func(*args, **kwargs)


def _check_plausible(path: Path, cfg: ModelConfig) -> None:
    """Build the model on the meta device (no memory) and compare it with the weight file's header before any
    allocation: a config.json with hidden_dim 300000 must be a clear error, not a 360 GB allocation."""
    try:
        with torch.device("meta"), _NoWeightInit():
            shapes = {k: tuple(v.shape) for k, v in CaptionModel(cfg).state_dict().items()}
    except (ValueError, TypeError, RuntimeError) as e:
        raise CheckpointError(f"{path / CONFIG}: describes no buildable model ({e})") from None
    n = sum(math.prod(s) for s in shapes.values())
    if n > MAX_PARAMETERS:
        raise CheckpointError(f"{path / CONFIG}: implausible config: it describes a model of {n:,} parameters "
                              f"({n * 4 / 2**30:,.0f} GiB in fp32; the limit is {MAX_PARAMETERS:,}); check its "
                              "encoder and decoder sizes")
    try:
        with safe_open(str(path / WEIGHTS), framework="pt") as f:
            stored = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except (SafetensorError, OSError) as e:  # truncated or not a safetensors file
        raise CheckpointError(f"{path / WEIGHTS}: unreadable safetensors file ({e})") from None
    bad = [f"{k} {stored[k]} != {shapes[k]}" for k in shapes if k in stored and stored[k] != shapes[k]]
    if bad:  # load_state_dict would raise a bare RuntimeError
        raise CheckpointError(f"{path / WEIGHTS} does not match config.json: shape mismatch for {bad[:4]}")


def load_pretrained(path: str | Path, device: str | torch.device = "cpu") -> tuple[CaptionModel, Vocabulary]:
    path = Path(path)
    cfg = read_config(path)
    try:
        vocab = Vocabulary.load(path / VOCAB)
    except (json.JSONDecodeError, ValueError) as e:
        raise CheckpointError(f"{path / VOCAB}: {e}") from None
    if len(vocab) != cfg.vocab_size:
        raise CheckpointError(f"{path}: vocab.json has {len(vocab)} entries, config.vocab_size is {cfg.vocab_size}")
    _check_plausible(path, cfg)
    model = CaptionModel(cfg)
    try:
        state = load_file(str(path / WEIGHTS), device="cpu")
    except (SafetensorError, OSError) as e:  # the header was fine but the data is cut short
        raise CheckpointError(f"{path / WEIGHTS}: unreadable safetensors file ({e})") from None
    own = model.state_dict()
    state = {k: v.to(own[k].dtype) if k in own else v for k, v in state.items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise CheckpointError(f"{path / WEIGHTS} does not match config.json: missing {missing[:4]}, unexpected {unexpected[:4]}")
    return model.to(device).eval(), vocab


def read_metrics(path: str | Path) -> dict | None:
    f = Path(path) / METRICS
    return json.loads(f.read_text()) if f.is_file() else None


def load_training_state(path: str | Path) -> dict:
    """A run's training_state.pt (optimizer, scheduler, RNG, epoch), loaded without unpickling code
    (weights_only=True); a truncated or foreign file is a CheckpointError naming it, not a traceback."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path} not found")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001  (zip, pickle and EOF errors all mean: this file is damaged)
        raise CheckpointError(f"{path}: unreadable training state ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
                              "the run was interrupted while writing it or the file is damaged: resume from a "
                              "copy, or start the run again without --resume") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: not a training state (a {type(state).__name__}, expected a dict)")
    return state
