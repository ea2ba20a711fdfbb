"""Multiple-choice VQA data: Visual7W telling, VQA v1 multiple choice, easy-VQA turned into multiple choice, and a
Visual7W-format fixture generated from COCO instance annotations.

Every reader returns a list of VQAExample (one question with its choices, the right one's index and a question
type). Choices are deduplicated after tokenization and put in a deterministic pseudo-random order keyed by the
question id, so the right answer is not always first. Training groups the questions by image (group_by_image) so
that each image is encoded once per step, however many questions it has.

    python -m training.vqa_data coco-fixture --coco-root ../shared/data/coco-mini --out v7w_coco_mini.json
    python -m training.vqa_data easy-vqa --split test --out easy_vqa_test_v7w.json   # export as Visual7W JSON
"""
from __future__ import annotations

import argparse
import functools
import logging
import random
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from captioner.config import VQAConfig
from captioner.fileio import write_json_atomic
from captioner.tokenizer import Vocabulary, tokenize
from captioner.vqa import encode_text, pad_2d, pad_choices

from .datasets import DatasetError, ImageRecord, _check_image_root, _load_json

log = logging.getLogger(__name__)

EASY_VQA_TYPES = {  # answer type -> its answers (easy-VQA's 13 answers)
    "yes/no": ("yes", "no"),
    "shape": ("circle", "rectangle", "triangle"),
    "color": ("red", "green", "blue", "black", "gray", "teal", "brown", "yellow"),
}


@dataclass
class VQAExample:
    image: str  # absolute image path
    image_id: int | str
    question: str
    choices: list[str]
    answer: int  # index of the right choice
    qtype: str = ""
    qid: int | str = ""
    split: str = ""

    @property
    def answer_text(self) -> str:
        return self.choices[self.answer]


@functools.lru_cache(maxsize=65536)  # template datasets repeat the same few texts many times
def _key(text: str) -> str:
    return " ".join(tokenize(text))


def make_example(image: str, image_id, question: str, answer: str, distractors: Sequence[str], qtype: str, qid,
                 split: str, salt: str) -> VQAExample | None:
    """The answer plus distractors that differ from it (and each other) after tokenization, in a fixed random
    order; None when fewer than two distinct choices remain or the text has no words."""
    question = " ".join(str(question).split())
    answer = " ".join(str(answer).split())
    if not _key(question) or not _key(answer):
        return None
    seen, choices = {_key(answer)}, [answer]
    for d in distractors:
        d = " ".join(str(d).split())
        k = _key(d)
        if k and k not in seen:
            seen.add(k)
            choices.append(d)
    if len(choices) < 2:
        return None
    order = list(range(len(choices)))
    random.Random(f"{salt}:{qid}").shuffle(order)
    return VQAExample(image, image_id, question, [choices[i] for i in order], order.index(0), qtype, qid, split)


# ----------------------------------------------------------------------------- readers

def read_v7w(json_path: str | Path, image_root: str | Path, split: str = "train") -> list[VQAExample]:
    """Visual7W telling (dataset_v7w_telling.json): images[] with filename, split and qa_pairs[] holding question,
    answer, multiple_choices (the distractors) and type. ``split`` 'all' keeps every split."""
    ann = Path(json_path)
    data = _load_json(ann)
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise DatasetError(f"{ann.name}: not a Visual7W file (expected an object with an 'images' list)")
    root = Path(image_root).resolve()
    out, present, dropped = [], set(), 0
    for i, img in enumerate(data["images"]):
        try:
            s = img.get("split", "")
            present.add(s)
            if split != "all" and s != split:
                continue
            image_id = img["image_id"]
            path = str(root / img.get("filename", f"v7w_{image_id}.jpg"))
            for j, qa in enumerate(img["qa_pairs"]):
                ex = make_example(path, image_id, qa["question"], qa["answer"], qa["multiple_choices"],
                                  qa.get("type", ""), qa.get("qa_id", f"{image_id}-{j}"), s, "v7w")
                if ex is None:
                    dropped += 1
                else:
                    out.append(ex)
        except (KeyError, TypeError, AttributeError) as e:
            raise DatasetError(f"{ann.name}: images[{i}]: missing or bad key {e}") from None
    if not out:
        raise DatasetError(f"no questions with split {split!r} in {ann.name}; "
                           f"splits present: {', '.join(sorted(map(str, present))) or 'none'}")
    if dropped:
        log.warning("%s: dropped %d questions with fewer than 2 distinct choices or no words", ann.name, dropped)
    _check_images(root, out, ann)
    return out


def read_vqa_mc(questions_json: str | Path, annotations_json: str | Path, image_root: str | Path,
                split: str = "") -> list[VQAExample]:
    """VQA v1 multiple choice: MultipleChoice_mscoco_<subtype>_questions.json (18 multiple_choices per question)
    + mscoco_<subtype>_annotations.json (multiple_choice_answer, answer_type); images
    <image_root>/COCO_<subtype>_<image_id:012d>.jpg. Top-1 accuracy against multiple_choice_answer (not the
    official 10-human consensus score). Question type = answer_type (yes/no, number, other)."""
    qf, af = Path(questions_json), Path(annotations_json)
    qd, ad = _load_json(qf), _load_json(af)
    if not isinstance(qd, dict) or not isinstance(qd.get("questions"), list):
        raise DatasetError(f"{qf.name}: not a VQA questions file (expected a 'questions' list)")
    if not isinstance(ad, dict) or not isinstance(ad.get("annotations"), list):
        raise DatasetError(f"{af.name}: not a VQA annotations file (expected an 'annotations' list)")
    subtype = qd.get("data_subtype", "")
    root = Path(image_root).resolve()
    try:
        anns = {a["question_id"]: a for a in ad["annotations"]}
    except (KeyError, TypeError) as e:
        raise DatasetError(f"{af.name}: bad annotation (missing key {e})") from None
    out, dropped = [], 0
    for i, q in enumerate(qd["questions"]):
        try:
            a = anns.get(q["question_id"])
            if a is None:
                raise DatasetError(f"{af.name}: no annotation for question_id {q['question_id']}")
            path = str(root / f"COCO_{subtype}_{q['image_id']:012d}.jpg")
            ans = a["multiple_choice_answer"]
            ex = make_example(path, q["image_id"], q["question"], ans, [c for c in q["multiple_choices"] if c != ans],
                              a.get("answer_type", ""), q["question_id"], split or subtype, "vqa")
        except (KeyError, TypeError, ValueError) as e:
            raise DatasetError(f"{qf.name}: questions[{i}]: missing or bad key {e}") from None
        if ex is None:
            dropped += 1
        else:
            out.append(ex)
    if not out:
        raise DatasetError(f"{qf.name}: no usable questions")
    if dropped:
        log.warning("%s: dropped %d questions", qf.name, dropped)
    _check_images(root, out, qf)
    return out


def _check_images(root: Path, examples: list[VQAExample], ann: Path) -> None:
    seen: dict[str, ImageRecord] = {}
    for e in examples:
        seen.setdefault(e.image, ImageRecord(e.image, e.image_id))
    _check_image_root(root, list(seen.values()), ann)


def easy_vqa_examples(split: str = "train", num_choices: int = 4, seed: int = 0,
                      val_every: int = 10) -> list[VQAExample]:
    """easy-VQA (the ``easy-vqa`` package) as multiple choice: each question's answer plus up to num_choices - 1
    distractors drawn from the other answers of its type, so yes/no questions get 2 choices, shape questions 3 and
    colour questions 4 (with the default). Deterministic in (split, seed).

    easy-VQA has train and test; 'val' is every val_every-th training image (by image id), 'train' the rest.
    """
    try:
        import easy_vqa
    except ImportError:
        raise DatasetError("easy-VQA needs the easy-vqa package: pip install easy-vqa") from None
    if split not in ("train", "val", "test"):
        raise DatasetError(f"easy-VQA split must be train, val or test, got {split!r}")
    if num_choices < 2:
        raise DatasetError("num_choices must be >= 2")
    if split == "test":
        texts, answers, ids = easy_vqa.get_test_questions()
        paths = easy_vqa.get_test_image_paths()
    else:
        texts, answers, ids = easy_vqa.get_train_questions()
        paths = easy_vqa.get_train_image_paths()
    qtype = {a: t for t, ans in EASY_VQA_TYPES.items() for a in ans}
    out = []
    for i, (q, a, im) in enumerate(zip(texts, answers, ids)):
        if split != "test" and (im % val_every == 0) != (split == "val"):
            continue
        t = qtype[a]
        rng = random.Random(f"easy-vqa:{seed}:{split}:{i}")
        others = [x for x in EASY_VQA_TYPES[t] if x != a]
        distractors = rng.sample(others, min(num_choices - 1, len(others)))
        ex = make_example(str(Path(paths[im]).resolve()), im, q, a, distractors, t, i, split, f"easy-vqa:{seed}")
        out.append(ex)
    return out


def read_vqa(kind: str, split: str, annotations: str | None = None, images: str | None = None,
             questions: str | None = None, num_choices: int = 4, seed: int = 0) -> list[VQAExample]:
    """kind: 'easy-vqa' (no files needed), 'v7w' (annotations + images) or 'vqa-mc' (questions + annotations +
    images)."""
    if kind == "easy-vqa":
        return easy_vqa_examples(split, num_choices, seed)
    if kind == "v7w":
        if not (annotations and images):
            raise DatasetError("Visual7W needs --vqa-annotations (dataset_v7w_telling.json) and --vqa-images")
        return read_v7w(annotations, images, split)
    if kind == "vqa-mc":
        if not (questions and annotations and images):
            raise DatasetError("VQA v1 needs --vqa-questions, --vqa-annotations and --vqa-images")
        return read_vqa_mc(questions, annotations, images, split)
    raise DatasetError(f"unknown VQA dataset {kind!r}; choose easy-vqa, v7w or vqa-mc")


def to_v7w(examples: Sequence[VQAExample], image_root: str | Path | None = None, name: str = "v7w_telling") -> dict:
    """Examples -> a Visual7W telling JSON object (filenames relative to image_root when given)."""
    images: dict = {}
    for e in examples:
        fn = str(Path(e.image).relative_to(Path(image_root).resolve())) if image_root else e.image
        img = images.setdefault(e.image, {"image_id": e.image_id, "filename": fn, "split": e.split, "qa_pairs": []})
        img["qa_pairs"].append({"qa_id": e.qid, "image_id": e.image_id, "question": e.question,
                                "answer": e.answer_text, "type": e.qtype,
                                "multiple_choices": [c for k, c in enumerate(e.choices) if k != e.answer]})
    return {"dataset": name, "images": list(images.values())}


# ----------------------------------------------------------------------------- COCO instances -> Visual7W fixture

_PLURAL = {"person": "people", "mouse": "mice", "sheep": "sheep", "knife": "knives", "skis": "pairs of skis",
           "scissors": "pairs of scissors"}
_COUNT_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"]


def plural(name: str) -> str:
    *head, last = name.split(" ")
    if name in _PLURAL:
        return _PLURAL[name]
    if last.endswith(("s", "x", "ch", "sh")):
        last += "es"
    elif last.endswith("y") and last[-2:-1] not in "aeiou":
        last = last[:-1] + "ies"
    else:
        last += "s"
    return " ".join(head + [last])


def coco_questions(instances: dict, split: str, image_prefix: str = "", seed: int = 0) -> list[dict]:
    """Visual7W-style image entries with four template questions per annotated image, from COCO instances:
    how many (the most frequent category; 4 choices), what (the largest object; 4), is there (yes/no; 2),
    where (left/middle/right of a single object; 3)."""
    cats = {c["id"]: c for c in instances["categories"]}
    by_img = defaultdict(list)
    for a in instances["annotations"]:
        if not a.get("iscrowd", 0):
            by_img[a["image_id"]].append(a)
    out = []
    for img in sorted(instances["images"], key=lambda im: im["id"]):
        anns = by_img.get(img["id"])
        if not anns:
            continue
        rng = random.Random(f"coco-v7w:{seed}:{img['id']}")
        counts = Counter(cats[a["category_id"]]["name"] for a in anns)
        present = set(counts)
        absent = sorted(c["name"] for c in cats.values() if c["name"] not in present)
        qa = []
        name, n = max(counts.items(), key=lambda kv: (kv[1], kv[0]))
        if n <= 10:
            nums = [k for k in range(1, 11) if k != n]
            qa.append(("how", f"How many {plural(name)} are there?", _COUNT_WORDS[n],
                       [_COUNT_WORDS[k] for k in rng.sample(nums, 3)]))
        big = max(anns, key=lambda a: a["area"])
        bname = cats[big["category_id"]]["name"]
        same = [c for c in absent if any(k["name"] == c and k["supercategory"] == cats[big["category_id"]]["supercategory"]
                                         for k in cats.values())]
        pool = same if len(same) >= 3 else absent
        qa.append(("what", "What is the largest object in the picture?", bname, rng.sample(pool, 3)))
        if rng.random() < 0.5:
            qa.append(("yes/no", f"Is there a {rng.choice(sorted(present))} in the picture?", "yes", ["no"]))
        else:
            qa.append(("yes/no", f"Is there a {rng.choice(absent)} in the picture?", "no", ["yes"]))
        singles = sorted(c for c, k in counts.items() if k == 1)
        if singles:
            c = rng.choice(singles)
            a = next(x for x in anns if cats[x["category_id"]]["name"] == c)
            cx = (a["bbox"][0] + a["bbox"][2] / 2) / img["width"]
            where = ["on the left", "in the middle", "on the right"]
            right = where[min(2, int(cx * 3))]
            qa.append(("where", f"Where is the {c} in the picture?", right, [w for w in where if w != right]))
        out.append({"image_id": img["id"], "filename": image_prefix + img["file_name"], "split": split,
                    "qa_pairs": [{"qa_id": f"{img['id']}-{k}", "image_id": img["id"], "type": t, "question": q,
                                  "answer": ans, "multiple_choices": d} for k, (t, q, ans, d) in enumerate(qa)]})
    return out


def make_coco_fixture(coco_root: str | Path, seed: int = 0) -> dict:
    """Visual7W telling JSON for coco-mini: instances_{train,val}2017.json -> splits train/val, filenames relative to
    coco_root (read it back with read_v7w(path, coco_root, split))."""
    root = Path(coco_root)
    images = []
    for sub, split in (("train2017", "train"), ("val2017", "val")):
        f = root / "annotations" / f"instances_{sub}.json"
        if f.is_file():
            images += coco_questions(_load_json(f), split, f"{sub}/", seed)
    if not images:
        raise DatasetError(f"no annotations/instances_*2017.json with annotated images under {root}")
    return {"dataset": "v7w_telling_coco_mini", "images": images}


# ----------------------------------------------------------------------------- encoding and batching

@dataclass
class EncodedQA:
    question: list[int]
    choices: list[list[int]]
    answer: int  # index into choices
    keep: list[int]  # which of the example's choices these are (all of them unless over max_choices)


def vocab_texts(examples: Sequence[VQAExample]):
    for e in examples:
        yield e.question
        yield from e.choices


def build_vocab(texts, min_count: int) -> Vocabulary:
    """Vocabulary.build over many repeated texts, tokenizing each distinct text once (same words, same order)."""
    counts: Counter = Counter()
    for text, n in Counter(texts).items():
        for t in _key(text).split():
            counts[t] += n
    return Vocabulary(sorted((w for w, n in counts.items() if n >= min_count), key=lambda w: (-counts[w], w)),
                      min_count=min_count)


def encode_examples(examples: Sequence[VQAExample], vocab: Vocabulary, cfg: VQAConfig) -> list[EncodedQA]:
    """Word ids (truncated to the configured limits); examples with more than max_choices choices keep the answer
    and the first other choices."""
    cache: dict[tuple[str, int], list[int]] = {}

    def enc(text: str, n: int) -> list[int]:
        if (text, n) not in cache:
            cache[text, n] = encode_text(vocab, text, n)
        return cache[text, n]

    out = []
    for e in examples:
        keep = [e.answer] + [k for k in range(len(e.choices)) if k != e.answer][: cfg.max_choices - 1]
        keep.sort()
        out.append(EncodedQA(enc(e.question, cfg.max_question_words),
                             [enc(e.choices[k], cfg.max_answer_words) for k in keep], keep.index(e.answer), keep))
    return out


def group_by_image(examples: Sequence[VQAExample]) -> tuple[list[ImageRecord], list[list[int]]]:
    """One ImageRecord per distinct image (first-seen order) and, per image, the indices of its questions."""
    index: dict[str, int] = {}
    records, qs = [], []
    for i, e in enumerate(examples):
        k = index.get(e.image)
        if k is None:
            k = index[e.image] = len(records)
            records.append(ImageRecord(e.image, e.image_id, [], e.split))
            qs.append([])
        qs[k].append(i)
    return records, qs


def qa_batch(encoded: Sequence[EncodedQA], picks: Sequence[int]) -> dict[str, torch.Tensor]:
    """question (N, T), choices (N, C, L), choice_mask (N, C), target (N,) for the picked examples."""
    sel = [encoded[i] for i in picks]
    c, m = pad_choices([e.choices for e in sel])
    return {"question": pad_2d([e.question for e in sel]), "choices": c, "choice_mask": m,
            "target": torch.tensor([e.answer for e in sel], dtype=torch.long)}


def pick_questions(image_indices: Sequence[int], per_image: Sequence[Sequence[int]], k: int,
                   g: torch.Generator | None) -> tuple[list[int], torch.Tensor]:
    """Up to k random questions of each image in the batch (all of them, in order, when g is None);
    returns example indices and rep (N,), the batch row of each question's image."""
    picks, rep = [], []
    for j, i in enumerate(image_indices):
        qs = per_image[i]
        sel = qs if g is None or len(qs) <= k else [qs[t] for t in torch.randperm(len(qs), generator=g)[:k].tolist()]
        picks += sel
        rep += [j] * len(sel)
    return picks, torch.tensor(rep, dtype=torch.long)


# ----------------------------------------------------------------------------- command line

def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser("python -m training.vqa_data", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("coco-fixture", help="Visual7W-format questions from COCO instances")
    a.add_argument("--coco-root", required=True, help="folder with annotations/instances_*2017.json")
    a.add_argument("--out", required=True)
    a.add_argument("--seed", type=int, default=0)
    b = sub.add_parser("easy-vqa", help="export easy-VQA as multiple choice in Visual7W format")
    b.add_argument("--split", choices=["train", "val", "test"], default="test")
    b.add_argument("--num-choices", type=int, default=4)
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--out", required=True)
    args = p.parse_args(argv)
    if args.cmd == "coco-fixture":
        data = make_coco_fixture(args.coco_root, args.seed)
    else:
        data = to_v7w(easy_vqa_examples(args.split, args.num_choices, args.seed), name="easy_vqa_mc")
    write_json_atomic(args.out, data)
    n = sum(len(im["qa_pairs"]) for im in data["images"])
    print(f"{len(data['images'])} images, {n} questions -> {args.out}")


if __name__ == "__main__":
    main()
