"""Encoder throughput (images/s) for fp32 vs bf16 (and fp16 on CUDA), NCHW vs channels_last, next to a
square-matmul GFLOP/s measured in the same run as the machine's "peak".

The encoder's FLOPs per image are counted from the config (2·Cin·Cout·9·H·W per 3x3 conv, 2·in·out per
FC; batch norm, ReLU and pooling are not counted), so achieved GFLOP/s = FLOPs/image x images/s.
All settings and the matmuls are timed round-robin (one run each per round), so a shared machine's
changing load hits them alike; medians are reported.

    python bench/encoder.py                            # compact preset, 128 px, batch 32, CPU
    python bench/encoder.py --batch-size 8,16,32 --fold-bn --layers
    python bench/encoder.py --arch vgg16 --batch-size 8
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

from captioner.runtime import autocast
from captioner.config import EncoderConfig, preset
from captioner.encoder import VGGEncoder

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchenv import CLOCKS, check_clock, describe, interleaved, timed  # noqa: E402


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="compact", help="encoder preset: compact, vgg11/13/16/19 (optionally _bn)")
    p.add_argument("--image-size", type=int, default=None, help="input side in pixels (default: the preset's)")
    p.add_argument("--batch-size", default="32", help="images per forward pass, or a comma list to sweep (default 32)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch intra-op threads (default 1, see bench/README.md; 0 = torch's default, all cores)")
    p.add_argument("--precision", default=None,
                   help="comma list of fp32/bf16/fp16 (default: fp32,bf16 on CPU, fp32,bf16,fp16 on CUDA)")
    p.add_argument("--clock", choices=sorted(CLOCKS), default="wall",
                   help="wall (default) or cpu: this process's CPU time, for --threads 1 on a busy shared machine")
    p.add_argument("--repeats", type=int, default=5, help="timed rounds; the median per setting is reported")
    p.add_argument("--matmul-size", type=int, default=2048, help="side of the square matmul used as peak")
    p.add_argument("--fold-bn", action="store_true",
                   help="also time a copy with BatchNorm folded into the convs (a candidate inference optimisation)")
    p.add_argument("--layers", action="store_true", help="also print per-layer time and GFLOP/s for the best setting")
    return p


def encoder_flops(cfg: EncoderConfig, image_size: int) -> list[tuple[str, float]]:
    """(name, FLOPs per image) for every conv, then one entry for the FC head; multiply-add = 2 FLOPs."""
    out, cin, s = [], 3, image_size
    for i, c in enumerate(cfg.layers):
        if c == "M":
            s //= 2
            continue
        out.append((f"conv{i} {cin}->{c} @{s}x{s}", 2.0 * cin * int(c) * 9 * s * s))
        cin = int(c)
    d, head = cfg.channels * cfg.pool_size ** 2, 0.0
    dims = [d] + list(cfg.fc_dims)
    for a, b in zip(dims, dims[1:]):
        head += 2.0 * a * b
    out.append((f"pool+fc {'->'.join(map(str, dims))}", head))
    return out


@dataclass
class Case:
    name: str
    fn: Callable[[], object]
    info: dict = field(default_factory=dict)
    seconds: float = 0.0  # median
    times: list[float] = field(default_factory=list)


def run_interleaved(cases: list[Case], device: torch.device, repeats: int, clock: str) -> None:
    with torch.inference_mode():
        res = interleaved({c.name: c.fn for c in cases}, device, repeats, warmup=2, clock=clock)
    for c in cases:
        c.seconds, c.times, _ = res[c.name]


def matmul_case(n: int, precision: str, device: torch.device) -> Case:
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    return Case(f"matmul {precision}", lambda: torch.mm(a, b))


def fold_bn(model: VGGEncoder) -> VGGEncoder:
    """A copy with every eval-mode BatchNorm folded into the conv before it (as Captioner.from_pretrained runs it)."""
    return copy.deepcopy(model).eval().fold_batch_norm()


_layout_copies: dict[tuple[int, bool], nn.Module] = {}


def in_layout(model: nn.Module, channels_last: bool) -> nn.Module:
    """One copy of ``model`` per memory format (Module.to(memory_format=...) converts in place)."""
    key = (id(model), channels_last)
    if key not in _layout_copies:
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        _layout_copies[key] = copy.deepcopy(model).to(memory_format=fmt)
    return _layout_copies[key]


def encoder_case(model: nn.Module, x: torch.Tensor, precision: str, channels_last: bool, device: torch.device,
                 tag: str = "") -> Case:
    model = in_layout(model, channels_last)
    x = x.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)

    def fn():
        with autocast(device, precision):
            return model(x)

    info = {"precision": precision, "layout": ("channels_last" if channels_last else "NCHW") + tag, "batch": x.size(0)}
    return Case(f"{precision} {info['layout']} b{x.size(0)}", fn, info)


def per_layer(model: VGGEncoder, x: torch.Tensor, precision: str, layout: str, device: torch.device,
              flops: list[tuple[str, float]], peak: float, repeats: int, clock: str) -> None:
    """Time each conv(+BN+ReLU)(+pool) block separately, on the activations the real net feeds it."""
    fmt = torch.channels_last if layout.startswith("channels_last") else torch.contiguous_format
    model = copy.deepcopy(model).to(memory_format=fmt)
    blocks: list[list[nn.Module]] = []
    for m in model.features:
        if isinstance(m, nn.Conv2d) or not blocks:
            blocks.append([])
        blocks[-1].append(m)
    blocks.append([model.avgpool, nn.Flatten(1), model.classifier])
    B = x.size(0)
    print(f"\nper layer ({precision}, {layout}, batch {B}; "
          f"each block = conv + its BN/ReLU/pool; run one after another, not interleaved):")
    print(f"  {'layer':<28} {'ms/batch':>9} {'share':>6} {'GFLOP/s':>9} {'% bf16 mm':>9}")
    h = x.contiguous(memory_format=fmt)
    rows = []
    with torch.inference_mode(), autocast(device, precision):
        for (name, f), block in zip(flops, blocks):
            seq = nn.Sequential(*block)
            t, _, h = timed(lambda: seq(h), device, repeats, clock=clock)
            rows.append((name, f, t))
    total = sum(t for _, _, t in rows)
    for name, f, t in rows:
        g = f * B / t / 1e9
        print(f"  {name:<28} {t * 1e3:>9.2f} {100 * t / total:>5.1f}% {g:>9.1f} {100 * g / peak:>8.1f}%")
    print(f"  {'sum':<28} {total * 1e3:>9.2f} {'':>6} {sum(f for _, f in flops) * B / total / 1e9:>9.1f}")


def main(args: argparse.Namespace) -> int:
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("error: --device cuda but CUDA is not available")
    try:
        batch_sizes = [int(b) for b in str(args.batch_size).split(",")]
    except ValueError:
        sys.exit(f"error: --batch-size must be an integer or a comma list of integers, got {args.batch_size!r}")
    if min(batch_sizes) < 1 or args.repeats < 1:
        sys.exit("error: --batch-size and --repeats must be >= 1")
    if args.threads < 0:
        sys.exit("error: --threads must be >= 0")
    if args.threads:
        torch.set_num_threads(args.threads)
    check_clock(args.clock, device)
    default_prec = "fp32,bf16,fp16" if device.type == "cuda" else "fp32,bf16"
    precisions = [p.strip() for p in (args.precision or default_prec).split(",") if p.strip()]
    if not precisions or any(p not in ("fp32", "bf16", "fp16") for p in precisions):
        sys.exit(f"error: --precision must be a comma list of fp32, bf16, fp16; got {args.precision!r}")
    try:
        cfg = preset(args.arch)
    except ValueError as e:
        sys.exit(f"error: {e}")
    S = args.image_size or cfg.preprocess.image_size
    if S < 32:
        sys.exit("error: --image-size must be >= 32 (five 2x2 poolings)")
    torch.manual_seed(0)
    model = VGGEncoder(cfg.encoder).to(device).eval()
    flops = encoder_flops(cfg.encoder, S)
    f_img = sum(f for _, f in flops)

    print(describe(device, args.clock))
    print(f"encoder: {args.arch} @ {S}x{S}, batch {','.join(map(str, batch_sizes))}, eval + inference_mode, "
          f"random weights; {f_img / 1e9:.3f} GFLOP/image (convs + FC)")
    print(f"encoder config: {json.dumps(cfg.encoder.__dict__, separators=(',', ':'))}")

    peak_precs = ["fp32", "bf16"] + (["fp16"] if "fp16" in precisions else [])
    peaks = {p: matmul_case(args.matmul_size, p, device) for p in peak_precs}
    variants = [(model, "")]
    if args.fold_bn and cfg.encoder.batch_norm:
        variants.append((fold_bn(model), "+foldBN"))
    runs = []
    for B in batch_sizes:
        x = torch.randn(B, 3, S, S, device=device)
        runs += [encoder_case(m, x, p, cl, device, tag) for p in precisions for cl in (False, True) for m, tag in variants]
    run_interleaved(list(peaks.values()) + runs, device, args.repeats, args.clock)

    peak = {p: 2.0 * args.matmul_size ** 3 / c.seconds / 1e9 for p, c in peaks.items()}
    print(f"\nmatmul {args.matmul_size}^3 (median of {args.repeats}, interleaved with the encoder runs): "
          + ", ".join(f"{p} {g:.1f} GFLOP/s (runs {min(peaks[p].times) * 1e3:.0f}-{max(peaks[p].times) * 1e3:.0f} ms)"
                      for p, g in peak.items()))
    print(f"\n{'precision':<9} {'layout':<21} {'batch':>5} {'images/s':>9} {'ms/batch':>9} {'GFLOP/s':>8} "
          f"{'% own mm':>8} {'% bf16 mm':>9}   runs (ms)")
    best = None
    for c in runs:
        ips = c.info["batch"] / c.seconds
        g = f_img * ips / 1e9
        own = peak.get(c.info["precision"], peak["bf16"])
        times = " ".join(f"{t * 1e3:.0f}" for t in c.times)
        print(f"{c.info['precision']:<9} {c.info['layout']:<21} {c.info['batch']:>5} {ips:>9.1f} {c.seconds * 1e3:>9.1f} "
              f"{g:>8.1f} {100 * g / own:>7.1f}% {100 * g / peak['bf16']:>8.1f}%   {times}")
        if best is None or ips > best[0]:
            best = (ips, g / peak["bf16"], c.info)
    ips, frac, info = best
    print(f"\nbest: {info['precision']} {info['layout']} batch {info['batch']}: {ips:.1f} images/s, "
          f"{100 * frac:.1f}% of the bf16 matmul peak"
          + (f" (target >= 50% for compact: {'met' if frac >= 0.5 else 'NOT met'})" if args.arch == "compact" else ""))
    if args.layers:
        m = fold_bn(model) if info["layout"].endswith("+foldBN") else model
        x = torch.randn(info["batch"], 3, S, S, device=device)
        per_layer(m, x, info["precision"], info["layout"], device, flops, peak["bf16"],
                  args.repeats, args.clock)
    return 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
