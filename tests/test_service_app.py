"""The FastAPI app in-process (TestClient): every endpoint, bad input -> its 4xx, auth, CORS, metrics, errors."""
from __future__ import annotations

import base64
import contextlib
import logging
import threading
import time

import pytest

pytest.importorskip("fastapi", reason="service extra not installed (pip install -e '.[serve]')")

from fastapi.testclient import TestClient  # noqa: E402

from _service_util import in_threads, jpeg_bytes, metric_value, png_bomb_header, wait_ready  # noqa: E402
from captioner.api import Captioner  # noqa: E402
from service.app import create_app  # noqa: E402
from service.settings import Settings  # noqa: E402

JPG = jpeg_bytes()


@contextlib.contextmanager
def client_for(checkpoint, captioner=None, **settings):
    settings.setdefault("max_delay_ms", 2)
    app = create_app(Settings(checkpoint=checkpoint, device="cpu", **settings), captioner=captioner)
    with TestClient(app) as c:
        wait_ready(c)
        yield c


@pytest.fixture
def client(tiny_checkpoint):
    with client_for(tiny_checkpoint) as c:
        yield c


def post_image(c, data=JPG, url="/v1/captions", **fields):
    return c.post(url, files={"image": ("x.jpg", data, "image/jpeg")}, data=fields)


def field_of(r) -> list:
    """The loc of the first validation error, without the leading 'body'."""
    return r.json()["detail"][0]["loc"][1:]


# ----------------------------------------------------------------------------- endpoints

def test_health_ready_models_metrics_docs_and_page(client):
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/readyz").json()["status"] == "ready"
    m = client.get("/v1/models").json()["models"][0]
    assert m["vocab_size"] == 18 and m["architecture"]["decoder"]["cell"] == "lstm"
    assert m["tasks"] == ["caption"] and m["architecture"]["vqa"] is None
    assert {"name", "version", "metrics", "limits"} <= set(m)
    text = client.get("/metrics").text
    assert "captioner_batch_size_bucket" in text and "captioner_queue_depth" in text
    assert "swagger" in client.get("/docs").text.lower()
    spec = client.get("/openapi.json").json()
    body = spec["paths"]["/v1/captions"]["post"]["requestBody"]["content"]
    assert {"multipart/form-data", "application/json"} <= set(body)
    assert "/v1/vqa" in spec["paths"]
    page = client.get("/")
    assert page.status_code == 200 and "/static/app.js" in page.text
    for asset in ("/static/app.js", "/static/style.css", "/static/samples/elephant.jpg"):
        assert client.get(asset).status_code == 200, asset


def test_model_workers_for_the_device():
    import torch

    from captioner.runtime import model_workers

    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    assert model_workers(cpu, 2) == (2, 1)  # two batches at once, a core each
    assert model_workers(cpu, 16) == (2, 8)
    assert model_workers(cpu, 1) == (1, 1)
    assert model_workers(gpu, 16) == (1, 16)  # a GPU runs one batch at a time
    assert model_workers(cpu, 16, 3) == (3, 5)
    assert model_workers(cpu, 16, 1) == (1, 16)


def test_a_service_in_process_runs_its_model_workers_and_gives_torch_threads_back(tiny_checkpoint):
    import torch

    before = torch.get_num_threads()
    workers, threads = 2, 1  # --torch-threads is the total, split among the workers
    cap, running, peak, seen = Captioner.from_pretrained(tiny_checkpoint, "cpu"), [0], [0], set()
    encode, lock = cap.encode, threading.Lock()

    def counted(x):
        with lock:
            seen.add(torch.get_num_threads())  # in the model worker's thread: torch's count is per thread
            running[0] += 1
            peak[0] = max(peak[0], running[0])
        time.sleep(0.3)
        with lock:
            running[0] -= 1
        return encode(x)

    cap.encode = counted
    with client_for(tiny_checkpoint, cap, max_batch_size=2, model_workers=2, torch_threads=2, warmup=False) as c:
        assert c.get("/v1/models").json()["models"][0]["batching"]["model_workers"] == workers
        rs = in_threads(lambda i: post_image(c), 6)
        assert [r.status_code for r in rs] == [200] * 6
    assert peak[0] == workers and seen == {threads}  # batches side by side, never more than the workers
    after: list[int] = []  # a thread started now takes torch's process-wide count: the one before the service
    t = threading.Thread(target=lambda: after.append(torch.get_num_threads()))
    t.start()
    t.join()
    assert after == [before]


def test_caption_multipart(client):
    r = post_image(client, beam_size="4", num_captions="3")
    assert r.status_code == 200, r.text
    body = r.json()
    caps = body["captions"]
    assert len(caps) == 3 and all(c["caption"] for c in caps)
    scores = [c["score"] for c in caps]
    assert scores == sorted(scores, reverse=True) and all(c["log_prob"] < 0 for c in caps)
    assert body["model"] == {"name": "captioner", "version": "0"}
    t = body["timings"]
    assert t["total_ms"] >= t["inference_ms"] > 0 and t["queue_ms"] >= 0 and body["batch_size"] == 1


def test_caption_json_base64_and_data_url_match_multipart(client):
    a = post_image(client, beam_size="2").json()["captions"]
    b64 = base64.b64encode(JPG).decode()
    b = client.post("/v1/captions", json={"image": b64, "beam_size": 2}).json()["captions"]
    c = client.post("/v1/captions", json={"image": "data:image/jpeg;base64," + b64, "beam_size": 2}).json()["captions"]
    assert a == b == c


def test_service_answers_like_the_python_api(client, tiny_checkpoint):
    ref = Captioner.from_pretrained(tiny_checkpoint, "cpu").caption(JPG, beam_size=3, num_captions=2)
    got = post_image(client, beam_size="3", num_captions="2").json()["captions"]
    assert [g["caption"] for g in got] == [c.text for c in ref]
    assert [g["log_prob"] for g in got] == pytest.approx([c.log_prob for c in ref], abs=1e-4)


def test_service_runs_the_encoder_in_onnxruntime_when_told(tiny_checkpoint):
    pytest.importorskip("onnxruntime", reason="onnxruntime is not installed: pip install -e '.[onnx]'")
    pytest.importorskip("onnxscript", reason="torch.onnx's exporter needs onnxscript: pip install -e '.[onnx]'")
    ref = Captioner.from_pretrained(tiny_checkpoint, "cpu").caption(JPG, beam_size=3)
    with client_for(tiny_checkpoint, encoder_backend="onnxruntime") as c:
        got = post_image(c, beam_size="3").json()["captions"]
        assert c.app.state.svc.captioner.encoder_backend == "onnxruntime"
    assert [g["caption"] for g in got] == [c.text for c in ref]


def test_sampling_and_greedy(client):
    r = post_image(client, sample="true", num_captions="4", temperature="1.5", top_k="5", beam_size="1")
    assert r.status_code == 200 and len(r.json()["captions"]) == 4
    r = post_image(client, beam_size="1", max_length="3")
    assert r.status_code == 200 and len(r.json()["captions"][0]["caption"].split()) <= 3


# ----------------------------------------------------------------------------- bad input

@pytest.mark.parametrize("fields, field", [
    ({"beam_size": "0"}, ["beam_size"]),
    ({"beam_size": "11"}, ["beam_size"]),
    ({"beam_size": "three"}, ["beam_size"]),
    ({"beam_size": "2", "num_captions": "3"}, ["num_captions"]),
    ({"max_length": "0"}, ["max_length"]),
    ({"temperature": "0", "sample": "true"}, ["temperature"]),
    ({"top_k": "-1"}, ["top_k"]),
    ({"beam": "3"}, ["beam"]),  # unknown field: a typo must not be silently ignored
])
def test_bad_parameters_are_422_naming_the_field(client, fields, field):
    r = post_image(client, **fields)
    assert r.status_code == 422, r.text
    assert field_of(r) == field


def test_bad_images(client, tiny_checkpoint):
    cases = [
        (client.post("/v1/captions", data={"beam_size": "2"}), 422, "image"),  # no image at all
        (post_image(client, b"this is not an image"), 415, "recognised"),
        (post_image(client, b""), 422, "empty"),
        (post_image(client, JPG[: len(JPG) // 2]), 422, "truncated"),
        (post_image(client, png_bomb_header()), 413, "pixels"),
        (client.post("/v1/captions", json={"image": "***not base64***"}), 422, "base64"),
        (client.post("/v1/captions", json={"image": "https://example.com/cat.jpg"}), 422, "URL"),
        (client.post("/v1/captions", json={"beam_size": 2}), 422, "image"),
        (client.post("/v1/captions", json=[1, 2]), 422, "object"),
        (client.post("/v1/captions", content=b"{not json", headers={"content-type": "application/json"}), 422, "JSON"),
        (client.post("/v1/captions", content=JPG, headers={"content-type": "image/jpeg"}), 415, "multipart"),
    ]
    for r, status, word in cases:
        assert r.status_code == status, (word, r.text)
        assert word.lower() in r.text.lower(), (word, r.text)
    assert field_of(cases[0][0]) == ["image"] and field_of(cases[1][0]) == ["image"]


def test_upload_and_pixel_limits(tiny_checkpoint):
    big = jpeg_bytes(400, 300)  # ~ 360 kB of noise
    with client_for(tiny_checkpoint, max_upload_bytes=100_000, max_image_pixels=50_000) as c:
        r = post_image(c, big)
        assert r.status_code == 413 and "limit" in r.text
        r = c.post("/v1/captions", json={"image": base64.b64encode(big).decode()})
        assert r.status_code == 413
        r = post_image(c, jpeg_bytes(300, 200))  # 60,000 pixels, small file
        assert r.status_code == 413 and "60000 pixels" in r.text
        assert post_image(c, jpeg_bytes(200, 200)).status_code == 200  # 40,000 pixels: fine
        # far over the body limit: refused from Content-Length before the body is read
        r = c.post("/v1/captions", content=b"x" * 1_000_000, headers={"content-type": "application/json"})
        assert r.status_code == 413


# ----------------------------------------------------------------------------- auth, CORS, metrics

def test_api_keys(tiny_checkpoint):
    key = "s3cret-key-123"
    with client_for(tiny_checkpoint, api_keys=[key, "other-key-456"]) as c:
        for path in ("/v1/models", "/", "/docs"):
            r = c.get(path)
            assert r.status_code == 401 and r.headers["www-authenticate"].startswith("Bearer"), path
        assert post_image(c).status_code == 401
        assert c.get("/v1/models", headers={"Authorization": "Bearer wrong-key-000"}).status_code == 401
        assert c.get("/v1/models", headers={"Authorization": f"Bearer {key}"}).status_code == 200
        assert c.get("/v1/models", headers={"X-API-Key": "other-key-456"}).status_code == 200
        r = c.post("/v1/captions", files={"image": ("x.jpg", JPG)}, headers={"X-API-Key": key})
        assert r.status_code == 200
        for path in ("/healthz", "/readyz", "/metrics"):  # probes and scrapers need no key
            assert c.get(path).status_code == 200, path
        text = c.get("/metrics").text
        assert metric_value(text, "captioner_requests_total", 'endpoint="/v1/models",method="GET",status="401"') == 2


def test_cors(tiny_checkpoint):
    with client_for(tiny_checkpoint, cors_origins=["https://app.example"]) as c:
        pre = {"Origin": "https://app.example", "Access-Control-Request-Method": "POST",
               "Access-Control-Request-Headers": "x-api-key"}
        r = c.options("/v1/captions", headers=pre)
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "https://app.example"
        r = c.options("/v1/captions", headers={**pre, "Origin": "https://evil.example"})
        assert "access-control-allow-origin" not in r.headers
        r = c.get("/v1/models", headers={"Origin": "https://app.example"})
        assert r.headers["access-control-allow-origin"] == "https://app.example"


def test_metrics_count_requests_images_and_batches(client):
    for _ in range(3):
        assert post_image(client).status_code == 200
    assert post_image(client, beam_size="0").status_code == 422
    text = client.get("/metrics").text
    assert metric_value(text, "captioner_requests_total", 'endpoint="/v1/captions",method="POST",status="200"') == 3
    assert metric_value(text, "captioner_requests_total", 'endpoint="/v1/captions",method="POST",status="422"') == 1
    assert metric_value(text, "captioner_images_processed_total", 'task="caption"') == 3
    assert metric_value(text, "captioner_batch_size_count") == 3  # warm-up batches are not counted
    assert metric_value(text, "captioner_batch_size_sum") == 3
    assert metric_value(text, "captioner_inference_seconds_count") == 3
    assert metric_value(text, "captioner_queue_wait_seconds_count") == 3
    assert metric_value(text, "captioner_queue_depth") == 0
    assert metric_value(text, "captioner_ready") == 1


# ----------------------------------------------------------------------------- batching and failures

def slowed(checkpoint, seconds: float) -> tuple[Captioner, list]:
    """A loaded tiny model whose encoder takes ``seconds`` per batch; calls[] records batch sizes."""
    cap = Captioner.from_pretrained(checkpoint, "cpu")
    calls: list[int] = []
    encode = cap.encode

    def slow_encode(x):
        calls.append(len(x))
        time.sleep(seconds)
        return encode(x)

    cap.encode = slow_encode
    return cap, calls


def test_concurrent_requests_share_batches(tiny_checkpoint):
    cap, calls = slowed(tiny_checkpoint, 0.2)
    with client_for(tiny_checkpoint, cap, max_batch_size=16, max_delay_ms=50, warmup=False) as c:
        rs = in_threads(lambda i: post_image(c, jpeg_bytes(seed=i)), 12)
        assert all(r.status_code == 200 for r in rs), [r.text for r in rs]
        text = c.get("/metrics").text
    assert max(r.json()["batch_size"] for r in rs) > 1
    n, total = metric_value(text, "captioner_batch_size_count"), metric_value(text, "captioner_batch_size_sum")
    assert total == 12 and n == len(calls) and total / n > 1  # average batch size from the histogram


def test_queue_overflow_is_503_with_retry_after(tiny_checkpoint):
    cap, _ = slowed(tiny_checkpoint, 0.5)
    with client_for(tiny_checkpoint, cap, max_batch_size=1, max_queue=1, max_delay_ms=0, warmup=False) as c:
        rs = in_threads(lambda i: (time.sleep(0.1 * i), post_image(c))[1], 4)
        codes = sorted(r.status_code for r in rs)
        assert codes.count(200) >= 2 and 503 in codes, codes
        busy = next(r for r in rs if r.status_code == 503)
        assert busy.headers["retry-after"] == "1" and "busy" in busy.json()["detail"]


def test_timeout_is_504_and_the_queued_work_is_dropped(tiny_checkpoint):
    cap, calls = slowed(tiny_checkpoint, 0.6)
    # one model worker: the second request queues behind the first
    with client_for(tiny_checkpoint, cap, max_batch_size=1, model_workers=1, max_delay_ms=0, request_timeout_s=0.3,
                    warmup=False) as c:
        rs = in_threads(lambda i: (time.sleep(0.05 * i), post_image(c))[1], 2)
        assert [r.status_code for r in rs] == [504, 504], [r.text for r in rs]
        time.sleep(0.8)  # the first batch finishes; the second request's work must not start
        text = c.get("/metrics").text
    assert calls == [1]
    assert metric_value(text, "captioner_dropped_requests_total") == 1


def test_batch_exception_is_500_with_logged_error_id_and_service_goes_on(tiny_checkpoint, caplog):
    cap = Captioner.from_pretrained(tiny_checkpoint, "cpu")
    real, state = cap.caption_batch, {"fail": True}

    def flaky(*a, **k):
        if state.pop("fail", False):
            raise RuntimeError("CUDA error: simulated")
        return real(*a, **k)

    cap.caption_batch = flaky
    with client_for(tiny_checkpoint, cap, warmup=False) as c, caplog.at_level(logging.ERROR):
        r = post_image(c)
        assert r.status_code == 500
        error_id = r.json()["error_id"]
        assert error_id in caplog.text and "simulated" in caplog.text
        assert "simulated" not in r.text  # internals stay in the log
        assert post_image(c).status_code == 200
        text = c.get("/metrics").text
    assert metric_value(text, "captioner_batch_errors_total") == 1


def blocked_warmup(checkpoint) -> tuple[Captioner, threading.Event]:
    """A loaded tiny model whose caption decoding (and so the warm-up) waits until the event is set."""
    cap = Captioner.from_pretrained(checkpoint, "cpu")
    gate, real = threading.Event(), cap.caption_batch

    def blocked(*a, **k):
        gate.wait(10)
        return real(*a, **k)

    cap.caption_batch = blocked
    return cap, gate


def test_not_ready_is_503(tiny_checkpoint):
    cap, gate = blocked_warmup(tiny_checkpoint)
    app = create_app(Settings(checkpoint=tiny_checkpoint, device="cpu"), captioner=cap)
    with TestClient(app) as c:
        assert c.get("/healthz").status_code == 200
        r = c.get("/readyz")
        assert r.status_code == 503 and r.json()["status"] == "warming up"
        r = post_image(c)
        assert r.status_code == 503 and "retry-after" in r.headers
        gate.set()
        wait_ready(c)
        assert post_image(c).status_code == 200


def test_vqa_without_head_is_501(client):
    r = client.post("/v1/vqa", files={"image": ("x.jpg", JPG)}, data={"question": "what", "choices": ["a", "b"]})
    assert r.status_code == 501 and r.json()["detail"] == "this model has no VQA head"


def test_shutdown_answers_accepted_requests_and_refuses_new_ones(tiny_checkpoint):
    cap, calls = slowed(tiny_checkpoint, 0.5)
    app = create_app(Settings(checkpoint=tiny_checkpoint, device="cpu", max_delay_ms=0, warmup=False), captioner=cap)
    with TestClient(app) as c:
        wait_ready(c)
        svc = app.state.svc
        out = {}
        t = threading.Thread(target=lambda: out.setdefault("r", post_image(c)))
        t.start()
        time.sleep(0.2)  # the request is on the model
        stopping = c.portal.start_task_soon(svc.stop)  # what the lifespan does on SIGTERM
        time.sleep(0.05)
        late = post_image(c)
        assert late.status_code == 503 and "shutting down" in late.json()["detail"]
        assert c.get("/readyz").status_code == 503
        t.join()
        stopping.result(5)
        assert out["r"].status_code == 200  # accepted before shutdown: answered
    assert calls == [1]


def test_engine_micro_batched_nhwc_encoder_matches_the_plain_path(tiny_checkpoint):
    import numpy as np
    import torch

    from captioner.generation import GenerationConfig
    from service.engine import CaptionJob, Engine

    size = 32
    jobs = [CaptionJob(np.random.default_rng(i).integers(0, 256, (size, size, 3), np.uint8),
                       GenerationConfig(beam_size=2))
            for i in range(5)]
    nchw = Captioner.from_pretrained(tiny_checkpoint, "cpu", "fp32", channels_last=False)
    assert nchw.model.encoder.features[0].weight.is_contiguous()  # --no-channels-last really is NCHW
    plain = Engine(nchw)(jobs)
    cap = Captioner.from_pretrained(tiny_checkpoint, "cpu", "fp32", encode_chunk=2)
    assert cap.model.encoder.features[0].weight.is_contiguous(memory_format=torch.channels_last)
    sizes, encode = [], cap.model.encode
    cap.model.encode = lambda x: (sizes.append(len(x)), encode(x))[1]
    fast = Engine(cap)(jobs)
    assert sizes == [2, 2, 1]  # every image encoded exactly once, in micro-batches
    assert [[c.text for c in caps] for caps in fast] == [[c.text for c in caps] for caps in plain]
    assert [c[0].log_prob for c in fast] == pytest.approx([c[0].log_prob for c in plain], abs=1e-4)
