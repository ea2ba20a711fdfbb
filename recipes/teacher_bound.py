"""How much better could captions get with a perfect student? A diagnostic, not part of the default recipe.

Writes the distillation teacher's features (EfficientNet-Lite0, 224 px centre crop, pooled 1280-d, PCA to the
model's v size and scaled like its v) into a feature cache under the keys of MODEL's own encoder, so that a
frozen-encoder run reading that cache fits a decoder to the teacher's features instead of the student's:

    python recipes/teacher_bound.py --model captioner/models/default --out runs/teacher-cache -- \\
        --annotations $D/dataset_flickr8k.json --images $D
    captioner train --init-from captioner/models/default --fresh-decoder --seed 1 --freeze-encoder \\
        --feature-cache runs/teacher-cache --annotations $D/dataset_flickr8k.json --images $D --epochs 12 \\
        --output runs/teacher-bound

Only the evaluation view (centre crop) is written: a run with --feature-views K > 1 would compute the student's
other views itself. It also prints how much of the teacher's (reduced) features the student's v explains linearly
(ridge R^2, fitted on train, measured on val). Needs pip install -e ".[distill]"; one torch process at a time on
a small CPU.
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch.utils.data import DataLoader
from tqdm import tqdm

from captioner.checkpoint import load_pretrained
from captioner.config import PreprocessConfig
from training import train as train_mod
from training.datasets import CaptionDataset, collate
from training.distill import IMAGENET_MEAN, IMAGENET_STD, TEACHERS
from training.features import cache_key, compute_features
from training.options import CaptionData
from captioner.cli import parsers


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="captioner/models/default", help="saved model whose cache keys are used")
    p.add_argument("--teacher", choices=sorted(TEACHERS), default="efficientnet-lite0")
    p.add_argument("--teacher-size", type=int, default=224)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--out", required=True, help="feature cache folder to write")
    p.add_argument("data", nargs=argparse.REMAINDER,
                   help="after --: the data flags of the captioner train run that will read the cache "
                        "(--annotations, --images, splits, --max-train-images, ...)")
    return p


@torch.no_grad()
def teacher_features(teacher, records, size: int, batch_size: int, workers: int,
                     seen_at: int | None = None) -> torch.Tensor:
    """(N, teacher_dim) pooled features of each image's centre crop, as distillation measures the teacher; rows
    of unreadable images stay 0 (the student's cache marks them not ok). With ``seen_at``, the crop is first
    reduced to that many pixels and resized back up: the teacher sees only what a student at that size sees."""
    at = seen_at or size
    ds = CaptionDataset(records, PreprocessConfig(image_size=at, resize=at, mean=IMAGENET_MEAN, std=IMAGENET_STD))
    out = torch.zeros(len(records), teacher.feature_dim)
    for b in tqdm(DataLoader(ds, batch_size, num_workers=workers, collate_fn=collate), desc="teacher"):
        if b["images"].size(0):
            x = b["images"] if at == size else F.interpolate(b["images"], size=(size, size), mode="bilinear")
            out[b["indices"]] = teacher(x)[0].float()
    return out


def ridge(x, y, lam: float = 1e-2):
    """The ridge regression x -> y (with a bias) as a function."""
    def aug(a):
        return torch.cat([a, torch.ones(len(a), 1)], 1).double()
    a = aug(x)
    w = torch.linalg.solve(a.T @ a + lam * len(a) * torch.eye(a.size(1), dtype=a.dtype), a.T @ y.double())
    return lambda x_: aug(x_) @ w


def explained(predict, x: torch.Tensor, z: torch.Tensor) -> float:
    """R^2 of predict(x) for z, around z's origin (the training mean, where the cache's features are centred)."""
    z = z.double()
    return float(1 - ((predict(x) - z) ** 2).sum() / (z ** 2).sum())


def main(args: argparse.Namespace) -> None:
    model, _ = load_pretrained(args.model, "cpu")
    teacher = TEACHERS[args.teacher]().to(memory_format=torch.channels_last)
    data = [a for a in args.data if a != "--"]
    train_data = CaptionData.from_args(parsers.train().parse_args([*data, "--output", "unused"]))
    rows = {}
    for split, rec in zip(("train", "val"), train_mod.read_records(train_data)):  # the records training will key
        t = teacher_features(teacher, rec, args.teacher_size, args.batch_size, args.workers)
        features, ok = compute_features(model, rec, torch.device("cpu"), None, args.batch_size, args.workers)
        v = features.fc
        rows[split] = (cache_key(model, rec), t, v, ok)
    _, t_fit, v_fit, ok = rows["train"]  # PCA, scale and ridge are fitted on the training images
    t_fit, v_fit = t_fit[ok], v_fit[ok]
    mu, dim = t_fit.mean(0), v_fit.size(1)
    _, s, basis = torch.pca_lowrank(t_fit - mu, q=min(dim, *t_fit.shape), center=False, niter=6)
    print(f"{basis.size(1)} principal components keep {float((s ** 2).sum() / ((t_fit - mu) ** 2).sum()):.1%} "
          f"of the teacher's feature variance on train")
    basis = torch.cat([basis, basis.new_zeros(basis.size(0), dim - basis.size(1))], 1)  # (teacher_dim, dim)
    scale = v_fit.std() / ((t_fit - mu) @ basis).std()  # the student's overall scale, so lr and init still fit
    predict = ridge(v_fit, (t_fit - mu) @ basis)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for split, (key, t, v, ok) in rows.items():
        z = (t - mu) @ basis
        tmp, path = out / f"{key}.tmp{os.getpid()}", out / f"{key}.safetensors"
        save_file({"fc": (z * scale).float().contiguous(), "ok": ok}, str(tmp))  # read as the cache's fc
        os.replace(tmp, path)  # a half-written cache file must never be read as features
        print(f"{split}: {len(z)} teacher features -> {path}; the student's v explains R^2 = "
              f"{explained(predict, v[ok], z[ok]):.3f} of them (ridge fitted on train)")


if __name__ == "__main__":
    main(get_args_parser().parse_args())
