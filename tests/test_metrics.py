"""training.metrics: COCO caption scores (Java + Python paths) and results-file I/O."""
from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from training import metrics
from training.metrics import (METRIC_KEYS, SPICE_MISSING_NOTE, format_metrics, python_tokenize, read_results,
                              score_captions, write_json_atomic, write_results)

needs_java = pytest.mark.skipif(shutil.which("java") is None, reason="Java not installed (PTB tokenizer/METEOR)")

# >= 3 images with different captions: CIDEr-D's idf is log(#images / df), so one image (or identical ones)
# scores 0 even for perfect predictions. Mixed int / str ids are kept as given.
CAPTIONS = {
    1: "A man riding a red bike down the street.",
    2: "Two dogs playing with a ball on the grass.",
    "img3": "A plate of pizza with cheese and tomatoes.",
    4: "A woman holding an umbrella in the rain.",
}
REFS = {i: [c] * 3 for i, c in CAPTIONS.items()}  # identical refs: a perfect prediction has BLEU-4 == 1
PERFECT = dict(CAPTIONS)
# Wrong captions, two with a newline and METEOR's '|||' separator, which would hang/misalign unsanitized.
WRONG = {1: "A cat sleeping\non a sofa.", 2: "A bowl of soup ||| on a table.",
         "img3": "A train at the station.", 4: "A boat floating on a lake."}
SCORED = [k for k in METRIC_KEYS if k not in ("METEOR", "SPICE")]


@pytest.fixture(scope="module")
def java_scores() -> tuple[dict, dict]:
    # Both runs in parallel: each pays the ~5 s METEOR jar startup, so this halves the Java tests' wall time.
    with ThreadPoolExecutor(2) as pool:
        perfect, wrong = pool.map(lambda p: score_captions(p, REFS, use_java=True), (PERFECT, WRONG))
    return perfect, wrong


@needs_java
def test_java_perfect_predictions(java_scores):
    m, _ = java_scores
    assert m["tokenizer"] == "ptb-java" and m["num_images"] == 4
    for n in range(1, 5):
        assert m[f"BLEU-{n}"] == pytest.approx(1.0, abs=1e-6)
    assert m["ROUGE-L"] == pytest.approx(1.0) and m["CIDEr-D"] > 0 and m["METEOR"] > 0.9
    assert all(isinstance(m[k], float) for k in METRIC_KEYS if m[k] is not None)


@needs_java
def test_java_wrong_scores_lower_for_every_metric(java_scores):
    right, wrong = java_scores
    assert wrong["METEOR"] is not None, wrong["notes"]  # odd input did not break METEOR
    for k in SCORED + ["METEOR"]:
        assert wrong[k] < right[k], k


@needs_java
def test_spice_reported_not_crashing(java_scores):
    m, _ = java_scores
    assert "SPICE" in m
    if not metrics.spice_available():
        assert m["SPICE"] is None and SPICE_MISSING_NOTE in m["notes"]


@needs_java
def test_python_tokenizer_matches_ptb():
    caps = ["A man riding a red bike.", "Two dogs, one cat, and a bird!", "There's a man's hat (red) here.",
            "A \"vintage\" car; it's 2,000 years old... isn't it?", "U.S. flag at 5:30 p.m.", "They can't go",
            "the dogs' toys", "A sign that says 'stop'.", "a hot-dog stand -- busy", "Is this a cat?"]
    java = metrics._tokenize_java({i: [c] for i, c in enumerate(caps)})
    assert [python_tokenize(c) for c in caps] == [java[i][0] for i in range(len(caps))]


@needs_java
def test_ptb_alignment_survives_line_breaks_and_empty_captions():
    caps = {0: ["a\rb"], 1: [""], 2: ["x\u2028y ||| z"], 3: ["last one."], 4: [""]}
    cleaned = {k: [metrics._clean(c) for c in v] for k, v in caps.items()}
    assert metrics._tokenize_java(cleaned) == {0: ["a b"], 1: [""], 2: ["x y z"], 3: ["last one"], 4: [""]}


@needs_java
def test_meteor_failure_becomes_none_with_note(monkeypatch):
    class BrokenMeteor:
        def __init__(self):
            raise OSError("meteor jar exploded")

    monkeypatch.setattr(metrics, "Meteor", BrokenMeteor)
    m = score_captions(PERFECT, REFS, use_java=True)
    assert m["METEOR"] is None and any("METEOR failed" in n for n in m["notes"])
    assert m["BLEU-4"] == pytest.approx(1.0) and m["tokenizer"] == "ptb-java"


def test_python_fallback(caplog):
    with caplog.at_level(logging.WARNING, logger="training.metrics"):
        right = score_captions(PERFECT, REFS, use_java=False)
    wrong = score_captions(WRONG, REFS, use_java=False)
    assert right["tokenizer"] == "python" and right["METEOR"] is None and right["SPICE"] is None
    assert any("PTB tokenizer replaced by Python tokenization, METEOR skipped" in n for n in right["notes"])
    assert "METEOR skipped" in caplog.text
    assert right["BLEU-4"] == pytest.approx(1.0) and right["CIDEr-D"] > 0
    for k in SCORED:
        assert wrong[k] < right[k], k


def test_java_missing_falls_back(monkeypatch):
    monkeypatch.setattr(metrics.shutil, "which", lambda _name: None)
    m = score_captions(PERFECT, REFS)
    assert m["tokenizer"] == "python" and m["METEOR"] is None
    assert "Java not found: PTB tokenizer replaced by Python tokenization, METEOR skipped" in m["notes"]
    with pytest.raises(RuntimeError):
        score_captions(PERFECT, REFS, use_java=True)


def test_spice_missing_note(monkeypatch):
    monkeypatch.setattr(metrics, "spice_available", lambda: False)
    m = score_captions(PERFECT, REFS, use_java=False)
    assert m["SPICE"] is None and SPICE_MISSING_NOTE in m["notes"]


def test_mismatched_ids_raise():
    with pytest.raises(ValueError, match="no references.*'extra'"):
        score_captions({**PERFECT, "extra": "a cat"}, REFS, use_java=False)
    with pytest.raises(ValueError, match=r"no prediction.*\[4\]"):
        score_captions({k: v for k, v in PERFECT.items() if k != 4}, REFS, use_java=False)
    with pytest.raises(ValueError, match="no references"):
        score_captions({"1": "a man"}, {1: ["a man"]}, use_java=False)  # '1' is not 1
    with pytest.raises(ValueError, match="no predictions"):
        score_captions({}, REFS, use_java=False)


def test_format_metrics():
    m = {"BLEU-1": 0.5512, "BLEU-4": 0.1419, "METEOR": 0.17, "ROUGE-L": 0.42, "CIDEr-D": 0.3012, "SPICE": None}
    assert format_metrics(m) == "BLEU-1 55.1 BLEU-4 14.2 METEOR 17.0 ROUGE-L 42.0 CIDEr-D 30.1 SPICE n/a"


def test_results_round_trip(tmp_path):
    path = tmp_path / "sub" / "results.json"
    preds = {1: "a man", "img-2": "a café", 3: ""}
    write_results(path, preds)
    assert json.loads(path.read_text(encoding="utf-8")) == [
        {"image_id": 1, "caption": "a man"}, {"image_id": "img-2", "caption": "a café"},
        {"image_id": 3, "caption": ""}]
    assert read_results(path) == preds
    assert [p.name for p in path.parent.iterdir()] == ["results.json"]  # no temp file left behind
    assert path.stat().st_mode & 0o777 == 0o644


def test_write_json_atomic_keeps_old_file_on_failure(tmp_path):
    path = tmp_path / "x.json"
    write_json_atomic(path, {"a": 1})
    with pytest.raises(TypeError):
        write_json_atomic(path, {"a": object()})
    assert json.loads(path.read_text()) == {"a": 1} and len(list(tmp_path.iterdir())) == 1


@pytest.mark.parametrize("content", [
    "not json", '{"image_id": 1, "caption": "x"}', '[{"image_id": 1}]', '[{"caption": "x"}]',
    '[{"image_id": 1, "caption": 5}]', '[{"image_id": [1], "caption": "x"}]',
    '[{"image_id": 1, "caption": "x"}, {"image_id": 1, "caption": "y"}]'])
def test_read_results_malformed(tmp_path, content):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(ValueError, match="malformed COCO results file"):
        read_results(path)


def test_meteor_hang_times_out_and_cleans_up():
    # Stand-in for a wedged METEOR jar: holds the lock and blocks reading a process that never answers.
    class HungMeteor:
        def __init__(self):
            self.lock = threading.Lock()
            self.meteor_p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"],
                                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)

        def compute_score(self, gts, res):
            self.lock.acquire()
            return float(self.meteor_p.stdout.readline()), []

    hung = HungMeteor()
    with pytest.raises(TimeoutError):
        metrics._run_meteor(hung, {1: ["a"]}, {1: ["a"]}, timeout_s=0.5)
    metrics._close_meteor(hung)
    assert hung.meteor_p.returncode is not None and not hung.lock.locked()
