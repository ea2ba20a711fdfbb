"""``captioner export``: copy a trained checkpoint into a compact, shippable model directory.

Float weights are stored as fp16 (loaded back as fp32), the training state is left behind, and the model
card and metrics travel along; ``--metrics`` merges an evaluation's metrics JSON into metrics.json.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from .checkpoint import CARD, load_pretrained, read_metrics, save_pretrained


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser("captioner export", add_help=add_help, description=__doc__,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="trained checkpoint directory (e.g. runs/x/best)")
    p.add_argument("--out", required=True, help="directory to write (replaced atomically)")
    p.add_argument("--dtype", choices=["fp16", "bf16", "fp32"], default="fp16", help="storage type of float weights")
    p.add_argument("--name", help="model name recorded in config.json")
    p.add_argument("--version", help="model version recorded in config.json")
    p.add_argument("--metrics", action="append", default=[], metavar="JSON",
                   help="evaluation metrics JSON to merge into metrics.json under 'evaluations' (repeatable)")
    p.add_argument("--card", help="Markdown model card to ship as README.md (default: the checkpoint's own)")
    return p


def main(args: argparse.Namespace) -> int:
    src = Path(args.checkpoint)
    model, vocab = load_pretrained(src, "cpu")
    if args.name:
        model.cfg.name = args.name
    if args.version:
        model.cfg.version = args.version
    metrics = read_metrics(src) or {}
    for m in args.metrics:
        metrics.setdefault("evaluations", []).append(json.loads(Path(m).read_text()))
    card = Path(args.card).read_text() if args.card else ((src / CARD).read_text() if (src / CARD).is_file() else None)
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": None}[args.dtype]
    out = save_pretrained(model, vocab, args.out, metrics=metrics or None, card=card, dtype=dtype)
    size = sum(f.stat().st_size for f in out.iterdir())
    print(f"exported {src} -> {out} ({size / 2**20:.1f} MiB, {args.dtype} weights)")
    return 0
