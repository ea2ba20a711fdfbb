"""`captioner make-vqa`: multiple-choice questions derived from captions (agreement, no-answers, balance,
distractors, determinism), written as Visual7W that the training reader reads back."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from captioner.cli import main as cli
from training.make_vqa import (COLORS, Candidate, Photo, activity_of, agreed, colors_of, count_of, make_questions,
                               photo_candidates, words)
from training.vqa_data import read_v7w

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"


def photo(i, *captions, split="train"):
    return Photo(f"images/p{i}.jpg", i, split, list(captions))


def qas(data, image_id):
    return {q["question"]: q for im in data["images"] if im["image_id"] == image_id for q in im["qa_pairs"]}


def test_caption_readers():
    assert colors_of(words("A black dog runs"), {"dog"}) == {"black"}
    assert colors_of(words("a black furry dog"), {"dog"}) == {"black"}
    assert colors_of(words("A black and white dog"), {"dog"}) == {"multi"}
    assert colors_of(words("a man in a red t-shirt"), {"shirt", "tshirt"}) == {"red"}
    assert count_of(words("Two dogs play"), {"dog"}, {"dogs"}) == {2}
    assert count_of(words("A dog plays"), {"dog"}, {"dogs"}) == {1}
    assert count_of(words("dogs play"), {"dog"}, {"dogs"}) == {0}  # plural without a number: no single count
    assert count_of(words("the dog plays"), {"dog"}, {"dogs"}) == {-1}  # neutral
    assert activity_of(words("A dog is running on grass"), {"dog"}) == {"running"}
    assert activity_of(words("A dog with a ball runs"), {"dog"}) == set()  # not the verb right after the subject
    assert agreed([{"beach"}, {"beach", "water"}, set()], 2, {"beach": {"water"}}) == "beach"
    assert agreed([{"water"}, {"water", "pool"}, {"pool"}], 2, {"pool": {"water"}}) == "pool"
    assert agreed([{"grass"}, {"grass"}, {"snow"}], 2) is None  # contradicted
    assert agreed([{"grass"}, set()], 2) is None  # one caption is not enough


def _photos():
    dogs = [photo(i, "A black dog runs on the grass .", "A black dog is running .", "A dog runs in a field .",
                  "Two dogs play .") for i in range(4)]
    brown = [photo(10 + i, "A brown dog is running on the grass .", "A brown dog runs in the grass .",
                   "A dog runs .") for i in range(3)]
    mixed = [photo(20, "A black dog runs on the grass .", "A brown dog runs in the snow .", "A dog .")]
    people = [photo(30 + i, "Two men sit on a bench in the street .", "Two men sit on the street .",
                    "Two men are sitting .") for i in range(3)]
    one = [photo(40 + i, "A man sits on a bench in the street .", "A man is sitting on a street bench .")
           for i in range(3)]
    animal = [photo(50, "An animal runs on the grass .", "An animal in a field .")]
    return dogs + brown + mixed + people + one + animal


def _candidates(p: Photo) -> dict[str, Candidate]:
    p.tokens = [words(c) for c in p.captions]
    return {c.question: c for c in photo_candidates(0, p, min_support=2)}


def test_agreement_contradiction_and_no_answers():
    photos = _photos()
    q = _candidates(photos[4])  # brown dog running on grass
    assert q["What color is the dog?"].answer == "brown"
    assert set(q["What color is the dog?"].pool) == set(COLORS) - {"brown"}  # distractors: what no caption says
    assert q["What is the dog doing?"].answer == "running"
    assert q["Where is this?"].answer == "grass"
    # black vs brown and grass vs snow in one photo's captions: no colour and no scene question
    assert "What color is the dog?" not in _candidates(photos[7]) and "Where is this?" not in _candidates(photos[7])
    # "two dogs" in one caption contradicts "a black dog" in others: no count question
    assert all("How many" not in k for k in _candidates(photos[0]))
    # "no" only where no caption could mean the thing: "animal" blocks "Is there a dog in the picture?" -> no
    assert "Is there a dog in the picture?" not in _candidates(photos[-1])
    assert _candidates(photos[8])["Is there a dog in the picture?"].answer == "no"
    assert _candidates(photos[0])["Is there a dog in the picture?"].answer == "yes"
    assert _candidates(photos[8])["How many men are there?"].answer == "two"


def test_balanced_answers_per_question():
    data = make_questions(_photos(), min_support=2, seed=0)
    by_q = {}
    for im in data["images"]:
        for q in im["qa_pairs"]:
            by_q.setdefault(q["question"], Counter())[q["answer"]] += 1
    for question, counts in by_q.items():
        top = counts.most_common(2)
        assert len(top) == 2, f"{question!r} has a single answer: the text would give it away"
        assert top[0][1] == top[1][1], (question, counts)  # the commonest cut down to the second's count
    assert by_q["How many men are there?"] == {"one": 3, "two": 3}
    assert by_q["What color is the dog?"] == {"black": 3, "brown": 3}  # 4 black photos cut to 3


def test_cli_writes_visual7w_the_reader_reads(tmp_path, make_images, capsys):
    make_images(8, "flickr/images", prefix="p")
    caps = [["A black dog runs on the grass .", "A black dog is running on grass .", "A dog runs ."],
            ["A brown dog runs on the grass .", "A brown dog is running on grass .", "A dog ."],
            ["Two men sit in the street .", "Two men sit on a street ."],
            ["A man sits in the street .", "A man is sitting on a street ."]] * 2
    ann = {"dataset": "tiny", "images": [
        {"filename": f"p{i}.jpg", "filepath": "images", "imgid": i, "split": ["train", "val", "test", "train"][i % 4],
         "sentences": [{"raw": c, "tokens": words(c)} for c in caps[i]]} for i in range(8)]}
    (tmp_path / "flickr" / "ann.json").write_text(json.dumps(ann))
    out = tmp_path / "q.json"
    assert cli(["make-vqa", "--karpathy", str(tmp_path / "flickr" / "ann.json"), str(tmp_path / "flickr"),
                "--image-root", str(tmp_path), "--min-support", "2", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "majority" in printed and "prior" in printed and "chance" in printed
    data = json.loads(out.read_text())
    assert {im["split"] for im in data["images"]} <= {"train", "val"}  # test photos are never used by default
    assert all(im["filename"].startswith("flickr/images/") for im in data["images"])
    train = read_v7w(out, tmp_path, "train")
    assert train and all(Path(e.image).is_file() and e.choices[e.answer] for e in train)
    stats = json.loads((tmp_path / "q.stats.json").read_text())
    assert stats["train"]["all"]["questions"] == len(train)
    assert 0 < stats["train"]["all"]["chance"] <= 0.5


def test_same_output_whatever_the_hash_seed(tmp_path):
    """Sets of words decide agreement: the output must not depend on Python's string-hash order."""
    code = ("import json,sys; from tests.test_make_vqa import _photos; from training.make_vqa import make_questions;"
            "print(json.dumps(make_questions(_photos(), 2, 4, 0), sort_keys=True))")
    outs = {subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True,
                           env={**os.environ, "PYTHONHASHSEED": seed}).stdout for seed in ("1", "2", "3")}
    assert len(outs) == 1


@pytest.mark.shared_data
@pytest.mark.slow
def test_flickr8k_and_coco_mini_questions(tmp_path):
    if not (SHARED / "flickr8k" / "dataset_flickr8k.json").is_file():
        pytest.skip(f"needs ../shared/data (Flickr8k, coco-mini) at {SHARED}")
    out = tmp_path / "real.json"
    coco = SHARED / "coco-mini"
    assert cli(["make-vqa", "--karpathy", str(SHARED / "flickr8k" / "dataset_flickr8k.json"), str(SHARED / "flickr8k"),
                "--coco", str(coco / "annotations" / "captions_val2017.json"), str(coco / "val2017"), "val",
                "--image-root", str(SHARED), "--out", str(out)]) == 0
    stats = json.loads((tmp_path / "real.stats.json").read_text())
    for split in ("train", "val"):
        for t in ("presence", "count", "color", "scene", "animal", "activity"):
            r = stats[split][t]
            assert r["questions"] >= 50, (split, t, r)
            # a guesser that knows the training answers gains little over chance (count: one/two dominate)
            assert r["prior_choice_rate"] <= r["chance"] + (0.2 if t == "count" else 0.12), (split, t, r)
    val = read_v7w(out, SHARED, "val")
    assert any("coco-mini" in e.image for e in val)
