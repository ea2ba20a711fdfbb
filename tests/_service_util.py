"""Helpers shared by the service tests (not collected: no test_ prefix)."""
from __future__ import annotations

import contextlib
import io
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


def jpeg_bytes(w: int = 64, h: int = 48, seed: int = 0, fmt: str = "JPEG") -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buf, fmt)
    return buf.getvalue()


def png_bomb_header(w: int = 100_000, h: int = 100_000) -> bytes:
    """A PNG whose header claims w x h pixels (10 gigapixels) in a few dozen bytes: never decode it."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def tiny_vqa_checkpoint(path: Path) -> Path:
    """The conftest tiny caption model plus a tiny VQA head (captioner.config.VQAConfig)."""
    import torch
    from conftest import TINY_WORDS, tiny_model_config

    from captioner.checkpoint import save_pretrained
    from captioner.config import VQAConfig
    from captioner.model import CaptionModel
    from captioner.tokenizer import Vocabulary

    torch.manual_seed(0)
    cfg = tiny_model_config()
    cfg.vqa = VQAConfig(embed_dim=8, hidden_dim=8, mlp_dim=16, dropout=0.0)
    model = CaptionModel(cfg)
    with torch.no_grad():
        model.decoder.layers[0].W_ih.weight.mul_(30)
    return save_pretrained(model, Vocabulary(TINY_WORDS), path)


def wait_ready(client, timeout: float = 30.0) -> None:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if client.get("/readyz").status_code == 200:
            return
        time.sleep(0.02)
    raise TimeoutError(f"service not ready after {timeout} s: {client.get('/readyz').json()}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serve_process(checkpoint: Path, *flags: str, log_path: Path | None = None, env: dict | None = None):
    """Run `captioner serve` on 127.0.0.1 and a free port; yields (process, base_url). Stops it at the end."""
    port = free_port()
    cmd = [sys.executable, "-m", "captioner", "serve", "--checkpoint", str(checkpoint), "--device", "cpu",
           "--host", "127.0.0.1", "--port", str(port), *flags]
    log = open(log_path, "wb") if log_path else subprocess.DEVNULL
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})
    try:
        yield proc, f"http://127.0.0.1:{port}"
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if log_path:
            log.close()


def closed_within(s, seconds: float) -> tuple[bool, bytes]:
    """Whether the server closes the socket's connection within ``seconds``, and what it sent before closing."""
    import socket

    s.settimeout(seconds)
    got = b""
    try:
        while True:
            chunk = s.recv(65536)
            if not chunk:
                return True, got
            got += chunk
    except (socket.timeout, TimeoutError):
        return False, got
    except ConnectionResetError:
        return True, got


def wait_http_ready(proc, url: str, timeout: float = 60.0) -> None:
    import httpx

    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"captioner serve exited with status {proc.returncode} before it was ready")
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise TimeoutError(f"{url} not ready after {timeout} s")


def metric_value(text: str, name: str, labels: str = "") -> float:
    """One sample from Prometheus text, e.g. metric_value(t, 'captioner_batch_size_count')."""
    key = f"{name}{{{labels}}}" if labels else name
    for line in text.splitlines():
        if line.startswith(key + " "):
            return float(line.split()[-1])
    raise KeyError(f"{key} not in metrics")


@contextlib.contextmanager
def serve_in_thread(app, port: int | None = None):
    """A real uvicorn server for ``app`` on 127.0.0.1 in a background thread (no process start: no second torch
    import); yields the base URL."""
    import threading

    import uvicorn

    port = port or free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    t0 = time.monotonic()
    while not server.started:
        if not thread.is_alive() or time.monotonic() - t0 > 30:
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(30)


def in_threads(fn, n: int) -> list:
    """fn(0..n-1) on n threads at once; each result, or the exception it raised, in order."""
    import threading

    out: list = [None] * n

    def work(i):
        try:
            out[i] = fn(i)
        except Exception as e:  # noqa: BLE001  (reported by the callers' assertions)
            out[i] = e

    threads = [threading.Thread(target=work, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out
