"""The one training engine: the epoch loop, AMP, gradient clipping, the LR schedule, resume, metrics.jsonl, progress
and curves.png, for every objective (caption cross-entropy and SCST in train.py, VQA and joint in train_vqa.py,
distillation in distill.py). An objective supplies only what is its own:

    objective.optimizer()            the optimizer over its parameter groups; .total_steps() for the schedule
    objective.begin_epoch(epoch)     freeze/unfreeze, datasets, loaders, train/eval modes
    objective.batches(epoch)         the epoch's training batches, prepared (captions picked, moved to the device)
    objective.step(batch)            -> (loss, {name: (sum, count)} to average into train_<name>, images)
    objective.evaluate(epoch, row)   -> (row updates, selection score); rank 0 only
    objective.save(epoch, row, rows, is_best, state)   last/ (+ best/) in its own format, with the training state
    objective.load_state(state)      what resume restores besides optimizer, scheduler, scaler, RNG and rows
    objective.plot_keys              val metrics drawn (x100) beside the losses in curves.png

    fit(objective, optim, device)    runs optim.epochs epochs (from the saved state with --resume)

build_or_load_model() is the model every caption/VQA run starts from (new, --init-from, or --resume); what the run
was asked comes as training/options.py's dataclasses, never as the command line's Namespace.
"""
from __future__ import annotations

import json
import logging
import math
import random
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch.utils.data import DataLoader, DistributedSampler, RandomSampler, SequentialSampler
from tqdm import tqdm

from captioner.checkpoint import load_pretrained, save_pretrained
from captioner.config import VQAConfig
from captioner.data import collate
from captioner.model import CaptionModel
from captioner.runtime import autocast, resolve_precision
from captioner.tokenizer import Vocabulary

from .distributed import average_buffers, barrier, cleanup, init_distributed, is_main
from .optim import amp_settings, lr_lambda, optimizer_step
from .options import ModelOptions, Optimisation

log = logging.getLogger("captioner.engine")
STATE = "training_state.pt"


# ----------------------------------------------------------------------------- training state

def rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "python": list(random.getstate()[1]),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(s: dict) -> None:
    torch.set_rng_state(s["torch"])
    random.setstate((3, tuple(s["python"]), None))
    if s.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


def training_state(optimizer, scheduler, scaler, epoch: int, best: float, rows: list[dict], **extra) -> dict:
    """What --resume needs beside the weights; only tensors and plain types, so weights_only=True loads it."""
    return {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(),
            "epoch": epoch, "best": best, "rows": json.dumps(rows), "rng": rng_state(), **extra}


def restore_training_state(state: dict, optimizer, scheduler, scaler) -> tuple[int, float, list[dict]]:
    """Inverse of training_state(); returns (first epoch to run, best score so far, metric rows so far)."""
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    scaler.load_state_dict(state["scaler"])
    if isinstance(state["rng"], torch.Tensor):  # a distillation state written before the engine: torch's RNG only
        torch.set_rng_state(state["rng"])
    else:
        set_rng_state(state["rng"])
    return state["epoch"] + 1, state["best"], json.loads(state.get("rows", "[]"))


# ----------------------------------------------------------------------------- data and records

def make_loader(ds, batch_size: int, shuffle: bool, workers: int, seed: int, epoch: int, world: int, rank: int
                ) -> DataLoader:
    """A DataLoader over ``ds``: sharded by rank under DDP, reshuffled per epoch from the seed, the dataset's own
    collate (FeatureDataset) or the one image collate."""
    if world > 1:
        sampler = DistributedSampler(ds, world, rank, shuffle=shuffle, seed=seed, drop_last=shuffle)
        sampler.set_epoch(epoch)
    elif shuffle:
        sampler = RandomSampler(ds, generator=torch.Generator().manual_seed(seed * 1000 + epoch))
    else:
        sampler = SequentialSampler(ds)
    return DataLoader(ds, batch_size=batch_size, sampler=sampler, num_workers=workers,
                      collate_fn=getattr(ds, "collate", collate),
                      pin_memory=torch.cuda.is_available(), drop_last=False,
                      generator=torch.Generator().manual_seed(seed * 1000 + epoch + 1),
                      persistent_workers=False)


def setup(device: str, seed: int, per_rank_seed: bool = False) -> tuple[int, int, torch.device]:
    """Logging, the process group under torchrun, the seeds (per rank: each rank draws its own augmentations)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    rank, world, dev = init_distributed(device)
    torch.manual_seed(seed + (rank if per_rank_seed else 0))
    random.seed(seed + (rank if per_rank_seed else 0))
    return rank, world, dev


def build_or_load_model(opts: ModelOptions, out: Path, *, resume: bool, vocab: Callable[[], Vocabulary],
                        max_length: int, vqa: VQAConfig | None = None, fresh_decoder: bool = False,
                        fresh_vqa_head: VQAConfig | None = None) -> tuple[CaptionModel, Vocabulary]:
    """The model (on the CPU) and vocabulary a caption or VQA run starts from:

    resume           OUT/last as it was saved (the options are ignored);
    opts.init_from   that saved model (its config and vocabulary; the model options are ignored) in training mode,
                     with a new caption decoder (``fresh_decoder``: opts.fresh_decoder_config() of its own) and/or a
                     new VQA head (``fresh_vqa_head``: that config), built by CaptionModel.with_decoder/with_vqa_head;
                     its vocabulary is extended by the words of ``vocab()`` it lacks (CaptionModel.grow_vocab);
    else             a new model: opts.model_config() with the vocabulary ``vocab()`` builds, ``max_length``, the
                     run's name (OUT's) and the VQA head ``vqa``; the --encoder-weights loaded.
    """
    if resume:
        return load_pretrained(out / "last", "cpu")
    if opts.init_from:
        model, voc = load_pretrained(opts.init_from, "cpu")
        grown = voc.extended(vocab().itos)  # words it has (the specials too) are skipped
        if len(grown) > len(voc):  # else answers like "triangle" would all read <unk>, and tie
            if is_main():
                log.info("the vocabulary grows by %d words this run's texts use (%s)", len(grown) - len(voc),
                         ", ".join(grown.itos[len(voc):len(voc) + 8]) + (", ..." if len(grown) - len(voc) > 8 else ""))
            model.grow_vocab(len(grown))  # first, so that a fresh decoder or head is built at the new size
            voc = grown
        if fresh_decoder:
            model = model.with_decoder(opts.fresh_decoder_config(model.cfg.decoder))
        if fresh_vqa_head is not None:
            model = model.with_vqa_head(fresh_vqa_head)
        model.train()
        if is_main():
            log.info("starting from %s (its config and vocabulary; model flags ignored)", opts.init_from)
        return model, voc
    voc = vocab()
    model = CaptionModel(opts.model_config(len(voc), max_length, out.name, vqa))
    if opts.encoder_weights:
        model.encoder.load_imagenet(opts.encoder_weights)
    return model, voc


def save_model_dirs(model, vocab, out: Path, metrics: dict, state: dict, is_best: bool, card: str) -> None:
    """A caption/VQA model's last/ (with the training state) and, when it is the best so far, best/ (with its card)."""
    save_pretrained(model, vocab, out / "last", metrics=metrics, extra_files={STATE: lambda d: torch.save(state, d / STATE)})
    if is_best:
        save_pretrained(model, vocab, out / "best", metrics=metrics, card=card)


# ----------------------------------------------------------------------------- the loop

class Objective:
    """Base class of the objectives; see the module docstring for what each method supplies."""
    model: torch.nn.Module  # what average_buffers() synchronises across DDP ranks
    out: Path  # the run directory (metrics.jsonl, curves.png)
    schedule: str = "cosine"
    plot_keys: tuple[str, ...] = ()
    log_keys: tuple[str, ...] = ("loss",)  # the train_<key> every epoch row has (0.0 for an epoch without batches)
    desc: str = "epoch"

    def optimizer(self) -> torch.optim.Optimizer: raise NotImplementedError
    def total_steps(self) -> int: raise NotImplementedError
    def begin_epoch(self, epoch: int) -> None: pass
    def batches(self, epoch: int): raise NotImplementedError
    def step(self, batch) -> tuple[torch.Tensor, dict, int]: raise NotImplementedError
    def trainable(self) -> list[torch.nn.Parameter]: return [p for p in self.model.parameters() if p.requires_grad]
    def evaluate(self, epoch: int, row: dict) -> tuple[dict, float]: raise NotImplementedError
    def save(self, epoch: int, row: dict, rows: list[dict], is_best: bool, state: dict) -> None: raise NotImplementedError
    def load_state(self, state: dict) -> None: pass
    def log_line(self, row: dict) -> str: return ", ".join(f"{k} {v:.4g}" for k, v in row.items()
                                                           if isinstance(v, float))


def fit(obj: Objective, optim: Optimisation, device: torch.device, state: dict | None = None,
        best: float = -math.inf) -> None:
    """optim.epochs epochs of ``obj`` on ``device`` (up to optim.stop_after): optim.amp, .grad_clip, .warmup_steps;
    ``state``: a loaded training state to resume from (optimizer, scheduler, scaler, RNG, rows, the objective's
    own)."""
    precision, use_scaler = resolve_precision(optim.amp, device), amp_settings(optim.amp, device)[1]
    optimizer = obj.optimizer()
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(obj.schedule, optim.warmup_steps, obj.total_steps()))
    scaler = torch.amp.GradScaler(device.type, enabled=use_scaler)
    start, rows = 0, []
    if state is not None:
        start, best, rows = restore_training_state(state, optimizer, scheduler, scaler)
        obj.load_state(state)
        if is_main():
            log.info("resumed %s at epoch %d (best score %.4f)", obj.out, start, best)
    end = min(optim.epochs, optim.stop_after or optim.epochs)  # --stop-after: a time-boxed stage
    for epoch in range(start, end):
        obj.begin_epoch(epoch)
        t0 = time.perf_counter()
        row = {"epoch": epoch, **train_one_epoch(obj, optimizer, scheduler, scaler, optim.grad_clip, epoch, device,
                                                  precision)}
        average_buffers(obj.model)
        row["lr"] = optimizer.param_groups[0]["lr"]
        row["train_seconds"] = time.perf_counter() - t0
        if is_main():
            updates, score = obj.evaluate(epoch, row)
            row.update(updates)
            rows.append(row)
            log.info("epoch %d: %s", epoch, obj.log_line(row))
            is_best = score > best
            best = max(best, score)
            obj.save(epoch, row, rows, is_best, training_state(optimizer, scheduler, scaler, epoch, best, rows))
            with open(obj.out / "metrics.jsonl", "a") as f:
                f.write(json.dumps(row) + "\n")
            plot(rows, obj.out / "curves.png", obj.plot_keys)
        barrier()
    cleanup()


def train_one_epoch(obj: Objective, optimizer, scheduler, scaler, grad_clip: float, epoch: int, device,
                    precision: str) -> dict:
    sums: dict[str, list[float]] = {k: [0.0, 0] for k in obj.log_keys}
    n_img, t0 = 0, time.perf_counter()
    params = obj.trainable()
    bar = tqdm(obj.batches(epoch), desc=f"{obj.desc} {epoch}", disable=not is_main(), dynamic_ncols=True,
               leave=False)
    for batch in bar:
        with autocast(device, precision):
            loss, logs, n = obj.step(batch)
        optimizer_step(loss, optimizer, scheduler, scaler, params, grad_clip)
        for k, (s, c) in logs.items():
            acc = sums.setdefault(k, [0.0, 0])
            acc[0] += s
            acc[1] += c
        n_img += n
        bar.set_postfix(**{k: f"{s / max(1, c):.3f}" for k, (s, c) in sums.items()},
                        img_s=f"{n_img / (time.perf_counter() - t0):.0f}")
    return {**{f"train_{k}": s / max(1, c) for k, (s, c) in sums.items()},
            "train_images_per_s": n_img / (time.perf_counter() - t0)}


def plot(rows: list[dict], path: Path, keys: tuple[str, ...]) -> None:
    """curves.png: every loss on the left, the objective's val metrics (x100) on the right."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ep = [r["epoch"] for r in rows]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    for k in sorted({k for r in rows for k in r if k.endswith("loss") and isinstance(r[k], float)}):
        a.plot(ep, [r.get(k) for r in rows], "o-", label=k)
    a.set_xlabel("epoch"), a.set_ylabel("loss"), a.legend()
    for k in keys:
        if any(r.get(k) is not None for r in rows):
            b.plot(ep, [None if r.get(k) is None else 100 * r[k] for r in rows], "o-", label=k)
    b.set_xlabel("epoch"), b.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
