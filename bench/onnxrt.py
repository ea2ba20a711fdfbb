"""Torch vs ONNX Runtime on this CPU for one checkpoint, side by side in one run, round-robin so a shared machine's
load hits both alike: the encoder as Captioner runs it with each encoder_backend (chunks of encode_chunk), beam
search end to end with each backend, and greedy captioning fully in ONNX Runtime (the `captioner export --format
onnx` files) against torch, all from preprocessed pixels; captions are checked equal first.

    python bench/onnxrt.py                                   # the shipped model, batch 32, torch's thread count
    python bench/onnxrt.py --checkpoint runs/x/best --batch-size 8 --threads 1

ONNX Runtime is offered as a backend only where it is faster; the README and bench/README.md quote this bench.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from captioner.api import Captioner
from captioner.generation import GenerationConfig
from captioner.onnx_export import OnnxModel, export_onnx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchenv import describe, interleaved  # noqa: E402


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default=None, help="model directory (default: the shipped model)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--threads", type=int, default=None, help="torch and ONNX Runtime intra-op threads (default: torch's)")
    p.add_argument("--beam-size", type=int, default=3)
    p.add_argument("--repeats", type=int, default=15, help="timing rounds")
    return p


def main(args: argparse.Namespace) -> None:
    import onnxruntime as ort

    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    cap = Captioner.from_pretrained(args.checkpoint, device="cpu", precision="fp32")
    print(describe(torch.device("cpu")))
    print(f"model {cap.cfg.name} v{cap.cfg.version}, {cap.cfg.preprocess.image_size} px, batch {args.batch_size}, "
          f"onnxruntime {ort.__version__} ({threads} intra-op threads), torch fp32 NHWC, encoder chunks of "
          f"{cap.encode_chunk}")
    x = torch.rand(args.batch_size, 3, cap.cfg.preprocess.image_size, cap.cfg.preprocess.image_size,
                   generator=torch.Generator().manual_seed(0))
    x = (x - torch.tensor(cap.cfg.preprocess.mean).view(1, 3, 1, 1)) / torch.tensor(cap.cfg.preprocess.std).view(1, 3, 1, 1)
    xn = x.numpy()
    with tempfile.TemporaryDirectory() as tmp:
        folder = export_onnx(cap.model, cap.vocab, Path(tmp) / "onnx")
        om = OnnxModel(folder, threads=threads)
        greedy = GenerationConfig(beam_size=1)
        want = [c[0].text for c in cap.caption_batch(x, generation=greedy)]
        got = [cap.vocab.decode(t) for t in om.greedy(xn)]
        print(f"export greedy captions equal: {got == want} ({sum(a == b for a, b in zip(got, want))}/{len(want)})")
        t0 = time.perf_counter()
        ort_cap = Captioner.from_pretrained(args.checkpoint, device="cpu", precision="fp32", encoder_backend="onnxruntime")
        print(f"encoder_backend='onnxruntime' load: {time.perf_counter() - t0:.1f} s (the in-memory export included)")
        beam = GenerationConfig(beam_size=args.beam_size)
        want = [c[0].text for c in cap.caption_batch(x, generation=beam)]
        got = [c[0].text for c in ort_cap.caption_batch(x, generation=beam)]
        print(f"backend beam-{args.beam_size} captions equal: {sum(a == b for a, b in zip(got, want))}/{len(want)}; "
              f"max |fc difference| {(cap.encode(x).fc - ort_cap.encode(x).fc).abs().max().item():.2e}")
        with torch.inference_mode():
            res = interleaved({
                "encoder torch": lambda: cap.encode(x),
                "encoder onnxruntime": lambda: ort_cap.encode(x),
                "greedy torch": lambda: cap.caption_batch(x, generation=greedy),
                "greedy onnxruntime": lambda: om.greedy(xn),
                f"beam {args.beam_size} torch": lambda: cap.caption_batch(x, generation=beam),
                f"beam {args.beam_size} onnxruntime": lambda: ort_cap.caption_batch(x, generation=beam),
            }, torch.device("cpu"), repeats=args.repeats)
    rate = {k: args.batch_size / v[0] for k, v in res.items()}
    for k, r in rate.items():
        print(f"{k:22s} {r:8.1f} images/s (median of {args.repeats})")
    ratio = lambda k: rate[f"{k} onnxruntime"] / rate[f"{k} torch"]  # noqa: E731
    print(f"onnxruntime / torch: encoder (chunks of {cap.encode_chunk}, the encoder_backend) {ratio('encoder'):.2f}x, "
          f"beam {args.beam_size} end to end with that backend {ratio(f'beam {args.beam_size}'):.2f}x, "
          f"greedy fully in ONNX Runtime (the export) {ratio('greedy'):.2f}x")


if __name__ == "__main__":
    main(get_args_parser().parse_args())
