"""torch.compile (inductor, frozen weights) against eager on one checkpoint, side by side in one run: the encoder as
Captioner runs it (BN folded, NHWC, chunks of encode_chunk) and the decoder's step inside beam search, each checked
equal to eager first (features within fp32 rounding, identical captions). Prints the compile time too: a server pays
it at every start unless inductor's cache is warm.

    python bench/compile.py                                    # the shipped model, batch 32, 1 thread, CPU clock
    python bench/compile.py --checkpoint runs/x/best --threads 0 --clock wall

Neither is used by the package: the README and bench/README.md quote this bench's figures as the reason.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from captioner.api import Captioner
from captioner.generation import GenerationConfig
from captioner.runtime import autocast

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchenv import check_clock, describe, interleaved  # noqa: E402


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default=None, help="model directory (default: the shipped model)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--beam-size", type=int, default=3)
    p.add_argument("--threads", type=int, default=1, help="torch threads (0 = torch's default)")
    p.add_argument("--clock", choices=["wall", "cpu"], default="cpu")
    p.add_argument("--repeats", type=int, default=7, help="timing rounds")
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32",
                   help="bf16: both paths under autocast, the decoder's weights stored in bf16, as Captioner loads them")
    return p


def main(args: argparse.Namespace) -> None:
    import torch._inductor.config as inductor

    if args.threads:
        torch.set_num_threads(args.threads)
    dev = torch.device("cpu")
    check_clock(args.clock, dev)
    print(describe(dev, args.clock))
    cap = Captioner.from_pretrained(args.checkpoint, device="cpu", precision=args.precision)
    S = cap.cfg.preprocess.image_size
    print(f"model {cap.cfg.name} v{cap.cfg.version}, {S} px, batch {args.batch_size}, beam {args.beam_size}, "
          f"encoder chunks of {cap.encode_chunk}, {cap.precision} NHWC, BN folded")
    x = torch.randn(args.batch_size, 3, S, S, generator=torch.Generator().manual_seed(0))
    beam = GenerationConfig(beam_size=args.beam_size)
    model, encode, step = cap.model, cap.model.encode, cap.model.decoder.step

    with torch.no_grad(), autocast(dev, cap.precision):
        want_fc = cap.encode(x).fc
        feats = cap.encode(x)
        want = model.generate(features=feats, generation=beam).tokens
        inductor.freezing = True  # weights as constants: conv+bias folding, oneDNN weight prepacking
        t0 = time.perf_counter()
        model.encode = torch.compile(encode)
        got_fc = cap.encode(x).fc
        enc_compile = time.perf_counter() - t0
        compiled_encode, model.encode = model.encode, encode
        t0 = time.perf_counter()
        model.decoder.step = torch.compile(step, dynamic=True)
        got = model.generate(features=feats, generation=beam).tokens
        step_compile = time.perf_counter() - t0
        compiled_step, model.decoder.step = model.decoder.step, step
    print(f"compile: encoder {enc_compile:.1f} s (max |fc difference| {(got_fc - want_fc).abs().max().item():.2e}), "
          f"decoder step {step_compile:.1f} s (beam captions identical: {torch.equal(got, want)})")

    def run_encoder(fn):
        def go():
            model.encode = fn
            try:
                return cap.encode(x)
            finally:
                model.encode = encode
        return go

    def run_beam(fn):
        def go():
            model.decoder.step = fn
            try:
                return model.generate(features=feats, generation=beam)
            finally:
                model.decoder.step = step
        return go

    with torch.no_grad(), autocast(dev, cap.precision):
        res = interleaved({"encoder eager": run_encoder(encode), "encoder compiled": run_encoder(compiled_encode),
                           "beam eager": run_beam(step), "beam compiled step": run_beam(compiled_step)},
                          dev, repeats=args.repeats, clock=args.clock)
    rate = {k: args.batch_size / v[0] for k, v in res.items()}
    for k, r in rate.items():
        print(f"{k:20s} {r:8.1f} images/s (median of {args.repeats})")
    print(f"compiled / eager: encoder {rate['encoder compiled'] / rate['encoder eager']:.2f}x, "
          f"beam search from features {rate['beam compiled step'] / rate['beam eager']:.2f}x")


if __name__ == "__main__":
    main(get_args_parser().parse_args())
