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

from captioner.checkpoint import load_training_state, read_metrics
from captioner.config import ModelConfig, PreprocessConfig
from captioner.model import CaptionModel
from captioner.pixels import resize_shorter

from .datasets import CaptionDataset, encode_captions, pad_captions, read_dataset
from .distributed import is_main
from .engine import STATE, Objective, build_or_load_model, fit, make_loader, save_model_dirs, setup
from .evaluate_vqa import predict, summarize
from .features import FeatureDataset, batch_inputs, cached_features, features_of, join_inputs
from .optim import amp_settings
from .options import CaptionData, VQAData, VQATraining
from .train import CaptionLoss, pick_captions
from .train import evaluate as evaluate_captions
from .vqa_data import build_vocab, encode_examples, group_by_image, pick_questions, qa_batch, read_vqa, vocab_texts

log = logging.getLogger("captioner.train_vqa")
CAPTION_METRICS = ("val_loss", "BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr-D", "SPICE")




# ----------------------------------------------------------------------------- model and data

def vqa_train_transform(cfg: PreprocessConfig, flip: bool) -> T.Compose:
    """The caption train transform without the horizontal flip unless asked: "on the left" must stay left."""
    return T.Compose([
        functools.partial(resize_shorter, size=cfg.resize, interpolation=cfg.interpolation),
        T.RandomCrop(cfg.image_size),
        *([T.RandomHorizontalFlip()] if flip else []),
        T.ToTensor(),
        T.Normalize(cfg.mean, cfg.std),
    ])


def read_vqa_splits(d: VQAData, seed: int):
    """Train and val questions of every --vqa-dataset (``seed``: easy-VQA's distractors); with more than one, each
    question type is prefixed by its dataset (easy-vqa/color and v7w/color are different questions)."""
    kinds = [d.vqa_dataset] if isinstance(d.vqa_dataset, str) else list(d.vqa_dataset)
    if len(set(kinds)) != len(kinds) or sum(k != "easy-vqa" for k in kinds) > 1:
        raise SystemExit("--vqa-dataset: each at most once, and at most one besides easy-vqa (the --vqa-* file "
                         "options are its)")
    train, val = [], []
    for kind in kinds:
        t = read_vqa(kind, d.vqa_train_split, d.vqa_annotations, d.vqa_images, d.vqa_questions, d.num_choices, seed)
        v = read_vqa(kind, d.vqa_val_split, d.vqa_val_annotations or d.vqa_annotations,
                     d.vqa_val_images or d.vqa_images, d.vqa_val_questions or d.vqa_questions, d.num_choices, seed)
        if len(kinds) > 1:
            for e in (*t, *v):
                e.qtype = f"{kind}/{e.qtype}"
        train += t[: d.max_train_questions or None]
        val += v[: d.max_val_questions or None]
    return train, val


def read_caption_splits(d: CaptionData):
    if not (d.annotations and d.images):
        raise SystemExit("--task joint needs caption data: --annotations and --images (as in `captioner train`)")
    train = read_dataset(d.dataset, d.annotations, d.images, d.train_split)
    if d.dataset == "coco" and not (d.val_annotations and d.val_images):
        raise SystemExit("--dataset coco needs --val-annotations and --val-images")
    val = read_dataset(d.dataset, d.val_annotations or d.annotations, d.val_images or d.images, d.val_split)
    return train[: d.max_train_images or None], [r for r in val[: d.max_val_images or None] if r.captions]


class TaskLoss(nn.Module):
    """One module for DDP to wrap: every task's images go through the encoder in ONE batch, then 'caption' parts get
    train.py's caption loss and 'vqa' parts the cross-entropy over each question's choices (padding choices carry
    the lowest logit, so they add nothing). One encoder pass matters for BatchNorm: with one batch per task the
    training batches would be normalised per domain (Flickr photos, synthetic shapes) while the running statistics
    used at test time blend both; mixed batches make training and test normalisation the same blend.

    forward([(task, x, rep, targets...), ...]) -> (total loss, one loss per part), x batch_inputs()'s images or
    cached features."""

    def __init__(self, model: CaptionModel, label_smoothing: float, image_blind: bool,
                 attention_penalty: float = 1.0) -> None:
        super().__init__()
        self.model, self.blind = model, image_blind
        self.caption = CaptionLoss(model, label_smoothing, image_blind, attention_penalty)

    def forward(self, parts: list[tuple]):
        sizes = [len(p[1]) for p in parts]
        x = join_inputs([p[1] for p in parts])
        v = self.model.blank_features(len(x), x.device) if self.blind else features_of(self.model, x)
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

    def __init__(self, opts: VQATraining, device, world: int, rank: int, state: dict | None) -> None:
        self.opts, self.device, self.world, self.rank = opts, device, world, rank
        data, m = opts.data, opts.model
        self.out = Path(opts.run.output)
        self.amp_dtype = amp_settings(opts.optim.amp, device)[0]
        self.joint = opts.task == "joint"
        self.tasks = ["caption", "vqa"] if self.joint else ["vqa"]
        self.log_keys = tuple(f"{t}_loss" for t in self.tasks)
        self.vqa_train, self.vqa_val = read_vqa_splits(opts.vqa_data, opts.optim.seed)
        self.cap_train, self.cap_val = read_caption_splits(data) if self.joint else ([], [])
        resume = state is not None
        self.model, self.vocab = build_or_load_model(
            m, self.out, resume=resume, max_length=data.max_length, vqa=opts.head.config(),
            fresh_vqa_head=opts.head.config() if opts.head.fresh_vqa_head else None,
            vocab=lambda: build_vocab(itertools.chain(vocab_texts(self.vqa_train),
                                                      (c for r in self.cap_train for c in r.captions)),
                                      data.min_count))
        if self.model.vqa is None:
            raise SystemExit(f"--resume: {self.out / 'last'} has no VQA head" if resume else
                             f"--init-from: {m.init_from} has no VQA head (train one with --task joint or vqa)")
        model = self.model
        cfg = self.cfg = model.cfg
        model.to(device)
        self.enc_train = encode_examples(self.vqa_train, self.vocab, cfg.vqa)
        self.enc_val = encode_examples(self.vqa_val, self.vocab, cfg.vqa)
        self.rec_train, self.per_img_train = group_by_image(self.vqa_train)
        self.rec_val, self.per_img_val = group_by_image(self.vqa_val)
        self.cap_train_caps = encode_captions(self.cap_train, self.vocab, data.max_length)
        self.cap_val_caps = encode_captions(self.cap_val, self.vocab, data.max_length)
        if is_main():
            log.info("tasks %s: VQA %d train questions on %d images, %d val questions on %d images; captions %d "
                     "train, %d val images; vocab %d words, %.2fM parameters, device %s, amp %s, world %d", self.tasks,
                     len(self.vqa_train), len(self.rec_train), len(self.vqa_val), len(self.rec_val),
                     len(self.cap_train), len(self.cap_val), len(self.vocab),
                     sum(p.numel() for p in model.parameters()) / 1e6, device, self.amp_dtype, world)
        if not self.joint:  # untrained in a VQA-only model, or a trained one carried from --init-from unchanged
            model.decoder.requires_grad_(False)
        self.carried = self._carried(resume)
        self.enc_params = list(model.encoder.parameters())
        self.schedule = opts.optim.schedule

    def _carried(self, resume: bool) -> dict:
        """--task vqa from a caption model: its decoder is kept as it was, so the model still captions; with the
        encoder frozen for the whole run its caption metrics stay true and are kept too."""
        m = self.opts.model
        src = self.out / "last" if resume else m.init_from
        metrics = (read_metrics(src) or {}) if (src and not self.joint) else {}
        if "caption" not in metrics.get("tasks", []):
            return {}
        self.tasks = ["caption", "vqa"]
        if not m.encoder_frozen_throughout:
            if is_main():
                log.warning("the encoder is trained: the caption decoder of %s no longer sees the v it was trained "
                            "on; measure its captions again with `captioner evaluate`", src)
            return {"tasks": self.tasks}
        return {k: metrics[k] for k in ("tasks", "split", "beam_size", *CAPTION_METRICS) if k in metrics}  # not
        # "domain": the VQA head changed what the model knows (export --domain says it anew)

    def optimizer(self) -> torch.optim.Optimizer:
        model, o = self.model, self.opts.optim
        head_params = list(model.vqa.parameters()) + (list(model.decoder.parameters()) if self.joint else [])
        return torch.optim.Adam([{"params": head_params, "lr": o.lr},
                                 {"params": self.enc_params, "lr": o.encoder_lr or o.lr}],
                                weight_decay=o.weight_decay)

    def total_steps(self) -> int:
        o = self.opts.optim
        per_task = [math.ceil(len(self.rec_train) / (o.batch_size * self.world))]
        if self.joint:
            per_task.append(math.ceil(len(self.cap_train) / (o.batch_size * self.world)))
        return max(per_task) * o.epochs

    def images(self, records, train: bool, vqa: bool):
        m, model = self.opts.model, self.model
        if m.image_blind:  # never opened: a placeholder dataset of readable "images"
            return FeatureDataset.placeholder(len(records))
        if self.frozen:  # no augmentation with a frozen encoder: encode every image once, cached on disk
            return FeatureDataset(cached_features(model, records, m.feature_cache, self.device, self.amp_dtype,
                                                  self.opts.run.eval_batch_size, self.opts.data.workers))
        tf = vqa_train_transform(self.cfg.preprocess, self.opts.vqa_data.flip) if (train and vqa) else None
        return CaptionDataset(records, self.cfg.preprocess, train=train, transform=tf)

    def begin_epoch(self, epoch: int) -> None:
        m, o, workers = self.opts.model, self.opts.optim, self.opts.data.workers
        self.frozen = m.image_blind or (m.freeze_encoder and not (0 <= m.finetune_after <= epoch))
        for p_ in self.enc_params:
            p_.requires_grad_(not self.frozen)
        self.streams = [("vqa", make_loader(self.images(self.rec_train, True, True), o.batch_size, True,
                                            workers, o.seed, epoch, self.world, self.rank),
                         (self.enc_train, self.per_img_train))]
        if self.joint:
            self.streams.insert(0, ("caption", make_loader(self.images(self.cap_train, True, False), o.batch_size,
                                                           True, workers, o.seed + 1, epoch, self.world,
                                                           self.rank), self.cap_train_caps))
        if self.world > 1:  # cached_features is collective (rank 0 computes, all wait): build the val caches here,
            self.images(self.rec_val, False, True)  # on every rank, not in evaluate() on rank 0 alone
            if self.joint:
                self.images(self.cap_val, False, False)
        loss_mod = TaskLoss(self.model, o.label_smoothing, m.image_blind, m.attention_penalty)
        # --task vqa leaves the caption decoder unused
        self.step_fn = (DistributedDataParallel(loss_mod, find_unused_parameters=not self.joint) if self.world > 1
                        else loss_mod)

    def batches(self, epoch: int):
        data, device = self.opts.data, self.device
        self.step_fn.train()
        if self.frozen:
            self.model.encoder.eval()  # frozen BatchNorm statistics stay put
        g = torch.Generator().manual_seed(self.opts.optim.seed * 1000 + epoch)
        iters = {task: iter(loader) for task, loader, _ in self.streams}
        for _ in range(max(len(loader) for _, loader, _ in self.streams)):
            parts = []
            for task, loader, items in self.streams:
                try:
                    batch = next(iters[task])
                except StopIteration:  # the smaller task goes round again
                    iters[task] = iter(loader)
                    batch = next(iters[task])
                if len(batch["indices"]) == 0:
                    continue
                idx = batch["indices"].tolist()
                if task == "caption":
                    seqs, rep = pick_captions(idx, items, data.captions_per_image, g)
                    tensors = pad_captions(seqs, data.max_length)
                else:
                    encoded, per_image = items
                    picks, rep = pick_questions(idx, per_image, self.opts.vqa_data.questions_per_image, g)
                    b = qa_batch(encoded, picks)
                    tensors = (b["question"], b["choices"], b["choice_mask"], b["target"])
                x = batch_inputs(batch, device)
                parts.append((task, x, rep.to(device), *(t.to(device) for t in tensors), len(idx)))
            if parts:
                yield parts

    def step(self, batch) -> tuple[torch.Tensor, dict, int]:
        parts = batch
        loss, losses = self.step_fn([p[:-1] for p in parts])
        logs = {f"{task}_loss": (part_loss.item(), 1) for (task, *_), part_loss in zip(parts, losses)}
        return loss, logs, sum(p[-1] for p in parts)

    def evaluate(self, epoch: int, row: dict) -> tuple[dict, float]:
        data, run, seed, model, device = self.opts.data, self.opts.run, self.opts.optim.seed, self.model, self.device
        blind = self.opts.model.image_blind
        ctx = (lambda: torch.autocast(device.type, dtype=self.amp_dtype)) if self.amp_dtype else contextlib.nullcontext
        vl = make_loader(self.images(self.rec_val, False, True), run.eval_batch_size, False, data.workers, seed,
                         epoch, 1, 0)
        mode = "zero" if blind else "image"
        raw = predict(model, vl, self.enc_val, self.per_img_val, device, ctx, modes=(mode,), progress=True)[mode]
        vm = summarize(self.enc_val, [e.qtype for e in self.vqa_val], raw["pred"])
        up = {"val_vqa_loss": raw["loss"] / max(1, raw["n"]), "val_accuracy": vm["accuracy"],
              "val_chance": vm["chance"], "val_accuracy_per_type": {k: d["accuracy"] for k, d in vm["per_type"].items()}}
        score = vm["accuracy"]
        if self.joint:
            cl = make_loader(self.images(self.cap_val, False, False), run.eval_batch_size, False, data.workers,
                             seed, epoch, 1, 0)
            m = evaluate_captions(model, cl, self.cap_val, self.cap_val_caps, self.vocab, device, self.amp_dtype,
                                  image_blind=blind, max_length=data.max_length, beam_size=run.eval_beam,
                                  use_java=not run.no_java)
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
        o, kinds = self.opts, self.opts.vqa_data.vqa_dataset
        metrics = {**self.carried, "epoch": epoch, "tasks": self.tasks, "image_blind": o.model.image_blind,
                   "vqa_dataset": "+".join([kinds] if isinstance(kinds, str) else kinds),
                   "vqa_split": o.vqa_data.vqa_val_split,
                   **({"split": o.data.val_split, "beam_size": o.run.eval_beam} if self.joint else {}),
                   **{k: v for k, v in row.items() if k != "examples"}, "args": o.record}
        save_model_dirs(self.model, self.vocab, self.out, metrics, state, is_best, _card(metrics, self.cfg))


def main(args: argparse.Namespace) -> CaptionModel:
    """`captioner train --task vqa|joint`: the command line's Namespace ends here."""
    return train(VQATraining.from_args(args))


def train(opts: VQATraining) -> CaptionModel:
    rank, world, device = setup(opts.run.device, opts.optim.seed)
    state = load_training_state(Path(opts.run.output) / "last" / STATE) if opts.run.resume else None
    obj = VQAObjective(opts, device, world, rank, state)
    fit(obj, opts.optim, device, state, best=-1.0)
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

