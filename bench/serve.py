"""The REST service under load: `captioner serve` as a subprocess on 127.0.0.1, driven by N concurrent keep-alive
connections (drive(): a raw HTTP/1.1 load generator) posting real photos from ../shared/data/coco-mini, next to the
same model run in-process on the same photos.

    python bench/serve.py                         # random-weight compact model (2,500 words), built in a temp dir
    python bench/serve.py --checkpoint DIR        # a real checkpoint

Prints, in one run:
  (1) throughput at saturation / raw batched throughput of the model in-process     (target >= 0.9)
  (2) dynamic batching vs --max-batch-size 1, both at concurrency 32                 (target >= 1.5x on CPU, 3x GPU)
  (3) p50 / p99 latency at concurrency 1 vs one bare forward pass of one image      (target p50 <= 1.2x)
"Raw" and "bare" run exactly what the server runs per image (JPEG decode + preprocessing, then the server's batch
function: encoder + beam search), minus HTTP, queueing and threads. Client and server share this machine's CPUs, so
the client's own work counts against the server. Timings on a shared machine are noisy, so every figure is taken
next to its reference: both servers of (2) run side by side, the runs of (1) and (2) alternate in rounds (each ratio
is taken within a round, the median over rounds reported), and (3) alternates one bare forward with one request.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "coco-mini"


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default=None, help="checkpoint directory (default: random compact model)")
    p.add_argument("--image-dir", default=str(DATA / "val2017"), help="photos to send (default: coco-mini val2017)")
    p.add_argument("--images", type=int, default=64, help="distinct photos, cycled through (default 64)")
    p.add_argument("--requests", type=int, default=128, help="requests per throughput run (default 128)")
    p.add_argument("--rounds", type=int, default=4,
                   help="alternating measurement rounds; ratios are taken within a round, medians reported (default 4)")
    p.add_argument("--latency-requests", type=int, default=60, help="requests at concurrency 1 (default 60)")
    p.add_argument("--saturation", type=int, default=64, help="concurrency for the saturation run (default 64)")
    p.add_argument("--concurrency", type=int, default=32, help="concurrency for batching vs no batching (default 32)")
    p.add_argument("--max-batch-size", type=int, default=32, help="server --max-batch-size (default 32)")
    p.add_argument("--max-delay-ms", type=float, default=None, help="server --max-delay-ms (default: the server's)")
    p.add_argument("--beam", type=int, default=3, help="beam size of every request (default 3)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--vocab-size", type=int, default=2500, help="words of the random model (default 2500)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch intra-op threads, in-process and in the server (default 1: on the shared 2-core "
                        "machine, 2 OpenMP threads made the in-process model 4-8x slower under load; 0 = torch's "
                        "choice)")
    return p


# ----------------------------------------------------------------------------- the model

def random_checkpoint(folder: Path, vocab_size: int) -> Path:
    """A compact-preset model with random weights and ~2,500 words (Flickr8k-sized vocabulary)."""
    from captioner.checkpoint import save_pretrained
    from captioner.config import preset
    from captioner.model import CaptionModel
    from captioner.tokenizer import Vocabulary

    torch.manual_seed(0)
    cfg = preset("compact")
    cfg.vocab_size = vocab_size
    model = CaptionModel(cfg)
    with torch.no_grad():  # so that different photos get different (gibberish) captions
        model.decoder.layers[0].W_ih.weight.mul_(8)
    return save_pretrained(model, Vocabulary([f"w{i}" for i in range(vocab_size - 4)]), folder / "random-compact")


def load_model(ckpt: Path, device: str):
    """The server's batch function on the model, prepared with the server's defaults (NHWC encoder weights,
    encoder micro-batches on CPU): in-process runs do exactly what a server batch does."""
    from captioner.api import Captioner
    from service.engine import Engine

    return Engine(Captioner.from_pretrained(ckpt, device))


def forward(engine, photos: list[bytes], beam: int) -> None:
    """Decode, resize and crop each photo (what a request's decode thread does), then run them as one batch."""
    import numpy as np

    from captioner.generation import GenerationConfig
    from captioner.pixels import crop, load_image
    from service.engine import CaptionJob

    pre, gen = engine.captioner.cfg.preprocess, GenerationConfig(beam_size=beam)
    engine([CaptionJob(np.array(crop(load_image(p, min_side=pre.resize), pre)), gen) for p in photos])


def raw_throughput(engine, photos: list[bytes], batch_size: int, beam: int, passes: int = 2) -> float:
    """Images/s of decode + preprocess + encode + beam search, in batches of batch_size, in this process
    (best of ``passes``)."""
    n = len(photos)
    best = 0.0
    for _ in range(passes):
        t0 = time.perf_counter()
        for i in range(0, n, batch_size):
            forward(engine, photos[i:i + batch_size], beam)
        best = max(best, n / (time.perf_counter() - t0))
    return best


# ----------------------------------------------------------------------------- the server

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`captioner serve` as a subprocess on 127.0.0.1 and a free port, with extra ``flags``."""

    def __init__(self, checkpoint: Path | None, *flags: str, device: str = "cpu") -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "captioner", "serve", "--device", device, "--host", "127.0.0.1",
               "--port", str(self.port), *flags]
        if checkpoint:
            cmd += ["--checkpoint", str(checkpoint)]
        self.log = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=self.log, stderr=subprocess.STDOUT,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1"})

    def wait_ready(self, timeout: float = 180) -> None:
        import httpx

        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            if self.proc.poll() is not None:
                self.log.seek(0)
                sys.exit(f"server exited ({self.proc.returncode}):\n{self.log.read().decode(errors='replace')}")
            try:
                if httpx.get(self.url + "/readyz", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        sys.exit("server not ready in time")

    def metric(self, name: str) -> float:
        """The sum of a metric's samples (all label values)."""
        import httpx

        return sum(float(line.split()[-1]) for line in httpx.get(self.url + "/metrics").text.splitlines()
                   if line.startswith(name) and line[len(name):len(name) + 1] in (" ", "{"))

    def metrics(self) -> tuple[float, float, float]:
        """(batches, images, seconds in the model) from the batch-size and inference-time histograms."""
        import httpx

        vals = {"captioner_batch_size_count": 0.0, "captioner_batch_size_sum": 0.0,
                "captioner_inference_seconds_sum": 0.0}
        for line in httpx.get(self.url + "/metrics").text.splitlines():
            name, _, value = line.partition(" ")
            if name in vals:
                vals[name] = float(value)
        return tuple(vals.values())

    def cpu_seconds(self) -> float:
        """User + system CPU time the server process has used so far (its threads included), from /proc."""
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rpartition(")")[2].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


BOUNDARY = "benchserve0123456789"


def multipart(photo: bytes, beam: int) -> bytes:
    """The request body, built once per photo so the client spends its CPU on sending, not on encoding."""
    b = BOUNDARY.encode()
    return (b"--" + b + b'\r\nContent-Disposition: form-data; name="beam_size"\r\n\r\n' + str(beam).encode() +
            b"\r\n--" + b + b'\r\nContent-Disposition: form-data; name="image"; filename="p.jpg"\r\n'
            b"Content-Type: image/jpeg\r\n\r\n" + photo + b"\r\n--" + b + b"--\r\n")


async def drive(url: str, photos: list[bytes], n: int, concurrency: int, beam: int) -> tuple[float, list[float]]:
    """n caption requests from `concurrency` keep-alive connections at once; returns (wall seconds, per-request
    latencies). Raw HTTP/1.1 over asyncio streams with every request prebuilt, as a load generator should be
    (wrk-style): the client shares this machine's cores with the server it measures, and httpx spent ~6 ms of CPU
    per request (0.3 of a core at saturation) where this spends well under one."""
    host, port = url.removeprefix("http://").rsplit(":", 1)
    head = (f"POST /v1/captions HTTP/1.1\r\nHost: {host}:{port}\r\n"
            f"Content-Type: multipart/form-data; boundary={BOUNDARY}\r\n")
    requests = [head.encode() + f"Content-Length: {len(b)}\r\n\r\n".encode() + b
                for b in (multipart(p, beam) for p in photos)]
    latencies: list[float] = []
    next_i = 0

    async def exchange(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, req: bytes) -> tuple[int, bool]:
        """One request on an open connection -> (status, whether the server keeps the connection)."""
        writer.write(req)
        status_line = await reader.readline()
        if not status_line:
            raise ConnectionResetError("the server closed the connection")
        length, keep = 0, True
        while (line := await reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode("latin-1").partition(":")
            name, value = name.strip().lower(), value.strip().lower()
            if name == "content-length":
                length = int(value)
            elif name == "connection":
                keep = value != "close"
            elif name == "transfer-encoding":
                raise RuntimeError(f"unexpected transfer-encoding {value}")
        body = await reader.readexactly(length)
        status = int(status_line.split()[1])
        if status != 200:
            raise RuntimeError(f"HTTP {status}: {body[:200]!r}")
        return status, keep

    async def worker() -> None:
        nonlocal next_i
        conn = None
        try:
            while next_i < n:
                i = next_i
                next_i += 1
                t0 = time.perf_counter()
                for attempt in range(2):  # a kept-alive connection the server has just closed: reconnect once
                    if conn is None:
                        conn = await asyncio.open_connection(host, int(port))
                    try:
                        _, keep = await exchange(*conn, requests[i % len(requests)])
                        break
                    except (ConnectionError, asyncio.IncompleteReadError):
                        conn[1].close()
                        conn = None
                        if attempt:
                            raise
                if not keep:
                    conn[1].close()
                    conn = None
                latencies.append(time.perf_counter() - t0)
        finally:
            if conn is not None:
                conn[1].close()

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return time.perf_counter() - t0, latencies


def run_load(server: Server, photos, n, concurrency, beam) -> dict:
    b0, i0, s0 = server.metrics()
    cpu0, server_cpu0 = time.process_time(), server.cpu_seconds()
    wall, lat = asyncio.run(drive(server.url, photos, n, concurrency, beam))
    client_cpu, server_cpu = time.process_time() - cpu0, server.cpu_seconds() - server_cpu0
    b1, i1, s1 = server.metrics()
    return {"rps": n / wall, "lat": lat, "avg_batch": (i1 - i0) / max(b1 - b0, 1), "client_cpu": client_cpu / wall,
            "server_cpu": server_cpu / wall, "server_cpu_per_image": server_cpu / n,
            "model_ms_per_image": 1e3 * (s1 - s0) / max(i1 - i0, 1)}  # batch time per image: model workers overlap


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(q / 100 * (len(xs) - 1))))]


# ----------------------------------------------------------------------------- main

def interleaved_latency(engine, url: str, photos: list[bytes], n: int, beam: int) -> tuple[list[float], list[float]]:
    """Concurrency 1, side by side: a bare in-process forward on photo i, then the same photo through the server,
    alternating, so both see the same machine load. Returns (bare seconds, server seconds)."""
    import httpx

    bare, served, timings = [], [], []
    headers = {"content-type": f"multipart/form-data; boundary={BOUNDARY}"}
    with httpx.Client(base_url=url, timeout=60) as client:
        for i in range(n):
            p = photos[i % len(photos)]
            body = multipart(p, beam)
            t0 = time.perf_counter()
            forward(engine, [p], beam)
            bare.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            r = client.post("/v1/captions", content=body, headers=headers)
            served.append(time.perf_counter() - t0)
            if r.status_code != 200:
                raise RuntimeError(f"HTTP {r.status_code}: {r.text[:200]}")
            timings.append(r.json()["timings"])
    return bare, served, timings


def main(args: argparse.Namespace) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    image_dir = Path(args.image_dir)
    if not image_dir.is_dir():
        sys.exit(f"error: {image_dir} not found (the benchmark sends real photos; pass --image-dir)")
    paths = sorted(p for p in image_dir.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))[:args.images]
    if not paths:
        sys.exit(f"error: no images in {image_dir}")
    photos = [p.read_bytes() for p in paths]

    tmp = tempfile.TemporaryDirectory(prefix="bench-serve-")
    if args.checkpoint:
        ckpt, what = Path(args.checkpoint), f"checkpoint {args.checkpoint}"
    else:
        ckpt = random_checkpoint(Path(tmp.name), args.vocab_size)
        what = (f"RANDOM-weight compact model ({args.vocab_size} words) built in {ckpt.parent} - not a trained model: "
                "captions are gibberish, timings are what count")
    print(f"host: {platform.node()} | {os.cpu_count()} CPUs | torch {torch.__version__} | device {args.device} "
          f"| torch threads {torch.get_num_threads()} | load average {os.getloadavg()[0]:.1f} "
          "(shared machine: timings are noisy)")
    print(f"model: {what}")
    delay = "server default" if args.max_delay_ms is None else f"{args.max_delay_ms:g}"
    print(f"photos: {len(photos)} from {image_dir} (mean {statistics.mean(map(len, photos)) / 1024:.0f} KiB); "
          f"beam {args.beam}; servers: --max-batch-size {args.max_batch_size} and 1, --max-delay-ms {delay}; "
          f"{args.rounds} rounds of {args.requests} requests per throughput run")

    # both servers up first (idle servers cost nothing), then every measurement alternates with its reference
    def flags(max_batch_size: int) -> list[str]:
        f = ["--max-batch-size", str(max_batch_size), "--max-queue", "4096", "--log-level", "warning"]
        if args.max_delay_ms is not None:
            f += ["--max-delay-ms", str(args.max_delay_ms)]
        return f + (["--torch-threads", str(args.threads)] if args.threads else [])

    dyn = Server(ckpt, *flags(args.max_batch_size), device=args.device)
    one = Server(ckpt, *flags(1), device=args.device)
    dyn.wait_ready()
    one.wait_ready()
    engine = load_model(ckpt, args.device)
    try:
        raw_throughput(engine, photos[:args.max_batch_size], args.max_batch_size, args.beam, passes=1)  # warm-ups
        run_load(dyn, photos, 2 * args.max_batch_size, args.saturation, args.beam)
        run_load(one, photos, 16, args.concurrency, args.beam)

        rows = []
        for r in range(args.rounds):
            raw = raw_throughput(engine, photos, args.max_batch_size, args.beam, passes=1)
            raw1 = raw_throughput(engine, photos[:32], 1, args.beam, passes=1)
            sat = run_load(dyn, photos, args.requests, args.saturation, args.beam)
            d32 = run_load(dyn, photos, args.requests, args.concurrency, args.beam)
            s32 = run_load(one, photos, args.requests, args.concurrency, args.beam)
            rows.append((raw, sat, d32, s32, raw1))
            print(f"round {r + 1}: raw in-process {raw:6.1f} img/s (one at a time {raw1:5.1f}) | server saturation "
                  f"c={args.saturation} {sat['rps']:6.1f} req/s (avg batch {sat['avg_batch']:4.1f}, model {sat['model_ms_per_image']:.1f} "
                  f"ms/img) | c={args.concurrency}: dynamic "
                  f"{d32['rps']:6.1f} req/s (avg batch {d32['avg_batch']:4.1f}, p50 {pct(d32['lat'], 50) * 1e3:4.0f} ms)"
                  f", max_batch_size=1 {s32['rps']:6.1f} req/s (p50 {pct(s32['lat'], 50) * 1e3:4.0f} ms) | the client "
                  f"used {sat['client_cpu']:.2f} CPUs at saturation")

        interleaved_latency(engine, dyn.url, photos, 5, args.beam)  # warm-up
        bare, served, timings = interleaved_latency(engine, dyn.url, photos, args.latency_requests, args.beam)
    finally:
        dyn.stop()
        one.stop()

    med = statistics.median
    raw = med(r[0] for r in rows)
    sat = med(r[1]["rps"] for r in rows)
    d32, s32 = med(r[2]["rps"] for r in rows), med(r[3]["rps"] for r in rows)
    # each ratio is taken within a round (its two runs were back to back) and the median over rounds reported
    r1 = med(r[1]["rps"] / r[0] for r in rows)
    r2 = med(r[2]["rps"] / r[3]["rps"] for r in rows)
    per_round1 = ", ".join(f"{r[1]['rps'] / r[0]:.2f}" for r in rows)
    per_round2 = ", ".join(f"{r[2]['rps'] / r[3]['rps']:.2f}" for r in rows)
    r3 = pct(served, 50) / pct(bare, 50)
    ceiling = med(r[0] / r[4] for r in rows)
    target2 = 3.0 if args.device.startswith("cuda") else 1.5
    print("\n== results (ratios within each round, median over rounds; throughputs are medians too) ==")
    print(f"(1) saturation throughput / raw batched throughput: {sat:.1f} / {raw:.1f} req/s -> {r1:.2f}  "
          f"(per round: {per_round1}; target >= 0.9: {'met' if r1 >= 0.9 else 'NOT met'})")
    print(f"(2) dynamic batching / max_batch_size=1 at c={args.concurrency}: {d32:.1f} / {s32:.1f} req/s -> {r2:.2f}x  "
          f"(per round: {per_round2}; target >= {target2:g}x: {'met' if r2 >= target2 else 'NOT met'}); "
          f"in-process ceiling, batch {args.max_batch_size} vs one at a time: {ceiling:.2f}x")
    print(f"(3) latency at c=1, server / bare forward (interleaved, {len(bare)} each): "
          f"p50 {pct(served, 50) * 1e3:.1f} / {pct(bare, 50) * 1e3:.1f} ms = {r3:.2f}x "
          f"(target <= 1.2x: {'met' if r3 <= 1.2 else 'NOT met'}); "
          f"p99 {pct(served, 99) * 1e3:.1f} / {pct(bare, 99) * 1e3:.1f} ms = {pct(served, 99) / pct(bare, 99):.2f}x")
    parts = {k: med(t[k] for t in timings) for k in timings[0]}
    print("    server-side medians at c=1: " + ", ".join(f"{k} {v:.1f}" for k, v in parts.items())
          + f"; the rest of the client's {pct(served, 50) * 1e3:.1f} ms is HTTP and the client")
    tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
