"""``captioner export``: copy a trained checkpoint into a compact, shippable model directory.

Float weights are stored as fp16 (loaded back as fp32), the training state is left behind, and the model
card and metrics travel along; ``--metrics`` merges an evaluation's metrics JSON into metrics.json.
``--add-decoders`` makes an ensemble: the caption decoders of other checkpoints that share this one's frozen encoder
and vocabulary join its own, and their next-word probabilities are averaged at every step.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn as nn

from ..checkpoint import CARD, VQA_METRICS, CheckpointError, load_pretrained, read_metrics, save_pretrained
from ..decoder import DecoderEnsemble
from ..model import CaptionModel
from ..tokenizer import Vocabulary




def _members(model: CaptionModel) -> list[nn.Module]:
    return list(model.decoder.members) if isinstance(model.decoder, DecoderEnsemble) else [model.decoder]


def add_decoders(model: CaptionModel, vocab: Vocabulary, paths: list[str]) -> CaptionModel:
    """``model`` with its caption decoder and those of the checkpoints at ``paths`` as one ensemble
    (CaptionModel.with_decoder: config and modules agree); ``model`` itself when there are none.

    The members must have read the same v, so the encoders must hold the same weights (compared at fp16, the
    storage type of an exported model) and the preprocessing, vocabulary and decoder shape must match.
    """
    if not paths:
        return model
    cfg = model.cfg
    if cfg.attention:
        raise CheckpointError("--add-decoders: attention decoders are not ensembled (each member would draw its own "
                              "heatmaps); ensemble FC decoders, or ship the attention model alone")
    mine = {k: t.to(torch.float16) if t.is_floating_point() else t for k, t in model.encoder.state_dict().items()}
    members = _members(model)
    for path in paths:
        other, other_vocab = load_pretrained(path, "cpu")
        why = None
        if other_vocab.itos != vocab.itos:
            why = "its vocabulary differs"
        elif replace(other.cfg.decoder, members=1) != replace(cfg.decoder, members=1):
            why = f"its decoder has another shape ({other.cfg.decoder} vs {cfg.decoder})"
        elif other.cfg.encoder != cfg.encoder or other.cfg.preprocess != cfg.preprocess:
            why = "its encoder or preprocessing differs"
        elif any(not torch.equal(mine[k], t.to(mine[k].dtype)) for k, t in other.encoder.state_dict().items()):
            why = ("its encoder weights differ: members must be trained on this checkpoint's frozen encoder "
                   "(captioner train --init-from CHECKPOINT --fresh-decoder --freeze-encoder)")
        if why:
            raise CheckpointError(f"--add-decoders {path}: {why}")
        members += _members(other)
    decoder = replace(cfg.decoder, members=len(members))
    ensemble = DecoderEnsemble(decoder, cfg.vocab_size, cfg.decoder_image_dim)
    ensemble.members = nn.ModuleList(members)
    return model.with_decoder(decoder, ensemble)


def ensemble_metrics(first: dict, paths: list[str]) -> dict:
    """An ensemble's metrics.json: each member's own training-run metrics under 'members' (at the top level they
    would pass one member's numbers off as the ensemble's), the shared VQA results and tasks kept as they were."""
    shared = ("tasks", "evaluations", *VQA_METRICS)
    members = [first] + [read_metrics(p) or {} for p in paths[1:]]
    out = {k: first[k] for k in shared if k in first}
    out["members"] = [{"checkpoint": p, **{k: v for k, v in m.items() if k not in shared}}
                      for p, m in zip(paths, members)]
    return out


def main(args: argparse.Namespace) -> int:
    src = Path(args.checkpoint)
    model, vocab = load_pretrained(src, "cpu")
    try:
        model = add_decoders(model, vocab, args.add_decoders)
    except CheckpointError as e:
        print(f"captioner export: error: {e}", file=sys.stderr)
        return 2
    if args.name:
        model.cfg.name = args.name
    if args.version:
        model.cfg.version = args.version
    metrics = read_metrics(src) or {}
    if args.add_decoders:
        metrics = ensemble_metrics(metrics, [str(src), *args.add_decoders])
    if args.domain:
        metrics["domain"] = args.domain
    for m in args.metrics:
        metrics.setdefault("evaluations", []).append(json.loads(Path(m).read_text()))
    card = Path(args.card).read_text() if args.card else ((src / CARD).read_text() if (src / CARD).is_file() else None)
    if args.format == "onnx":
        return _onnx(model, vocab, src, Path(args.out), metrics, card)
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": None}[args.dtype]
    out = save_pretrained(model, vocab, args.out, metrics=metrics or None, card=card, dtype=dtype)
    size = sum(f.stat().st_size for f in out.iterdir())
    members = f", {model.cfg.decoder.members} caption decoders" if model.cfg.decoder.members > 1 else ""
    print(f"exported {src} -> {out} ({size / 2**20:.1f} MiB, {args.dtype} weights{members})")
    return 0


def _onnx(model: CaptionModel, vocab: Vocabulary, src: Path, out: Path, metrics: dict, card: str | None) -> int:
    try:
        from ..onnx_export import export_onnx
        import onnxscript  # noqa: F401  (torch.onnx's exporter needs it)
    except ImportError as e:
        print(f"captioner export: error: --format onnx needs {e.name}: pip install -e '.[onnx]'", file=sys.stderr)
        return 2
    files = {CARD: card} if card else {}
    if metrics:
        files["metrics.json"] = json.dumps(metrics, indent=2)
    try:
        export_onnx(model, vocab, out, files)
    except CheckpointError as e:
        print(f"captioner export: error: {e}", file=sys.stderr)
        return 2
    size = sum(f.stat().st_size for f in out.iterdir())
    print(f"exported {src} -> {out} (ONNX: encoder.onnx, decoder_start.onnx, decoder_step.onnx; {size / 2**20:.1f} MiB)")
    return 0
