"""This machine's throughput bound for one checkpoint, and how close the batch CLI and the service get to it, in one
run (issue 35).

    python bench/bound.py                                  # the shipped model, coco-mini photos, beam 3
    python bench/bound.py --checkpoint runs/x/best --images DIR --beam-size 5
    python bench/bound.py --model-workers 1,auto --repeat 3     # one worker against the default, side by side

1. FLOPs per image: the encoder's from its config (bench/encoder.py's count: convs + FC), the decoder's at this
   model's mean caption length on the photos and the beam size (W_ih·v once; per step and beam W_xh·x, W_hh·h, W_hy·h).
2. This machine: square-matmul GFLOP/s in fp32 and bf16 with all of torch's threads, and JPEG decode + resize + crop
   images/s on one core (the CLI's loader workers and the service's decode threads do this work).
3. The bound: both run on the same cores, so an image costs FLOPs / (matmul rate of the precision the model runs in)
   + cores / (cores x decode rate) machine-seconds; bound = 1 / that.
4. Achieved, each as a fraction of the bound: `captioner caption` on --copies symlinked copies of the photos (2 loader
   workers), end to end and after its start-up (a second run on --batch-size photos gives the start-up's wall and
   CPU time, subtracted), and the service at saturation (`captioner serve`, --saturation concurrent keep-alive connections
   from bench/serve.py's raw HTTP driver, warm-up excluded). The service is compared with the CLI after start-up,
   per second and per CPU-second: the load generator shares this machine's cores with the server it measures (a
   real service's clients run elsewhere), so images per CPU-second of the server process against those of the CLI
   and its loader workers is the per-core comparison. --model-workers a,b runs the CLI and the service with each
   value in turn, --repeat rounds of them, and prints the medians.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from captioner.api import Captioner
from captioner.cli import main as cli
from captioner.generation import GenerationConfig
from captioner.inputs import expand_inputs
from captioner.pixels import crop, load_image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from batch_cli import cpu_seconds, symlinked_copies  # noqa: E402
from benchenv import describe, timed  # noqa: E402
from encoder import encoder_flops, matmul_case  # noqa: E402
from serve import Server, run_load  # noqa: E402

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "coco-mini"


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default=None, help="model directory (default: the shipped model)")
    p.add_argument("--images", nargs="+", default=[str(DATA / "val2017"), str(DATA / "train2017")])
    p.add_argument("--beam-size", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--matmul-size", type=int, default=1024)
    p.add_argument("--copies", type=int, default=2, help="the batch CLI captions this many copies of the photos")
    p.add_argument("--requests", type=int, default=1024, help="service requests at saturation")
    p.add_argument("--saturation", type=int, default=64, help="concurrent clients")
    p.add_argument("--model-workers", default="auto",
                   help="comma-separated --model-workers values for the CLI and the service (auto: their default)")
    p.add_argument("--repeat", type=int, default=1, help="rounds of step 4")
    return p


def decoder_flops(cap: Captioner, steps: float, beam: int) -> float:
    d, c, V = cap.cfg.decoder, cap.cfg, cap.cfg.vocab_size
    gh = {"rnn": 1, "gru": 3, "lstm": 4}[d.cell] * d.hidden_dim
    once = 2.0 * c.decoder_image_dim * gh  # W_ih·v
    per_step = 2.0 * d.embed_dim * gh + (d.num_layers - 1) * 2.0 * d.hidden_dim * gh \
        + d.num_layers * 2.0 * d.hidden_dim * gh + 2.0 * d.hidden_dim * V
    return d.members * (once + beam * steps * per_step)


def main(args: argparse.Namespace) -> None:
    cores = torch.get_num_threads()
    cap = Captioner.from_pretrained(args.checkpoint, device="cpu")
    print(describe(torch.device("cpu")))
    paths = [it.path for it in expand_inputs(args.images)]
    pre = cap.cfg.preprocess
    gen = GenerationConfig(beam_size=args.beam_size)
    print(f"model {cap.cfg.name} v{cap.cfg.version} ({cap.precision}), {len(paths)} photos, beam {args.beam_size}, "
          f"batch {args.batch_size}, {cores} threads")

    # 1. FLOPs per image
    sample = cap.preprocess(paths[:64])
    with torch.inference_mode():
        caps = cap.caption_batch(sample, generation=gen)
    steps = sum(len(cap.vocab.encode(c[0].text)) + 1 for c in caps) / len(caps)  # words + <eos>
    f_enc = sum(f for _, f in encoder_flops(cap.cfg.encoder, pre.image_size))
    f_dec = decoder_flops(cap, steps, args.beam_size)
    print(f"FLOPs per image: encoder {f_enc / 1e9:.3f} G, decoder {f_dec / 1e9:.3f} G (mean {steps:.1f} steps x "
          f"beam {args.beam_size}), total {(f_enc + f_dec) / 1e9:.3f} G")

    # 2. the machine
    with torch.inference_mode():
        rate = {p: 2.0 * args.matmul_size ** 3 / timed(matmul_case(args.matmul_size, p, torch.device("cpu")).fn,
                                                       torch.device("cpu"), repeats=5, warmup=2)[0]
                for p in ("fp32", "bf16")}
    t0 = time.perf_counter()
    n_dec = min(len(paths), 96)
    for p in paths[:n_dec]:
        crop(load_image(p, min_side=pre.resize), pre)
    decode = n_dec / (time.perf_counter() - t0)
    print(f"matmul {args.matmul_size}^3: fp32 {rate['fp32'] / 1e9:.1f} GFLOP/s, bf16 {rate['bf16'] / 1e9:.1f} GFLOP/s; "
          f"JPEG decode+resize+crop {decode:.0f} images/s per core")

    # 3. the bound
    r = rate["bf16" if cap.precision == "bf16" else "fp32"]
    bound = 1.0 / ((f_enc + f_dec) / r + 1.0 / (cores * decode))
    print(f"bound: {bound:.0f} images/s (compute alone {r / (f_enc + f_dec):.0f}, decoding alone {cores * decode:.0f})")

    # 4. achieved
    def run_cli(inputs: list[str], tmp: str, mw: list[str]) -> tuple[float, float]:
        t0, c0 = time.perf_counter(), cpu_seconds()
        rc = cli(["caption", *inputs, "--out", f"{tmp}/c.jsonl", "--beam-size", str(args.beam_size),
                  "--batch-size", str(args.batch_size), "--workers", "2", "--no-progress", "--restart", *mw])
        if rc:
            sys.exit(f"captioner caption exited {rc}")
        return time.perf_counter() - t0, cpu_seconds() - c0

    def run_service(mw: list[str]) -> dict:
        server = Server(Path(args.checkpoint) if args.checkpoint else None, "--max-batch-size", str(args.batch_size),
                        *mw)
        try:
            server.wait_ready()
            photos = [Path(p).read_bytes() for p in paths[:64]]
            run_load(server, photos, 2 * args.saturation, args.saturation, args.beam_size)  # warm-up
            return run_load(server, photos, args.requests, args.saturation, args.beam_size)
        finally:
            server.stop()

    rows: dict[str, list[tuple[float, ...]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        inputs = symlinked_copies(paths, Path(tmp) / "copies", args.copies)
        n = len(inputs)
        for rnd in range(args.repeat):
            for value in args.model_workers.split(","):
                mw = [] if value == "auto" else ["--model-workers", value]
                wall, cpu = run_cli(inputs, tmp, mw)
                wall1, cpu1 = run_cli(paths[:args.batch_size], tmp, mw)  # start-up and --batch-size photos
                cli_rate, steady = n / wall, (n - args.batch_size) / (wall - wall1)
                cli_per_cpu = (n - args.batch_size) / (cpu - cpu1)
                print(f"[round {rnd + 1}, model workers {value}] batch CLI, {n} images: {cli_rate:.1f} images/s end to "
                      f"end = {cli_rate / bound:.1%} of the bound (target >= 40 %); after start-up ({wall1:.1f} s for the first "
                      f"{args.batch_size} photos) {steady:.1f} images/s, {cli_per_cpu:.1f} images per CPU-second "
                      f"({(cpu - cpu1) / (wall - wall1):.2f} CPUs busy)")
                res = run_service(mw)
                per_cpu = 1.0 / res["server_cpu_per_image"]
                print(f"[round {rnd + 1}, model workers {value}] service at saturation ({args.saturation} connections, "
                      f"{args.requests} requests): {res['rps']:.1f} images/s = {res['rps'] / bound:.1%} of the bound, "
                      f"{res['rps'] / steady:.2f} of the batch CLI's after start-up (target >= 0.9); mean batch "
                      f"{res['avg_batch']:.1f}")
                print(f"  per CPU-second: the server used {res['server_cpu']:.2f} CPUs (the load generator "
                      f"{res['client_cpu']:.2f}), {per_cpu:.1f} images per CPU-second = {per_cpu / cli_per_cpu:.2f} of "
                      "the batch CLI's", flush=True)
                rows.setdefault(value, []).append((cli_rate, steady, res["rps"], res["rps"] / steady,
                                                   per_cpu / cli_per_cpu))
    if args.repeat > 1 or len(rows) > 1:
        print(f"\nmedians over {args.repeat} round(s): model workers | CLI end to end | CLI after start-up | service | "
              "service / CLI | per CPU-second")
        for value, rs in rows.items():
            m = [statistics.median(col) for col in zip(*rs)]
            print(f"  {value:>5} | {m[0]:.1f} images/s ({m[0] / bound:.0%} of the bound) | {m[1]:.1f} | {m[2]:.1f} | "
                  f"{m[3]:.2f} | {m[4]:.2f}")


if __name__ == "__main__":
    main(get_args_parser().parse_args())
