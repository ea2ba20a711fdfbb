"""The shipped default model (captioner/models/default): loads with no arguments, fits the size budget, captions
photos and answers multiple-choice questions about real easy-VQA test images."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from captioner import Captioner
from captioner.api import default_checkpoint

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "service" / "static" / "samples"
SHARED = ROOT.parent / "shared" / "data"

pytestmark = pytest.mark.usefixtures("one_thread")
# measured on all 2,984 real-photo val questions (model card): 80.1, 82.1, 60.1, 51.4, 64.2, 50.9 %; chance 25 %
# (presence 50 %); the image-blind model counts 41.8 %
REAL_BARS = {"presence": 0.70, "scene": 0.70, "color": 0.45, "activity": 0.38, "animal": 0.45, "count": 0.38}
BARS = {"color": 0.95, "yes/no": 0.95, "shape": 0.95}  # measured on the whole test split: 100, 99.7, 99.3 %


@pytest.fixture(scope="module")
def cap():
    return Captioner.from_pretrained(device="cpu")


def test_shipped_model_is_complete_and_small(cap):
    d = default_checkpoint()
    assert {"config.json", "vocab.json", "model.safetensors", "metrics.json", "README.md"} <= {p.name for p in d.iterdir()}
    assert sum(p.stat().st_size for p in d.iterdir()) <= 30 * 2**20
    assert cap.tasks == ["caption", "vqa"] and cap.has_vqa
    assert cap.metrics["BLEU-4"] > 0 and cap.metrics["val_accuracy"] > 0.5


def test_captions_the_bundled_photos(cap):
    photos = sorted(SAMPLES.glob("*.jpg"))
    assert len(photos) == 3
    for c in cap.caption(photos):
        assert len(c[0].text.split()) >= 3 and "<unk>" not in c[0].text


@pytest.mark.parametrize("qtype", ["color", "yes/no", "shape"])
def test_answers_questions_on_easy_vqa_test_images(cap, qtype):
    """The first 60 test questions of each type, as multiple choice exactly as `captioner evaluate --task vqa`
    builds them; the bars sit below the accuracies measured on the whole test split (model card)."""
    pytest.importorskip("easy_vqa", reason="the easy-vqa package is not installed")
    from training.vqa_data import easy_vqa_examples

    ex = [e for e in easy_vqa_examples("test") if e.qtype == qtype][:60]
    got = cap.answer_many([e.image for e in ex], [e.question for e in ex], [e.choices for e in ex])
    right = sum(g.index == e.answer for g, e in zip(got, ex))
    assert right >= BARS[qtype] * len(ex), f"{right}/{len(ex)} {qtype} questions right"


def _page_question() -> tuple[str, list[str]]:
    """The question and choices the web page is pre-filled with."""
    html = (ROOT / "service" / "static" / "index.html").read_text()
    question = re.search(r'id="question"[^>]*value="([^"]+)"', html, re.S).group(1)
    choices = re.search(r'<textarea id="choices"[^>]*>(.*?)</textarea>', html, re.S).group(1).split("\n")
    return question, [c.strip() for c in choices if c.strip()]


@pytest.mark.parametrize("photo, right", [
    ("horses-beach.jpg", "beach"),
    pytest.param("pizza-kitchen.jpg", "kitchen", marks=pytest.mark.xfail(
        strict=True, reason="v7 answers 'street' (80 %): kitchens are 24 of its 2,058 scene training questions "
                            "(model card, Limitations); v6 said 'kitchen' (66 %)")),
])
def test_answers_the_web_pages_question_about_its_samples(cap, photo, right):
    question, choices = _page_question()
    assert (question, choices) == ("Where is this?", ["beach", "snow", "street", "kitchen"])
    a = cap.answer(SAMPLES / photo, question, choices)
    assert a.text == right and a.probs[a.index] > 0.5, (photo, a)


@pytest.mark.shared_data
def test_answers_questions_about_real_photos(cap, tmp_path):
    """Questions `captioner make-vqa` derives from the captions of the Flickr8k val photos (never trained on): the
    first 200 of each type; the bars sit below the accuracies measured on all of them (model card)."""
    if not (SHARED / "flickr8k" / "dataset_flickr8k.json").is_file():
        pytest.skip(f"needs ../shared/data (Flickr8k) at {SHARED}")
    from captioner.cli import main as cli
    from training.vqa_data import read_v7w

    out = tmp_path / "real.json"
    assert cli(["make-vqa", "--karpathy", str(SHARED / "flickr8k" / "dataset_flickr8k.json"),
                str(SHARED / "flickr8k"), "--splits", "train", "val", "--image-root", str(SHARED),
                "--out", str(out)]) == 0
    val = read_v7w(out, SHARED, "val")
    for qtype, bar in REAL_BARS.items():
        ex = [e for e in val if e.qtype == qtype][:200]
        got = cap.answer_many([e.image for e in ex], [e.question for e in ex], [e.choices for e in ex])
        right = sum(g.index == e.answer for g, e in zip(got, ex))
        print(f"{qtype}: {right}/{len(ex)}")
        assert len(ex) >= 30 and right >= bar * len(ex), f"{right}/{len(ex)} {qtype} questions right"
