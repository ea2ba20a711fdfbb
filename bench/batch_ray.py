"""`captioner caption --engine ray` vs the local engine on the same photos, measured side by side in one run.

    python bench/batch_ray.py [--checkpoint DIR] [--copies 8] [--repeat 2] [--batch-size 32] [--beam-size 3]

Both engines run as users run them, as `captioner caption` commands (each pays its own Python, torch and model
start-up), writing fsynced JSONL records. The Ray engine's cluster is started once by this script with the first
of the README's cluster commands (`ray start --head`) and joined with --address auto, as on a real cluster, where
it is started once for many jobs; its start-up is reported apart. Each Ray run still starts its model actor and decode
workers, and that is counted.
local = the default loader workers; ray = one model actor (--concurrency 1), decode tasks as Ray sees fit.
Each ray run is paired with a local run just before it, so slow drifts in a shared machine's load cancel in the
ratio; --repeat N reports the median. end-to-end = images / wall time of the command; loop = the command's own
images/s (from model loaded to last record: for ray it includes starting the actor); first batch = from the loop's
start to the first batch written (start-up); steady = images/s after it.
Target: the Ray engine reaches >= 0.8 of the local one end-to-end.
The default photos are the 338 coco-mini ones in ../shared/data; --copies K captions K symlinked copies of them.
Without --checkpoint the shipped default model is used.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from batch_cli import SHARED, symlinked_copies  # noqa: E402

PORT = 6391


def one_run(inputs_file: Path, out: Path, ckpt: str | None, extra: list[str], args) -> tuple[float, float, dict, int]:
    cmd = [sys.executable, "-m", "captioner", "caption", f"@{inputs_file}", "--out", str(out), "--batch-size",
           str(args.batch_size), "--beam-size", str(args.beam_size), "--no-progress", *extra]
    if ckpt:
        cmd += ["--checkpoint", ckpt]
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    wall = time.perf_counter() - t0
    m = re.search(r"([\d.]+) images/s", p.stderr)
    first = re.search(r"first batch after ([\d.]+) s, then ([\d.]+) images/s", p.stderr)
    if p.returncode or not m:
        print(p.stderr[-2000:])
    caps = {}
    for line in out.read_text().splitlines():
        r = json.loads(line)
        caps[r["path"]] = (r.get("captions") or [{}])[0].get("caption", r.get("error"))
    steady = (float(first.group(1)), float(first.group(2))) if first else (0.0, 0.0)
    return wall, float(m.group(1)) if m else 0.0, steady, caps, p.returncode


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", help="model directory (default: the shipped default model)")
    p.add_argument("--images", nargs="+", default=[str(SHARED / "train2017"), str(SHARED / "val2017")])
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--beam-size", type=int, default=3)
    p.add_argument("--copies", type=int, default=8, help="caption K symlinked copies of the photos")
    p.add_argument("--repeat", type=int, default=2)
    args = p.parse_args()

    missing = [d for d in args.images if not Path(d).is_dir()]
    if missing:
        print(f"image folders not found: {', '.join(missing)} (the coco-mini photos live in ../shared/data)")
        return 2
    sys.path.insert(0, str(ROOT))
    from captioner.inputs import expand_inputs

    tmp = Path(tempfile.mkdtemp(prefix="bench-batch-ray-", dir=ROOT / "runs" if (ROOT / "runs").is_dir() else None))
    paths = [it.path for it in expand_inputs(args.images)]
    inputs = symlinked_copies(paths, tmp / "copies", args.copies) if args.copies > 1 else paths
    n = len(inputs)
    listing = tmp / "inputs.txt"
    listing.write_text("\n".join(inputs) + "\n")
    ray_bin = str(Path(sys.executable).parent / "ray")
    env = {**os.environ, "RAY_worker_niceness": "0"}  # what captioner.ray.init sets for a cluster it starts
    t0 = time.perf_counter()
    subprocess.run([ray_bin, "start", "--head", f"--port={PORT}", "--include-dashboard=false",
                    "--disable-usage-stats"], check=True, capture_output=True, env=env)
    start = time.perf_counter() - t0
    address = "auto"  # the cluster `ray start` started on this machine (as RAY_ADDRESS=auto would)
    print(f"model {args.checkpoint or 'default'}; {n} images ({len(paths)} photos x {args.copies}); batch "
          f"{args.batch_size}, beam {args.beam_size}; `ray start --head` took {start:.1f} s (not counted below)",
          flush=True)
    rows = []
    try:
        for rep in range(args.repeat):
            lw, lloop, lsteady, lcaps, lcode = one_run(listing, tmp / f"local-{rep}.jsonl", args.checkpoint, [], args)
            rw, rloop, rsteady, rcaps, rcode = one_run(listing, tmp / f"ray-{rep}.jsonl", args.checkpoint,
                                                       ["--engine", "ray", "--address", address], args)
            same = sum(rcaps.get(k) == v for k, v in lcaps.items())
            rows.append((lw, lloop, rw, rloop, lsteady, rsteady, same, (lcode, rcode)))
            print(f"  run {rep + 1}: local {n / lw:.1f} images/s, ray {n / rw:.1f} images/s end-to-end", flush=True)
    finally:
        subprocess.run([ray_bin, "stop"], capture_output=True)
    print(f"\n{'run':>3} | {'local e2e':>9} | {'ray e2e':>7} | {'ratio e2e':>9} | {'local loop':>10} | "
          f"{'ray loop':>8} | {'ratio loop':>10} | {'1st batch local/ray':>19} | {'steady local':>12} | "
          f"{'steady ray':>10} | {'ratio steady':>12} | same captions")
    e2e, steady = [], []
    for i, (lw, lloop, rw, rloop, ls, rs, same, codes) in enumerate(rows):
        e2e.append(lw / rw)
        steady.append(rs[1] / max(ls[1], 1e-9))
        print(f"{i + 1:>3} | {n / lw:>9.1f} | {n / rw:>7.1f} | {e2e[-1]:>9.2f} | {lloop:>10.1f} | {rloop:>8.1f} | "
              f"{rloop / max(lloop, 1e-9):>10.2f} | {f'{ls[0]:.1f} / {rs[0]:.1f} s':>19} | {ls[1]:>12.1f} | "
              f"{rs[1]:>10.1f} | {steady[-1]:>12.2f} | {same}/{n}"
              + ("" if codes == (0, 0) else f"  (exit codes {codes})"))
    print("(images/s; loop: from model loaded to last record; 1st batch: from then to the first batch written, "
          "i.e. start-up; steady: after it)")
    print(f"{'median ' if len(rows) > 1 else ''}ratio ray/local after start-up: {statistics.median(steady):.2f}")
    ratio = statistics.median(e2e)
    print(f"\n{'median ' if len(rows) > 1 else ''}ratio ray/local end-to-end: {ratio:.2f} "
          f"(target >= 0.8: {'met' if ratio >= 0.8 else 'NOT met'})")
    print("note: a shared machine is noisy; the ratios are measured side by side.")
    shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
