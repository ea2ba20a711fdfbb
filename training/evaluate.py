"""``captioner evaluate``: caption a dataset split with a checkpoint (or read a results file) and score it."""
from __future__ import annotations

import argparse
import logging
import time
from collections import Counter
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from captioner.api import Captioner
from captioner.batch import caption_batches
from captioner.fileio import write_json_atomic
from captioner.generation import GenerationConfig

from .datasets import CaptionDataset, collate, read_dataset
from .metrics import format_metrics, read_results, score_captions, write_results

log = logging.getLogger("captioner.evaluate")


def caption_records(cap: Captioner, records, batch_size: int, workers: int, gen: GenerationConfig,
                    progress: bool = True) -> dict:
    """image_id -> best caption for every readable record."""
    ds = CaptionDataset(records, cap.cfg.preprocess, train=False)
    dl = DataLoader(ds, batch_size=batch_size, num_workers=workers, collate_fn=collate)
    preds = {}
    for b in caption_batches(cap, dl, gen, progress=progress):
        for _, msg in b.errors:
            log.warning("skipped %s", msg)
        preds.update((records[i].image_id, text) for i, text in b.best())
    return preds


def variety(preds: dict) -> dict:
    """How generic the captions are: distinct captions over the images, and the commonest one with its count."""
    counts = Counter(preds.values())
    top, n = counts.most_common(1)[0] if counts else ("", 0)
    return {"distinct_captions": len(counts), "commonest_caption": top, "commonest_caption_count": n}


def main(args: argparse.Namespace) -> dict:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    gen = GenerationConfig.from_args(args)  # a bad option fails before the dataset is read
    records = read_dataset(args.dataset, args.annotations, args.images, args.split)
    records = [r for r in records if r.captions][: args.max_images or None]
    t0 = time.perf_counter()
    if args.results:
        preds = read_results(args.results)
        known = {r.image_id for r in records}
        preds = {k: v for k, v in preds.items() if k in known}
    else:
        cap = Captioner.from_pretrained(args.checkpoint, device=args.device, precision=args.precision)
        with torch.inference_mode():
            preds = caption_records(cap, records, args.batch_size, args.workers, gen, progress=not args.no_progress)
        write_results(args.out, preds)
    refs = {r.image_id: r.captions for r in records if r.image_id in preds}
    if not preds:
        raise SystemExit("no image could be captioned; nothing to score")
    metrics = score_captions(preds, refs, use_java=False if args.no_java else None)
    metrics.update({"split": args.split, "dataset": args.dataset, "annotations": str(args.annotations),
                    "checkpoint": args.checkpoint, "beam_size": args.beam_size,
                    "precision": None if args.results else cap.precision,
                    "skipped_images": len(records) - len(preds), "seconds": round(time.perf_counter() - t0, 1),
                    **variety(preds)})
    out = Path(args.metrics_out or Path(args.out).with_suffix(".metrics.json"))
    write_json_atomic(out, metrics)
    print(format_metrics(metrics))
    print(f"{len(preds)} images scored ({metrics['skipped_images']} skipped); {metrics['distinct_captions']} distinct "
          f"captions, the commonest given to {metrics['commonest_caption_count']} images; metrics -> {out}")
    return metrics
