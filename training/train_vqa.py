"""Multiple-choice VQA and joint caption + VQA training: ``captioner train --task vqa|joint``
(multi-GPU: ``torchrun --nproc_per_node=N -m captioner train --task vqa ...``).

--task vqa    the encoder and the VQA head learn to pick the right choice (cross-entropy over each question's
              own choices, padding masked). Every CaptionModel carries a caption decoder; here it is built small
              and left untrained, and metrics.json says tasks: ["vqa"] so no one mistakes its captions for real.
--task joint  every step puts a caption batch (Flickr8k/COCO, the same CaptionLoss as ``captioner train``) and a
              VQA batch through the shared encoder in one pass (so BatchNorm normalises the same blend of both
              domains in training as at test time) and sums the two losses; an epoch is one pass over the larger
              task's images, the smaller task's loader restarts when it runs out. metrics.json says tasks:
              ["caption", "vqa"].

Questions are grouped by image: a step takes --batch-size images and up to --questions-per-image of each one's
questions, so an image is encoded once per step. The machinery is training/train.py's: AMP, warmup + cosine,
gradient clipping, DDP, exact --resume from OUTPUT/last (training_state.pt, loaded with weights_only=True),
metrics.jsonl, curves.png, and OUTPUT/best chosen by val accuracy (vqa) or val accuracy + CIDEr-D (joint, both
as fractions: a point of either counts the same).
"""
from __future__ import annotations

import argparse
import contextlib
import itertools
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
from torchvision import transforms as T
from tqdm import tqdm

from captioner.checkpoint import load_pretrained, load_training_state, save_pretrained
from captioner.config import ModelConfig, PreprocessConfig, VQAConfig, override_encoder, preset
from captioner.model import CaptionModel
from captioner.preprocess import _interp

from .datasets import CaptionDataset, encode_captions, pad_captions, read_dataset
from .distributed import barrier, cleanup, init_distributed, is_main
from .evaluate_vqa import predict, summarize
from .features import FeatureDataset, cached_features
from .optim import amp_settings, lr_lambda, optimizer_step
from .train import (STATE, CaptionLoss, _jsonable, _loader, pick_captions, restore_training_state,
                    training_state)
from .train import evaluate as evaluate_captions
from .vqa_data import build_vocab, encode_examples, group_by_image, pick_questions, qa_batch, read_vqa, vocab_texts

log = logging.getLogger("captioner.train_vqa")




# ----------------------------------------------------------------------------- model and data

def build_config(args: argparse.Namespace, vocab_size: int) -> ModelConfig:
    small = args.task == "vqa"
    cfg = preset(args.arch, cell=args.cell, inject=args.inject, num_layers=args.num_layers, dropout=args.dropout,
                 embed_dim=args.embed_dim or (32 if small else 256), hidden_dim=args.hidden_dim or (32 if small else 512))
    override_encoder(cfg, args.encoder_layers, args.fc_dims, args.image_size, args.resize, args.pool_size,
                     args.encoder_dropout)
    cfg.vqa = VQAConfig(cell=args.vqa_cell, embed_dim=args.vqa_embed_dim, hidden_dim=args.vqa_hidden_dim,
                        mlp_dim=args.vqa_mlp_dim, dropout=args.vqa_dropout, max_choices=args.max_choices)
    cfg.vocab_size, cfg.max_length, cfg.name = vocab_size, args.max_length, Path(args.output).name
    cfg.__post_init__()  # validate the edited config
    return cfg


def vqa_train_transform(cfg: PreprocessConfig, flip: bool) -> T.Compose:
    """The caption train transform without the horizontal flip unless asked: "on the left" must stay left."""
    return T.Compose([
        T.Resize(cfg.resize, interpolation=_interp(cfg), antialias=True),
        T.RandomCrop(cfg.image_size),
        *([T.RandomHorizontalFlip()] if flip else []),
        T.ToTensor(),
        T.Normalize(cfg.mean, cfg.std),
    ])


def read_vqa_splits(args):
    train = read_vqa(args.vqa_dataset, args.vqa_train_split, args.vqa_annotations, args.vqa_images,
                     args.vqa_questions, args.num_choices, args.seed)
    val = read_vqa(args.vqa_dataset, args.vqa_val_split, args.vqa_val_annotations or args.vqa_annotations,
                   args.vqa_val_images or args.vqa_images, args.vqa_val_questions or args.vqa_questions,
                   args.num_choices, args.seed)
    return train[: args.max_train_questions or None], val[: args.max_val_questions or None]


def read_caption_splits(args):
    if not (args.annotations and args.images):
        raise SystemExit("--task joint needs caption data: --annotations and --images (as in `captioner train`)")
    train = read_dataset(args.dataset, args.annotations, args.images, args.train_split)
    if args.dataset == "coco" and not (args.val_annotations and args.val_images):
        raise SystemExit("--dataset coco needs --val-annotations and --val-images")
    val = read_dataset(args.dataset, args.val_annotations or args.annotations, args.val_images or args.images,
                       args.val_split)
    return train[: args.max_train_images or None], [r for r in val[: args.max_val_images or None] if r.captions]


class TaskLoss(nn.Module):
    """One module for DDP to wrap: every task's images go through the encoder in ONE batch, then 'caption' parts get
    train.py's caption loss and 'vqa' parts the cross-entropy over each question's choices (padding choices carry
    the lowest logit, so they add nothing). One encoder pass matters for BatchNorm: with one batch per task the
    training batches would be normalised per domain (Flickr photos, synthetic shapes) while the running statistics
    used at test time blend both; mixed batches make training and test normalisation the same blend.

    forward(is_features, [(task, x, rep, targets...), ...]) -> (total loss, one loss per part)."""

    def __init__(self, model: CaptionModel, label_smoothing: float, image_blind: bool) -> None:
        super().__init__()
        self.model, self.blind = model, image_blind
        self.caption = CaptionLoss(model, label_smoothing, image_blind)

    def forward(self, is_features: bool, parts: list[tuple]):
        sizes = [p[1].size(0) for p in parts]
        x = torch.cat([p[1] for p in parts])
        if self.blind:
            v = x.new_zeros(x.size(0), self.model.cfg.encoder.feature_dim)
        else:
            v = x if is_features else self.model.encode(x)  # (sum B, D)
        losses = []
        for (task, _, rep, *t), vt in zip(parts, v.split(sizes)):
            if task == "caption":
                losses.append(self.caption.loss(vt, rep, *t))
            else:
                question, choices, mask, target = t
                logits = self.model.answer_logits(vt[rep], question, choices, mask)  # (N, C)
                losses.append(F.cross_entropy(logits.float(), target))
        return sum(losses), losses


def train_one_epoch(step_fn, model, optimizer, scheduler, scaler, streams, args, epoch, device, amp_dtype, params):
    """Each step takes one batch of every task (one encoder pass, the losses summed); ``streams`` =
    [(task, loader, data)], data the task's targets; an epoch is one pass over the largest task's images."""
    step_fn.train()
    if args.frozen_now:
        model.encoder.eval()  # frozen BatchNorm statistics stay put
    g = torch.Generator().manual_seed(args.seed * 1000 + epoch)
    iters = {task: iter(loader) for task, loader, _ in streams}
    steps = max(len(loader) for _, loader, _ in streams)
    stats = {task: [0.0, 0] for task, _, _ in streams}
    n_img, t0 = 0, time.perf_counter()
    bar = tqdm(range(steps), desc=f"epoch {epoch}", disable=not is_main(), dynamic_ncols=True, leave=False)
    for _ in bar:
        parts, n_step, is_feat = [], 0, False
        for task, loader, data in streams:
            try:
                batch = next(iters[task])
            except StopIteration:  # the smaller task goes round again
                iters[task] = iter(loader)
                batch = next(iters[task])
            if batch["images"].size(0) == 0:
                continue
            idx = batch["indices"].tolist()
            if task == "caption":
                seqs, rep = pick_captions(idx, data, args.captions_per_image, g)
                tensors = pad_captions(seqs, args.max_length)
            else:
                encoded, per_image = data
                picks, rep = pick_questions(idx, per_image, args.questions_per_image, g)
                b = qa_batch(encoded, picks)
                tensors = (b["question"], b["choices"], b["choice_mask"], b["target"])
            x = batch["images"].to(device, non_blocking=True)
            is_feat = bool(batch.get("is_features"))
            parts.append((task, x, rep.to(device), *(t.to(device) for t in tensors)))
            n_step += len(idx)
        if not parts:
            continue
        ctx = torch.autocast(device.type, dtype=amp_dtype) if amp_dtype else contextlib.nullcontext()
        with ctx:
            loss, losses = step_fn(is_feat, parts)
        optimizer_step(loss, optimizer, scheduler, scaler, params, args.grad_clip)
        for (task, *_), part_loss in zip(parts, losses):
            stats[task][0] += part_loss.item()
            stats[task][1] += 1
        n_img += n_step
        bar.set_postfix(**{f"{k}_loss": f"{s / max(1, n):.3f}" for k, (s, n) in stats.items()},
                        img_s=f"{n_img / (time.perf_counter() - t0):.0f}")
    row = {f"train_{k}_loss": s / max(1, n) for k, (s, n) in stats.items()}
    row["train_images_per_s"] = n_img / (time.perf_counter() - t0)
    return row


# ----------------------------------------------------------------------------- main

def main(args: argparse.Namespace) -> CaptionModel:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    rank, world, device = init_distributed(args.device)
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    out = Path(args.output)
    last = out / "last"
    amp_dtype, use_scaler = amp_settings(args.amp, device)
    joint = args.task == "joint"
    tasks = ["caption", "vqa"] if joint else ["vqa"]

    vqa_train, vqa_val = read_vqa_splits(args)
    cap_train, cap_val = read_caption_splits(args) if joint else ([], [])

    state = None
    if args.resume:
        state = load_training_state(last / STATE)
        model, vocab = load_pretrained(last, "cpu")
        if model.vqa is None:
            raise SystemExit(f"--resume: {last} has no VQA head")
    elif args.init_from:
        model, vocab = load_pretrained(args.init_from, "cpu")
        if model.vqa is None:
            raise SystemExit(f"--init-from: {args.init_from} has no VQA head (train one with --task joint or vqa)")
        model.train()
        if is_main():
            log.info("starting from %s (its config and vocabulary; model flags ignored)", args.init_from)
    else:
        texts = itertools.chain(vocab_texts(vqa_train), (c for r in cap_train for c in r.captions))
        vocab = build_vocab(texts, args.min_count)
        model = CaptionModel(build_config(args, len(vocab)))
        if args.encoder_weights:
            model.encoder.load_imagenet(args.encoder_weights)
    cfg = model.cfg
    model.to(device)

    enc_train = encode_examples(vqa_train, vocab, cfg.vqa)
    enc_val = encode_examples(vqa_val, vocab, cfg.vqa)
    rec_train, per_img_train = group_by_image(vqa_train)
    rec_val, per_img_val = group_by_image(vqa_val)
    cap_train_caps = encode_captions(cap_train, vocab, args.max_length)
    cap_val_caps = encode_captions(cap_val, vocab, args.max_length)
    if is_main():
        log.info("tasks %s: VQA %d train questions on %d images, %d val questions on %d images; captions %d train, "
                 "%d val images; vocab %d words, %.2fM parameters, device %s, amp %s, world %d", tasks,
                 len(vqa_train), len(rec_train), len(vqa_val), len(rec_val), len(cap_train), len(cap_val), len(vocab),
                 sum(p.numel() for p in model.parameters()) / 1e6, device, amp_dtype, world)

    if not joint:
        model.decoder.requires_grad_(False)  # untrained in a VQA-only model; kept only because CaptionModel has one
    enc_params = list(model.encoder.parameters())
    head_params = list(model.vqa.parameters()) + (list(model.decoder.parameters()) if joint else [])
    optimizer = torch.optim.Adam([{"params": head_params, "lr": args.lr},
                                  {"params": enc_params, "lr": args.encoder_lr or args.lr}],
                                 weight_decay=args.weight_decay)
    per_task = [math.ceil(len(rec_train) / (args.batch_size * world))]
    if joint:
        per_task.append(math.ceil(len(cap_train) / (args.batch_size * world)))
    steps_per_epoch = max(per_task)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(args.schedule, args.warmup_steps, steps_per_epoch * args.epochs))
    scaler = torch.amp.GradScaler(device.type, enabled=use_scaler)
    start_epoch, best, rows = 0, -1.0, []
    if state is not None:
        start_epoch, best, rows = restore_training_state(state, optimizer, scheduler, scaler)
        if is_main():
            log.info("resumed from %s at epoch %d (best score %.4f)", last, start_epoch, best)

    for epoch in range(start_epoch, args.epochs):
        frozen = args.image_blind or (args.freeze_encoder and not (0 <= args.finetune_after <= epoch))
        args.frozen_now = frozen
        for p_ in enc_params:
            p_.requires_grad_(not frozen)

        def images(records, train: bool, vqa: bool):
            if args.image_blind:  # never opened: a placeholder dataset of readable "images"
                return FeatureDataset.placeholder(len(records))
            if frozen:  # no augmentation with a frozen encoder: encode every image once, cached on disk
                return FeatureDataset(cached_features(model, records, args.feature_cache, device, amp_dtype,
                                                      args.eval_batch_size, args.workers))
            tf = vqa_train_transform(cfg.preprocess, args.flip) if (train and vqa) else None
            return CaptionDataset(records, cfg.preprocess, train=train, transform=tf)

        streams = [("vqa", _loader(images(rec_train, True, True), args.batch_size, True, args.workers, args.seed,
                                   epoch, world, rank), (enc_train, per_img_train))]
        if joint:
            streams.insert(0, ("caption", _loader(images(cap_train, True, False), args.batch_size, True, args.workers,
                                                  args.seed + 1, epoch, world, rank), cap_train_caps))
        loss_mod = TaskLoss(model, args.label_smoothing, args.image_blind)
        # --task vqa leaves the caption decoder unused
        step_fn = DistributedDataParallel(loss_mod, find_unused_parameters=not joint) if world > 1 else loss_mod
        params = [p_ for p_ in model.parameters() if p_.requires_grad]
        t0 = time.perf_counter()
        row = {"epoch": epoch, **train_one_epoch(step_fn, model, optimizer, scheduler, scaler, streams, args, epoch,
                                                 device, amp_dtype, params)}
        row["lr"] = optimizer.param_groups[0]["lr"]
        row["train_seconds"] = time.perf_counter() - t0
        if is_main():
            ctx = (lambda: torch.autocast(device.type, dtype=amp_dtype)) if amp_dtype else contextlib.nullcontext
            vl = _loader(images(rec_val, False, True), args.eval_batch_size, False, args.workers, args.seed, epoch, 1, 0)
            mode = "zero" if args.image_blind else "image"
            raw = predict(model, vl, enc_val, per_img_val, device, ctx, modes=(mode,), progress=True)[mode]
            vm = summarize(enc_val, [e.qtype for e in vqa_val], raw["pred"])
            row.update({"val_vqa_loss": raw["loss"] / max(1, raw["n"]), "val_accuracy": vm["accuracy"],
                        "val_chance": vm["chance"],
                        "val_accuracy_per_type": {k: d["accuracy"] for k, d in vm["per_type"].items()}})
            score = vm["accuracy"]
            if joint:
                cl = _loader(images(cap_val, False, False), args.eval_batch_size, False, args.workers, args.seed,
                             epoch, 1, 0)
                m = evaluate_captions(model, cl, cap_val, cap_val_caps, vocab, args, device, amp_dtype)
                row.update({k: m[k] for k in ("val_loss", "BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR",
                                              "ROUGE-L", "CIDEr-D", "SPICE")})
                row["examples"] = m["examples"]
                score += row["CIDEr-D"]
            row["score"] = score
            rows.append(row)
            log.info("epoch %d: %s, val accuracy %.2f%% (chance %.2f%%)%s, %.1f img/s", epoch,
                     ", ".join(f"{k} {v:.3f}" for k, v in row.items() if k.startswith("train_") and k.endswith("loss")),
                     100 * vm["accuracy"], 100 * vm["chance"],
                     f", CIDEr-D {100 * row['CIDEr-D']:.1f}" if joint else "", row["train_images_per_s"])
            metrics = {"epoch": epoch, "tasks": tasks, "image_blind": args.image_blind,
                       "vqa_dataset": args.vqa_dataset, "vqa_split": args.vqa_val_split,
                       **({"split": args.val_split, "beam_size": args.eval_beam} if joint else {}),
                       **{k: v for k, v in row.items() if k != "examples"}, "args": _jsonable(vars(args))}
            is_best = score > best
            best = max(best, score)
            train_state = training_state(optimizer, scheduler, scaler, epoch, best, rows)
            save_pretrained(model, vocab, last, metrics=metrics,
                            extra_files={STATE: lambda d: torch.save(train_state, d / STATE)})
            if is_best:
                save_pretrained(model, vocab, out / "best", metrics=metrics, card=_card(metrics, cfg))
            with open(out / "metrics.jsonl", "a") as f:
                f.write(json.dumps(row) + "\n")
            _plot(rows, out / "curves.png")
        barrier()
    cleanup()
    return model


def _plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ep = [r["epoch"] for r in rows]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    for k in sorted({k for r in rows for k in r if k.endswith("loss")}):
        a.plot(ep, [r.get(k) for r in rows], "o-", label=k)
    a.set_xlabel("epoch"), a.set_ylabel("cross-entropy"), a.legend()
    b.plot(ep, [100 * r["val_accuracy"] for r in rows], "o-", label="VQA val accuracy %")
    b.plot(ep, [100 * r["val_chance"] for r in rows], "--", label="chance %")
    if "CIDEr-D" in rows[0]:
        b.plot(ep, [100 * r["CIDEr-D"] for r in rows], "o-", label="CIDEr-D")
    b.set_xlabel("epoch"), b.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _card(metrics: dict, cfg: ModelConfig) -> str:
    a, q = metrics["args"], cfg.vqa
    lines = [f"# {cfg.name}", "",
             f"Trained tasks: {', '.join(metrics['tasks'])}."
             + ("" if "caption" in metrics["tasks"] else " The caption decoder is untrained: do not use its captions."),
             "", f"{cfg.encoder.arch} encoder (v = {cfg.encoder.feature_dim}-d, {cfg.preprocess.image_size} px); VQA head: "
             f"bidirectional {q.cell} question encoder with W_ih·v at every step, {q.cell} answer encoder, MLP scorer "
             f"({q.hidden_dim}-d); vocabulary {cfg.vocab_size}.", "",
             f"VQA data: {a.get('vqa_dataset')}, epoch {metrics['epoch']}"
             + (" (image-blind baseline: v = 0)." if metrics.get("image_blind") else "."), "",
             f"## Validation ({metrics['vqa_split']})", "", "| question type | accuracy |", "|---|---|",
             f"| all | {100 * metrics['val_accuracy']:.2f} % (chance {100 * metrics['val_chance']:.2f} %) |"]
    for t, v in metrics["val_accuracy_per_type"].items():
        lines.append(f"| {t} | {100 * v:.2f} % |")
    if "CIDEr-D" in metrics:
        lines += ["", f"Captions ({metrics['split']}, beam {metrics['beam_size']}): "
                  + ", ".join(f"{k} {100 * metrics[k]:.1f}" for k in ("BLEU-4", "METEOR", "ROUGE-L", "CIDEr-D")
                              if metrics.get(k) is not None)]
    return "\n".join(lines) + "\n"

