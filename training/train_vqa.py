"""Multiple-choice VQA and joint caption + VQA training: ``captioner train --task vqa|joint``
(multi-GPU: ``torchrun --nproc_per_node=N -m captioner train --task vqa ...``); an objective for training/engine.py.

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
import functools
import itertools
import logging
import math
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from torchvision import transforms as T

from captioner.checkpoint import load_pretrained, load_training_state, read_metrics
from captioner.config import ModelConfig, PreprocessConfig, VQAConfig, override_encoder, preset
from captioner.model import CaptionModel
from captioner.vqa import VQAHead
from captioner.pixels import resize_shorter

from .datasets import CaptionDataset, encode_captions, pad_captions, read_dataset
from .distributed import is_main
from .engine import STATE, Objective, fit, jsonable_args, make_loader, save_model_dirs, setup
from .evaluate_vqa import predict, summarize
from .features import FeatureDataset, cached_features
from .optim import amp_settings
from .train import CaptionLoss, pick_captions
from .train import evaluate as evaluate_captions
from .vqa_data import build_vocab, encode_examples, group_by_image, pick_questions, qa_batch, read_vqa, vocab_texts

log = logging.getLogger("captioner.train_vqa")
CAPTION_METRICS = ("val_loss", "BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr-D", "SPICE")




# ----------------------------------------------------------------------------- model and data

def build_config(args: argparse.Namespace, vocab_size: int) -> ModelConfig:
    small = args.task == "vqa"
    cfg = preset(args.arch, cell=args.cell, inject=args.inject, num_layers=args.num_layers, dropout=args.dropout,
                 embed_dim=args.embed_dim or (32 if small else 256), hidden_dim=args.hidden_dim or (32 if small else 512))
    override_encoder(cfg, args.encoder_layers, args.fc_dims, args.image_size, args.resize, args.pool_size,
                     args.encoder_dropout)
    cfg.vqa = vqa_config(args)
    cfg.vocab_size, cfg.max_length, cfg.name = vocab_size, args.max_length, Path(args.output).name
    cfg.__post_init__()  # validate the edited config
    return cfg


def vqa_config(args: argparse.Namespace) -> VQAConfig:
    return VQAConfig(cell=args.vqa_cell, embed_dim=args.vqa_embed_dim, hidden_dim=args.vqa_hidden_dim,
                     mlp_dim=args.vqa_mlp_dim, dropout=args.vqa_dropout, max_choices=args.max_choices)


def vqa_train_transform(cfg: PreprocessConfig, flip: bool) -> T.Compose:
    """The caption train transform without the horizontal flip unless asked: "on the left" must stay left."""
    return T.Compose([
        functools.partial(resize_shorter, size=cfg.resize, interpolation=cfg.interpolation),
        T.RandomCrop(cfg.image_size),
        *([T.RandomHorizontalFlip()] if flip else []),
        T.ToTensor(),
        T.Normalize(cfg.mean, cfg.std),
    ])


def read_vqa_splits(args):
    """Train and val questions of every --vqa-dataset; with more than one, each question type is prefixed by its
    dataset (easy-vqa/color and v7w/color are different questions)."""
    kinds = [args.vqa_dataset] if isinstance(args.vqa_dataset, str) else list(args.vqa_dataset)
    if len(set(kinds)) != len(kinds) or sum(k != "easy-vqa" for k in kinds) > 1:
        raise SystemExit("--vqa-dataset: each at most once, and at most one besides easy-vqa (the --vqa-* file "
                         "options are its)")
    train, val = [], []
    for kind in kinds:
        t = read_vqa(kind, args.vqa_train_split, args.vqa_annotations, args.vqa_images, args.vqa_questions,
                     args.num_choices, args.seed)
        v = read_vqa(kind, args.vqa_val_split, args.vqa_val_annotations or args.vqa_annotations,
                     args.vqa_val_images or args.vqa_images, args.vqa_val_questions or args.vqa_questions,
                     args.num_choices, args.seed)
        if len(kinds) > 1:
            for e in (*t, *v):
                e.qtype = f"{kind}/{e.qtype}"
        train += t[: args.max_train_questions or None]
        val += v[: args.max_val_questions or None]
    return train, val


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
            v = self.model.blank_features(x.size(0), x)
        else:
            v = x if is_features else self.model.encode(x)  # (sum B, D) or grids
        losses = []
        for (task, _, rep, *t), vt in zip(parts, v.split(sizes)):
            if task == "caption":
                losses.append(self.caption.loss(vt, rep, *t))
            else:
                question, choices, mask, target = t
                logits = self.model.answer_logits(vt[rep], question, choices, mask)  # (N, C)
                losses.append(F.cross_entropy(logits.float(), target))
        return sum(losses), losses


class VQAObjective(Objective):
    """VQA (--task vqa) or caption + VQA (--task joint) for the engine: each step takes one batch of every task,
    one encoder pass, the losses summed; an epoch is one pass over the largest task's images."""
    plot_keys = ("val_accuracy", "val_chance", "CIDEr-D")

    def __init__(self, args, device, world: int, rank: int, state: dict | None) -> None:
        self.args, self.device, self.world, self.rank = args, device, world, rank
        self.out = Path(args.output)
        self.amp_dtype = amp_settings(args.amp, device)[0]
        self.joint = args.task == "joint"
        self.tasks = ["caption", "vqa"] if self.joint else ["vqa"]
        self.log_keys = tuple(f"{t}_loss" for t in self.tasks)
        self.vqa_train, self.vqa_val = read_vqa_splits(args)
        self.cap_train, self.cap_val = read_caption_splits(args) if self.joint else ([], [])
        self.model, self.vocab = self._model(state is not None)
        model = self.model
        cfg = self.cfg = model.cfg
        model.to(device)
        self.enc_train = encode_examples(self.vqa_train, self.vocab, cfg.vqa)
        self.enc_val = encode_examples(self.vqa_val, self.vocab, cfg.vqa)
        self.rec_train, self.per_img_train = group_by_image(self.vqa_train)
        self.rec_val, self.per_img_val = group_by_image(self.vqa_val)
        self.cap_train_caps = encode_captions(self.cap_train, self.vocab, args.max_length)
        self.cap_val_caps = encode_captions(self.cap_val, self.vocab, args.max_length)
        if is_main():
            log.info("tasks %s: VQA %d train questions on %d images, %d val questions on %d images; captions %d "
                     "train, %d val images; vocab %d words, %.2fM parameters, device %s, amp %s, world %d", self.tasks,
                     len(self.vqa_train), len(self.rec_train), len(self.vqa_val), len(self.rec_val),
                     len(self.cap_train), len(self.cap_val), len(self.vocab),
                     sum(p.numel() for p in model.parameters()) / 1e6, device, self.amp_dtype, world)
        if not self.joint:  # untrained in a VQA-only model, or a trained one carried from --init-from unchanged
            model.decoder.requires_grad_(False)
        self.carried = self._carried(state is not None)
        self.enc_params = list(model.encoder.parameters())
        self.schedule = args.schedule

    def _model(self, resume: bool) -> tuple[CaptionModel, object]:
        args, last = self.args, self.out / "last"
        if resume or args.init_from:
            src = last if resume else args.init_from
            model, vocab = load_pretrained(src, "cpu")
            if args.fresh_vqa_head and not resume:  # a new head (the --vqa-* flags) on the kept encoder and decoder
                model.cfg.vqa = vqa_config(args)
                model.vqa = VQAHead(model.cfg.vqa, model.cfg.vocab_size, model.cfg.encoder.feature_dim)
            if model.vqa is None:
                raise SystemExit(f"--resume: {last} has no VQA head" if resume else
                                 f"--init-from: {args.init_from} has no VQA head (train one with --task joint or vqa)")
            if not resume:
                model.train()
                if is_main():
                    log.info("starting from %s (its config and vocabulary; model flags ignored)", args.init_from)
            return model, vocab
        texts = itertools.chain(vocab_texts(self.vqa_train), (c for r in self.cap_train for c in r.captions))
        vocab = build_vocab(texts, args.min_count)
        model = CaptionModel(build_config(args, len(vocab)))
        if args.encoder_weights:
            model.encoder.load_imagenet(args.encoder_weights)
        return model, vocab

    def _carried(self, resume: bool) -> dict:
        """--task vqa from a caption model: its decoder is kept as it was, so the model still captions; with the
        encoder frozen for the whole run its caption metrics stay true and are kept too."""
        args = self.args
        src = self.out / "last" if resume else args.init_from
        m = (read_metrics(src) or {}) if (src and not self.joint) else {}
        if "caption" not in m.get("tasks", []):
            return {}
        self.tasks = ["caption", "vqa"]
        if not (args.freeze_encoder and args.finetune_after < 0):
            if is_main():
                log.warning("the encoder is trained: the caption decoder of %s no longer sees the v it was trained "
                            "on; measure its captions again with `captioner evaluate`", src)
            return {"tasks": self.tasks}
        return {k: m[k] for k in ("tasks", "split", "beam_size", *CAPTION_METRICS) if k in m}  # not "domain": the VQA
        # head changed what the model knows (export --domain says it anew)

    def optimizer(self) -> torch.optim.Optimizer:
        model, args = self.model, self.args
        head_params = list(model.vqa.parameters()) + (list(model.decoder.parameters()) if self.joint else [])
        return torch.optim.Adam([{"params": head_params, "lr": args.lr},
                                 {"params": self.enc_params, "lr": args.encoder_lr or args.lr}],
                                weight_decay=args.weight_decay)

    def total_steps(self) -> int:
        per_task = [math.ceil(len(self.rec_train) / (self.args.batch_size * self.world))]
        if self.joint:
            per_task.append(math.ceil(len(self.cap_train) / (self.args.batch_size * self.world)))
        return max(per_task) * self.args.epochs

    def images(self, records, train: bool, vqa: bool):
        args, model = self.args, self.model
        if args.image_blind:  # never opened: a placeholder dataset of readable "images"
            return FeatureDataset.placeholder(len(records))
        if self.frozen:  # no augmentation with a frozen encoder: encode every image once, cached on disk
            return FeatureDataset(cached_features(model, records, args.feature_cache, self.device, self.amp_dtype,
                                                  args.eval_batch_size, args.workers))
        tf = vqa_train_transform(self.cfg.preprocess, args.flip) if (train and vqa) else None
        return CaptionDataset(records, self.cfg.preprocess, train=train, transform=tf)

    def begin_epoch(self, epoch: int) -> None:
        args = self.args
        self.frozen = args.image_blind or (args.freeze_encoder and not (0 <= args.finetune_after <= epoch))
        for p_ in self.enc_params:
            p_.requires_grad_(not self.frozen)
        self.streams = [("vqa", make_loader(self.images(self.rec_train, True, True), args.batch_size, True,
                                            args.workers, args.seed, epoch, self.world, self.rank),
                         (self.enc_train, self.per_img_train))]
        if self.joint:
            self.streams.insert(0, ("caption", make_loader(self.images(self.cap_train, True, False), args.batch_size,
                                                           True, args.workers, args.seed + 1, epoch, self.world,
                                                           self.rank), self.cap_train_caps))
        if self.world > 1:  # cached_features is collective (rank 0 computes, all wait): build the val caches here,
            self.images(self.rec_val, False, True)  # on every rank, not in evaluate() on rank 0 alone
            if self.joint:
                self.images(self.cap_val, False, False)
        loss_mod = TaskLoss(self.model, args.label_smoothing, args.image_blind)
        # --task vqa leaves the caption decoder unused
        self.step_fn = (DistributedDataParallel(loss_mod, find_unused_parameters=not self.joint) if self.world > 1
                        else loss_mod)

    def batches(self, epoch: int):
        args, device = self.args, self.device
        self.step_fn.train()
        if self.frozen:
            self.model.encoder.eval()  # frozen BatchNorm statistics stay put
        g = torch.Generator().manual_seed(args.seed * 1000 + epoch)
        iters = {task: iter(loader) for task, loader, _ in self.streams}
        for _ in range(max(len(loader) for _, loader, _ in self.streams)):
            parts, is_feat = [], False
            for task, loader, data in self.streams:
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
                parts.append((task, x, rep.to(device), *(t.to(device) for t in tensors), len(idx)))
            if parts:
                yield is_feat, parts

    def step(self, batch) -> tuple[torch.Tensor, dict, int]:
        is_feat, parts = batch
        loss, losses = self.step_fn(is_feat, [p[:-1] for p in parts])
        logs = {f"{task}_loss": (part_loss.item(), 1) for (task, *_), part_loss in zip(parts, losses)}
        return loss, logs, sum(p[-1] for p in parts)

    def evaluate(self, epoch: int, row: dict) -> tuple[dict, float]:
        args, model, device = self.args, self.model, self.device
        ctx = (lambda: torch.autocast(device.type, dtype=self.amp_dtype)) if self.amp_dtype else contextlib.nullcontext
        vl = make_loader(self.images(self.rec_val, False, True), args.eval_batch_size, False, args.workers, args.seed,
                         epoch, 1, 0)
        mode = "zero" if args.image_blind else "image"
        raw = predict(model, vl, self.enc_val, self.per_img_val, device, ctx, modes=(mode,), progress=True)[mode]
        vm = summarize(self.enc_val, [e.qtype for e in self.vqa_val], raw["pred"])
        up = {"val_vqa_loss": raw["loss"] / max(1, raw["n"]), "val_accuracy": vm["accuracy"],
              "val_chance": vm["chance"], "val_accuracy_per_type": {k: d["accuracy"] for k, d in vm["per_type"].items()}}
        score = vm["accuracy"]
        if self.joint:
            cl = make_loader(self.images(self.cap_val, False, False), args.eval_batch_size, False, args.workers,
                             args.seed, epoch, 1, 0)
            m = evaluate_captions(model, cl, self.cap_val, self.cap_val_caps, self.vocab, args, device, self.amp_dtype)
            up.update({k: m[k] for k in CAPTION_METRICS})
            up["examples"] = m["examples"]
            score += up["CIDEr-D"]
        up["score"] = score
        return up, score

    def log_line(self, row: dict) -> str:
        losses = ", ".join(f"{k} {v:.3f}" for k, v in row.items() if k.startswith("train_") and k.endswith("loss"))
        return (f"{losses}, val accuracy {100 * row['val_accuracy']:.2f}% (chance {100 * row['val_chance']:.2f}%)"
                + (f", CIDEr-D {100 * row['CIDEr-D']:.1f}" if self.joint else "")
                + f", {row['train_images_per_s']:.1f} img/s")

    def save(self, epoch: int, row: dict, rows: list[dict], is_best: bool, state: dict) -> None:
        args = self.args
        metrics = {**self.carried, "epoch": epoch, "tasks": self.tasks, "image_blind": args.image_blind,
                   "vqa_dataset": "+".join([args.vqa_dataset] if isinstance(args.vqa_dataset, str) else args.vqa_dataset),
                   "vqa_split": args.vqa_val_split,
                   **({"split": args.val_split, "beam_size": args.eval_beam} if self.joint else {}),
                   **{k: v for k, v in row.items() if k != "examples"}, "args": jsonable_args(args)}
        save_model_dirs(self.model, self.vocab, self.out, metrics, state, is_best, _card(metrics, self.cfg))


def main(args: argparse.Namespace) -> CaptionModel:
    rank, world, device = setup(args)
    state = load_training_state(Path(args.output) / "last" / STATE) if args.resume else None
    obj = VQAObjective(args, device, world, rank, state)
    fit(obj, args, device, state, best=-1.0)
    return obj.model


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

