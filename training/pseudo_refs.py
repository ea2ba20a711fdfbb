"""Pseudo-references for photos without captions, from a text-only caption pool: ``captioner pseudo-refs``.

The COCO sentence pool holds human captions of photos we do not have; ``captioner label`` knows which COCO objects
the photos we do have show. As in Feng et al. (2019, "Unsupervised Image Captioning"), a caption that names the
objects a photo's detector found (and no others) is a plausible description of it: each labelled photo with at
least one object gets the ``--per-photo`` pool captions whose named objects best match its detections

    score(photo, caption) = |D ∩ N| / |D ∪ N|  + 0.25 per class whose count the caption states correctly

with D the classes detected in the photo's centre view (score >= --threshold) and N the classes the caption names
(through the lexicon below, singular or plural). The output is a Karpathy-format JSON (split "train", absolute
paths) that ``captioner train --annotations`` reads; each sentence keeps its score and pool image id, so a run can
weight or filter them. Pool captions of ``--exclude-ids`` photos (a validation or test split) are never used.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import random
import re
from collections import defaultdict
from pathlib import Path

from captioner.fileio import write_json_atomic
from captioner.tokenizer import tokenize

from .label import Labels

log = logging.getLogger("captioner.pseudo_refs")

# COCO class -> the phrases that name it in captions, comma-separated (singular and plural); a class not listed is
# named by its own name and that name + "s"
NAMES = {
    "person": "person, people, man, men, woman, women, boy, boys, girl, girls, child, children, kid, kids, guy, guys, "
              "lady, ladies, player, players, skier, skiers, surfer, surfers, skateboarder, skateboarders",
    "bicycle": "bicycle, bicycles, bike, bikes", "motorcycle": "motorcycle, motorcycles, motorbike, motorbikes",
    "airplane": "airplane, airplanes, plane, planes, jet, jets, aircraft", "boat": "boat, boats, ship, ships",
    "traffic light": "traffic light, traffic lights", "fire hydrant": "fire hydrant, hydrant, hydrants",
    "stop sign": "stop sign, stop signs", "parking meter": "parking meter, parking meters",
    "bird": "bird, birds, pigeon, pigeons, seagull, seagulls, duck, ducks", "cat": "cat, cats, kitten, kittens",
    "dog": "dog, dogs, puppy, puppies", "sheep": "sheep, lamb, lambs", "cow": "cow, cows, cattle, bull, bulls",
    "handbag": "handbag, handbags, purse, purses", "suitcase": "suitcase, suitcases, luggage", "skis": "skis",
    "sports ball": "ball, balls, soccer ball, tennis ball", "baseball bat": "bat, bats, baseball bat",
    "baseball glove": "glove, gloves, mitt", "tennis racket": "racket, rackets, racquet, tennis racket",
    "wine glass": "wine glass, wine glasses, glass of wine", "cup": "cup, cups, mug, mugs",
    "donut": "donut, donuts, doughnut, doughnuts", "hot dog": "hot dog, hot dogs", "couch": "couch, couches, sofa",
    "potted plant": "potted plant, plant, plants", "dining table": "table, tables, dining table",
    "tv": "tv, television", "laptop": "laptop, laptops, computer, computers", "remote": "remote, remotes",
    "cell phone": "phone, phones, cell phone, cellphone", "oven": "oven, ovens, stove",
    "refrigerator": "refrigerator, fridge", "teddy bear": "teddy bear, teddy bears, teddy", "hair drier": "hair dryer",
    "scissors": "scissors", "broccoli": "broccoli", "toothbrush": "toothbrush, toothbrushes",
}
NUMBER_WORDS = {"two": 2, "three": 3, "four": 4, "five": 5, "six": 6}


def lexicon(classes: list[str]) -> list[tuple[tuple[str, ...], str]]:
    """(phrase tokens, class) for every naming phrase, longest first: "hot dog" is matched before "dog"."""
    out = []
    for c in classes:
        phrases = NAMES.get(c, f"{c}, {c}s")
        out += [(tuple(p.split()), c) for p in (x.strip() for x in phrases.split(",")) if p]
    return sorted(out, key=lambda pc: -len(pc[0]))


def named_classes(tokens: list[str], lex: list[tuple[tuple[str, ...], str]]) -> dict[str, int | None]:
    """Class -> the count the caption states before it ("two dogs", "three brown dogs"; None when it names the class
    without a number) for every class the caption names. Tokens taken by a longer phrase are not reused ("a hot
    dog" names no dog)."""
    taken = [False] * len(tokens)
    found: dict[str, int | None] = {}
    for phrase, c in lex:
        n = len(phrase)
        for i in range(len(tokens) - n + 1):
            if tuple(tokens[i:i + n]) != phrase or any(taken[i:i + n]):
                continue
            taken[i:i + n] = [True] * n
            count = next((NUMBER_WORDS[tokens[j]] for j in (i - 1, i - 2) if j >= 0 and tokens[j] in NUMBER_WORDS),
                         None)
            found[c] = count if found.get(c) is None else found[c]
    return found


def read_pool(path: str | os.PathLike, exclude: set[int]) -> list[tuple[int, str]]:
    """(image id, caption) of a COCO caption file, without the captions of ``exclude`` images."""
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    return [(a["image_id"], " ".join(a["caption"].split())) for a in data["annotations"]
            if a["image_id"] not in exclude]


def read_ids(path: str | os.PathLike) -> set[int]:
    """Image ids from a text file (one a line) or a COCO JSON file (its images' ids)."""
    text = Path(path).read_text(encoding="utf-8")
    if text.lstrip().startswith("{"):
        return {im["id"] for im in json.loads(text)["images"]}
    return {int(s) for s in text.split()}


def match(labels: Labels, pool: list[tuple[int, str]], per_photo: int, threshold: float, rows: list[int],
          seed: int = 0) -> dict[int, list[tuple[float, int, str]]]:
    """Row -> its best ``per_photo`` (score, pool image id, caption), best first, for every row with an object."""
    lex = lexicon(labels.classes)
    index: dict[str, list[int]] = defaultdict(list)  # class -> pool captions naming it
    named = []
    for k, (_, caption) in enumerate(pool):
        n = named_classes(tokenize(caption), lex)
        named.append(n)
        for c in n:
            index[c].append(k)
    _, counts = labels.objects(threshold)
    centre = counts[:, 0]  # (N, 80): boxes in the centre view
    rng = random.Random(seed)  # breaks ties between equally good captions
    out = {}
    for r in rows:
        present = {labels.classes[i]: int(n) for i, n in enumerate(centre[r].tolist()) if n > 0}
        if not present:
            continue
        candidates = {k for c in present for k in index.get(c, ())}
        scored = []
        for k in candidates:
            n = named[k]
            union = len(set(present) | set(n))
            score = len(set(present) & set(n)) / union
            score += 0.25 * sum(1 for c, said in n.items() if said is not None and present.get(c) == said)
            scored.append((round(score, 4), rng.random(), k))
        scored.sort(reverse=True)
        out[r] = [(s, pool[k][0], pool[k][1]) for s, _, k in scored[:per_photo]]
    return out


def karpathy(labels: Labels, matches: dict[int, list[tuple[float, int, str]]], name: str) -> dict:
    images = []
    for r, refs in sorted(matches.items()):
        path = os.path.abspath(labels.paths[r])
        images.append({"filepath": os.path.dirname(path), "filename": os.path.basename(path), "split": "train",
                       "imgid": len(images), "pseudo": True,
                       "sentences": [{"raw": c, "tokens": tokenize(c), "score": s, "pool_image_id": i}
                                     for s, i, c in refs]})
    return {"dataset": name, "images": images}


def main(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    labels = Labels(args.labels)
    exclude: set[int] = set()
    for p in args.exclude_ids or []:
        exclude |= read_ids(p)
    pool = read_pool(args.pool, exclude)
    if args.photos:
        from captioner.inputs import expand_inputs

        keys = {os.path.abspath(it.path) for it in expand_inputs(args.photos, warn=log.warning)}
        rows = [i for i, p in enumerate(labels.paths) if labels.ok[i] and os.path.abspath(p) in keys]
    else:
        rows = [i for i in range(len(labels)) if labels.ok[i]]
    matches = match(labels, pool, args.per_photo, args.threshold, rows, args.seed)
    out = karpathy(labels, matches, "pseudo-refs")
    write_json_atomic(args.out, out)
    n_refs = sum(len(v) for v in matches.values())
    mean = sum(s for v in matches.values() for s, _, _ in v) / max(1, n_refs)
    print(f"{len(rows)} photos: {len(matches)} with objects got {n_refs} pseudo-references (mean score {mean:.2f}) "
          f"from {len(pool)} pool captions ({len(exclude)} excluded image ids) -> {args.out}")
    return 0
