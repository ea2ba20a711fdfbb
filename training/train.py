"""Caption training: ``captioner train`` or ``torchrun --nproc_per_node=N -m captioner train``.

Teacher-forced cross-entropy, Adam + warmup/cosine, gradient clipping, AMP, DDP, per-epoch validation
(loss + beam-search COCO metrics), atomic ``last/`` and ``best/`` checkpoints and exact ``--resume``.
``--init-from DIR`` starts from a saved model (its config and vocabulary; the model flags are ignored), and
``--scst`` then fine-tunes it with self-critical sequence training on CIDEr-D (training/scst.py).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import random
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, RandomSampler, SequentialSampler
from tqdm import tqdm

from captioner.checkpoint import VQA_METRICS, load_pretrained, load_training_state, read_metrics, save_pretrained
from captioner.config import override_encoder, preset
from captioner.decoder import Decoder
from captioner.fileio import portable
from captioner.model import CaptionModel
from captioner.tokenizer import PAD_ID, Vocabulary

from .datasets import CaptionDataset, ImageRecord, collate, encode_captions, pad_captions, read_dataset
from .distributed import average_buffers, barrier, cleanup, init_distributed, is_main
from .cider import CiderD
from .features import FeatureDataset, cached_features
from .optim import amp_settings, lr_lambda, optimizer_step
from .scst import ScstLoss, reference_corpus, scst_one_epoch

log = logging.getLogger("captioner.train")
STATE = "training_state.pt"




# ----------------------------------------------------------------------------- helpers

def rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "python": list(random.getstate()[1]),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(s: dict) -> None:
    torch.set_rng_state(s["torch"])
    random.setstate((3, tuple(s["python"]), None))
    if s.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


def training_state(optimizer, scheduler, scaler, epoch: int, best: float, rows: list[dict]) -> dict:
    """What --resume needs beside the weights; only tensors and plain types, so weights_only=True loads it."""
    return {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(),
            "epoch": epoch, "best": best, "rows": json.dumps(rows), "rng": rng_state()}


def restore_training_state(state: dict, optimizer, scheduler, scaler) -> tuple[int, float, list[dict]]:
    """Inverse of training_state(); returns (first epoch to run, best score so far, metric rows so far)."""
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    scaler.load_state_dict(state["scaler"])
    set_rng_state(state["rng"])
    return state["epoch"] + 1, state["best"], json.loads(state["rows"])


class CaptionLoss(nn.Module):
    """Wraps the model so that DDP sees the whole training forward: (images | features) -> loss."""

    def __init__(self, model: CaptionModel, label_smoothing: float, image_blind: bool) -> None:
        super().__init__()
        self.model, self.ls, self.blind = model, label_smoothing, image_blind

    def forward(self, x: torch.Tensor, is_features: bool, rep: torch.Tensor, inp: torch.Tensor, tgt: torch.Tensor):
        if self.blind:
            v = x.new_zeros(x.size(0), self.model.cfg.encoder.feature_dim)
        else:
            v = x if is_features else self.model.encode(x)  # (B, D)
        return self.loss(v, rep, inp, tgt)

    def loss(self, v: torch.Tensor, rep: torch.Tensor, inp: torch.Tensor, tgt: torch.Tensor) -> torch.Tensor:
        """Teacher-forced cross-entropy of N captions; v (B, D), rep (N,) picks each caption's image."""
        logits = self.model.decoder(v[rep], inp)  # (N, T, V)
        return F.cross_entropy(logits.flatten(0, 1).float(), tgt.flatten(), ignore_index=PAD_ID,
                               label_smoothing=self.ls)


def pick_captions(indices: list[int], caps: list[list[torch.Tensor]], k: int, g: torch.Generator):
    seqs, rep = [], []
    for j, i in enumerate(indices):
        cs = caps[i]
        for c in torch.randperm(len(cs), generator=g)[: min(k, len(cs))].tolist():
            seqs.append(cs[c])
            rep.append(j)
    return seqs, torch.tensor(rep, dtype=torch.long)


# ----------------------------------------------------------------------------- epoch loops

def train_one_epoch(step_fn, model, optimizer, scheduler, scaler, loader, caps, args, epoch, device, amp_dtype, params):
    step_fn.train()
    if args.freeze_encoder_now:
        model.encoder.eval()  # frozen BatchNorm statistics stay put
    g = torch.Generator().manual_seed(args.seed * 1000 + epoch)
    total, count, n_img, t0 = 0.0, 0, 0, time.perf_counter()
    bar = tqdm(loader, desc=f"epoch {epoch}", disable=not is_main(), dynamic_ncols=True, leave=False)
    for batch in bar:
        if batch["images"].size(0) == 0:
            continue
        idx = batch["indices"].tolist()
        seqs, rep = pick_captions(idx, caps, args.captions_per_image, g)
        inp, tgt = pad_captions(seqs, args.max_length)
        x = batch["images"].to(device, non_blocking=True)
        if not batch.get("is_features") and args.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        ctx = torch.autocast(device.type, dtype=amp_dtype) if amp_dtype else contextlib.nullcontext()
        with ctx:
            loss = step_fn(x, bool(batch.get("is_features")), rep.to(device), inp.to(device), tgt.to(device))
        optimizer_step(loss, optimizer, scheduler, scaler, params, args.grad_clip)
        total += loss.item()
        count += 1
        n_img += len(idx)
        bar.set_postfix(loss=f"{total / count:.3f}", img_s=f"{n_img / (time.perf_counter() - t0):.0f}")
    return {"train_loss": total / max(1, count), "train_images_per_s": n_img / (time.perf_counter() - t0)}


@torch.no_grad()
def evaluate(model: CaptionModel, loader, records, caps, vocab: Vocabulary, args, device, amp_dtype) -> dict:
    """Validation loss (teacher forcing on every caption) and beam-search caption metrics."""
    from .metrics import score_captions

    model.eval()
    total, ntok, preds = 0.0, 0, {}
    for batch in tqdm(loader, desc="val", disable=not is_main(), dynamic_ncols=True, leave=False):
        if batch["images"].size(0) == 0:
            continue
        idx = batch["indices"].tolist()
        x = batch["images"].to(device)
        ctx = torch.autocast(device.type, dtype=amp_dtype) if amp_dtype else contextlib.nullcontext()
        with ctx:
            if args.image_blind:
                v = x.new_zeros(x.size(0), model.cfg.encoder.feature_dim)
            else:
                v = (x if batch.get("is_features") else model.encode(x)).float()
            seqs, rep = pick_captions(idx, caps, 1_000, torch.Generator().manual_seed(0))
            inp, tgt = pad_captions(seqs, args.max_length)
            logits = model.decoder(v[rep.to(device)], inp.to(device))
            total += F.cross_entropy(logits.flatten(0, 1).float(), tgt.to(device).flatten(), ignore_index=PAD_ID,
                                     reduction="sum").item()
            ntok += int((tgt != PAD_ID).sum())
            hyp = model.generate(features=v, beam_size=args.eval_beam, max_length=args.max_length)
        for i, t in zip(idx, hyp.tokens[:, 0].tolist()):
            preds[records[i].image_id] = vocab.decode(t)
    refs = {r.image_id: r.captions for r in records if r.image_id in preds}
    metrics = score_captions(preds, refs, use_java=False if args.no_java else None)
    metrics["val_loss"] = total / max(1, ntok)
    metrics["examples"] = dict(list(preds.items())[:5])
    return metrics


# ----------------------------------------------------------------------------- main

def read_records(args: argparse.Namespace) -> tuple[list[ImageRecord], list[ImageRecord]]:
    """The training and validation images, in the order (and so under the feature-cache keys) training uses."""
    train_rec = read_dataset(args.dataset, args.annotations, args.images, args.train_split)
    if args.dataset == "coco":
        if not (args.val_annotations and args.val_images):
            raise SystemExit("--dataset coco needs --val-annotations and --val-images")
        val_rec = read_dataset("coco", args.val_annotations, args.val_images, args.val_split)
    else:
        val_rec = read_dataset(args.dataset, args.val_annotations or args.annotations, args.val_images or args.images,
                               args.val_split)
    if args.max_train_images:
        train_rec = train_rec[: args.max_train_images]
    if args.max_val_images:
        val_rec = val_rec[: args.max_val_images]
    return train_rec, [r for r in val_rec if r.captions]


def _loader(ds, batch_size, shuffle, workers, seed, epoch, world, rank):
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


def _plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ep = [r["epoch"] for r in rows]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    a.plot(ep, [r["train_loss"] for r in rows], "o-", label="train")
    a.plot(ep, [r["val_loss"] for r in rows], "o-", label="val")
    a.set_xlabel("epoch"), a.set_ylabel("cross-entropy / token"), a.legend()
    b.plot(ep, [100 * r["CIDEr-D"] for r in rows], "o-", label="CIDEr-D")
    b.plot(ep, [100 * r["BLEU-4"] for r in rows], "o-", label="BLEU-4")
    b.set_xlabel("epoch"), b.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(args: argparse.Namespace) -> CaptionModel:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    rank, world, device = init_distributed(args.device)
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    out = Path(args.output)
    last = out / "last"
    amp_dtype, use_scaler = amp_settings(args.amp, device)
    check_args(args)

    train_rec, val_rec = read_records(args)

    state = None
    if args.resume:
        state = load_training_state(last / STATE)
        model, vocab = load_pretrained(last, "cpu")
    elif args.init_from:
        model, vocab = load_pretrained(args.init_from, "cpu")
        if args.fresh_decoder:
            model.cfg.decoder.members = 1
            model.decoder = Decoder(model.cfg.decoder, model.cfg.vocab_size, model.cfg.encoder.feature_dim)
        model.train()
        if is_main():
            log.info("starting from %s (its config and vocabulary; model flags ignored)", args.init_from)
    else:
        vocab = Vocabulary.build((c for r in train_rec for c in r.captions), min_count=args.min_count)
        cfg = preset(args.arch, cell=args.cell, inject=args.inject, embed_dim=args.embed_dim,
                     hidden_dim=args.hidden_dim, num_layers=args.num_layers, dropout=args.dropout)
        override_encoder(cfg, args.encoder_layers, args.fc_dims, args.image_size)
        cfg.vocab_size, cfg.max_length = len(vocab), args.max_length
        cfg.name = out.name
        model = CaptionModel(cfg)
        if args.encoder_weights:
            model.encoder.load_imagenet(args.encoder_weights)
    cfg = model.cfg
    model.to(device)
    if args.channels_last:
        model.encoder.to(memory_format=torch.channels_last)
    if is_main():
        log.info("train %d images, val %d images, vocab %d words, %.1fM parameters, device %s, amp %s, world %d",
                 len(train_rec), len(val_rec), len(vocab), sum(p.numel() for p in model.parameters()) / 1e6,
                 device, amp_dtype, world)

    train_caps = encode_captions(train_rec, vocab, args.max_length)
    val_caps = encode_captions(val_rec, vocab, args.max_length)
    enc_params = list(model.encoder.parameters())
    dec_params = list(model.decoder.parameters())
    optimizer = torch.optim.Adam([
        {"params": dec_params, "lr": args.lr},
        {"params": enc_params, "lr": args.encoder_lr or args.lr},
    ], weight_decay=args.weight_decay)
    steps_per_epoch = math.ceil(len(train_rec) / (args.batch_size * world))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(args.schedule, args.warmup_steps, steps_per_epoch * args.epochs))
    scaler = torch.amp.GradScaler(device.type, enabled=use_scaler)
    start_epoch, best, rows = 0, -1.0, []
    carried = carried_metrics(last if args.resume else args.init_from,
                              args.freeze_encoder and args.finetune_after < 0)
    if args.scst:
        refs = reference_corpus(train_caps)
        cider = CiderD(refs)
    if state is not None:
        start_epoch, best, rows = restore_training_state(state, optimizer, scheduler, scaler)
        if is_main():
            log.info("resumed from %s at epoch %d (best CIDEr-D %.3f)", last, start_epoch, best)

    for epoch in range(start_epoch, args.epochs):
        frozen = args.image_blind or (args.freeze_encoder and not (0 <= args.finetune_after <= epoch))
        args.freeze_encoder_now = frozen
        for p_ in enc_params:
            p_.requires_grad_(not frozen)
        if args.image_blind:  # the images are never looked at: skip reading them
            train_ds, val_ds = FeatureDataset.placeholder(len(train_rec)), FeatureDataset.placeholder(len(val_rec))
        elif frozen:  # encode every image once (or --feature-views crops of it), cached on disk
            train_ds = FeatureDataset(cached_features(model, train_rec, args.feature_cache, device, amp_dtype,
                                                      args.eval_batch_size, args.workers, args.feature_views))
            val_ds = FeatureDataset(cached_features(model, val_rec, args.feature_cache, device, amp_dtype,
                                                    args.eval_batch_size, args.workers))
        else:
            train_ds = CaptionDataset(train_rec, cfg.preprocess, train=True)
            val_ds = CaptionDataset(val_rec, cfg.preprocess, train=False)
        loss_mod = ScstLoss(model) if args.scst else CaptionLoss(model, args.label_smoothing, args.image_blind)
        step_fn = DistributedDataParallel(loss_mod) if world > 1 else loss_mod
        params = [p_ for p_ in model.parameters() if p_.requires_grad]
        t0 = time.perf_counter()
        loader = _loader(train_ds, args.batch_size, True, args.workers, args.seed, epoch, world, rank)
        if args.scst:
            stats = scst_one_epoch(step_fn, model, optimizer, scheduler, scaler, loader, cider, refs, args, epoch,
                                   device, amp_dtype, params)
        else:
            stats = train_one_epoch(step_fn, model, optimizer, scheduler, scaler, loader, train_caps, args, epoch,
                                    device, amp_dtype, params)
        row = {"epoch": epoch, **stats}
        average_buffers(model)
        row["lr"] = optimizer.param_groups[0]["lr"]
        row["train_seconds"] = time.perf_counter() - t0
        if is_main():
            vl = _loader(val_ds, args.eval_batch_size, False, args.workers, args.seed, epoch, 1, 0)
            m = evaluate(model, vl, val_rec, val_caps, vocab, args, device, amp_dtype)
            row.update({k: m[k] for k in ("val_loss", "BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR",
                                          "ROUGE-L", "CIDEr-D", "SPICE")})
            row["examples"] = m["examples"]
            rows.append(row)
            log.info("epoch %d: train loss %.3f, val loss %.3f, BLEU-4 %.1f, CIDEr-D %.1f, %.1f img/s", epoch,
                     row["train_loss"], row["val_loss"], 100 * row["BLEU-4"], 100 * row["CIDEr-D"],
                     row["train_images_per_s"])
            metrics = {**carried, "epoch": epoch, "split": args.val_split, "beam_size": args.eval_beam,
                       **{k: v for k, v in row.items() if k != "examples"}, "args": _jsonable(vars(args))}
            is_best = row["CIDEr-D"] > best
            best = max(best, row["CIDEr-D"])
            train_state = training_state(optimizer, scheduler, scaler, epoch, best, rows)
            save_pretrained(model, vocab, last, metrics=metrics,
                            extra_files={STATE: lambda d: torch.save(train_state, d / STATE)})
            if is_best:
                save_pretrained(model, vocab, out / "best", metrics=metrics, card=_card(metrics, cfg))
            with open(out / "metrics.jsonl", "a") as f:
                f.write(json.dumps({k: v for k, v in row.items()}) + "\n")
        barrier()
    if is_main() and rows:
        _plot(rows, out / "curves.png")
    cleanup()
    return model


def check_args(args: argparse.Namespace) -> None:
    if args.scst:
        if not (args.init_from or args.resume):
            raise SystemExit("--scst fine-tunes a trained model: give --init-from RUN/best (or --resume)")
        if args.image_blind:
            raise SystemExit("--scst and --image-blind do not go together")
        if args.scst_samples < (2 if args.scst_baseline == "mean" else 1):
            raise SystemExit("--scst-samples must be >= 2 with --scst-baseline mean")
    if args.feature_views < 1:
        raise SystemExit("--feature-views must be >= 1 (1 = the centre crop only)")
    if args.feature_views > 1 and not args.freeze_encoder:
        raise SystemExit("--feature-views caches frozen-encoder features: it needs --freeze-encoder")
    if args.fresh_decoder and not args.init_from:
        raise SystemExit("--fresh-decoder needs --init-from: the model whose encoder and vocabulary it keeps")
    if args.lr is None:
        args.lr = 5e-5 if args.scst else 2e-3


def carried_metrics(path, encoder_frozen: bool) -> dict:
    """What a caption fine-tuning run keeps from its starting model's metrics.json: the tasks it was trained for, and
    the VQA results when the encoder stays frozen (only then are they still true: the VQA head is not trained here)."""
    m = (read_metrics(path) or {}) if path else {}
    keep = ("tasks",) + (VQA_METRICS if encoder_frozen else ())
    if "vqa" in m.get("tasks", []) and not encoder_frozen and is_main():
        log.warning("the encoder is trained: the VQA head's accuracy changes; measure it again with "
                    "`captioner evaluate --task vqa`")
    return {k: m[k] for k in keep if k in m}


def _jsonable(d: dict) -> dict:
    """The run's arguments as recorded in metrics.json and the card: plain values, paths made portable."""
    return portable({k: v for k, v in d.items() if isinstance(v, (str, int, float, bool, type(None), list))})


def _card(metrics: dict, cfg) -> str:
    a = metrics["args"]
    lines = [f"# {cfg.name}", "",
             f"Caption model: {cfg.encoder.arch} encoder (v = {cfg.encoder.feature_dim}-d), "
             f"{cfg.decoder.num_layers}-layer {cfg.decoder.cell} decoder, image injected at "
             f"{'every step' if cfg.decoder.inject == 'every' else 'the first step'}, vocabulary {cfg.vocab_size}.",
             "", f"Trained on {a.get('dataset')} `{a.get('annotations')}` split `{a.get('train_split')}`, "
             f"epoch {metrics['epoch']}.", "",
             f"## Validation ({metrics['split']}, beam {metrics['beam_size']})", "", "| metric | value |", "|---|---|"]
    for k in ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr-D", "SPICE"):
        v = metrics.get(k)
        lines.append(f"| {k} | {'n/a' if v is None else f'{100 * v:.1f}'} |")
    return "\n".join(lines) + "\n"

