"""How much of the distillation teacher's information does an encoder carry? A proxy for fitting a decoder.

recipes/teacher_bound.py writes the teacher's reduced features into a feature cache under --model's keys. This
fits, on the training images, a ridge regression to those features from one of

* --model's own v (the default; teacher_bound.py prints the same figure);
* --encoder RUN/encoder.safetensors, a `captioner distill` student (layout and crop size read from the file): a
  distillation run can be followed between epochs for a few minutes each, instead of a decoder fit (~40 min);
* --teacher-seen-at S: the teacher itself, on the crop reduced to S px and resized back up: what a student
  whose input is S px could carry at best,

and prints R^2 on train and on val:

    python recipes/probe_student.py --model captioner/models/default --cache runs/teacher-cache \\
        --encoder runs/distill/encoder.safetensors -- --annotations $D/dataset_flickr8k.json --images $D

Without --cache it needs no teacher_bound.py run: it computes the teacher's features itself (once per image set,
kept in --teacher-cache), fits the same PCA on train, and also measures photos of other kinds, --extra NAME=FOLDER
(e.g. COCO photos no encoder was distilled on); --encoder may then be given several times, one row each:

    python recipes/probe_student.py --teacher-cache runs/probe-teacher --extra coco-mini=$C \\
        --encoder runs/v6/distill-coco/encoder.safetensors -- --annotations $D/dataset_flickr8k.json --images $D
"""
from __future__ import annotations

import argparse
import hashlib
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from teacher_bound import explained, ridge, teacher_features  # noqa: E402

from captioner.checkpoint import load_pretrained  # noqa: E402
from training import train as train_mod  # noqa: E402
from training.distill import TEACHERS, encoder_layout  # noqa: E402
from training.datasets import ImageRecord  # noqa: E402
from training.features import cache_key, compute_features  # noqa: E402
from training.options import CaptionData  # noqa: E402
from captioner.fileio import atomic_write  # noqa: E402
from captioner.inputs import expand_inputs  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from captioner.cli import parsers


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="captioner/models/default", help="the model teacher_bound.py keyed the cache by")
    p.add_argument("--cache", help="the feature cache folder teacher_bound.py wrote (else see --teacher-cache)")
    p.add_argument("--teacher-cache", help="without --cache: where the teacher's features of each image set go")
    p.add_argument("--extra", action="append", default=[], metavar="NAME=FOLDER",
                   help="without --cache: another image set to measure R^2 on (the ridge is still fitted on train)")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--encoder", action="append",
                       help="a captioner distill encoder.safetensors to probe instead of --model's (several "
                            "without --cache)")
    which.add_argument("--teacher-seen-at", type=int, metavar="S", help="probe the teacher on S-px images")
    p.add_argument("--teacher", choices=sorted(TEACHERS), default="efficientnet-lite0")
    p.add_argument("--teacher-size", type=int, default=224)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("data", nargs=argparse.REMAINDER, help="after --: the data flags given to teacher_bound.py")
    return p


def main(args: argparse.Namespace) -> dict:
    if not args.cache:
        return probe_sets(args)
    args.encoder = args.encoder[0] if args.encoder else None
    model, _ = load_pretrained(args.model, "cpu")
    train_args = parsers.train().parse_args([*[a for a in args.data if a != "--"], "--output", "unused"])
    records = dict(zip(("train", "val"), train_mod.read_records(CaptionData.from_args(train_args))))
    targets = {}
    for split, rec in records.items():  # keyed by --model's own encoder, before any swap below
        path = Path(args.cache) / f"{cache_key(model, rec)}.safetensors"
        if not path.is_file():
            raise SystemExit(f"{path}: no teacher features for the {split} split; write them with "
                             f"recipes/teacher_bound.py --model {args.model} and the same data flags")
        targets[split] = load_file(str(path))
    if args.teacher_seen_at:
        teacher = TEACHERS[args.teacher]().to(memory_format=torch.channels_last)
        what = f"the teacher on {args.teacher_seen_at}-px images"

        def probe(rec):
            return teacher_features(teacher, rec, args.teacher_size, args.batch_size, args.workers,
                                    seen_at=args.teacher_seen_at)
    else:
        what = f"the v of {args.encoder or args.model}"
        if args.encoder:
            cfg, encoder = encoder_layout(Path(args.encoder))
            encoder.load_imagenet(args.encoder)
            model.cfg.encoder, model.cfg.preprocess, model.encoder = cfg.encoder, cfg.preprocess, encoder

        def probe(rec):
            return compute_features(model, rec, torch.device("cpu"), None, args.batch_size, args.workers)[0].fc
    x = {split: probe(rec) for split, rec in records.items()}
    ok = {split: t["ok"] for split, t in targets.items()}
    predict = ridge(x["train"][ok["train"]], targets["train"]["fc"][ok["train"]])
    r2 = {split: explained(predict, x[split][ok[split]], targets[split]["fc"][ok[split]]) for split in x}
    for split, r in r2.items():
        print(f"{split}: {what} explains R^2 = {r:.3f} of the teacher's features (ridge fitted on train)")
    return r2


def _student(args, path: str | None):
    model, _ = load_pretrained(args.model, "cpu")
    if path:
        cfg, encoder = encoder_layout(Path(path))
        encoder.load_imagenet(path)
        model.cfg.encoder, model.cfg.preprocess, model.encoder = cfg.encoder, cfg.preprocess, encoder
    return model


def probe_sets(args: argparse.Namespace) -> dict:
    """R^2 per encoder and image set, the teacher's features computed here (PCA to v's size fitted on train)."""
    if not args.teacher_cache:
        raise SystemExit("give --cache (a teacher_bound.py cache) or --teacher-cache (computed here)")
    train_args = parsers.train().parse_args([*[a for a in args.data if a != "--"], "--output", "unused"])
    sets = dict(zip(("train", "val"), train_mod.read_records(CaptionData.from_args(train_args))))
    for spec in args.extra:
        name, _, folder = spec.partition("=")
        sets[name] = [ImageRecord(str(Path(i.path).resolve()), i.path) for i in expand_inputs([folder])]
    teacher = None
    targets = {}
    for name, rec in sets.items():
        key = hashlib.sha256("\n".join(r.path for r in rec).encode()).hexdigest()[:16]
        path = Path(args.teacher_cache) / f"{args.teacher}-{args.teacher_size}-{name}-{key}.safetensors"
        if not path.is_file():
            teacher = teacher or TEACHERS[args.teacher]().to(memory_format=torch.channels_last)
            t = teacher_features(teacher, rec, args.teacher_size, args.batch_size, args.workers)
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(path, lambda tmp, t=t: save_file({"features": t.contiguous()}, tmp))
        targets[name] = load_file(str(path))["features"].double()
    rows = {}
    for enc in args.encoder or [None]:
        model = _student(args, enc)
        x = {n: compute_features(model, rec, torch.device("cpu"), None, args.batch_size, args.workers)
             for n, rec in sets.items()}
        ok = {n: x[n][1] & (targets[n].abs().sum(1) > 0) for n in sets}
        t_fit = targets["train"][ok["train"]]
        mu, dim = t_fit.mean(0), x["train"][0].fc.size(1)
        _, _, basis = torch.pca_lowrank(t_fit - mu, q=min(dim, *t_fit.shape), center=False, niter=6)
        z = {n: (targets[n][ok[n]] - mu) @ basis for n in sets}
        predict = ridge(x["train"][0].fc[ok["train"]], z["train"])
        rows[enc or args.model] = {n: explained(predict, x[n][0].fc[ok[n]].double(), z[n]) for n in sets}
    names = list(sets)
    print(f"{'encoder':<60} " + " ".join(f"{n:>10}" for n in names))
    for enc, r in rows.items():
        print(f"{enc:<60} " + " ".join(f"{r[n]:>10.3f}" for n in names))
    print("R^2 of the teacher's PCA-reduced features explained by a ridge from v fitted on train; images: "
          + ", ".join(f"{n} {len(sets[n])}" for n in names))
    return rows


if __name__ == "__main__":
    main(get_args_parser().parse_args())
