"""The shipped default model (captioner/models/default): loads with no arguments, fits the size budget, captions
photos and answers multiple-choice questions about real easy-VQA test images."""
from __future__ import annotations

from pathlib import Path

import pytest

from captioner import Captioner
from captioner.api import default_checkpoint

SAMPLES = Path(__file__).resolve().parents[1] / "service" / "static" / "samples"

pytestmark = pytest.mark.usefixtures("one_thread")
BARS = {"color": 0.95, "yes/no": 0.95, "shape": 0.95}  # measured on the whole test split: 100, 99.9, 99.7 %


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
