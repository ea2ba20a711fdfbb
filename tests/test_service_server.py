"""A real `captioner serve` process on 127.0.0.1: endpoints, batching under concurrency, auth from the
environment, and SIGTERM draining the requests in flight."""
from __future__ import annotations

import signal
import threading
import time

import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("uvicorn", reason="service extra not installed (pip install -e '.[serve]')")

from _service_util import in_threads, jpeg_bytes, metric_value, serve_process, wait_http_ready  # noqa: E402

JPG = jpeg_bytes()


def post(url: str, data: bytes = JPG, timeout: float = 30, **kw) -> httpx.Response:
    return httpx.post(f"{url}/v1/captions", files={"image": ("x.jpg", data, "image/jpeg")}, timeout=timeout, **kw)


def slow_upload(url: str, headers: dict, release: threading.Event, out: dict) -> None:
    """A client whose upload stalls halfway until ``release`` is set (chunked body); stores its response."""
    boundary = "slowupload42"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"x.jpg\"\r\n"
            "Content-Type: image/jpeg\r\n\r\n").encode() + JPG + f"\r\n--{boundary}--\r\n".encode()

    def chunks():
        yield body[:100]
        release.wait(30)
        yield body[100:]

    out["r"] = httpx.post(f"{url}/v1/captions", content=chunks(), timeout=60,
                          headers={**headers, "content-type": f"multipart/form-data; boundary={boundary}"})


def test_real_server_endpoints_batching_auth_and_graceful_shutdown(tiny_checkpoint, tmp_path):
    key = "test-key-0123456789"
    with serve_process(tiny_checkpoint, "--max-batch-size", "16", "--max-delay-ms", "5000",
                       log_path=tmp_path / "serve.log", env={"CAPTIONER_API_KEYS": key}) as (proc, url):
        wait_http_ready(proc, url)
        auth = {"Authorization": f"Bearer {key}"}
        assert httpx.get(f"{url}/healthz").json() == {"status": "ok"}
        assert httpx.get(f"{url}/v1/models").status_code == 401  # the key from the environment is enforced
        assert httpx.get(f"{url}/v1/models", headers=auth).json()["models"][0]["vocab_size"] == 18
        assert httpx.get(f"{url}/", headers=auth).status_code == 200
        assert httpx.get(f"{url}/docs", headers=auth).status_code == 200
        assert post(url, b"not an image", headers=auth).status_code == 415
        t0 = time.monotonic()
        assert post(url, headers=auth).status_code == 200
        assert time.monotonic() - t0 < 4  # a lone request does not wait out the 5 s max delay

        # 16 clients at once: the batcher puts several of them in one model batch
        rs = in_threads(lambda i: post(url, jpeg_bytes(seed=i), headers=auth), 16)
        assert all(isinstance(r, httpx.Response) and r.status_code == 200 for r in rs), rs
        assert all(r.json()["captions"][0]["caption"] for r in rs)
        text = httpx.get(f"{url}/metrics").text  # no key needed for the scraper
        batches, images = metric_value(text, "captioner_batch_size_count"), metric_value(text, "captioner_batch_size_sum")
        # average batch size of the 16, from the histogram (the lone request above was one batch of 1)
        assert images == 17 and (images - 1) / (batches - 1) > 1.5, (images, batches)
        assert metric_value(text, "captioner_batch_size_bucket", 'le="1.0"') < batches  # some batch held > 1
        assert max(r.json()["batch_size"] for r in rs) > 1
        assert metric_value(text, "captioner_requests_total",
                            'endpoint="/v1/captions",method="POST",status="200"') == 17

        # SIGTERM while 8 requests wait in the forming batch for a 9th that is still uploading: all 9 are answered,
        # new connections are refused
        release, slow = threading.Event(), {}
        uploader = threading.Thread(target=slow_upload, args=(url, auth, release, slow))
        uploader.start()
        time.sleep(0.3)  # the slow request is announced: a forming batch waits for it
        n = 8
        results: list = [None] * n
        threads = [threading.Thread(target=lambda i=i: results.__setitem__(i, post(url, jpeg_bytes(seed=i),
                                                                                   headers=auth)))
                   for i in range(n)]
        for t in threads:
            t.start()
        t0 = time.monotonic()
        while time.monotonic() - t0 < 10:  # wait until the server holds all n requests
            if metric_value(httpx.get(f"{url}/metrics").text, "captioner_queue_depth") == n:
                break
            time.sleep(0.02)
        else:
            pytest.fail("the requests never reached the server's queue")
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        with pytest.raises(httpx.TransportError):
            httpx.get(f"{url}/healthz", timeout=2)
        assert all(r is None for r in results)  # still held
        release.set()  # the upload completes during shutdown
        for t in [*threads, uploader]:
            t.join(30)
        proc.wait(30)
    assert [getattr(r, "status_code", r) for r in results] == [200] * n
    assert slow["r"].status_code == 200, slow["r"].text
    assert all(r.json()["batch_size"] == n + 1 for r in results)  # answered together, by the drain
    assert proc.returncode == 0  # a graceful stop is a normal exit, not death by SIGTERM (-15)
    log = (tmp_path / "serve.log").read_text()
    assert "ready:" in log and "draining" in log and "stopped" in log and "Traceback" not in log
    assert key not in log  # the key is never logged
