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
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from teacher_bound import explained, ridge, teacher_features  # noqa: E402

from captioner.checkpoint import load_pretrained  # noqa: E402
from training import train as train_mod  # noqa: E402
from training.distill import TEACHERS, encoder_layout  # noqa: E402
from training.features import cache_key, compute_features  # noqa: E402
from captioner.cli import parsers


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="captioner/models/default", help="the model teacher_bound.py keyed the cache by")
    p.add_argument("--cache", required=True, help="the feature cache folder teacher_bound.py wrote")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--encoder", help="a captioner distill encoder.safetensors to probe instead of --model's")
    which.add_argument("--teacher-seen-at", type=int, metavar="S", help="probe the teacher on S-px images")
    p.add_argument("--teacher", choices=sorted(TEACHERS), default="efficientnet-lite0")
    p.add_argument("--teacher-size", type=int, default=224)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("data", nargs=argparse.REMAINDER, help="after --: the data flags given to teacher_bound.py")
    return p


def main(args: argparse.Namespace) -> dict[str, float]:
    model, _ = load_pretrained(args.model, "cpu")
    train_args = parsers.train().parse_args([*[a for a in args.data if a != "--"], "--output", "unused"])
    records = dict(zip(("train", "val"), train_mod.read_records(train_args)))
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
            return compute_features(model, rec, torch.device("cpu"), None, args.batch_size, args.workers)[0]
    x = {split: probe(rec) for split, rec in records.items()}
    ok = {split: t["ok"] for split, t in targets.items()}
    predict = ridge(x["train"][ok["train"]], targets["train"]["features"][ok["train"]])
    r2 = {split: explained(predict, x[split][ok[split]], targets[split]["features"][ok[split]]) for split in x}
    for split, r in r2.items():
        print(f"{split}: {what} explains R^2 = {r:.3f} of the teacher's features (ridge fitted on train)")
    return r2


if __name__ == "__main__":
    main(get_args_parser().parse_args())
