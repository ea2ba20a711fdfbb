"""fp32 against bf16 (what --precision auto picks on CPUs with native bf16), side by side in one run.

    python bench/precision.py                                  # speed: the batch CLI on 300 Flickr8k photos
    python bench/precision.py --quality                        # and Flickr8k val BLEU-4 / CIDEr-D in both (~3 min)

Speed: `captioner caption` (captioner.cli.caption.run, in-process, end to end: model load, loader workers decoding
JPEGs, captioning, JSONL writes) with the shipped model, alternating fp32 and bf16 in rounds; the ratio is taken
within each round (the machine is shared) and the median reported, with how many top captions agree.
Quality: `captioner evaluate` on the Flickr8k val split (1,000 photos, beam 3) in each precision.
Targets (issue: bf16 by default): throughput >= 1.5x fp32; BLEU-4 within 0.3 and CIDEr-D within 1.0 points.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FLICKR = ROOT.parent / "shared" / "data" / "flickr8k"
sys.path.insert(0, str(ROOT))

from benchenv import describe  # noqa: E402

from captioner.cli import parsers  # noqa: E402
from captioner.cli.caption import run  # noqa: E402
from captioner.cli.writers import read_records  # noqa: E402
from captioner.runtime import native_bf16, resolve_precision  # noqa: E402


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default=str(ROOT / "captioner" / "models" / "default"))
    p.add_argument("--images", type=int, default=300, help="Flickr8k photos captioned per run")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--quality", action="store_true", help="also score Flickr8k val in both precisions")
    return p


def caption_run(photos: list[str], out: Path, precision: str, args) -> tuple[float, list[str]]:
    cli = parsers.caption().parse_args([*photos, "--out", str(out), "--checkpoint", args.checkpoint, "--precision",
                                        precision, "--device", "cpu", "--workers", str(args.workers),
                                        "--no-progress", "--restart"])
    t0 = time.perf_counter()
    res = run(cli)
    wall = time.perf_counter() - t0
    assert res.exit_code == 0, res.exit_code
    recs = sorted(read_records(str(out)).records, key=lambda r: r["index"])
    return len(photos) / wall, [r["captions"][0]["caption"] for r in recs]


def quality(precision: str, tmp: Path, args) -> dict:
    from training.evaluate import main as evaluate

    ev = parsers.evaluate().parse_args([
        "--checkpoint", args.checkpoint, "--annotations", str(FLICKR / "dataset_flickr8k.json"),
        "--images", str(FLICKR), "--split", "val", "--precision", precision, "--device", "cpu",
        "--out", str(tmp / f"val-{precision}.json")])
    return evaluate(ev)


def main(args: argparse.Namespace) -> int:
    print(describe(__import__("torch").device("cpu")))
    if not FLICKR.is_dir():
        sys.exit(f"needs {FLICKR} (the project's shared data)")
    print(f"native bf16 on this CPU: {native_bf16(__import__('torch').device('cpu'))}; "
          f"--precision auto -> {resolve_precision('auto', 'cpu')}")
    photos = sorted(str(p) for p in (FLICKR / "images").glob("*.jpg"))[: args.images]
    tmp = Path(tempfile.mkdtemp(prefix="bench-precision-"))
    rows = []
    for r in range(args.rounds):
        fp32, t32 = caption_run(photos, tmp / "fp32.jsonl", "fp32", args)
        bf16, t16 = caption_run(photos, tmp / "bf16.jsonl", "bf16", args)
        same = sum(a == b for a, b in zip(t32, t16))
        rows.append((fp32, bf16, same))
        print(f"round {r + 1}: fp32 {fp32:.1f} images/s, bf16 {bf16:.1f} images/s, ratio {bf16 / fp32:.2f}, "
              f"identical top captions {same}/{len(photos)}", flush=True)
    ratio = statistics.median(b / f for f, b, _ in rows)
    print(f"\nmedian throughput ratio bf16 / fp32 (end to end, {len(photos)} photos, {args.workers} loader workers): "
          f"{ratio:.2f} (target >= 1.5: {'met' if ratio >= 1.5 else 'NOT met'})")
    if args.quality:
        m = {p: quality(p, tmp, args) for p in ("fp32", "bf16")}
        d4 = 100 * (m["bf16"]["BLEU-4"] - m["fp32"]["BLEU-4"])
        dc = 100 * (m["bf16"]["CIDEr-D"] - m["fp32"]["CIDEr-D"])
        for p in ("fp32", "bf16"):
            print(f"{p}: BLEU-4 {100 * m[p]['BLEU-4']:.2f}, CIDEr-D {100 * m[p]['CIDEr-D']:.2f}, "
                  f"METEOR {100 * m[p]['METEOR']:.2f} ({m[p]['seconds']} s)" if m[p].get("METEOR") is not None else
                  f"{p}: BLEU-4 {100 * m[p]['BLEU-4']:.2f}, CIDEr-D {100 * m[p]['CIDEr-D']:.2f} ({m[p]['seconds']} s)")
        print(f"bf16 - fp32: BLEU-4 {d4:+.2f} (target within 0.3: {'met' if abs(d4) <= 0.3 else 'NOT met'}), "
              f"CIDEr-D {dc:+.2f} (target within 1.0: {'met' if abs(dc) <= 1.0 else 'NOT met'})")
    return 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
