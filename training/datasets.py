"""Caption datasets: readers for Karpathy-split and official COCO caption JSON, and an image-level
torch Dataset that reads images straight from disk and never crashes a DataLoader on a bad file."""
from __future__ import annotations

import contextlib
import io
import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from captioner.config import PreprocessConfig
from captioner.data import ImageDataset, collate  # noqa: F401  (collate: the training loaders' too)
from captioner.preprocess import eval_transform, train_transform
from captioner.tokenizer import BOS_ID, EOS_ID, PAD_ID, Vocabulary

logger = logging.getLogger(__name__)

KARPATHY_SPLITS = ("train", "val", "test", "restval", "all")


class DatasetError(ValueError):
    """An annotation file that cannot be read as the expected dataset; the message names the file."""


@dataclass
class ImageRecord:
    path: str  # absolute image path
    image_id: int | str
    captions: list[str] = field(default_factory=list)
    split: str = ""


def _load_json(path: str | Path) -> Any:
    p = Path(path)
    if not p.is_file():
        raise DatasetError(f"{p}: no such file")
    try:
        with p.open("rb") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise DatasetError(f"{p.name}: not valid JSON (line {e.lineno} column {e.colno}: {e.msg}) in {p}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise DatasetError(f"{p}: cannot read ({e})") from None


def _check_image_root(root: Path, records: list[ImageRecord], ann: Path) -> None:
    """Fail early on a wrong image folder instead of skipping every image at training time."""
    if not root.is_dir():
        raise DatasetError(f"image folder {root} (for {ann.name}) does not exist")
    step = max(1, len(records) // 20)
    sample = records[::step][:20]
    if sample and not any(Path(r.path).is_file() for r in sample):
        raise DatasetError(f"none of {len(sample)} sampled images of {ann.name} exist under {root} "
                           f"(e.g. {sample[0].path}); is the image folder right?")


def read_karpathy(json_path: str | Path, image_root: str | Path, split: str) -> list[ImageRecord]:
    """Images of one split of a Karpathy split JSON (dataset_{flickr8k,flickr30k,coco}.json).

    For split 'train', COCO's 'restval' images are folded in; 'all' returns every image.
    """
    if split not in KARPATHY_SPLITS:
        raise DatasetError(f"unknown split {split!r}; choose from {', '.join(KARPATHY_SPLITS)}")
    ann = Path(json_path)
    data = _load_json(ann)
    if isinstance(data, dict) and isinstance(data.get("annotations"), list):
        raise DatasetError(f"{ann.name} is an official COCO captions file (it has an 'annotations' list), not a "
                           "Karpathy split file: add --dataset coco")
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise DatasetError(f"{ann.name}: not a Karpathy split file (expected an object with an 'images' list)")
    wanted = {"train": {"train", "restval"}}.get(split, {split})
    root = Path(image_root).resolve()
    records, present = [], set()
    for i, img in enumerate(data["images"]):
        try:
            s = img["split"]
            present.add(s)
            if split != "all" and s not in wanted:
                continue
            rel = Path(img["filepath"], img["filename"]) if img.get("filepath") else Path(img["filename"])
            image_id = img["cocoid"] if "cocoid" in img else img["imgid"]
            captions = [sent["raw"].strip() for sent in img["sentences"]]
        except (KeyError, TypeError) as e:
            what = f"missing key {e}" if isinstance(e, KeyError) else f"bad entry ({e})"
            raise DatasetError(f"{ann.name}: images[{i}]: {what}") from None
        records.append(ImageRecord(str(root / rel), image_id, captions, s))
    if not records:
        raise DatasetError(f"no images with split {split!r} in {ann.name}; "
                           f"splits present: {', '.join(sorted(present)) or 'none'}")
    _check_image_root(root, records, ann)
    return records


def read_coco(annotations_json: str | Path, image_dir: str | Path, split: str | None = None) -> list[ImageRecord]:
    """Images of an official COCO captions file (captions_{train,val}20xx.json), in file order.

    ``split`` only labels the records; it defaults to the image folder's name (e.g. 'val2017').
    """
    from pycocotools.coco import COCO

    ann = Path(annotations_json)
    data = _load_json(ann)
    if not isinstance(data, dict):
        raise DatasetError(f"{ann.name}: not a COCO annotation file (expected a JSON object)")
    images = data.get("images")
    if isinstance(images, list) and images and isinstance(images[0], dict) and "sentences" in images[0]:
        raise DatasetError(f"{ann.name} is a Karpathy split file (its images carry 'sentences'), not an official "
                           "COCO captions file: add --dataset karpathy")
    for key in ("images", "annotations"):
        if not isinstance(data.get(key), list):
            raise DatasetError(f"{ann.name}: not a COCO captions file (missing '{key}' list)")
    coco = COCO()
    coco.dataset = data
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
            coco.createIndex()
    except (KeyError, TypeError) as e:
        raise DatasetError(f"{ann.name}: bad image or annotation entry (missing key {e})") from None
    root = Path(image_dir).resolve()
    label = split if split is not None else root.name
    records = []
    for img_id, img in coco.imgs.items():
        try:
            captions = [a["caption"].strip() for a in coco.imgToAnns.get(img_id, [])]
            records.append(ImageRecord(str(root / img["file_name"]), img_id, captions, label))
        except (KeyError, TypeError, AttributeError) as e:
            raise DatasetError(f"{ann.name}: image {img_id}: missing or bad key {e}") from None
    if not records:
        raise DatasetError(f"{ann.name}: no images")
    _check_image_root(root, records, ann)
    return records


def read_dataset(kind: str, annotations: str | Path, images: str | Path, split: str = "train") -> list[ImageRecord]:
    """kind 'karpathy' -> read_karpathy(annotations, images, split); 'coco' -> read_coco (split is a label)."""
    if kind == "karpathy":
        return read_karpathy(annotations, images, split)
    if kind == "coco":
        return read_coco(annotations, images, split)
    raise DatasetError(f"unknown dataset kind {kind!r}; choose 'coco' or 'karpathy'")


class CaptionDataset(ImageDataset):
    """One item per image: {"index", "image" (3,S,S) float, "ok"} (+ "error" when the image is unreadable).

    Give ``preprocess`` (the checkpoint's PreprocessConfig), or just ``image_size`` (resize = 8/7 of it,
    like 256/224); ``transform`` overrides the default train/eval transform built from that.
    """

    def __init__(self, records: Sequence[ImageRecord], preprocess: PreprocessConfig | None = None,
                 train: bool = False, transform: Callable | None = None, image_size: int | None = None) -> None:
        if preprocess is None:
            size = image_size or PreprocessConfig.image_size
            preprocess = PreprocessConfig(image_size=size, resize=round(size * 8 / 7))
        self.records = list(records)
        self.image_size, self.resize = preprocess.image_size, preprocess.resize
        super().__init__([r.path for r in self.records],
                         transform or (train_transform if train else eval_transform)(preprocess), preprocess.resize,
                         placeholder=torch.zeros(3, preprocess.image_size, preprocess.image_size))


def encode_captions(records: Sequence[ImageRecord], vocab: Vocabulary, max_length: int) -> list[list[torch.Tensor]]:
    """Per image, per caption: word ids (no <bos>/<eos>), truncated to ``max_length`` words."""
    return [[torch.tensor(vocab.encode(c, max_length), dtype=torch.long) for c in r.captions] for r in records]


def pad_captions(seqs: Sequence[Sequence[int] | torch.Tensor], max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher-forcing pair for N captions, each (N, T+1) with T the longest (<= max_length) in the batch.

    tokens_in = <bos> w1..wn <pad>..., targets = w1..wn <eos> <pad>...
    """
    seqs = [torch.as_tensor(s, dtype=torch.long)[:max_length] for s in seqs]
    t = max((len(s) for s in seqs), default=0)
    tokens_in = torch.full((len(seqs), t + 1), PAD_ID, dtype=torch.long)
    targets = torch.full((len(seqs), t + 1), PAD_ID, dtype=torch.long)
    tokens_in[:, 0] = BOS_ID
    for n, s in enumerate(seqs):
        tokens_in[n, 1:len(s) + 1] = s
        targets[n, :len(s)] = s
        targets[n, len(s)] = EOS_ID
    return tokens_in, targets
