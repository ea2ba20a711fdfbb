"""captioner pseudo-refs: pool captions that name a photo's detected objects become its pseudo-references."""
from __future__ import annotations

import json

from captioner.cli import main as cli
from captioner.tokenizer import tokenize
from test_label import fake_run
from training.label import CLASS_NAMES
from training.pseudo_refs import lexicon, named_classes

LEX = lexicon(list(CLASS_NAMES))


def named(caption: str) -> dict:
    return named_classes(tokenize(caption), LEX)


def test_captions_name_classes_with_their_counts_and_longer_phrases_win():
    assert named("Two brown dogs play with a ball on the grass.") == {"dog": 2, "sports ball": None}
    assert named("A hot dog on a plate next to a cup") == {"hot dog": None, "cup": None}  # no dog
    assert named("A teddy bear on a bed") == {"teddy bear": None, "bed": None}
    assert named("A brown bear in the woods") == {"bear": None}
    assert named("three men by a stop sign") == {"person": 3, "stop sign": None}
    assert named("A bus at the bus stop") == {"bus": None}  # "stop" alone is no stop sign


def test_photos_get_the_pool_captions_that_name_their_objects_and_never_excluded_ones(tmp_path, make_images):
    photos = [str(p) for p in make_images(3, "photos")]
    run = fake_run(tmp_path / "labels", photos,
                   [[("dog", 0.9, 0.1, 0.1, 0.4, 0.9), ("dog", 0.8, 0.5, 0.1, 0.9, 0.9)],
                    [("giraffe", 0.9, 0.2, 0.2, 0.8, 0.8)], []])
    pool = {"images": [{"id": i} for i in range(1, 7)], "annotations": [
        {"image_id": 1, "id": 1, "caption": "Two dogs run on the beach."},
        {"image_id": 2, "id": 2, "caption": "A dog and a cat on a couch."},
        {"image_id": 3, "id": 3, "caption": "A man walks his dog."},
        {"image_id": 4, "id": 4, "caption": "A giraffe eats from a tree."},
        {"image_id": 5, "id": 5, "caption": "A tall giraffe in a zoo."},
        {"image_id": 6, "id": 6, "caption": "Two dogs play tug of war."}]}
    (tmp_path / "pool.json").write_text(json.dumps(pool))
    (tmp_path / "val_ids.txt").write_text("6\n")
    out = tmp_path / "refs.json"
    assert cli(["pseudo-refs", "--labels", str(run), "--pool", str(tmp_path / "pool.json"), "--per-photo", "2",
                "--exclude-ids", str(tmp_path / "val_ids.txt"), "--out", str(out)]) == 0
    images = {im["filename"]: im for im in json.loads(out.read_text())["images"]}
    assert set(images) == {"img0.jpg", "img1.jpg"}  # img2 has no object: no pseudo-reference
    dogs = [s["raw"] for s in images["img0.jpg"]["sentences"]]
    assert dogs[0] == "Two dogs run on the beach."  # names the dogs and their count; id 6 is excluded
    assert "Two dogs play tug of war." not in dogs and len(dogs) == 2
    assert {s["raw"] for s in images["img1.jpg"]["sentences"]} == {"A giraffe eats from a tree.", "A tall giraffe in a zoo."}
    assert all(im["split"] == "train" and im["pseudo"] for im in images.values())
    from training.datasets import read_dataset
    records = read_dataset("karpathy", out, tmp_path, "train")  # what captioner train --annotations reads
    assert len(records) == 2 and all(len(r.captions) == 2 for r in records)


def test_make_vqa_asks_presence_and_counts_of_photos_known_only_from_their_labels(tmp_path, make_images):
    from training.make_vqa import labelled_photos, make_questions, photo_candidates

    photos = [str(p) for p in make_images(4, "photos")]
    run = fake_run(tmp_path / "labels", photos, [
        [("dog", 0.9, 0.1, 0.1, 0.4, 0.9), ("dog", 0.8, 0.5, 0.1, 0.9, 0.9)],  # two dogs
        [("dog", 0.9, 0.1, 0.1, 0.4, 0.9), ("dog", 0.4, 0.5, 0.1, 0.9, 0.9)],  # one sure, one unsure: no dog question
        [("cat", 0.95, 0.2, 0.2, 0.8, 0.8)],
        [("person", 0.9, 0.1, 0.1, 0.3, 0.9), ("person", 0.9, 0.4, 0.1, 0.6, 0.9), ("person", 0.9, 0.7, 0.1, 0.9, 0.9)]])
    ps = labelled_photos(str(run), "train", 0.5, None)
    assert [p.instances for p in ps] == [{"dog": 2}, {"dog": 1}, {"cat": 1}, {"person": 3}]
    assert ps[1].unsure == {"dog"} and not ps[0].unsure
    asked = [{c.question: c.answer for c in photo_candidates(k, p, 2)} for k, p in enumerate(ps)]
    assert asked[0]["How many dogs are there?"] == "two" and asked[0]["Is there a dog in the picture?"] == "yes"
    assert asked[0]["Is there a cat in the picture?"] == "no"
    assert "How many dogs are there?" not in asked[1] and "Is there a dog in the picture?" not in asked[1]
    assert asked[2]["Is there a cat in the picture?"] == "yes" and asked[3]["How many people are there?"] == "three"
    data = make_questions(ps, seed=0)  # balanced: per question text, no answer more common than the next
    for im in data["images"]:
        for q in im["qa_pairs"]:
            assert q["answer"] in ("yes", "no", "one", "two", "three", "four")
            assert q["answer"] not in q["multiple_choices"]
