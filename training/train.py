"""Caption training: ``captioner train`` or ``torchrun --nproc_per_node=N -m captioner train``.

The caption objective for training/engine.py (which runs the epochs, AMP, clipping, the schedule, DDP, exact
``--resume``): teacher-forced cross-entropy, Adam + warmup/cosine, per-epoch validation (loss + beam-search COCO
metrics), atomic ``last/`` and ``best/`` (by CIDEr-D) checkpoints.
``--init-from DIR`` starts from a saved model (its config and vocabulary; the model flags are ignored), and
``--scst`` then fine-tunes it with self-critical sequence training on CIDEr-D (training/scst.py).

    main(args)      the command: the Namespace becomes a CaptionTraining (training/options.py), then
    train(opts)     the run, from those typed options alone
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

from captioner.api import Captioner
from captioner.batch import caption_batches
from captioner.checkpoint import VQA_METRICS, load_training_state, read_metrics
from captioner.features import ImageFeatures
from captioner.generation import GenerationConfig
from captioner.model import CaptionModel
from captioner.runtime import DTYPES
from captioner.tokenizer import PAD_ID, Vocabulary

from .cider import CiderD
from .datasets import CaptionDataset, ImageRecord, encode_captions, pad_captions, read_dataset
from .distributed import is_main
from .engine import STATE, Objective, build_or_load_model, fit, make_loader, save_model_dirs, setup
from .features import FeatureDataset, batch_inputs, cached_features, features_of
from .optim import amp_settings
from .options import CaptionData, CaptionTraining, ModelOptions, ScstOptions
from .scst import ObjectRecall, ScstLoss, reference_corpus, scst_step

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

    def forward(self, x: torch.Tensor | ImageFeatures, rep: torch.Tensor, inp: torch.Tensor, tgt: torch.Tensor):
        """x: batch_inputs()'s images or cached features of B images."""
        v = self.model.blank_features(len(x), x.device) if self.blind else features_of(self.model, x)
        return self.loss(v, rep, inp, tgt)

    def loss(self, v: ImageFeatures, rep: torch.Tensor, inp: torch.Tensor, tgt: torch.Tensor) -> torch.Tensor:
        """Teacher-forced cross-entropy of N captions (+ the attention penalty); v: the images' features, rep (N,)
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
def evaluate(model: CaptionModel, loader, records, caps, vocab: Vocabulary, device, amp_dtype, *, image_blind: bool,
             max_length: int, beam_size: int, use_java: bool, channels_last: bool = False) -> dict:
    """Validation loss (teacher forcing on every caption) and beam-search (``beam_size``) caption metrics;
    ``use_java`` False: Python tokenization, no METEOR. ``channels_last``: the encoder's layout as training set it
    (the Captioner that captions keeps it so)."""
    from .metrics import score_captions

    def autocast():
        return torch.autocast(device.type, dtype=amp_dtype) if amp_dtype else contextlib.nullcontext()

    def encode(batch: dict) -> ImageFeatures:
        with autocast():
            if image_blind:
                return model.blank_features(len(batch["indices"]), device)
            return features_of(model, batch_inputs(batch, device)).float()

    precision = next((name for name, dtype in DTYPES.items() if dtype == amp_dtype), "fp32")
    cap = Captioner(model, vocab, precision, channels_last=channels_last)  # puts the model in eval mode
    gen = GenerationConfig(beam_size=beam_size, max_length=max_length)
    total, ntok, preds = 0.0, 0, {}
    for b in caption_batches(cap, loader, gen, encode=encode, progress=is_main(), desc="val", leave=False):
        if not b.indices:
            continue
        with autocast():
            seqs, rep = pick_captions(b.indices, caps, 1_000, torch.Generator().manual_seed(0))
            inp, tgt = pad_captions(seqs, max_length)
            logits = model.decoder(b.features[rep.to(device)], inp.to(device))
            total += F.cross_entropy(logits.flatten(0, 1).float(), tgt.to(device).flatten(), ignore_index=PAD_ID,
                                     reduction="sum").item()
            ntok += int((tgt != PAD_ID).sum())
        preds.update((records[i].image_id, text) for i, text in b.best())
    refs = {r.image_id: r.captions for r in records if r.image_id in preds}
    metrics = score_captions(preds, refs, use_java=None if use_java else False)
    metrics["val_loss"] = total / max(1, ntok)
    metrics["examples"] = dict(list(preds.items())[:5])
    return metrics


# ----------------------------------------------------------------------------- main

def read_records(data: CaptionData) -> tuple[list[ImageRecord], list[ImageRecord]]:
    """The training and validation images, in the order (and so under the feature-cache keys) training uses."""
    train_rec = read_dataset(data.dataset, data.annotations, data.images, data.train_split)
    if data.dataset == "coco":
        if not (data.val_annotations and data.val_images):
            raise SystemExit("--dataset coco needs --val-annotations and --val-images")
        val_rec = read_dataset("coco", data.val_annotations, data.val_images, data.val_split)
    else:
        val_rec = read_dataset(data.dataset, data.val_annotations or data.annotations, data.val_images or data.images,
                               data.val_split)
    if data.max_train_images:
        train_rec = train_rec[: data.max_train_images]
    if data.max_val_images:
        val_rec = val_rec[: data.max_val_images]
    return train_rec, [r for r in val_rec if r.captions]


class CaptionObjective(Objective):
    """Caption cross-entropy (or, with --scst, self-critical training) for the engine."""
    plot_keys = ("CIDEr-D", "BLEU-4")

    def __init__(self, opts: CaptionTraining, device, world: int, rank: int, state: dict | None) -> None:
        self.opts, self.device, self.world, self.rank = opts, device, world, rank
        data, m, o, run = opts.data, opts.model, opts.optim, opts.run
        self.out = Path(run.output)
        self.amp_dtype = amp_settings(o.amp, device)[0]
        self.train_rec, self.val_rec = read_records(data)
        self.model, self.vocab = build_or_load_model(
            m, self.out, resume=state is not None, max_length=data.max_length, fresh_decoder=m.fresh_decoder,
            vocab=lambda: Vocabulary.build((c for r in self.train_rec for c in r.captions), min_count=data.min_count))
        model, cfg = self.model, self.model.cfg
        model.to(device)
        if o.channels_last:
            model.encoder.to(memory_format=torch.channels_last)
        if is_main():
            log.info("train %d images, val %d images, vocab %d words, %.1fM parameters, device %s, amp %s, world %d",
                     len(self.train_rec), len(self.val_rec), len(self.vocab),
                     sum(p.numel() for p in model.parameters()) / 1e6, device, self.amp_dtype, world)
        self.train_caps = encode_captions(self.train_rec, self.vocab, data.max_length)
        self.val_caps = encode_captions(self.val_rec, self.vocab, data.max_length)
        self.carried = carried_metrics(self.out / "last" if run.resume else m.init_from, m.encoder_frozen_throughout)
        if opts.scst.scst:
            self.refs = reference_corpus(self.train_caps)
            self.cider = CiderD(self.refs)
            sc = opts.scst
            self.objects = ObjectRecall(sc.scst_labels, [r.path for r in self.train_rec], self.vocab) \
                if sc.scst_object_weight else None
            if self.objects is not None and is_main():
                log.info("object reward: %d of %d training photos have detected objects (%s)",
                         sum(map(bool, self.objects.present)), len(self.train_rec), sc.scst_labels)
            self.desc, self.log_keys = "scst", ("loss", "reward", "baseline")
        self.cfg, self.schedule = cfg, o.schedule
        self.enc_params = list(model.encoder.parameters())

    def optimizer(self) -> torch.optim.Optimizer:
        o, model = self.opts.optim, self.model
        return torch.optim.Adam([{"params": list(model.decoder.parameters()), "lr": o.lr},
                                 {"params": self.enc_params, "lr": o.encoder_lr or o.lr}],
                                weight_decay=o.weight_decay)

    def total_steps(self) -> int:
        o = self.opts.optim
        return math.ceil(len(self.train_rec) / (o.batch_size * self.world)) * o.epochs

    def begin_epoch(self, epoch: int) -> None:
        data, m, o, model, device = self.opts.data, self.opts.model, self.opts.optim, self.model, self.device
        self.frozen = m.image_blind or (m.freeze_encoder and not (0 <= m.finetune_after <= epoch))
        for p_ in self.enc_params:
            p_.requires_grad_(not self.frozen)
        if m.image_blind:  # the images are never looked at: skip reading them
            train_ds, self.val_ds = FeatureDataset.placeholder(len(self.train_rec)), \
                FeatureDataset.placeholder(len(self.val_rec))
        elif self.frozen:  # encode every image once (or --feature-views crops of it), cached on disk
            eval_bs = self.opts.run.eval_batch_size
            train_ds = FeatureDataset(cached_features(model, self.train_rec, m.feature_cache, device,
                                                      self.amp_dtype, eval_bs, data.workers, m.feature_views))
            self.val_ds = FeatureDataset(cached_features(model, self.val_rec, m.feature_cache, device,
                                                         self.amp_dtype, eval_bs, data.workers))
        else:
            train_ds = CaptionDataset(self.train_rec, model.cfg.preprocess, train=True)
            self.val_ds = CaptionDataset(self.val_rec, model.cfg.preprocess, train=False)
        loss_mod = ScstLoss(model) if self.opts.scst.scst else CaptionLoss(model, o.label_smoothing, m.image_blind,
                                                                            m.attention_penalty)
        self.step_fn = DistributedDataParallel(loss_mod) if self.world > 1 else loss_mod
        self.loader = make_loader(train_ds, o.batch_size, True, data.workers, o.seed, epoch, self.world,
                                  self.rank)

    def batches(self, epoch: int):
        seed, device = self.opts.optim.seed, self.device
        if self.opts.scst.scst:
            self.model.eval()  # the sampled policy is the test-time one (training/scst.py)
            self.g = torch.Generator(device=device).manual_seed(seed * 1000 + epoch)
        else:
            self.step_fn.train()
            if self.frozen:
                self.model.encoder.eval()  # frozen BatchNorm statistics stay put
            self.g = torch.Generator().manual_seed(seed * 1000 + epoch)
        for batch in self.loader:
            if len(batch["indices"]):
                yield batch

    def step(self, batch) -> tuple[torch.Tensor, dict, int]:
        data, channels_last, device = self.opts.data, self.opts.optim.channels_last, self.device
        if self.opts.scst.scst:
            return scst_step(self.step_fn, self.model, batch, self.cider, self.refs, self.opts.scst, data.max_length,
                             channels_last, self.g, device, self.objects)
        idx = batch["indices"].tolist()
        seqs, rep = pick_captions(idx, self.train_caps, data.captions_per_image, self.g)
        inp, tgt = pad_captions(seqs, data.max_length)
        x = batch_inputs(batch, device, channels_last)
        loss = self.step_fn(x, rep.to(device), inp.to(device), tgt.to(device))
        return loss, {"loss": (loss.item(), 1)}, len(idx)

    def evaluate(self, epoch: int, row: dict) -> tuple[dict, float]:
        data, run = self.opts.data, self.opts.run
        vl = make_loader(self.val_ds, run.eval_batch_size, False, data.workers, self.opts.optim.seed, epoch, 1, 0)
        m = evaluate(self.model, vl, self.val_rec, self.val_caps, self.vocab, self.device, self.amp_dtype,
                     image_blind=self.opts.model.image_blind, max_length=data.max_length, beam_size=run.eval_beam,
                     use_java=not run.no_java, channels_last=self.opts.optim.channels_last)
        updates = {k: m[k] for k in ("val_loss", "BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L",
                                     "CIDEr-D", "SPICE")}
        updates["examples"] = m["examples"]
        return updates, m["CIDEr-D"]

    def log_line(self, row: dict) -> str:
        return (f"train loss {row['train_loss']:.3f}, val loss {row['val_loss']:.3f}, BLEU-4 {100 * row['BLEU-4']:.1f}, "
                f"CIDEr-D {100 * row['CIDEr-D']:.1f}, {row['train_images_per_s']:.1f} img/s")

    def save(self, epoch: int, row: dict, rows: list[dict], is_best: bool, state: dict) -> None:
        metrics = {**self.carried, "epoch": epoch, "split": self.opts.data.val_split,
                   "beam_size": self.opts.run.eval_beam, **{k: v for k, v in row.items() if k != "examples"},
                   "args": self.opts.record}
        save_model_dirs(self.model, self.vocab, self.out, metrics, state, is_best, _card(metrics, self.cfg))


def main(args: argparse.Namespace) -> CaptionModel:
    """`captioner train`: the command line's Namespace ends here."""
    return train(CaptionTraining.from_args(args))


def train(opts: CaptionTraining) -> CaptionModel:
    rank, world, device = setup(opts.run.device, opts.optim.seed)
    check_options(opts.model, opts.scst, opts.run.resume)
    state = load_training_state(Path(opts.run.output) / "last" / STATE) if opts.run.resume else None
    obj = CaptionObjective(opts, device, world, rank, state)
    fit(obj, opts.optim, device, state, best=-1.0)
    return obj.model


def check_options(m: ModelOptions, scst: ScstOptions, resume: bool) -> None:
    """The combinations `captioner train` refuses, as one line each."""
    if scst.scst:
        if not (m.init_from or resume):
            raise SystemExit("--scst fine-tunes a trained model: give --init-from RUN/best (or --resume)")
        if m.image_blind:
            raise SystemExit("--scst and --image-blind do not go together")
        if scst.scst_object_weight and not scst.scst_labels:
            raise SystemExit("--scst-object-weight needs --scst-labels: the `captioner label` run of the training photos")
        if scst.scst_samples < (2 if scst.scst_baseline == "mean" else 1):
            raise SystemExit("--scst-samples must be >= 2 with --scst-baseline mean")
    if m.feature_views < 1:
        raise SystemExit("--feature-views must be >= 1 (1 = the centre crop only)")
    if m.feature_views > 1 and not m.freeze_encoder:
        raise SystemExit("--feature-views caches frozen-encoder features: it needs --freeze-encoder")
    if m.fresh_decoder and not m.init_from:
        raise SystemExit("--fresh-decoder needs --init-from: the model whose encoder and vocabulary it keeps")


def carried_metrics(path, encoder_frozen: bool) -> dict:
    """What a caption fine-tuning run keeps from its starting model's metrics.json: the tasks it was trained for, and
    the VQA results when the encoder stays frozen (only then are they still true: the VQA head is not trained here)."""
    m = (read_metrics(path) or {}) if path else {}
    keep = ("tasks",) + (VQA_METRICS if encoder_frozen else ())
    if "vqa" in m.get("tasks", []) and not encoder_frozen and is_main():
        log.warning("the encoder is trained: the VQA head's accuracy changes; measure it again with "
                    "`captioner evaluate --task vqa`")
    out = {k: m[k] for k in keep if k in m}
    if "tasks" in out:  # this run trains the caption decoder, whatever its start had
        out["tasks"] = ["caption"] + [t for t in out["tasks"] if t != "caption"]
    return out


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

