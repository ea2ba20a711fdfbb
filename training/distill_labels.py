"""Distillation from cached labels: ``captioner distill --labels RUN`` (RUN made by ``captioner label``).

The teacher never runs here: ``captioner label`` ran it once on V views of every photo (the centre square and random
resized crops) and the COCO detector once on the whole photo. Each epoch the student sees one of those very views
of each photo and learns, from its v, four things a caption needs:

    view (B, 3, S, S) -> student encoder -> v (B, D) -> to_features (B, 1280)  cosine to the teacher's, standardised
                                                     -> to_logits   (B, 1000)  KL to the teacher's ImageNet classes
                                                     -> to_objects  (B, 80)    BCE to the detector's per-class score (summed over classes)
                                                     -> to_counts   (B, 80)    smooth L1 to log(1 + boxes in the view)

A box belongs to a view when half of it lies inside (training.label.Labels.objects). The heads are dropped at the
end; ``encoder.safetensors`` is what ``captioner train --encoder-weights`` loads, as for online distillation.
"""
from __future__ import annotations

import logging
import os
import random
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, DistributedSampler, RandomSampler
from tqdm import tqdm

from captioner.checkpoint import load_pretrained
from captioner.encoder import VGGEncoder
from captioner.inputs import expand_inputs
from captioner.pixels import load_image

from .datasets import read_dataset
from .distill import DistillObjective, Student, distill_loss, encoder_layout, fit_heads_to
from .distributed import is_main
from .label import Labels, cut_view
from .optim import amp_settings
from .options import DistillImages, DistillTraining

log = logging.getLogger("captioner.distill")


class LabelledViews(Dataset):
    """Item i: one view of photo ``rows[i]`` of a label run as uint8 (3, S, S): a random one of its V views for
    training, the centre view (0) for evaluation; unreadable files become items that ``collate_views`` drops."""

    def __init__(self, labels: Labels, rows: list[int], size: int, train: bool) -> None:
        self.labels, self.rows, self.size, self.train = labels, rows, size, train
        self.views = labels.view_boxes.shape[1]

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        row = self.rows[i]
        view = random.randrange(self.views) if self.train else 0
        try:
            # decoded at >= 2x the student's size: a small view is cut from it without upsampling
            im = load_image(self.labels.paths[row], min_side=2 * self.size)
            box, flip = self.labels.view_boxes[row, view].tolist(), bool(self.labels.view_flips[row, view])
            pixels = torch.frombuffer(bytearray(cut_view(im, box, flip, self.size).tobytes()), dtype=torch.uint8)
            return {"row": row, "view": view, "image": pixels.view(self.size, self.size, 3).permute(2, 0, 1)}
        except Exception as e:  # noqa: BLE001 - the file changed since it was labelled; skip it, say so
            log.warning("skipping %s: %s", self.labels.paths[row], e)
            return {"row": row, "view": view, "image": None}


def collate_views(items: list[dict]) -> dict:
    good = [it for it in items if it["image"] is not None]
    return {"rows": torch.tensor([it["row"] for it in good], dtype=torch.long),
            "views": torch.tensor([it["view"] for it in good], dtype=torch.long),
            "images": torch.stack([it["image"] for it in good]) if good else torch.empty(0, dtype=torch.uint8)}


class ObjectStudent(Student):
    """The student of training.distill plus the two object heads."""

    def __init__(self, encoder: VGGEncoder, teacher_dim: int, num_classes: int, num_objects: int, size: int,
                 mean, std) -> None:
        super().__init__(encoder, teacher_dim, num_classes, size, mean, std)
        self.to_objects = nn.Linear(encoder.feature_dim, num_objects)
        self.to_counts = nn.Linear(encoder.feature_dim, num_objects)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        v = self.embed(x)  # (B, D); x is already at the student's size, so embed's resize is the identity
        return self.to_features(v), self.to_logits(v), self.to_objects(v), self.to_counts(v)


def held_out_paths(images: DistillImages, hold_out=()) -> set[str]:
    """The photos distillation must not learn from: the --val-split of --annotations and the --hold-out inputs."""
    held: list[str] = []
    if images.annotations and images.val_split:
        if not images.images:
            raise SystemExit("--annotations needs --images")
        held += [r.path for r in read_dataset(images.dataset, images.annotations, images.images, images.val_split)]
    held += [it.path for it in expand_inputs(list(hold_out or []), warn=log.warning)]
    return {os.path.realpath(p) for p in held}


class LabelDistillObjective(DistillObjective):
    """The engine's objective for ``captioner distill --labels``: DistillObjective's optimizer, schedule and model
    files (encoder.safetensors, last_encoder.safetensors, the training state), with cached targets."""
    desc = "distill epoch"
    log_keys = ("loss", "kl", "cos", "obj", "count")
    plot_keys = ("val_top1_agreement", "val_cosine", "val_object_f1", "val_count_accuracy")

    def __init__(self, opts: DistillTraining, device, world: int, rank: int) -> None:
        self.opts, self.device, self.world = opts, device, world
        imgs, lab, o, run = opts.images, opts.labels, opts.optim, opts.run
        self.out = Path(run.out)
        self.amp_dtype = amp_settings(o.amp, device)[0]
        self.labels = Labels(lab.labels)
        last = self.out / "last_encoder.safetensors"
        if run.resume and last.is_file():  # the run's own layout, whatever flags it is resumed with
            cfg, encoder = encoder_layout(last)
        elif run.init_from:  # a saved model's encoder, layout and preprocessing (the student flags are ignored)
            model, _ = load_pretrained(run.init_from, "cpu")
            cfg, encoder = model.cfg, model.encoder
        else:
            cfg = opts.student.model_config()
            encoder = VGGEncoder(cfg.encoder)
        self.cfg = cfg
        held = held_out_paths(imgs, lab.hold_out)
        ok = self.labels.ok.tolist()
        # real paths: a photo reached through a link (or a relative path from another folder) is still held out
        keys = [os.path.realpath(p) for p in self.labels.paths]
        self.train_rows = [i for i, k in enumerate(keys) if ok[i] and k not in held]
        val_rows = [i for i, k in enumerate(keys) if ok[i] and k in held]
        if not self.train_rows:
            raise SystemExit(f"captioner distill: no labelled photo left to learn from in {lab.labels}")
        self.val_rows = val_rows[: imgs.max_val_images] if imgs.max_val_images else val_rows
        presence, counts = self.labels.objects(lab.object_threshold)
        self.targets = {"features": self.labels.features, "logits": self.labels.logits, "objects": presence,
                        "counts": counts.log1p()}
        t = self.labels.settings["teacher"]
        self.model = ObjectStudent(encoder, t["feature_dim"], t["num_classes"], len(self.labels.classes),
                                   cfg.preprocess.image_size, cfg.preprocess.mean, cfg.preprocess.std).to(device)
        if o.channels_last:
            encoder.to(memory_format=torch.channels_last)
        self.student_ddp = torch.nn.parallel.DistributedDataParallel(self.model) if world > 1 else self.model
        size = cfg.preprocess.image_size
        train_ds = LabelledViews(self.labels, self.train_rows, size, train=True)
        self.sampler = DistributedSampler(train_ds, world, rank, seed=o.seed) if world > 1 else RandomSampler(train_ds)
        self.loader = DataLoader(train_ds, o.batch_size, sampler=self.sampler, num_workers=imgs.workers,
                                 collate_fn=collate_views, drop_last=True, persistent_workers=imgs.workers > 0)
        self.val_loader = DataLoader(LabelledViews(self.labels, self.val_rows, size, train=False), o.batch_size,
                                     num_workers=imgs.workers, collate_fn=collate_views) if self.val_rows else None
        self.meta = {"teacher": t["name"], "labels": str(lab.labels), "encoder": cfg.to_dict()["encoder"],
                     "preprocess": cfg.to_dict()["preprocess"]}

    def start(self) -> None:
        run = self.opts.run
        if not run.resume:  # standardise each teacher feature over the training photos' centre views
            f = self.labels.features[self.train_rows, 0].float()
            self.model.t_mean.copy_(f.mean(0))
            self.model.t_std.copy_(f.std(0).clamp_min(1e-3))
        if run.init_from and not run.resume:
            self._fit_heads()
        if is_main():
            log.info("distilling cached %s + detector labels -> %s encoder (%.1fM parameters, %d px) on %d photos "
                     "(%d held out), device %s, amp %s", self.labels.settings["teacher"]["name"],
                     self.cfg.encoder.arch, sum(p.numel() for p in self.model.encoder.parameters()) / 1e6,
                     self.cfg.preprocess.image_size, len(self.train_rows), len(self.val_rows), self.device,
                     self.amp_dtype)

    @torch.no_grad()
    def _fit_heads(self, limit: int = 4000) -> None:
        """An encoder from a saved model already knows something: its four heads start at the ridge regression of
        the centre views' targets on its v (presence as a clipped logit), so that the first steps' gradients do not
        come from random heads and undo what it knows."""
        rows = self.train_rows[:: max(1, len(self.train_rows) // limit)][:limit]
        loader = DataLoader(LabelledViews(self.labels, rows, self.cfg.preprocess.image_size, train=False),
                            self.opts.optim.batch_size, num_workers=self.opts.images.workers, collate_fn=collate_views)
        self.model.eval()
        vs, kept = [], []
        for batch in tqdm(loader, desc="fitting heads", disable=not is_main(), dynamic_ncols=True, leave=False):
            if len(batch["rows"]):
                vs.append(self.model.embed(batch["images"].to(self.device).float().div_(255)).float())
                kept.append(torch.stack([batch["rows"], batch["views"]]))
        self.model.train()
        r, v = torch.cat(kept, 1)
        t = self._targets({"rows": r, "views": v})
        t["logits"] = t["logits"] - t["logits"].mean(-1, keepdim=True)  # softmax ignores a shift
        t["objects"] = t["objects"].clamp(0.05, 0.95).logit()
        m = self.model
        fit_heads_to(torch.cat(vs), ((m.to_features, t["features"]), (m.to_logits, t["logits"]),
                                     (m.to_objects, t["objects"]), (m.to_counts, t["counts"])))
        if is_main():
            log.info("student encoder from the model %s; its heads fitted to %d photos' centre views",
                     self.opts.run.init_from, len(r))

    def batches(self, epoch: int):
        self.model.train()
        for batch in self.loader:
            if len(batch["rows"]):
                yield batch

    def _targets(self, batch) -> dict[str, torch.Tensor]:
        r, v = batch["rows"], batch["views"]
        t = {k: x[r, v].float().to(self.device) for k, x in self.targets.items()}
        t["features"] = (t["features"] - self.model.t_mean) / self.model.t_std
        return t

    def _losses(self, out, t) -> tuple[torch.Tensor, ...]:
        sf, sl, so, sc = out
        _, kl, cos = distill_loss((sf, sl), (t["features"], t["logits"]), self.opts.teacher.temperature, 1.0)
        # summed over the 80 classes, as the KL over 1000: a mean would drown the few classes present in the many absent
        obj = F.binary_cross_entropy_with_logits(so.float(), t["objects"], reduction="sum") / so.size(0)
        count = F.smooth_l1_loss(sc.float(), t["counts"], reduction="sum") / sc.size(0)
        w, lab = self.opts.teacher.feature_weight, self.opts.labels
        return kl + w * cos + lab.object_weight * obj + lab.count_weight * count, kl, cos, obj, count

    def step(self, batch) -> tuple[torch.Tensor, dict, int]:
        x = batch["images"].to(self.device, non_blocking=True).float().div_(255)
        losses = self._losses(self.student_ddp(x), self._targets(batch))
        b = x.size(0)
        return losses[0], {k: (float(v.detach()) * b, b) for k, v in zip(self.log_keys, losses)}, b

    @torch.no_grad()
    def evaluate(self, epoch: int, row: dict) -> tuple[dict, float]:
        """On the held-out photos' centre views: the losses, ImageNet top-1 agreement, the F1 of object presence
        (detector score >= the threshold) and, over the classes present, how often the rounded count is right."""
        if self.val_loader is None:
            return {}, -row["train_loss"]
        self.model.eval()
        sums = dict.fromkeys(("loss", "kl", "cos", "obj", "count", "top1", "tp", "fp", "fn", "hit", "present"), 0.0)
        n = 0
        for batch in tqdm(self.val_loader, desc="held out", disable=not is_main(), dynamic_ncols=True, leave=False):
            if not len(batch["rows"]):
                continue
            x = batch["images"].to(self.device).float().div_(255)
            with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
                out = self.model(x)
            t = self._targets(batch)
            b = x.size(0)
            for k, v in zip(("loss", "kl", "cos", "obj", "count"), self._losses(out, t)):
                sums[k] += float(v) * b
            sums["top1"] += float((out[1].argmax(-1) == t["logits"].argmax(-1)).sum())
            pred, true = out[2].float().sigmoid() >= 0.5, t["objects"] >= self.opts.labels.object_threshold
            sums["tp"] += float((pred & true).sum())
            sums["fp"] += float((pred & ~true).sum())
            sums["fn"] += float((~pred & true).sum())
            count = t["counts"].expm1().round()
            guess = out[3].float().expm1().round().clamp_min(0)
            sums["hit"] += float(((guess == count) & true).sum())
            sums["present"] += float(true.sum())
            n += b
        self.model.train()
        n = max(n, 1)
        up = {f"val_{k}": sums[k] / n for k in ("loss", "kl", "cos", "obj", "count")}
        up["val_cosine"] = 1 - up.pop("val_cos")
        up["val_top1_agreement"] = sums["top1"] / n
        up["val_object_f1"] = 2 * sums["tp"] / max(1.0, 2 * sums["tp"] + sums["fp"] + sums["fn"])
        up["val_count_accuracy"] = sums["hit"] / max(1.0, sums["present"])
        return up, -up["val_loss"]
