"""End-to-end batch-CLI throughput of two or more checkpoints, side by side in one run.

    python bench/models.py captioner/models/default runs/v7/model [--copies 3] [--repeat 3]

Each round runs `captioner caption` (in-process, 2 loader workers, the CLI's defaults otherwise) over the same
images once per checkpoint, in turn, so slow drifts in a shared machine's load hit every model alike; the table
gives each model's median images/s and its ratio to the first checkpoint's (the ratio of the medians and the median
of the per-round ratios). The coco-mini photos (338, up to 640 px) are the default input; --copies K captions K
symlinked copies of them so start-up is amortised.
"""
from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import captioner  # noqa: E402,F401  (before torch, as in the `captioner` command)
import torch  # noqa: E402
from batch_cli import SHARED, symlinked_copies  # noqa: E402
from captioner.checkpoint import read_config  # noqa: E402
from captioner.cli.caption import run  # noqa: E402
from captioner.cli.parsers import caption as get_args_parser  # noqa: E402
from captioner.inputs import expand_inputs  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoints", nargs="+", help="model directories; ratios are to the first")
    p.add_argument("--images", nargs="+", default=[str(SHARED / "train2017"), str(SHARED / "val2017")])
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--beam-size", type=int, default=3)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--copies", type=int, default=3)
    p.add_argument("--repeat", type=int, default=3)
    args = p.parse_args()
    missing = [d for d in args.images if not Path(d).is_dir()]
    if missing:
        print(f"image folders not found: {', '.join(missing)} (the coco-mini photos live in ../shared/data)")
        return 2
    tmp = Path(tempfile.mkdtemp(prefix="bench-models-"))
    paths = [it.path for it in expand_inputs(args.images)]
    inputs = symlinked_copies(paths, tmp / "copies", args.copies) if args.copies > 1 else args.images
    n = len(paths) * max(args.copies, 1)
    for c in args.checkpoints:
        cfg = read_config(c)
        print(f"{c}: {cfg.name} v{cfg.version}, input {cfg.preprocess.image_size} px, "
              f"encoder {cfg.encoder.layers}")
    print(f"{n} images per run, batch {args.batch_size}, beam {args.beam_size}, {args.workers} loader workers, "
          f"{torch.get_num_threads()} torch threads")
    rates = {c: [] for c in args.checkpoints}
    for rep in range(args.repeat):
        for c in args.checkpoints:
            out = tmp / f"out-{rep}.jsonl"
            cli = get_args_parser().parse_args([*inputs, "--out", str(out), "--checkpoint", c, "--batch-size",
                                                str(args.batch_size), "--beam-size", str(args.beam_size),
                                                "--workers", str(args.workers), "--no-progress"])
            t0 = time.perf_counter()
            res = run(cli)
            rates[c].append(n / (time.perf_counter() - t0))
            out.unlink()
            print(f"  round {rep + 1}: {c}: {rates[c][-1]:.1f} images/s (exit {res.exit_code})", flush=True)
    base = args.checkpoints[0]
    print(f"\n{'checkpoint':<40} | {'median img/s':>12} | {'ratio of medians':>16} | {'median per-round ratio':>22}")
    for c in args.checkpoints:
        per_round = statistics.median(r / b for r, b in zip(rates[c], rates[base]))
        print(f"{c:<40} | {statistics.median(rates[c]):>12.1f} | "
              f"{statistics.median(rates[c]) / statistics.median(rates[base]):>16.2f} | {per_round:>22.2f}")
    print("note: timings on a shared machine are noisy; the per-round ratios are measured side by side.")
    shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
