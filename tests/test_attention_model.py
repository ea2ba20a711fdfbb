"""The shipped attention model (captioner/models/attention): complete and small, captions the bundled photos with
per-word maps that look somewhere, and answers the web page's question about them (it carries default model v6's
encoder and VQA head; the default is now v7)."""
from __future__ import annotations

from pathlib import Path

import pytest

from captioner import Captioner

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "captioner" / "models" / "attention"
SAMPLES = sorted((ROOT / "service" / "static" / "samples").glob("*.jpg"))

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def att():
    return Captioner.from_pretrained(MODEL, device="cpu", precision="fp32")


def test_shipped_attention_model_is_complete_and_small(att):
    assert {"config.json", "vocab.json", "model.safetensors", "metrics.json", "README.md"} <= {p.name for p in MODEL.iterdir()}
    assert sum(p.stat().st_size for p in MODEL.iterdir()) <= 30 * 2**20
    assert att.has_attention and att.cfg.feature_shapes == {"fc": (512,), "att": (49, 256)}
    assert att.metrics["BLEU-4"] > 0.1


def test_captions_with_maps_that_look_somewhere(att):
    for caps in att.caption(SAMPLES, attention=True):
        c = caps[0]
        assert len(c.words) >= 3 and len(c.attention) == len(c.words)
        peaks = []
        for m in c.attention:
            cells = [x for row in m for x in row]
            assert len(cells) == 49 and abs(sum(cells) - 1) < 1e-4
            peaks.append(max(cells))
        assert max(peaks) > 3 / 49  # at least one word's map is far from uniform
        assert len({tuple(round(x, 3) for row in m for x in row) for m in c.attention}) > 1  # maps change per word


def test_answers_the_web_pages_question_about_its_samples(att):
    q, choices = "Where is this?", ["beach", "snow", "street", "kitchen"]
    for photo, right in (("horses-beach.jpg", "beach"), ("pizza-kitchen.jpg", "kitchen")):
        a = att.answer(ROOT / "service" / "static" / "samples" / photo, q, choices)
        assert a.text == right and a.probs[a.index] > 0.5, (photo, a)
