"""Hostile clients against a real `captioner serve` on 127.0.0.1: one probe per finding of the service-hardening
review (poison parameters, thin images, slow clients, SIGTERM with a stalled upload, deep JSON, metric labels, work
for callers that gave up, encodings). Prints what each probe got; it never fails, it reports.

    python bench/abuse.py                       # the shipped model, ~2 minutes on the 2-core CPU
    python bench/abuse.py --checkpoint DIR --only poison,thin

Every connection goes to 127.0.0.1 only; every loop is bounded in count and time.
"""
from __future__ import annotations

import argparse
import base64
import io
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import serve  # bench/serve.py: its Server runs `captioner serve` as a subprocess
from PIL import Image

PROBES = ("poison", "thin", "slow", "sigterm", "json", "methods", "gone", "encodings", "trickle", "memory")


def jpeg(seed: int = 0, w: int = 320, h: int = 240) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def thin_png(w: int, h: int) -> bytes:
    """A real (decodable) w x h black PNG in a few hundred bytes."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    raw = b"".join(b"\0" + b"\0" * w for _ in range(h))  # filter byte + w grey pixels per row
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b""))


class Server(serve.Server):
    def __init__(self, checkpoint: str | None, *flags: str) -> None:
        super().__init__(checkpoint, *flags)
        self.wait_ready()

    def rss_peak_mb(self, field: str = "VmHWM") -> float:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
        return float("nan")

    def rss_mb(self) -> float:
        return self.rss_peak_mb("VmRSS")


def post_caption(url: str, data: bytes, timeout: float = 60, **fields) -> httpx.Response:
    return httpx.post(f"{url}/v1/captions", files={"image": ("x", data, "application/octet-stream")},
                      data={k: str(v) for k, v in fields.items()}, timeout=timeout)


def in_threads(fn, n: int) -> list:
    """fn(0..n-1) all at once; each result, or the exception it raised."""
    def safe(i):
        try:
            return fn(i)
        except Exception as e:  # noqa: BLE001  (reported as the outcome)
            return e
    with ThreadPoolExecutor(n) as pool:
        return list(pool.map(safe, range(n)))


def status(r) -> object:
    return r.status_code if isinstance(r, httpx.Response) else type(r).__name__


# --------------------------------------------------------------------------------------------------- probes

def probe_poison(s: Server) -> None:
    innocent_bad = innocent = 0
    poison_status = []
    for rnd in range(5):
        def one(i):
            if i == 8:
                return post_caption(s.url, jpeg(99), sample="true", temperature="1e-300")
            if i % 3 == 2:
                return httpx.post(f"{s.url}/v1/vqa", files={"image": ("x", jpeg(i), "image/jpeg")},
                                  data={"question": "what is it", "choices": ["a dog", "a cat"]}, timeout=60)
            return post_caption(s.url, jpeg(i))
        rs = in_threads(one, 9)
        poison_status.append(status(rs[8]))
        for r in rs[:8]:
            innocent += 1
            innocent_bad += status(r) not in (200, 501)
    print(f"poison: innocent requests failed {innocent_bad}/{innocent}; the poison request got {poison_status}; "
          f"batch errors {s.metric('captioner_batch_errors_total'):g}")


def probe_thin(s: Server) -> None:
    for w, h in ((1, 20000), (20000, 1), (1, 1_000_000)):
        data = thin_png(w, h)
        before = s.rss_peak_mb()
        t0 = time.monotonic()
        try:
            r = post_caption(s.url, data, timeout=120)
            got = f"{r.status_code} {r.text[:150]!r}"
        except httpx.HTTPError as e:
            got = type(e).__name__
        print(f"thin {w}x{h} ({len(data)} bytes): {got} in {time.monotonic() - t0:.2f} s, "
              f"peak RSS {before:.0f} -> {s.rss_peak_mb():.0f} MB")
        if s.proc.poll() is not None:
            print("  the server died")
            return


def probe_slow(s: Server, n: int = 100, seconds: float = 20) -> None:
    """n connections that send a request head one byte per 0.5 s; how many are still open after `seconds`."""
    head = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 200 + b"\r\n\r\n"
    socks = []
    for _ in range(n):
        c = socket.create_connection(("127.0.0.1", s.port), timeout=5)
        c.setblocking(False)
        socks.append(c)
    t0, k = time.monotonic(), 0
    open_ = set(range(n))
    while time.monotonic() - t0 < seconds:
        for i in list(open_):
            try:
                socks[i].send(head[k:k + 1])
                if socks[i].recv(1, socket.MSG_PEEK) == b"":  # closed by the server
                    open_.discard(i)
            except BlockingIOError:
                pass
            except OSError:
                open_.discard(i)
        k = min(k + 1, len(head) - 5)
        time.sleep(0.5)
    ok = status(httpx.get(f"{s.url}/healthz", timeout=5))
    print(f"slow headers: {len(open_)}/{n} connections still open after {seconds:g} s; a normal request meanwhile: {ok}")
    for c in socks:
        c.close()


def _trickler(port: int, stop: threading.Event, key: bytes | None, log: list) -> None:
    """Open a connection, send a multipart upload head, then one byte per packet as fast as the socket takes them;
    reconnect when the server cuts it. ``log`` gets (seconds the connection lasted, status line) per connection."""
    auth = b"Authorization: Bearer " + key + b"\r\n" if key else b""
    head = (b"POST /v1/captions HTTP/1.1\r\nHost: x\r\n" + auth + b"Content-Type: multipart/form-data; boundary=BB\r\n"
            b"Content-Length: 10000000\r\n\r\n--BB\r\nContent-Disposition: form-data; name=\"image\"; "
            b"filename=\"x.jpg\"\r\n\r\n")
    while not stop.is_set():
        c = socket.create_connection(("127.0.0.1", port), timeout=5)
        c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        t0 = time.monotonic()
        try:
            c.sendall(head)
            while not stop.is_set() and time.monotonic() - t0 < 120:
                c.send(b"x")
        except OSError:
            pass
        try:
            c.settimeout(1)
            got = c.recv(200).split(b"\r\n")[0].decode(errors="replace")
        except OSError:
            got = "(reset)"
        log.append((time.monotonic() - t0, got))
        c.close()


def _neighbour_p50(url: str, seconds: float, headers: dict) -> float:
    """Median latency (ms) of one client captioning a small JPEG back to back for ``seconds``."""
    lat, data = [], jpeg(3)
    t0 = time.monotonic()
    with httpx.Client(headers=headers, timeout=60) as c:
        while time.monotonic() - t0 < seconds:
            t = time.perf_counter()
            c.post(f"{url}/v1/captions", files={"image": ("x.jpg", data, "image/jpeg")})
            lat.append((time.perf_counter() - t) * 1000)
    return float(np.median(lat))


def probe_trickle(checkpoint: str | None, seconds: float = 10) -> None:
    """What one client trickling bytes costs the others: a neighbour's p50 alone, then beside one trickler (with a
    valid API key), then beside one that has none and reconnects each time it is cut. Ratios from one run."""
    key = "bench-key-0001"
    s = Server(checkpoint, "--api-key", key)
    try:
        hdr = {"X-API-Key": key}
        alone = _neighbour_p50(s.url, seconds, hdr)
        for name, k in (("authenticated trickler", key.encode()), ("unauthenticated, reconnecting", None)):
            stop, log = threading.Event(), []
            t = threading.Thread(target=_trickler, args=(s.port, stop, k, log), daemon=True)
            t.start()
            beside = _neighbour_p50(s.url, seconds, hdr)
            stop.set()
            t.join(30)
            longest = max((d for d, _ in log), default=float("nan"))
            statuses = sorted({g for _, g in log})
            print(f"trickle ({name}): neighbour p50 {alone:.1f} ms alone, {beside:.1f} ms beside it "
                  f"({beside / alone:.2f}x); {len(log)} trickling connections, the longest lasted {longest:.2f} s, "
                  f"answers {statuses}")
    finally:
        s.stop()


def probe_memory(checkpoint: str | None) -> None:
    """Eight 40-Mpx PNGs of ~50-120 KB at once: peak and settled RSS against the decode budget (default 512 MiB)."""
    row = (np.arange(8000) % 251).astype(np.uint8)
    grey = np.ascontiguousarray(np.broadcast_to(row, (5000, 8000)))
    pngs = []
    for a in (grey, np.stack([grey, grey[:, ::-1], grey], -1)):
        buf = io.BytesIO()
        Image.fromarray(a).save(buf, "PNG", compress_level=9)
        pngs.append(buf.getvalue())
    s = Server(checkpoint, "--request-timeout", "120")
    try:
        post_caption(s.url, jpeg())
        base = s.rss_mb()
        rs = in_threads(lambda i: post_caption(s.url, pngs[i % 2], timeout=120), 8)
        peak = s.rss_peak_mb()
        time.sleep(2)
        print(f"memory: 8 x 40 Mpx PNG ({len(pngs[0]) // 1024} / {len(pngs[1]) // 1024} KB) at once -> "
              f"{[status(r) for r in rs]}; RSS {base:.0f} MB before, peak {peak:.0f} (+{peak - base:.0f}), "
              f"{s.rss_mb():.0f} MB 2 s after (+{s.rss_mb() - base:.0f})")
    finally:
        s.stop()


def probe_sigterm(checkpoint: str | None) -> None:
    for trickle in (False, True):
        _sigterm(checkpoint, trickle)


def _sigterm(checkpoint: str | None, trickle: bool) -> None:
    """SIGTERM while an upload has stalled (trickle: it sends a byte every 2 s, so no idle timeout ends it)."""
    s = Server(checkpoint)
    body_head = (b"POST /v1/captions HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=BB\r\n"
                 b"Content-Length: 100000\r\n\r\n--BB\r\nContent-Disposition: form-data; name=\"image\"; "
                 b"filename=\"x.jpg\"\r\nContent-Type: image/jpeg\r\n\r\n")
    c = socket.create_connection(("127.0.0.1", s.port))
    c.sendall(body_head + b"\xff\xd8")
    stop = threading.Event()

    def drip():
        while trickle and not stop.wait(2):
            try:
                c.sendall(b"\0")
            except OSError:
                return
    threading.Thread(target=drip, daemon=True).start()
    time.sleep(1)
    # and one normal request answered while the server shuts down
    got: dict = {}
    t = threading.Thread(target=lambda: got.setdefault("r", post_caption(s.url, jpeg(1))))
    t.start()
    time.sleep(0.05)
    t0 = time.monotonic()
    s.proc.send_signal(signal.SIGTERM)
    try:
        rc = s.proc.wait(90)
    except subprocess.TimeoutExpired:
        rc = "still running after 90 s"
    took = time.monotonic() - t0
    stop.set()
    t.join(10)
    c.close()
    s.stop()
    print(f"SIGTERM with a {'trickling' if trickle else 'stalled'} upload: exit {rc} after {took:.1f} s; a request "
          f"sent just before: {status(got.get('r'))}")


def probe_json(s: Server) -> None:
    deep = '{"image": "' + base64.b64encode(jpeg()).decode() + '", "beam_size": ' + "[" * 100_000 + "]" * 100_000 + "}"
    big_int = '{"image": "' + base64.b64encode(jpeg()).decode() + '", "beam_size": ' + "9" * 5000 + "}"
    h = {"content-type": "application/json"}
    r1 = httpx.post(f"{s.url}/v1/captions", content=deep, headers=h, timeout=30)
    r2 = httpx.post(f"{s.url}/v1/captions", content=big_int, headers=h, timeout=30)
    r3 = httpx.post(f"{s.url}/v1/vqa", files={"image": ("x", jpeg(), "image/jpeg")},
                    data={"question": "what is it", "choices": "[" * 20000 + "]" * 20000}, timeout=30)
    r4 = post_caption(s.url, jpeg(), beam_size="9" * 5000)
    print(f"json: 100,000-deep nesting {r1.status_code}; 5,000-digit beam_size (JSON) {r2.status_code}, "
          f"(form) {r4.status_code}; 20,000-deep choices list {r3.status_code}")


def probe_methods(s: Server) -> None:
    def series() -> int:
        return sum(1 for line in httpx.get(f"{s.url}/metrics").text.splitlines() if line.startswith("captioner_"))
    series()  # the first scrape of /metrics adds its own series
    before = series()
    for i in range(50):
        httpx.request(f"ZZ{i}", f"{s.url}/v1/captions", timeout=10)
    print(f"methods: 50 requests with made-up methods added {series() - before} metric series")


def probe_gone(checkpoint: str | None, n: int = 200) -> None:
    s = Server(checkpoint, "--request-timeout", "2")
    try:
        before = s.metric("captioner_images_processed_total")
        rs = in_threads(lambda i: post_caption(s.url, jpeg(i), timeout=60), n)
        time.sleep(3)  # let the batches that were running end
        codes = [status(r) for r in rs]
        ok = codes.count(200)
        ran = s.metric("captioner_images_processed_total") - before
        batches, busy = s.metric("captioner_batch_size_count"), s.metric("captioner_inference_seconds_sum")
        print(f"gone: {n} concurrent requests with --request-timeout 2: {ok} answered 200, {codes.count(504)} got 504, "
              f"{len(codes) - ok - codes.count(504)} other ({sorted(set(map(str, codes)))}); the model ran {ran:g} "
              f"images, {ran - ok:g} of them for callers that had given up; {batches:g} batches, {busy:.1f} s on "
              f"the model; {s.metric('captioner_dropped_requests_total'):g} dropped unrun")
    finally:
        s.stop()


def probe_encodings(s: Server) -> None:
    photo = jpeg(0, 1600, 1200)  # a realistic photo size
    b64 = base64.b64encode(photo).decode()
    r1 = httpx.post(f"{s.url}/v1/captions", files=[("image", ("a", jpeg(1), "image/jpeg")),
                                                    ("image", ("b", jpeg(2), "image/jpeg"))], timeout=30)
    r2 = httpx.post(f"{s.url}/v1/captions", files={"image": ("a", jpeg(1), "image/jpeg")},
                    data={f"f{i}": "1" for i in range(70)}, timeout=30)
    r3 = httpx.post(f"{s.url}/v1/captions", data={"image": b64}, timeout=30)  # url-encoded base64
    r4 = httpx.post(f"{s.url}/v1/captions", files={"image": (None, b64)}, timeout=30)  # multipart text field
    r5 = httpx.post(f"{s.url}/v1/captions", json={"image": ""}, timeout=30)
    r6 = post_caption(s.url, jpeg(), sample="0")
    print(f"encodings: two image files {r1.status_code}; 70 form fields {r2.status_code}; "
          f"{len(photo) // 1024} KiB photo as url-encoded base64 {r3.status_code}, as a multipart text field "
          f"{r4.status_code}; JSON image \"\" {r5.status_code}; form sample=0 {r6.status_code}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default=None, help="model directory (default: the shipped model)")
    p.add_argument("--only", default=",".join(PROBES), help=f"comma-separated subset of {','.join(PROBES)}")
    args = p.parse_args()
    only = args.only.split(",")
    print(f"python {sys.version.split()[0]}, load average {os.getloadavg()[0]:.1f}")
    own = ("sigterm", "gone", "trickle", "memory")  # these start servers of their own
    shared = [x for x in only if x not in own]
    if shared:
        s = Server(args.checkpoint)
        try:
            for name in shared:
                globals()[f"probe_{name}"](s)
                if s.proc.poll() is not None:
                    print(f"the server died during {name}")
                    break
        finally:
            s.stop()
    if "sigterm" in only:
        probe_sigterm(args.checkpoint)
    for name in own[1:]:
        if name in only:
            globals()[f"probe_{name}"](args.checkpoint)


if __name__ == "__main__":
    main()
