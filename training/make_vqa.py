"""Multiple-choice questions about real photos, derived from their captions: ``captioner make-vqa``.

No real-photo VQA set ships with Flickr8k, but five human captions per photo say a lot about it. This builds
questions the way COCO-QA was built (Ren, Kiros & Zemel 2015: questions generated from COCO captions), as
multiple choice in Visual7W telling format (``read_v7w`` and any Visual7W tool read it):

    presence  "Is there a dog in the picture?"   yes/no            (COCO instances decide it where present)
    count     "How many dogs are there?"         one .. four       (number words; COCO instances where present)
    color     "What color is the shirt?"         11 colours        ("a man in a red shirt")
    scene     "Where is this?"                   beach, snow, ...  (place words)
    animal    "What animal is in the picture?"   dog, horse, ...
    activity  "What is the dog doing?"           running, ...      (the verb after the subject)

Photos without captions but with detector labels (``--labels``, a captioner label run) get presence and count
questions from their detections alone (detected_candidates).

An answer is kept only where the captions agree: at least --min-support captions say it and none says
something else of the same kind (another colour for the shirt, another count, another place, another animal). A
"no" is asked only about a thing no caption mentions (nor a word that could cover it: "animal" blocks every "no"
about animals). Distractors are answers of the same type that no caption of the photo supports. Each question's
commonest answer is cut down to the count of its second commonest (deterministically), so that the question
alone does not give the answer away; the report prints, per type, the share of the commonest answer (what a
blind guesser who knows the answer statistics scores) next to chance.

    captioner make-vqa --karpathy ../shared/data/flickr8k/dataset_flickr8k.json ../shared/data/flickr8k \\
        --coco ../shared/data/coco-mini/annotations/captions_train2017.json ../shared/data/coco-mini/train2017 train \\
        --coco ../shared/data/coco-mini/annotations/captions_val2017.json ../shared/data/coco-mini/val2017 val \\
        --image-root ../shared/data --out data/real-vqa.json
    captioner train --task joint --vqa-dataset v7w easy-vqa --vqa-annotations data/real-vqa.json \\
        --vqa-images ../shared/data ...
"""
from __future__ import annotations

import argparse
import logging
import os
import random
import re
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from captioner.fileio import write_json_atomic

from .datasets import DatasetError, _load_json, read_dataset

log = logging.getLogger("captioner.make_vqa")

# ------------------------------------------------------------------------------------------------------- lexicon
# Each group: the answer (or the thing asked about) -> the caption words that say it.

COLORS = {"black": {"black"}, "white": {"white"}, "brown": {"brown"}, "red": {"red"}, "blue": {"blue"},
          "green": {"green"}, "yellow": {"yellow"}, "orange": {"orange"}, "pink": {"pink"}, "purple": {"purple"},
          "gray": {"gray", "grey"}}
# things whose colour is asked: the name in the question -> its words
COLORED = {"dog": {"dog", "puppy"}, "shirt": {"shirt", "tshirt"}, "jacket": {"jacket", "coat"},
           "dress": {"dress"}, "hat": {"hat", "cap"}, "helmet": {"helmet"}, "ball": {"ball"}, "car": {"car"},
           "bike": {"bike", "bicycle"}, "horse": {"horse"}, "shorts": {"shorts"}, "pants": {"pants"},
           "boat": {"boat"}, "uniform": {"uniform"}, "top": {"top"}, "swimsuit": {"swimsuit"},
           "kayak": {"kayak"}, "tent": {"tent"}, "umbrella": {"umbrella"}, "bus": {"bus"}, "truck": {"truck"},
           "cat": {"cat", "kitten"}, "bird": {"bird"}, "frisbee": {"frisbee"}, "toy": {"toy"}}
# words that may stand between a colour and its noun ("a black furry dog")
FILLERS = {"small", "large", "big", "little", "fluffy", "furry", "shaggy", "wet", "long", "short", "young", "old",
           "striped", "sleeveless", "baseball", "winter", "knit", "hooded", "plastic", "rubber", "tennis"}

ANIMALS = {"dog": {"dog", "dogs", "puppy", "puppies"}, "cat": {"cat", "cats", "kitten", "kittens"},
           "horse": {"horse", "horses", "pony", "ponies"}, "bird": {"bird", "birds", "seagull", "seagulls",
                                                                     "duck", "ducks", "pigeons", "pigeon"},
           "cow": {"cow", "cows", "cattle", "bull", "bulls", "calf"}, "sheep": {"sheep", "lamb", "lambs"},
           "elephant": {"elephant", "elephants"}, "giraffe": {"giraffe", "giraffes"},
           "zebra": {"zebra", "zebras"}, "bear": {"bear", "bears"}, "camel": {"camel", "camels"},
           "goat": {"goat", "goats"}}
ANIMAL_WORDS = set().union(*ANIMALS.values()) | {"animal", "animals", "pet", "pets", "poodle", "terrier",
                                                 "retriever", "collie", "beagle", "labrador", "shepherd"}

PLACES = {"beach": {"beach", "sand", "sandy", "shore", "shoreline", "seashore"},
          "snow": {"snow", "snowy", "snowbank", "snowfield"},
          "water": {"water", "river", "lake", "ocean", "sea", "pond", "stream", "creek", "waves", "surf"},
          "pool": {"pool"},
          "grass": {"grass", "grassy", "lawn", "field", "meadow", "yard"},
          "street": {"street", "road", "sidewalk", "city", "crosswalk", "avenue", "intersection"},
          "mountain": {"mountain", "mountains", "hill", "hillside", "cliff", "cliffs", "mountainside"},
          "forest": {"forest", "woods", "wooded", "jungle"},
          "stage": {"stage"},
          "kitchen": {"kitchen"},
          "bathroom": {"bathroom", "toilet", "shower"},
          "room": {"room", "bedroom", "couch", "sofa", "bed"}}
# a place that contains another: "a dog runs on the beach by the water" is a beach
CONTAINS = {"beach": {"water"}, "pool": {"water"}, "mountain": {"snow"}}

# presence: the thing -> its words; "no" also needs none of BLOCKERS[kind] in any caption
THINGS = {"dog": ("animal", ANIMALS["dog"]), "cat": ("animal", ANIMALS["cat"]), "horse": ("animal", ANIMALS["horse"]),
          "bird": ("animal", ANIMALS["bird"]), "cow": ("animal", ANIMALS["cow"]),
          "sheep": ("animal", ANIMALS["sheep"]), "elephant": ("animal", ANIMALS["elephant"]),
          "giraffe": ("animal", ANIMALS["giraffe"]), "zebra": ("animal", ANIMALS["zebra"]),
          "ball": ("object", {"ball", "balls", "football", "basketball", "soccer", "volleyball", "tennis"}),
          "bike": ("vehicle", {"bike", "bikes", "bicycle", "bicycles", "bicyclist", "biker", "cyclist", "biking"}),
          "car": ("vehicle", {"car", "cars", "taxi"}), "boat": ("vehicle", {"boat", "boats", "canoe", "kayak",
                                                                            "raft", "sailboat"}),
          "motorcycle": ("vehicle", {"motorcycle", "motorcycles", "motorbike", "dirtbike"}),
          "bus": ("vehicle", {"bus", "buses"}), "train": ("vehicle", {"train", "trains"}),
          "skateboard": ("object", {"skateboard", "skateboarder", "skateboarding", "skateboards", "skate"}),
          "surfboard": ("object", {"surfboard", "surfer", "surfing", "surfboards"}),
          "umbrella": ("object", {"umbrella", "umbrellas"}), "tree": ("object", {"tree", "trees"}),
          "bench": ("object", {"bench", "benches"}), "fence": ("object", {"fence", "fences"}),
          "frisbee": ("object", {"frisbee", "frisbees"}), "guitar": ("object", {"guitar", "guitars", "guitarist"}),
          "hat": ("object", {"hat", "hats", "cap", "caps"}), "pizza": ("object", {"pizza", "pizzas"}),
          "child": ("person", {"child", "children", "kid", "kids", "boy", "boys", "girl", "girls", "baby",
                               "babies", "toddler", "toddlers"})}
BLOCKERS = {"animal": ANIMAL_WORDS, "vehicle": {"vehicle", "vehicles"}, "object": {"something", "object", "objects"},
            "person": {"person", "people", "someone", "crowd", "group", "family", "player", "players", "team",
                       "toy", "toys", "son", "daughter", "students", "youngster", "youngsters", "teenager"}}
# COCO instance category -> the presence question's thing (COCO decides presence and count where it has instances)
COCO_THINGS = {"dog": "dog", "cat": "cat", "horse": "horse", "bird": "bird", "cow": "cow", "sheep": "sheep",
               "elephant": "elephant", "giraffe": "giraffe", "zebra": "zebra", "sports ball": "ball",
               "bicycle": "bike", "car": "car", "boat": "boat", "motorcycle": "motorcycle", "bus": "bus",
               "train": "train", "skateboard": "skateboard", "surfboard": "surfboard", "umbrella": "umbrella",
               "bench": "bench", "frisbee": "frisbee", "pizza": "pizza", "person": "person"}

NUMBERS = {"one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6, "a": 1, "an": 1}
COUNT_WORDS = ["one", "two", "three", "four"]
COUNTED = {"dogs": ({"dog", "puppy"}, {"dogs", "puppies"}), "people": ({"person"}, {"people", "persons"}),
           "men": ({"man"}, {"men"}), "women": ({"woman"}, {"women"}), "boys": ({"boy"}, {"boys"}),
           "girls": ({"girl"}, {"girls"}), "children": ({"child", "kid"}, {"children", "kids"}),
           "horses": ({"horse"}, {"horses"}), "birds": ({"bird"}, {"birds"})}
COUNT_ADJ = FILLERS | {"black", "white", "brown", "tan", "other", "young", "older", "asian", "smiling"} | set(COLORS)

ACTIVITIES = {"running": {"run", "runs", "running", "races", "racing", "sprints"},
              "jumping": {"jump", "jumps", "jumping", "leaps", "leaping", "leap"},
              "swimming": {"swim", "swims", "swimming", "wades", "wading", "paddles", "paddling"},
              "sitting": {"sits", "sitting", "seated"}, "lying down": {"lies", "lying", "lays", "laying"},
              "walking": {"walk", "walks", "walking", "strolls"}, "climbing": {"climbs", "climbing", "climb"},
              "riding": {"rides", "riding", "ride"}, "playing": {"plays", "playing", "play"},
              "standing": {"stands", "standing"}, "catching": {"catches", "catching", "catch"},
              "digging": {"digs", "digging"}, "skiing": {"skis", "skiing"},
              "surfing": {"surfs", "surfing"}, "dancing": {"dances", "dancing"}, "eating": {"eats", "eating"}}
SUBJECTS = {"dog": {"dog", "puppy"}, "man": {"man", "guy"}, "woman": {"woman", "lady"}, "boy": {"boy"},
            "girl": {"girl"}}
AUX = {"is", "are", "was", "the", "a", "an", "who", "that", "and", "happily", "quickly", "also"}

PRESENCE_Q = "Is there a {} in the picture?"
QUESTIONS = {"count": "How many {} are there?", "color": "What color is the {}?", "scene": "Where is this?",
             "animal": "What animal is in the picture?", "activity": "What is the {} doing?"}
TYPES = ("presence", "count", "color", "scene", "animal", "activity")

_WORD = re.compile(r"[a-z]+")


def words(caption: str) -> list[str]:
    c = caption.lower().replace("t-shirt", "tshirt").replace("t shirt", "tshirt")
    return _WORD.findall(c)


@dataclass
class Candidate:
    qtype: str
    question: str
    answer: str
    pool: list[str]  # same-type answers no caption of the photo supports
    image: int  # index into the photo list
    key: str = ""  # the balancing group (the question text)


@dataclass
class Photo:
    path: str
    image_id: int | str
    split: str
    captions: list[str]
    instances: dict[str, int] | None = None  # COCO category -> count (large enough objects), None = unknown
    tokens: list[list[str]] = field(default_factory=list)
    unsure: set[str] = field(default_factory=set)  # detector labels: categories with boxes of middling score


# ----------------------------------------------------------------------------------------------- what captions say

def agreed(per_caption: list[set[str]], min_support: int, contains: dict[str, set[str]] | None = None) -> str | None:
    """The one value that >= min_support captions say and no caption contradicts (a caption that says two values
    contradicts itself unless one contains the other), else None."""
    contains = contains or {}
    support = Counter(v for vals in per_caption for v in vals)
    said = set(support)
    for best in sorted(v for v, n in support.items() if n >= min_support):  # sorted: no dependence on set order
        if said <= {best} | contains.get(best, set()):
            return best
    return None


def colors_of(tokens: list[str], noun_words: set[str]) -> set[str]:
    """Colours said of the noun in one caption; 'multi' for "black and white dog" (no single answer)."""
    out = set()
    for i, w in enumerate(tokens):
        if w not in noun_words:
            continue
        j = i - 1
        while j >= 0 and tokens[j] in FILLERS:
            j -= 1
        c = _color(tokens, j)
        if c is None:
            continue
        # "black and white dog", "brown and black dog", "red white and blue shirt"
        if j >= 2 and tokens[j - 1] in ("and", "or") and _color(tokens, j - 2) or j >= 1 and _color(tokens, j - 1):
            out.add("multi")
        else:
            out.add(c)
    return out


def _color(tokens: list[str], j: int) -> str | None:
    if j < 0:
        return None
    return next((c for c, ws in COLORS.items() if tokens[j] in ws), None)


def count_of(tokens: list[str], singular: set[str], plural: set[str]) -> set[int]:
    """Counts one caption states for the noun: "two dogs" -> 2, "a dog" -> 1, "dogs" (no number) -> 'many',
    written as 0 (contradicts every count)."""
    out = set()
    for i, w in enumerate(tokens):
        if w not in singular and w not in plural:
            continue
        j = i - 1
        while j >= 0 and tokens[j] in COUNT_ADJ:
            j -= 1
        n = NUMBERS.get(tokens[j]) if j >= 0 else None
        if j >= 0 and tokens[j] in ("another", "other", "several", "many", "some", "group", "of", "both"):
            n = 0
        if w in plural:
            out.add(n if n and n > 1 else 0)
        elif n == 1:
            out.add(1)
        else:  # "the dog": says there is one only when nothing else is said
            out.add(-1)
    return out


def activity_of(tokens: list[str], subject: set[str]) -> set[str]:
    out = set()
    for i, w in enumerate(tokens):
        if w not in subject:
            continue
        for nxt in tokens[i + 1:i + 4]:
            hit = next((a for a, ws in ACTIVITIES.items() if nxt in ws), None)
            if hit:
                out.add(hit)
                break
            if nxt not in AUX:
                break
    return out


# -------------------------------------------------------------------------------------------------- the questions

def photo_candidates(k: int, photo: Photo, min_support: int) -> list[Candidate]:
    toks = photo.tokens
    sets = [set(t) for t in toks]
    mentions = lambda ws: sum(1 for s in sets if s & ws)  # noqa: E731
    out: list[Candidate] = []

    if not photo.captions:  # a photo known only from its detector labels
        return detected_candidates(k, photo)
    # presence: COCO instances decide where present; else captions (yes needs support, no needs silence)
    for thing, (kind, ws) in THINGS.items():
        if photo.instances is not None and thing in COCO_THINGS.values():
            coco_n = sum(n for cat, n in photo.instances.items() if COCO_THINGS.get(cat) == thing)
            ans = "yes" if coco_n and mentions(ws) else ("no" if not coco_n and not mentions(ws | BLOCKERS[kind])
                                                          else None)
        elif mentions(ws) >= min_support:
            ans = "yes"
        elif not mentions(ws | BLOCKERS[kind]):
            ans = "no"
        else:
            ans = None
        if ans:
            out.append(Candidate("presence", PRESENCE_Q.format(thing), ans, ["no" if ans == "yes" else "yes"], k))

    for noun, (sing, plur) in COUNTED.items():
        per = [count_of(t, sing, plur) for t in toks]
        stated = [{n for n in s if n != -1} for s in per]  # "the dog" alone neither supports nor contradicts
        n = agreed(stated, min_support)
        if noun == "people" and photo.instances is not None:  # COCO counts people better than captions
            big = photo.instances.get("person", 0)
            n = big if 1 <= big <= 4 and n in (None, big) else None
        if n and 1 <= n <= 4:
            out.append(Candidate("count", QUESTIONS["count"].format(noun), COUNT_WORDS[n - 1],
                                 [w for w in COUNT_WORDS if w != COUNT_WORDS[n - 1]], k))

    for noun, ws in COLORED.items():
        per = [colors_of(t, ws) for t in toks]
        c = agreed(per, min_support)
        if c and c != "multi":
            said = set().union(*per)
            out.append(Candidate("color", QUESTIONS["color"].format(noun), c, [x for x in COLORS if x not in said], k))

    per = [{p for p, ws in PLACES.items() if s & ws} for s in sets]
    p = agreed(per, min_support, CONTAINS)
    if p:
        said = set().union(*per)
        out.append(Candidate("scene", QUESTIONS["scene"], p, [x for x in PLACES if x not in said], k))

    per = [{a for a, ws in ANIMALS.items() if s & ws} for s in sets]
    a = agreed(per, min_support)
    if a:
        said = set().union(*per)
        out.append(Candidate("animal", QUESTIONS["animal"], a, [x for x in ANIMALS if x not in said], k))

    for subj, ws in SUBJECTS.items():
        per = [activity_of(t, ws) for t in toks]
        act = agreed(per, min_support)
        if act:
            said = set().union(*per)
            out.append(Candidate("activity", QUESTIONS["activity"].format(subj), act,
                                 [x for x in ACTIVITIES if x not in said], k))
    for c in out:
        c.key = c.question
    return out


# plural noun of a count question -> the COCO category it counts, for photos known only from detector labels
DETECTED_COUNTS = {"people": "person", "dogs": "dog", "cats": "cat", "horses": "horse", "birds": "bird",
                   "cows": "cow", "sheep": "sheep", "elephants": "elephant", "giraffes": "giraffe", "zebras": "zebra",
                   "cars": "car", "bikes": "bicycle", "boats": "boat", "umbrellas": "umbrella"}


def detected_candidates(k: int, photo: Photo) -> list[Candidate]:
    """Presence and count questions from a detector's labels alone (captioner label): "yes" where a box of the
    category scores >= the threshold, "no" where none scores even the cache's 0.3; a count of 1..4 confident
    boxes when no box of that category has a middling score (between 0.3 and the threshold)."""
    out = []
    inst = photo.instances or {}
    for cat, thing in COCO_THINGS.items():
        if cat in photo.unsure:
            continue
        ans = "yes" if inst.get(cat) else "no"
        out.append(Candidate("presence", PRESENCE_Q.format(thing), ans, ["no" if ans == "yes" else "yes"], k))
    for noun, cat in DETECTED_COUNTS.items():
        n = inst.get(cat, 0)
        if 1 <= n <= 4 and cat not in photo.unsure:
            out.append(Candidate("count", QUESTIONS["count"].format(noun), COUNT_WORDS[n - 1],
                                 [w for w in COUNT_WORDS if w != COUNT_WORDS[n - 1]], k))
    for c in out:
        c.key = c.question
    return out


def balance(cands: list[Candidate], seed: int) -> list[Candidate]:
    """Per question text, the commonest answer is cut down (at random, deterministically) to the count of the
    second commonest; a question with a single answer is dropped (its text would give the answer away)."""
    groups: dict[str, dict[str, list[Candidate]]] = defaultdict(lambda: defaultdict(list))
    for c in cands:
        groups[c.key][c.answer].append(c)
    out = []
    for key in sorted(groups):
        by_answer = groups[key]
        if len(by_answer) < 2:
            continue
        sizes = sorted((len(v) for v in by_answer.values()), reverse=True)
        cap = sizes[1]
        for ans in sorted(by_answer):
            items = by_answer[ans]
            if len(items) > cap:
                items = random.Random(f"{seed}:{key}:{ans}").sample(items, cap)
            out += items
    return out


def finish(c: Candidate, photo: Photo, num_choices: int, seed: int, qid: str, freq: Counter) -> dict | None:
    """The question with num_choices - 1 distractors from c.pool, drawn in proportion to how often each is the
    answer to this question (freq): every answer is then about as often a distractor as it is right, so picking
    the commonest answer among the shown choices gains nothing."""
    rng = random.Random(f"{seed}:{qid}")
    pool = sorted(c.pool)
    if not pool:
        return None
    weights = [freq[p] + 0.5 for p in pool]  # + 0.5: answers never right for this question are still drawn, rarely
    picked: list[str] = []
    while pool and len(picked) < num_choices - 1:
        k = rng.choices(range(len(pool)), weights)[0]
        picked.append(pool.pop(k))
        weights.pop(k)
    return {"qa_id": qid, "image_id": photo.image_id, "type": c.qtype, "question": c.question, "answer": c.answer,
            "multiple_choices": picked}


def make_questions(photos: list[Photo], min_support: int = 2, num_choices: int = 4, seed: int = 0) -> dict:
    """Visual7W telling JSON object (filenames are the photos' paths as given) for the photos; balanced per split."""
    for p in photos:
        p.tokens = [words(c) for c in p.captions]
    by_split: dict[str, list[Candidate]] = defaultdict(list)
    for k, p in enumerate(photos):
        by_split[p.split] += photo_candidates(k, p, min_support)
    per_image: dict[int, list[dict]] = defaultdict(list)
    for split in sorted(by_split):
        kept = balance(by_split[split], seed)
        freq: dict[str, Counter] = defaultdict(Counter)
        for c in kept:
            freq[c.key][c.answer] += 1
        for c in kept:
            photo = photos[c.image]
            qa = finish(c, photo, num_choices, seed, f"{photo.image_id}-{c.qtype}-{c.question}", freq[c.key])
            if qa:
                per_image[c.image].append(qa)
    images = []
    for k in sorted(per_image):
        p = photos[k]
        qas = sorted(per_image[k], key=lambda q: (TYPES.index(q["type"]), q["question"]))
        for j, q in enumerate(qas):
            q["qa_id"] = f"{p.image_id}-{j}"
        images.append({"image_id": p.image_id, "filename": p.path, "split": p.split, "qa_pairs": qas})
    return {"dataset": "v7w_telling_from_captions", "images": images}


def report(data: dict) -> dict:
    """Per split and type: questions, images, and what guessing without the photo scores: the share of each
    question's commonest answer (majority), picking among the shown choices the one the training split answers
    most often to that question (prior; ties shared), and chance (1 / number of choices)."""
    qas_of = lambda split: [q for im in data["images"] if im["split"] == split for q in im["qa_pairs"]]  # noqa: E731
    train_counts: dict[str, Counter] = defaultdict(Counter)
    for q in qas_of("train"):
        train_counts[q["question"]][q["answer"]] += 1
    rows: dict = {}
    for split in sorted({im["split"] for im in data["images"]}):
        qas = qas_of(split)
        for t in (*TYPES, "all"):
            sel = [q for q in qas if t in ("all", q["type"])]
            if not sel:
                continue
            by_q: dict[str, Counter] = defaultdict(Counter)
            for q in sel:
                by_q[q["question"]][q["answer"]] += 1
            prior = 0.0
            for q in sel:
                counts = train_counts[q["question"]]
                scores = [counts[c] for c in (q["answer"], *q["multiple_choices"])]
                prior += (scores[0] == max(scores)) / scores.count(max(scores))
            rows.setdefault(split, {})[t] = {
                "questions": len(sel), "images": len({q["image_id"] for q in sel}),
                "majority_answer_rate": sum(max(c.values()) for c in by_q.values()) / len(sel),
                "prior_choice_rate": prior / len(sel),
                "chance": sum(1 / (1 + len(q["multiple_choices"])) for q in sel) / len(sel),
                "answers": dict(Counter(q["answer"] for q in sel).most_common(12))}
    return rows


# ----------------------------------------------------------------------------------------------------- the sources

def coco_instances(captions_json: Path) -> dict[int, dict[str, int]] | None:
    """instances_X.json beside captions_X.json: per image, category -> number of objects covering >= 1 % of it."""
    f = captions_json.with_name(captions_json.name.replace("captions_", "instances_"))
    if f == captions_json or not f.is_file():
        return None
    data = _load_json(f)
    cats = {c["id"]: c["name"] for c in data.get("categories", [])}
    sizes = {im["id"]: im["width"] * im["height"] for im in data.get("images", [])}
    out: dict[int, Counter] = {i: Counter() for i in sizes}
    for a in data.get("annotations", []):
        if not a.get("iscrowd") and a["image_id"] in sizes and a["area"] >= 0.01 * sizes[a["image_id"]]:
            out[a["image_id"]][cats[a["category_id"]]] += 1
    return {i: dict(c) for i, c in out.items()}


def read_photos(karpathy=(), splits=("train", "val"), coco=(), labels: str | None = None, label_split: str = "train",
                label_threshold: float = 0.5, label_photos: list[str] | None = None) -> list[Photo]:
    """The photos of the --karpathy (ANNOTATIONS, IMAGES) files' ``splits``, of the --coco (CAPTIONS, IMAGES, SPLIT)
    files, and of a --labels run (as ``label_split``)."""
    photos: list[Photo] = []
    for ann, images in karpathy or []:
        for split in splits:
            photos += [Photo(r.path, r.image_id, split, r.captions)
                       for r in read_dataset("karpathy", ann, images, split)]
    for ann, images, split in coco or []:
        inst = coco_instances(Path(ann))
        for r in read_dataset("coco", ann, images, split):
            photos.append(Photo(r.path, r.image_id, split, r.captions,
                                None if inst is None or r.image_id not in inst else inst[r.image_id]))
    if labels:
        photos += labelled_photos(labels, label_split, label_threshold, label_photos)
    if not photos:
        raise DatasetError("no photos: give --karpathy ANNOTATIONS IMAGES, --coco CAPTIONS IMAGES SPLIT and/or "
                           "--labels RUN")
    return photos


def labelled_photos(run: str, split: str, threshold: float, only: list[str] | None) -> list[Photo]:
    """The photos of a captioner label run as caption-less Photos: their centre view's confident detections as
    instances, and the categories with a box of middling score as unsure (no question is asked about those)."""
    from captioner.inputs import expand_inputs

    from .label import MIN_SCORE, Labels

    labels = Labels(run)
    keys = {os.path.abspath(it.path) for it in expand_inputs(only, warn=log.warning)} if only else None
    _, counts = labels.objects(threshold)
    low = labels.objects(labels.settings.get("min_score", MIN_SCORE))[1]  # every box the cache kept
    out = []
    for i, path in enumerate(labels.paths):
        if not labels.ok[i] or keys is not None and os.path.abspath(path) not in keys:
            continue
        sure = {labels.classes[c]: int(n) for c, n in enumerate(counts[i, 0].tolist()) if n}
        unsure = {labels.classes[c] for c, (n, m) in enumerate(zip(counts[i, 0].tolist(), low[i, 0].tolist()))
                  if m > n}
        out.append(Photo(os.path.abspath(path), f"label:{Path(path).stem}", split, [], sure, unsure=unsure))
    return out


def relative_to(photos: list[Photo], root: str | None) -> Path:
    base = Path(root).resolve() if root else Path(os.path.commonpath([Path(p.path).parent for p in photos]))
    for p in photos:
        try:
            p.path = str(Path(p.path).resolve().relative_to(base))
        except ValueError:
            raise DatasetError(f"{p.path} is not under --image-root {base}") from None
    return base


def main(args: argparse.Namespace) -> dict:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    photos = read_photos(args.karpathy, args.splits, args.coco, args.labels, args.label_split, args.label_threshold,
                         args.label_photos)
    root = relative_to(photos, args.image_root)
    ids = Counter(str(p.image_id) for p in photos)
    if any(n > 1 for n in ids.values()):  # two sources with the same ids: keep the qa_ids unique
        for p in photos:
            p.image_id = str(Path(p.path).with_suffix(""))
    data = make_questions(photos, args.min_support, args.num_choices, args.seed)
    data["image_root"] = str(root)
    stats = report(data)
    write_json_atomic(args.out, data)
    out = Path(args.out)
    write_json_atomic(out.with_name(out.stem + ".stats.json"), stats)
    print(f"{sum(len(im['qa_pairs']) for im in data['images'])} questions on {len(data['images'])} of {len(photos)} "
          f"photos -> {out} (image root {root})")
    print(f"{'split':<6} {'type':<9} {'questions':>9} {'images':>7} {'majority':>9} {'prior':>7} {'chance':>7}  "
          "answers")
    for split, rows in stats.items():
        for t, r in rows.items():
            top = ", ".join(f"{a} {n}" for a, n in list(r["answers"].items())[:6])
            print(f"{split:<6} {t:<9} {r['questions']:>9} {r['images']:>7} {100 * r['majority_answer_rate']:>8.1f}% "
                  f"{100 * r['prior_choice_rate']:>6.1f}% {100 * r['chance']:>6.1f}%  {top if t != 'all' else ''}")
    return stats
