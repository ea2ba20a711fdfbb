"""VQA data: Visual7W and VQA v1 readers, the easy-VQA converter, the COCO-instances fixture, batching."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from captioner.config import VQAConfig
from captioner.tokenizer import PAD_ID, Vocabulary
from training.datasets import DatasetError
from training.vqa_data import (EASY_VQA_TYPES, build_vocab, coco_questions, easy_vqa_examples, encode_examples,
                               group_by_image, make_coco_fixture, pick_questions, plural, qa_batch, read_v7w,
                               read_vqa_mc, to_v7w, vocab_texts)

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture
def v7w(tmp_path, make_images):
    make_images(3, "images", prefix="v7w_")
    qa = lambda i, q, a, d, t: {"qa_id": i, "question": q, "answer": a, "multiple_choices": d, "type": t}
    data = {"dataset": "v7w_telling", "images": [
        {"image_id": 0, "filename": "v7w_0.jpg", "split": "train", "qa_pairs": [
            qa(10, "What colour is the dog?", "Brown.", ["Black.", "White.", "Grey."], "what"),
            qa(11, "Where is the dog?", "On the grass.", ["In a car.", "on the GRASS", "At home."], "where")]},
        {"image_id": 1, "split": "train", "qa_pairs": [  # no filename: v7w_<image_id>.jpg
            qa(12, "Who is there?", "A man.", ["A woman.", "A child.", "Nobody."], "who"),
            qa(13, "   ", "A man.", ["A woman."], "who"),  # no question: dropped
            qa(14, "Why?", "Because.", ["because", "!!"], "why")]},  # no distinct distractor left: dropped
        {"image_id": 2, "filename": "v7w_2.jpg", "split": "val", "qa_pairs": [
            qa(15, "When was this taken?", "At night.", ["In the morning.", "At noon.", "At dawn."], "when")]},
    ]}
    path = tmp_path / "dataset_v7w_telling.json"
    path.write_text(json.dumps(data))
    return path, tmp_path / "images"


def test_read_v7w(v7w):
    path, root = v7w
    train = read_v7w(path, root, "train")
    assert [e.qid for e in train] == [10, 11, 12]
    assert [e.qtype for e in train] == ["what", "where", "who"]
    assert train[0].answer_text == "Brown." and sorted(train[0].choices) == ["Black.", "Brown.", "Grey.", "White."]
    assert len(train[1].choices) == 3  # "on the GRASS" duplicates the answer after tokenization
    assert train[2].image == str((root / "v7w_1.jpg").resolve())
    assert [e.qid for e in read_v7w(path, root, "val")] == [15]
    assert len(read_v7w(path, root, "all")) == 4
    # the right answer is not always first, and the order is the same on every read
    assert {e.answer for e in read_v7w(path, root, "all")} != {0}
    assert [e.choices for e in read_v7w(path, root, "all")] == [e.choices for e in read_v7w(path, root, "all")]


def test_read_v7w_errors(v7w, tmp_path):
    path, root = v7w
    with pytest.raises(DatasetError, match="splits present: train, val"):
        read_v7w(path, root, "test")
    with pytest.raises(DatasetError, match="none of .* exist"):
        read_v7w(path, tmp_path, "train")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"questions": []}))
    with pytest.raises(DatasetError, match="not a Visual7W file"):
        read_v7w(bad, root)
    bad.write_text(json.dumps({"images": [{"image_id": 0, "split": "train", "qa_pairs": [{"question": "x?"}]}]}))
    with pytest.raises(DatasetError, match=r"images\[0\]: missing or bad key 'answer'"):
        read_v7w(bad, root)


def test_read_vqa_mc(tmp_path, make_images):
    paths = make_images(2, "train2014", prefix="x")
    for k, p in enumerate(paths):
        p.rename(p.parent / f"COCO_train2014_{k + 7:012d}.jpg")
    choices = ["yes", "no", "2", "red", "dog"] + [str(n) for n in range(3, 16)]
    qs = {"data_subtype": "train2014", "questions": [
        {"question_id": 70, "image_id": 7, "question": "Is it a dog?", "multiple_choices": choices},
        {"question_id": 80, "image_id": 8, "question": "How many?", "multiple_choices": choices}]}
    anns = {"annotations": [
        {"question_id": 70, "image_id": 7, "multiple_choice_answer": "yes", "answer_type": "yes/no"},
        {"question_id": 80, "image_id": 8, "multiple_choice_answer": "2", "answer_type": "number"}]}
    (tmp_path / "q.json").write_text(json.dumps(qs))
    (tmp_path / "a.json").write_text(json.dumps(anns))
    ex = read_vqa_mc(tmp_path / "q.json", tmp_path / "a.json", tmp_path / "train2014")
    assert len(ex) == 2 and all(len(e.choices) == 18 for e in ex)
    assert ex[0].answer_text == "yes" and ex[1].answer_text == "2" and ex[1].qtype == "number"
    assert ex[0].image.endswith("COCO_train2014_000000000007.jpg")


@pytest.fixture(scope="module")
def easy():
    pytest.importorskip("easy_vqa", reason="easy-vqa not installed (pip install easy-vqa)")
    return easy_vqa_examples("test")


def test_easy_vqa_converter(easy):
    assert len(easy) == 9673  # the published test split
    again = easy_vqa_examples("test")
    assert [(e.choices, e.answer) for e in easy] == [(e.choices, e.answer) for e in again]  # deterministic
    other = easy_vqa_examples("test", seed=1)
    assert [e.choices for e in easy] != [e.choices for e in other]
    counts = {"yes/no": 2, "shape": 3, "color": 4}
    for e in easy:
        assert set(e.choices) <= set(EASY_VQA_TYPES[e.qtype])  # distractors of the answer's own type
        assert len(e.choices) == len(set(e.choices)) == counts[e.qtype]
    assert len({e.answer for e in easy if e.qtype == "color"}) == 4  # the right answer moves around
    two = easy_vqa_examples("test", num_choices=2)
    assert all(len(e.choices) == 2 for e in two)
    assert [e.answer_text for e in two] == [e.answer_text for e in easy]


def test_easy_vqa_val_is_held_out_train_images(easy):
    train, val = easy_vqa_examples("train"), easy_vqa_examples("val")
    assert not {e.image for e in train} & {e.image for e in val}
    assert len(train) + len(val) == 38575  # every training question, once
    with pytest.raises(DatasetError, match="train, val or test"):
        easy_vqa_examples("dev")


def _instances():
    cats = [{"id": 1, "name": "person", "supercategory": "person"}, {"id": 2, "name": "dog", "supercategory": "animal"},
            {"id": 3, "name": "cat", "supercategory": "animal"}, {"id": 4, "name": "horse", "supercategory": "animal"},
            {"id": 5, "name": "sheep", "supercategory": "animal"}, {"id": 6, "name": "bus", "supercategory": "vehicle"}]
    anns = [{"id": 1, "image_id": 9, "category_id": 1, "bbox": [0, 0, 10, 10], "area": 100, "iscrowd": 0},
            {"id": 2, "image_id": 9, "category_id": 1, "bbox": [20, 0, 10, 10], "area": 100, "iscrowd": 0},
            {"id": 3, "image_id": 9, "category_id": 2, "bbox": [80, 10, 15, 20], "area": 300, "iscrowd": 0},
            {"id": 4, "image_id": 9, "category_id": 1, "bbox": [0, 0, 99, 99], "area": 9000, "iscrowd": 1}]
    return {"images": [{"id": 9, "file_name": "9.jpg", "width": 100, "height": 50},
                       {"id": 10, "file_name": "10.jpg", "width": 100, "height": 50}],
            "annotations": anns, "categories": cats}


def test_coco_questions_are_right():
    (img,) = coco_questions(_instances(), "train", "train2017/")  # image 10 has no objects: no questions
    assert img["filename"] == "train2017/9.jpg" and img["split"] == "train"
    qa = {q["type"]: q for q in img["qa_pairs"]}
    assert qa["how"]["question"] == "How many people are there?" and qa["how"]["answer"] == "two"  # crowd ignored
    assert qa["what"]["answer"] == "dog" and set(qa["what"]["multiple_choices"]) == {"cat", "horse", "sheep"}
    assert qa["where"]["question"] == "Where is the dog in the picture?" and qa["where"]["answer"] == "on the right"
    yn = qa["yes/no"]
    thing = yn["question"][len("Is there a "):-len(" in the picture?")]
    assert yn["answer"] == ("yes" if thing in ("person", "dog") else "no")
    assert coco_questions(_instances(), "train") == coco_questions(_instances(), "train")  # deterministic
    assert [plural(w) for w in ("person", "bus", "wine glass", "teddy bear", "skis")] == [
        "people", "buses", "wine glasses", "teddy bears", "pairs of skis"]


@pytest.mark.skipif(not (SHARED / "coco-mini" / "annotations").is_dir(),
                    reason="needs ../shared/data/coco-mini (real COCO instances)")
def test_coco_mini_fixture_reads_as_v7w(tmp_path):
    data = make_coco_fixture(SHARED / "coco-mini")
    path = tmp_path / "v7w_coco_mini.json"
    path.write_text(json.dumps(data))
    train = read_v7w(path, SHARED / "coco-mini", "train")
    val = read_v7w(path, SHARED / "coco-mini", "val")
    assert len(train) > 300 and len(val) > 300
    assert {e.qtype for e in train} == {"how", "what", "yes/no", "where"}
    assert all(Path(e.image).is_file() for e in val[:20])


def test_encoding_batching_and_vocab(v7w):
    path, root = v7w
    ex = read_v7w(path, root, "all")
    vocab = build_vocab(vocab_texts(ex), 1)
    assert vocab.itos == Vocabulary.build(vocab_texts(ex), 1).itos
    cfg = VQAConfig(max_choices=3, max_answer_words=2)
    enc = encode_examples(ex, vocab, cfg)
    assert all(len(e.choices) <= 3 for e in enc)
    for e, x in zip(enc, ex):  # the right answer survives trimming to max_choices
        assert x.choices[e.keep[e.answer]] == x.answer_text
        assert all(len(c) <= 2 for c in e.choices)
    records, per_image = group_by_image(ex)
    assert len(records) == 3 and per_image == [[0, 1], [2], [3]]
    picks, rep = pick_questions([0, 2], per_image, 1, torch.Generator().manual_seed(0))
    assert len(picks) == 2 and rep.tolist() == [0, 1] and picks[1] == 3
    picks, rep = pick_questions([0, 1], per_image, 0, None)  # all, in order
    assert picks == [0, 1, 2] and rep.tolist() == [0, 0, 1]
    b = qa_batch(enc, picks)
    assert b["question"].shape[0] == 3 and b["choices"].shape[:2] == (3, 3)
    assert b["target"].tolist() == [enc[i].answer for i in picks]
    assert (b["choices"][~b["choice_mask"]] == PAD_ID).all()


def test_round_trip_through_v7w_json(v7w, tmp_path):
    path, root = v7w
    ex = read_v7w(path, root, "all")
    out = tmp_path / "again.json"
    out.write_text(json.dumps(to_v7w(ex, root)))
    back = read_v7w(out, root, "all")
    assert [(e.question, e.answer_text, sorted(e.choices), e.qtype) for e in back] == \
        [(e.question, e.answer_text, sorted(e.choices), e.qtype) for e in ex]
