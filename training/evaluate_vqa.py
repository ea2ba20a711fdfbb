"""``captioner evaluate --task vqa``: multiple-choice accuracy overall and per question type, next to chance and
image-blind baselines.

Baselines reported:
  chance       mean of 1 / number of choices over the scored questions (what uniform guessing gets)
  zero-image   the same checkpoint with v = 0 (an ablation: how much its answers depend on the image; the model
               never saw v = 0 in training, so this can be below a properly trained blind model)
  blind model  --blind-checkpoint: a model trained with ``captioner train --task vqa --image-blind`` (v = 0 in
               training and test), the fair image-blind baseline (what the question and answers alone give)
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import time
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from tqdm import tqdm

from captioner.api import Captioner
from captioner.runtime import autocast
from captioner.fileio import write_json_atomic
from captioner.model import CaptionModel
from captioner.vqa import VQAUnavailableError

from .datasets import CaptionDataset, collate
from .features import FeatureDataset, batch_inputs, features_of
from .vqa_data import EncodedQA, VQAExample, encode_examples, group_by_image, pick_questions, qa_batch, read_vqa

log = logging.getLogger("captioner.evaluate_vqa")




# ----------------------------------------------------------------------------- scoring

@torch.no_grad()
def predict(model: CaptionModel, loader, encoded: Sequence[EncodedQA], per_image: Sequence[Sequence[int]],
            device: torch.device, ctx=contextlib.nullcontext, modes: Sequence[str] = ("image",),
            chunk: int = 1024, progress: bool = True) -> dict[str, dict]:
    """Answer every question of every image in ``loader`` (image-level batches), encoding each image once.

    modes: 'image' (v from the image) and/or 'zero' (v = 0). Returns per mode {"pred": [index or -1 when the
    image was unreadable], "probs": [list or None], "loss": summed cross-entropy, "n": questions answered}.
    """
    model.eval()
    out = {m: {"pred": [-1] * len(encoded), "probs": [None] * len(encoded), "loss": 0.0, "n": 0} for m in modes}
    for b in tqdm(loader, desc="answering", dynamic_ncols=True, leave=False, disable=not progress):
        for _, msg in b.get("errors", []):
            log.warning("skipped %s", msg)
        if len(b["indices"]) == 0:
            continue
        v = None
        if "image" in modes:
            with ctx():
                v = features_of(model, batch_inputs(b, device)).float()
        picks, rep = pick_questions(b["indices"].tolist(), per_image, 0, None)
        for s in range(0, len(picks), chunk):
            sel = picks[s:s + chunk]
            qb = {k: t.to(device) for k, t in qa_batch(encoded, sel).items()}
            for mode in modes:
                if mode == "zero":
                    vv = model.blank_features(len(sel), device)
                else:
                    vv = v[rep[s:s + chunk].to(device)]
                with ctx():
                    logits = model.answer_logits(vv, qb["question"], qb["choices"], qb["choice_mask"]).float()
                r = out[mode]
                r["loss"] += F.cross_entropy(logits, qb["target"], reduction="sum").item()
                r["n"] += len(sel)
                probs = logits.softmax(-1).cpu()
                for k, ex in enumerate(sel):
                    p = probs[k, :len(encoded[ex].choices)]
                    r["pred"][ex] = int(p.argmax())
                    r["probs"][ex] = p.tolist()
    return out


def summarize(encoded: Sequence[EncodedQA], types: Sequence[str], pred: Sequence[int]) -> dict:
    """Accuracy and chance overall and per question type over the answered questions (pred >= 0)."""
    acc, chance = defaultdict(list), defaultdict(list)
    for e, t, p in zip(encoded, types, pred):
        if p < 0:
            continue
        for k in ("all", t or "?"):
            acc[k].append(p == e.answer)
            chance[k].append(1 / len(e.choices))
    n = len(acc["all"])
    res = {"accuracy": sum(acc["all"]) / max(1, n), "chance": sum(chance["all"]) / max(1, n), "questions": n,
           "skipped": len(encoded) - n, "per_type": {}}
    for k in sorted(acc):
        if k != "all":
            res["per_type"][k] = {"accuracy": sum(acc[k]) / len(acc[k]), "chance": sum(chance[k]) / len(chance[k]),
                                  "questions": len(acc[k])}
    return res


def image_loader(records, model: CaptionModel, batch_size: int, workers: int, read_images: bool = True) -> DataLoader:
    """Image-level batches; with read_images=False (v = 0 only) a placeholder that never opens a file."""
    if not read_images:
        return DataLoader(FeatureDataset.placeholder(len(records)), batch_size=batch_size,
                          collate_fn=FeatureDataset.collate)
    ds = CaptionDataset(records, model.cfg.preprocess, train=False)
    return DataLoader(ds, batch_size=batch_size, num_workers=workers, collate_fn=collate)


def evaluate_model(cap: Captioner, examples: Sequence[VQAExample], batch_size: int, workers: int,
                   modes: Sequence[str] = ("image", "zero"), progress: bool = True
                   ) -> tuple[dict, dict, list[EncodedQA]]:
    """(metrics per mode, raw predictions per mode, encoded questions) for a loaded checkpoint."""
    if not cap.has_vqa:
        raise VQAUnavailableError(f"{cap.path}: this checkpoint has no VQA head")
    encoded = encode_examples(examples, cap.vocab, cap.cfg.vqa)
    records, per_image = group_by_image(examples)
    loader = image_loader(records, cap.model, batch_size, workers, read_images="image" in modes)
    raw = predict(cap.model, loader, encoded, per_image, cap.device,
                  lambda: autocast(cap.device, cap.precision), modes, progress=progress)
    types = [e.qtype for e in examples]
    return {m: summarize(encoded, types, raw[m]["pred"]) for m in modes}, raw, encoded


def format_vqa_metrics(m: dict) -> str:
    main = m["image"]
    cols = [("model", main)]
    if "zero" in m:
        cols.append(("v = 0", m["zero"]))
    if "blind_model" in m:
        cols.append(("blind model", m["blind_model"]))
    head = f"{'type':<10} {'questions':>9} " + " ".join(f"{c:>12}" for c, _ in cols) + f" {'chance':>8}"
    lines = [head, "-" * len(head)]
    rows = [("all", main)] + [(t, {"questions": d["questions"]}) for t, d in main["per_type"].items()]
    for t, _ in rows:
        get = (lambda r: r) if t == "all" else (lambda r, t=t: r["per_type"].get(t, {}))
        n = get(main)["questions"]
        accs = " ".join(f"{100 * get(r).get('accuracy', float('nan')):>11.2f}%" for _, r in cols)
        lines.append(f"{t:<10} {n:>9} {accs} {100 * get(main)['chance']:>7.2f}%")
    return "\n".join(lines)


def main(args: argparse.Namespace) -> dict:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    t0 = time.perf_counter()
    examples = read_vqa(args.dataset, args.split, args.annotations, args.images, args.questions, args.num_choices,
                        args.seed)
    examples = examples[: args.max_questions or None]
    cap = Captioner.from_pretrained(args.checkpoint, device=args.device, precision=args.precision)
    if not cap.has_vqa:
        raise SystemExit(f"{cap.path}: this checkpoint has no VQA head; train one with `captioner train --task vqa`")
    with torch.inference_mode():
        metrics, raw, encoded = evaluate_model(cap, examples, args.batch_size, args.workers,
                                               progress=not args.no_progress)
        if args.blind_checkpoint:
            blind = Captioner.from_pretrained(args.blind_checkpoint, device=args.device, precision=args.precision)
            bm, _, _ = evaluate_model(blind, examples, args.batch_size, args.workers, modes=("zero",),
                                      progress=not args.no_progress)
            metrics["blind_model"] = bm["zero"]
    results = []
    for i, (e, enc) in enumerate(zip(examples, encoded)):
        p = raw["image"]["pred"][i]
        if p >= 0:
            results.append({"qa_id": e.qid, "image_id": e.image_id, "question": e.question, "type": e.qtype,
                            "choices": [e.choices[k] for k in enc.keep], "answer": enc.answer, "pred": p,
                            "probs": [round(x, 5) for x in raw["image"]["probs"][i]]})
    write_json_atomic(args.out, results)
    metrics.update({"dataset": args.dataset, "split": args.split, "checkpoint": str(cap.path),
                    "blind_checkpoint": args.blind_checkpoint, "seconds": round(time.perf_counter() - t0, 1),
                    "baselines": {"zero": "same checkpoint with v = 0",
                                  "blind_model": "separately trained image-blind model (--image-blind)"}})
    out = Path(args.metrics_out or Path(args.out).with_suffix(".metrics.json"))
    write_json_atomic(out, metrics, indent=2)
    print(format_vqa_metrics(metrics))
    print(f"{metrics['image']['questions']} questions scored ({metrics['image']['skipped']} skipped, unreadable "
          f"images); chance = mean 1/#choices; metrics -> {out}")
    return metrics
