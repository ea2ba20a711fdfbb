"""Caption training: ``captioner train`` or ``torchrun --nproc_per_node=N -m captioner train``.

The caption objective for training/engine.py (which runs the epochs, AMP, clipping, the schedule, DDP, exact
``--resume``): teacher-forced cross-entropy, Adam + warmup/cosine, per-epoch validation (loss + beam-search COCO
metrics), atomic ``last/`` and ``best/`` (by CIDEr-D) checkpoints.
``--init-from DIR`` starts from a saved model (its config and vocabulary; the model flags are ignored), and
``--scst`` then fine-tunes it with self-critical sequence training on CIDEr-D (training/scst.py).
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import math
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from captioner.checkpoint import VQA_METRICS, load_pretrained, load_training_state, read_metrics
from captioner.config import override_encoder, preset
from captioner.decoder import Decoder
from captioner.generation import GenerationConfig
from captioner.model import CaptionModel
from captioner.tokenizer import PAD_ID, Vocabulary

from .cider import CiderD
from .datasets import CaptionDataset, ImageRecord, encode_captions, pad_captions, read_dataset
from .distributed import is_main
from .engine import STATE, Objective, fit, jsonable_args, make_loader, save_model_dirs, setup
from .features import FeatureDataset, cached_features
from .optim import amp_settings
from .scst import ScstLoss, reference_corpus, scst_step

log = logging.getLogger("captioner.train")




# ----------------------------------------------------------------------------- helpers

INJECTED = {"every": "at every step", "first": "at the first step",
            "attention": "at every step through soft attention over the encoder's conv grid"}

class CaptionLoss(nn.Module):
    """Wraps the model so that DDP sees the whole training forward: (images | features) -> loss."""

    def __init__(self, model: CaptionModel, label_smoothing: float, image_blind: bool,
                 attention_penalty: float = 1.0) -> None:
        super().__init__()
        self.model, self.ls, self.blind = model, label_smoothing, image_blind
        self.penalty = attention_penalty if model.cfg.attention else 0.0

    def forward(self, x: torch.Tensor, is_features: bool, rep: torch.Tensor, inp: torch.Tensor, tgt: torch.Tensor):
        if self.blind:
            v = self.model.blank_features(x.size(0), x)
        else:
            v = x if is_features else self.model.encode(x)  # (B, D) or the grid (B, C, S, S)
        return self.loss(v, rep, inp, tgt)

    def loss(self, v: torch.Tensor, rep: torch.Tensor, inp: torch.Tensor, tgt: torch.Tensor) -> torch.Tensor:
        """Teacher-forced cross-entropy of N captions (+ the attention penalty); v: encode()'s features, rep (N,)
        picks each caption's image."""
        if not self.penalty:
            logits = self.model.decoder(v[rep], inp)  # (N, T, V)
            return F.cross_entropy(logits.flatten(0, 1).float(), tgt.flatten(), ignore_index=PAD_ID,
                                   label_smoothing=self.ls)
        logits, alpha = self.model.decoder(v[rep], inp, return_attention=True)  # (N, T, V), (N, T, P)
        ce = F.cross_entropy(logits.flatten(0, 1).float(), tgt.flatten(), ignore_index=PAD_ID,
                             label_smoothing=self.ls, reduction="sum")
        ntok = (tgt != PAD_ID).sum().clamp_min(1)
        return (ce + self.penalty * doubly_stochastic(alpha, tgt != PAD_ID)) / ntok


def doubly_stochastic(alpha: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Xu et al.'s penalty sum_i (1 - sum_t alpha_ti)^2, summed over captions: every cell should be looked at about
    once over the caption. alpha (N, T, P), mask (N, T) the steps that emit a real token. Added to the summed
    cross-entropy before dividing by the token count, so lambda = 1 weighs it against the words as the paper does."""
    seen = (alpha.float() * mask[..., None]).sum(1)  # (N, P)
    return ((1.0 - seen) ** 2).sum()


def pick_captions(indices: list[int], caps: list[list[torch.Tensor]], k: int, g: torch.Generator):
    seqs, rep = [], []
    for j, i in enumerate(indices):
        cs = caps[i]
        for c in torch.randperm(len(cs), generator=g)[: min(k, len(cs))].tolist():
            seqs.append(cs[c])
            rep.append(j)
    return seqs, torch.tensor(rep, dtype=torch.long)


# ----------------------------------------------------------------------------- epoch loops

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
                v = model.blank_features(x.size(0), x)
            else:
                v = (x if batch.get("is_features") else model.encode(x)).float()
            seqs, rep = pick_captions(idx, caps, 1_000, torch.Generator().manual_seed(0))
            inp, tgt = pad_captions(seqs, args.max_length)
            logits = model.decoder(v[rep.to(device)], inp.to(device))
            total += F.cross_entropy(logits.flatten(0, 1).float(), tgt.to(device).flatten(), ignore_index=PAD_ID,
                                     reduction="sum").item()
            ntok += int((tgt != PAD_ID).sum())
            hyp = model.generate(features=v, generation=GenerationConfig(beam_size=args.eval_beam,
                                                                         max_length=args.max_length))
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


class CaptionObjective(Objective):
    """Caption cross-entropy (or, with --scst, self-critical training) for the engine."""
    plot_keys = ("CIDEr-D", "BLEU-4")

    def __init__(self, args, device, world: int, rank: int, state: dict | None) -> None:
        self.args, self.device, self.world, self.rank = args, device, world, rank
        self.out = Path(args.output)
        self.amp_dtype = amp_settings(args.amp, device)[0]
        self.train_rec, self.val_rec = read_records(args)
        self.model, self.vocab = self._model(state is not None)
        model, cfg = self.model, self.model.cfg
        model.to(device)
        if args.channels_last:
            model.encoder.to(memory_format=torch.channels_last)
        if is_main():
            log.info("train %d images, val %d images, vocab %d words, %.1fM parameters, device %s, amp %s, world %d",
                     len(self.train_rec), len(self.val_rec), len(self.vocab),
                     sum(p.numel() for p in model.parameters()) / 1e6, device, self.amp_dtype, world)
        self.train_caps = encode_captions(self.train_rec, self.vocab, args.max_length)
        self.val_caps = encode_captions(self.val_rec, self.vocab, args.max_length)
        self.carried = carried_metrics(self.out / "last" if args.resume else args.init_from,
                                       args.freeze_encoder and args.finetune_after < 0)
        if args.scst:
            self.refs = reference_corpus(self.train_caps)
            self.cider = CiderD(self.refs)
            self.desc, self.log_keys = "scst", ("loss", "reward", "baseline")
        self.cfg, self.schedule = cfg, args.schedule
        self.enc_params = list(model.encoder.parameters())

    def _model(self, resume: bool) -> tuple[CaptionModel, Vocabulary]:
        args = self.args
        if resume:
            return load_pretrained(self.out / "last", "cpu")
        if args.init_from:
            model, vocab = load_pretrained(args.init_from, "cpu")
            if args.fresh_decoder:
                model.cfg.decoder.members = 1
                if args.inject:  # e.g. an attention decoder on a model trained with an FC one
                    model.cfg.decoder.inject = args.inject
                    model.cfg.decoder.attention_dim = args.attention_dim
                    model.cfg.decoder.attention_gate = args.attention_gate
                model.cfg.__post_init__()
                model.decoder = Decoder(model.cfg.decoder, model.cfg.vocab_size, model.cfg.decoder_image_dim)
            model.train()
            if is_main():
                log.info("starting from %s (its config and vocabulary; model flags ignored)", args.init_from)
            return model, vocab
        vocab = Vocabulary.build((c for r in self.train_rec for c in r.captions), min_count=args.min_count)
        cfg = preset(args.arch, cell=args.cell, inject=args.inject or "every", embed_dim=args.embed_dim,
                     hidden_dim=args.hidden_dim, num_layers=args.num_layers, dropout=args.dropout,
                     attention_dim=args.attention_dim, attention_gate=args.attention_gate)
        override_encoder(cfg, args.encoder_layers, args.fc_dims, args.image_size)
        cfg.vocab_size, cfg.max_length = len(vocab), args.max_length
        cfg.name = self.out.name
        model = CaptionModel(cfg)
        if args.encoder_weights:
            model.encoder.load_imagenet(args.encoder_weights)
        return model, vocab

    def optimizer(self) -> torch.optim.Optimizer:
        args, model = self.args, self.model
        return torch.optim.Adam([{"params": list(model.decoder.parameters()), "lr": args.lr},
                                 {"params": self.enc_params, "lr": args.encoder_lr or args.lr}],
                                weight_decay=args.weight_decay)

    def total_steps(self) -> int:
        return math.ceil(len(self.train_rec) / (self.args.batch_size * self.world)) * self.args.epochs

    def begin_epoch(self, epoch: int) -> None:
        args, model, device = self.args, self.model, self.device
        self.frozen = args.image_blind or (args.freeze_encoder and not (0 <= args.finetune_after <= epoch))
        for p_ in self.enc_params:
            p_.requires_grad_(not self.frozen)
        if args.image_blind:  # the images are never looked at: skip reading them
            train_ds, self.val_ds = FeatureDataset.placeholder(len(self.train_rec)), \
                FeatureDataset.placeholder(len(self.val_rec))
        elif self.frozen:  # encode every image once (or --feature-views crops of it), cached on disk
            train_ds = FeatureDataset(cached_features(model, self.train_rec, args.feature_cache, device,
                                                      self.amp_dtype, args.eval_batch_size, args.workers,
                                                      args.feature_views))
            self.val_ds = FeatureDataset(cached_features(model, self.val_rec, args.feature_cache, device,
                                                         self.amp_dtype, args.eval_batch_size, args.workers))
        else:
            train_ds = CaptionDataset(self.train_rec, model.cfg.preprocess, train=True)
            self.val_ds = CaptionDataset(self.val_rec, model.cfg.preprocess, train=False)
        loss_mod = ScstLoss(model) if args.scst else CaptionLoss(model, args.label_smoothing, args.image_blind,
                                                                  args.attention_penalty)
        self.step_fn = DistributedDataParallel(loss_mod) if self.world > 1 else loss_mod
        self.loader = make_loader(train_ds, args.batch_size, True, args.workers, args.seed, epoch, self.world,
                                  self.rank)

    def batches(self, epoch: int):
        args, device = self.args, self.device
        if args.scst:
            self.model.eval()  # the sampled policy is the test-time one (training/scst.py)
            self.g = torch.Generator(device=device).manual_seed(args.seed * 1000 + epoch)
        else:
            self.step_fn.train()
            if self.frozen:
                self.model.encoder.eval()  # frozen BatchNorm statistics stay put
            self.g = torch.Generator().manual_seed(args.seed * 1000 + epoch)
        for batch in self.loader:
            if batch["images"].size(0):
                yield batch

    def step(self, batch) -> tuple[torch.Tensor, dict, int]:
        args, device = self.args, self.device
        if args.scst:
            return scst_step(self.step_fn, self.model, batch, self.cider, self.refs, args, self.g, device)
        idx = batch["indices"].tolist()
        seqs, rep = pick_captions(idx, self.train_caps, args.captions_per_image, self.g)
        inp, tgt = pad_captions(seqs, args.max_length)
        x = batch["images"].to(device, non_blocking=True)
        if not batch.get("is_features") and args.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        loss = self.step_fn(x, bool(batch.get("is_features")), rep.to(device), inp.to(device), tgt.to(device))
        return loss, {"loss": (loss.item(), 1)}, len(idx)

    def evaluate(self, epoch: int, row: dict) -> tuple[dict, float]:
        args = self.args
        vl = make_loader(self.val_ds, args.eval_batch_size, False, args.workers, args.seed, epoch, 1, 0)
        m = evaluate(self.model, vl, self.val_rec, self.val_caps, self.vocab, args, self.device, self.amp_dtype)
        updates = {k: m[k] for k in ("val_loss", "BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L",
                                     "CIDEr-D", "SPICE")}
        updates["examples"] = m["examples"]
        return updates, m["CIDEr-D"]

    def log_line(self, row: dict) -> str:
        return (f"train loss {row['train_loss']:.3f}, val loss {row['val_loss']:.3f}, BLEU-4 {100 * row['BLEU-4']:.1f}, "
                f"CIDEr-D {100 * row['CIDEr-D']:.1f}, {row['train_images_per_s']:.1f} img/s")

    def save(self, epoch: int, row: dict, rows: list[dict], is_best: bool, state: dict) -> None:
        args = self.args
        metrics = {**self.carried, "epoch": epoch, "split": args.val_split, "beam_size": args.eval_beam,
                   **{k: v for k, v in row.items() if k != "examples"}, "args": jsonable_args(args)}
        save_model_dirs(self.model, self.vocab, self.out, metrics, state, is_best, _card(metrics, self.cfg))


def main(args: argparse.Namespace) -> CaptionModel:
    rank, world, device = setup(args)
    check_args(args)
    state = load_training_state(Path(args.output) / "last" / STATE) if args.resume else None
    obj = CaptionObjective(args, device, world, rank, state)
    fit(obj, args, device, state, best=-1.0)
    return obj.model


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


def _card(metrics: dict, cfg) -> str:
    a = metrics["args"]
    lines = [f"# {cfg.name}", "",
             f"Caption model: {cfg.encoder.arch} encoder (v = {cfg.encoder.feature_dim}-d), "
             f"{cfg.decoder.num_layers}-layer {cfg.decoder.cell} decoder, image injected "
             f"{INJECTED[cfg.decoder.inject]}, vocabulary {cfg.vocab_size}.",
             "", f"Trained on {a.get('dataset')} `{a.get('annotations')}` split `{a.get('train_split')}`, "
             f"epoch {metrics['epoch']}.", "",
             f"## Validation ({metrics['split']}, beam {metrics['beam_size']})", "", "| metric | value |", "|---|---|"]
    for k in ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr-D", "SPICE"):
        v = metrics.get(k)
        lines.append(f"| {k} | {'n/a' if v is None else f'{100 * v:.1f}'} |")
    return "\n".join(lines) + "\n"

