"""/v1/vqa and the shared batch function: validation (422 naming the field), answers, one encoder pass per batch."""
from __future__ import annotations

import base64

import numpy as np
import pytest

pytest.importorskip("fastapi", reason="service extra not installed (pip install -e '.[serve]')")

from fastapi.testclient import TestClient  # noqa: E402

from _service_util import jpeg_bytes, tiny_vqa_checkpoint, wait_ready  # noqa: E402
from captioner.api import Captioner  # noqa: E402
from service.app import create_app  # noqa: E402
from captioner.generation import GenerationConfig  # noqa: E402
from captioner.preprocess import normalize_batch  # noqa: E402
from service.engine import CaptionJob, Engine, VQAJob  # noqa: E402
from service.deps import validate_vqa  # noqa: E402
from service.settings import Settings  # noqa: E402

needs_vqa = pytest.mark.skipif(not hasattr(Captioner, "answer_batch"),
                               reason="captioner.api.Captioner has no answer_batch yet (VQA issue not landed)")
JPG = jpeg_bytes()
CHOICES = ["a red ball", "two dogs", "the grass", "a cat"]


@pytest.fixture
def vqa_checkpoint(tmp_path):
    if not hasattr(Captioner, "answer_batch"):
        pytest.skip("captioner.api.Captioner has no answer_batch yet (VQA issue not landed)")
    return tiny_vqa_checkpoint(tmp_path / "tiny-vqa")


@pytest.fixture
def client(vqa_checkpoint):
    app = create_app(Settings(checkpoint=vqa_checkpoint, device="cpu", max_delay_ms=2))
    with TestClient(app) as c:
        wait_ready(c)
        yield c


def ask(c, question="what is on the grass", choices=CHOICES, data=JPG):
    return c.post("/v1/vqa", files={"image": ("x.jpg", data, "image/jpeg")},
                  data={"question": question, "choices": list(choices)})


# ----------------------------------------------------------------------------- validation (no model needed)

@pytest.mark.parametrize("question, choices, loc, word", [
    (None, ["a", "b"], ["question"], "required"),
    ("   ", ["a", "b"], ["question"], "word"),
    ("?!", ["a", "b"], ["question"], "word"),
    ("x" * 501, ["a", "b"], ["question"], "limit"),
    ("what", None, ["choices"], "required"),
    ("what", "a dog", ["choices"], "list"),
    ("what", ["a dog"], ["choices"], "at least 2"),
    ("what", [f"answer {i}" for i in range(33)], ["choices"], "at most 32"),
    ("what", ["a dog", ""], ["choices", 1], "word"),
    ("what", ["a dog", 3], ["choices", 1], "string"),
    ("what", ["Red.", "blue", "red"], ["choices", 2], "choices 1 and 3 are the same answer ('Red.' and 'red')"),
    ("what", ["a dog", "y" * 201], ["choices", 1], "limit"),
])
def test_validate_vqa_names_the_field(question, choices, loc, word):
    from service.errors import InputError

    with pytest.raises(InputError) as e:
        validate_vqa(question, choices)
    err = e.value.errors[0]
    assert e.value.status == 422 and err["loc"] == ["body", *loc] and word in err["msg"], err


def test_validate_vqa_normalises_whitespace():
    assert validate_vqa("  what   is it ", [" a  dog", "a cat "]) == ("what is it", ["a dog", "a cat"])


# ----------------------------------------------------------------------------- the endpoint

@needs_vqa
def test_vqa_multipart_and_json(client):
    r = ask(client)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["choices"] == CHOICES and len(body["probs"]) == 4
    assert sum(body["probs"]) == pytest.approx(1.0, abs=1e-4)
    assert body["index"] == max(range(4), key=body["probs"].__getitem__)
    assert body["answer"] == CHOICES[body["index"]]
    assert body["timings"]["inference_ms"] > 0 and body["model"]["name"] == "captioner"
    j = client.post("/v1/vqa", json={"image": base64.b64encode(JPG).decode(), "question": "what is on the grass",
                                     "choices": CHOICES}).json()
    assert j["probs"] == pytest.approx(body["probs"], abs=1e-5)
    # one multipart field holding a JSON list works too (handy with curl)
    r = client.post("/v1/vqa", files={"image": ("x.jpg", JPG)}, data={"question": "what", "choices": '["a", "b c"]'})
    assert r.status_code == 200 and r.json()["choices"] == ["a", "b c"]


@needs_vqa
def test_vqa_matches_the_python_api(client, vqa_checkpoint):
    ref = Captioner.from_pretrained(vqa_checkpoint, "cpu").answer(JPG, "what is on the grass", CHOICES)
    got = ask(client).json()
    assert got["index"] == ref.index and got["probs"] == pytest.approx(ref.probs, abs=1e-5)


@needs_vqa
def test_models_lists_vqa(client):
    m = client.get("/v1/models").json()["models"][0]
    assert "vqa" in m["tasks"] and m["architecture"]["vqa"]["hidden_dim"] == 8


@needs_vqa
def test_vqa_bad_input_is_422_with_field(client):
    cases = [
        (ask(client, choices=["only one"]), ["choices"]),
        (ask(client, choices=["a dog", "A dog."]), ["choices", 1]),
        (ask(client, question=""), ["question"]),
        (client.post("/v1/vqa", files={"image": ("x.jpg", JPG)}, data={"question": "what"}), ["choices"]),
        (client.post("/v1/vqa", files={"image": ("x.jpg", JPG)},
                     data={"question": "what", "choices": ["a", "b"], "beam_size": "3"}), ["beam_size"]),
        (client.post("/v1/vqa", json={"image": base64.b64encode(JPG).decode(), "question": "what",
                                      "choices": "a, b"}), ["choices"]),
        (client.post("/v1/vqa", data={"question": "what", "choices": ["a", "b"]}), ["image"]),
    ]
    for r, loc in cases:
        assert r.status_code == 422, r.text
        assert r.json()["detail"][0]["loc"] == ["body", *loc], r.text
    assert ask(client, data=b"GIF89a-not-really").status_code in (415, 422)


# ----------------------------------------------------------------------------- the shared batch function

class Counting:
    """Wraps a Captioner and counts calls (and batch sizes) of encode / caption_batch / answer_batch."""

    def __init__(self, cap: Captioner) -> None:
        self.cap, self.calls = cap, []

    def __getattr__(self, name):
        attr = getattr(self.cap, name)
        if name in ("encode", "caption_batch", "answer_batch"):
            def wrapped(*a, **k):
                n = len(a[0]) if a else len(k["features"])
                self.calls.append((name, n))
                return attr(*a, **k)
            return wrapped
        return attr


@needs_vqa
def test_mixed_batch_shares_one_encoder_pass(vqa_checkpoint):
    cap = Captioner.from_pretrained(vqa_checkpoint, "cpu")
    counting = Counting(cap)
    size = cap.cfg.preprocess.image_size
    px = [np.random.default_rng(i).integers(0, 256, (size, size, 3), np.uint8) for i in range(6)]
    jobs = [
        CaptionJob(px[0], GenerationConfig(beam_size=3)),
        VQAJob(px[1], "what is it", ["a dog", "a cat"]),
        CaptionJob(px[2], GenerationConfig(beam_size=2, num_captions=2)),
        CaptionJob(px[3], GenerationConfig(beam_size=3)),
        VQAJob(px[4], "which one", ["red", "two people", "water", "grass", "a ball"]),  # mixed choice counts
        CaptionJob(px[5], GenerationConfig(sample=True, beam_size=4, temperature=0.7, num_captions=2)),
    ]
    out = Engine(counting)(jobs)
    assert counting.calls.count(("encode", 6)) == 1 and sum(c[0] == "encode" for c in counting.calls) == 1
    caption_calls = sorted(n for name, n in counting.calls if name == "caption_batch")
    assert caption_calls == [1, 1, 2]  # beam 3 (two images), beam 2, sampling
    assert [n for name, n in counting.calls if name == "answer_batch"] == [2]
    assert len(out[0]) == 1 and len(out[2]) == 2 and len(out[5]) == 2
    assert len(out[1].probs) == 2 and len(out[4].probs) == 5
    # the batched results equal one-at-a-time results
    v = cap.encode(normalize_batch(np.stack(px), cap.cfg.preprocess))
    alone = cap.caption_batch(features=v[3:4], beam_size=3)[0]
    assert [c.text for c in out[3]] == [c.text for c in alone]
    a = cap.answer_batch(v[4:5], ["which one"], [["red", "two people", "water", "grass", "a ball"]])[0]
    assert out[4].probs == pytest.approx(a.probs, abs=1e-5)


@needs_vqa
def test_model_side_vqa_error_fails_only_that_job(vqa_checkpoint):
    from captioner.vqa import VQAInputError

    cap = Captioner.from_pretrained(vqa_checkpoint, "cpu")
    size = cap.cfg.preprocess.image_size
    x = np.zeros((size, size, 3), np.uint8)
    too_long = "word " * 400  # over VQAConfig.max_chars: the model's own check raises
    out = Engine(cap)([VQAJob(x, "what", ["a", "b"]), VQAJob(x, too_long, ["a", "b"]), CaptionJob(x)])
    assert len(out[0].probs) == 2 and isinstance(out[1], VQAInputError) and out[2][0].text is not None
