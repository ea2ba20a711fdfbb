from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

from captioner.config import PreprocessConfig
from captioner.preprocess import eval_transform
from captioner.tokenizer import BOS_ID, EOS_ID, PAD_ID, UNK_ID, Vocabulary
from training.datasets import (CaptionDataset, DatasetError, ImageRecord, collate, encode_captions,
                               pad_captions, read_coco, read_dataset, read_karpathy)

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def _sent(raw: str) -> dict:
    return {"raw": raw, "tokens": raw.lower().split(), "imgid": 0, "sentid": 0}


@pytest.fixture
def karpathy(tmp_path, make_images):
    """COCO-style Karpathy file: filepath train2014/val2014, splits train/restval/val/test."""
    make_images(2, "coco/train2014", prefix="tr")
    make_images(3, "coco/val2014", prefix="va")
    imgs = [
        ("train2014", "tr0.jpg", "train", 10), ("train2014", "tr1.jpg", "train", 11),
        ("val2014", "va0.jpg", "restval", 20), ("val2014", "va1.jpg", "val", 21), ("val2014", "va2.jpg", "test", 22),
    ]
    data = {"dataset": "coco", "images": [
        {"filepath": fp, "filename": fn, "imgid": k, "cocoid": cid, "split": s, "sentids": [k],
         "sentences": [_sent(f"A photo number {k} ."), _sent(f" Another caption {k}. ")]}
        for k, (fp, fn, s, cid) in enumerate(imgs)]}
    path = tmp_path / "dataset_coco.json"
    path.write_text(json.dumps(data))
    return path, tmp_path / "coco"


@pytest.fixture
def coco(tmp_path, make_images):
    make_images(3, "val2017", prefix="c")
    data = {"info": {"description": "tiny"}, "licenses": [], "type": "captions",
            "images": [{"id": 100 + i, "file_name": f"c{i}.jpg", "width": 48, "height": 40} for i in range(3)],
            "annotations": [{"id": 1, "image_id": 100, "caption": "A dog runs."},
                            {"id": 2, "image_id": 101, "caption": "A cat sleeps.\n"},
                            {"id": 3, "image_id": 100, "caption": "A brown dog."}]}
    path = tmp_path / "captions_val2017.json"
    path.write_text(json.dumps(data))
    return path, tmp_path / "val2017"


def test_karpathy_splits_restval_and_paths(karpathy):
    ann, root = karpathy
    train = read_karpathy(ann, root, "train")
    assert [r.image_id for r in train] == [10, 11, 20]  # restval folded into train, cocoid preferred
    assert [r.split for r in train] == ["train", "train", "restval"]
    assert train[2].path == str((root / "val2014" / "va0.jpg").resolve())
    assert all(Path(r.path).is_absolute() and Path(r.path).is_file() for r in train)
    assert train[0].captions == ["A photo number 0 .", "Another caption 0."]
    assert [r.image_id for r in read_karpathy(ann, root, "val")] == [21]
    assert [r.image_id for r in read_karpathy(ann, root, "test")] == [22]
    assert [r.image_id for r in read_karpathy(ann, root, "restval")] == [20]
    assert len(read_karpathy(ann, root, "all")) == 5
    assert [r.image_id for r in read_dataset("karpathy", ann, root, "val")] == [21]


def test_karpathy_without_filepath_uses_imgid(tmp_path, make_images):
    make_images(1, "flickr")
    ann = tmp_path / "dataset_flickr8k.json"
    ann.write_text(json.dumps({"dataset": "flickr8k", "images": [
        {"filename": "img0.jpg", "imgid": 7, "split": "val", "sentences": [_sent("x")]}]}))
    (rec,) = read_karpathy(ann, tmp_path / "flickr", "val")
    assert rec.image_id == 7 and rec.path == str((tmp_path / "flickr" / "img0.jpg").resolve())


def test_karpathy_errors(tmp_path, karpathy):
    ann, root = karpathy
    doc = json.loads(ann.read_text())
    doc["images"] = [im for im in doc["images"] if im["split"] in ("val", "test")]
    (tmp_path / "vt.json").write_text(json.dumps(doc))
    with pytest.raises(DatasetError, match=r"no images with split 'train'.*splits present: test, val"):
        read_karpathy(tmp_path / "vt.json", root, "train")
    with pytest.raises(DatasetError, match="unknown split 'dev'"):
        read_karpathy(ann, root, "dev")
    bad = tmp_path / "dataset_flickr8k.json"
    bad.write_text('{"dataset": "flickr8k",\n "images": [\n {"filename": oops}]}')
    with pytest.raises(DatasetError, match=r"dataset_flickr8k.json: not valid JSON \(line 3"):
        read_karpathy(bad, root, "train")
    bad.write_text(json.dumps({"dataset": "x"}))
    with pytest.raises(DatasetError, match="dataset_flickr8k.json: not a Karpathy split file"):
        read_karpathy(bad, root, "train")
    bad.write_text(json.dumps({"images": [{"filename": "a.jpg", "imgid": 0, "split": "train"}]}))
    with pytest.raises(DatasetError, match=r"images\[0\]: missing key 'sentences'"):
        read_karpathy(bad, root, "train")
    with pytest.raises(DatasetError, match="nope.json: no such file"):
        read_karpathy(tmp_path / "nope.json", root, "train")
    with pytest.raises(DatasetError, match="does not exist"):
        read_karpathy(ann, tmp_path / "no_images_here", "train")
    with pytest.raises(DatasetError, match="is the image folder right"):
        read_karpathy(ann, root / "val2014", "train")  # image root one level too deep
    with pytest.raises(DatasetError, match="unknown dataset kind"):
        read_dataset("flickr", ann, root, "train")


def test_coco_reader(coco):
    ann, img_dir = coco
    recs = read_coco(ann, img_dir)
    assert [r.image_id for r in recs] == [100, 101, 102]
    assert recs[0].captions == ["A dog runs.", "A brown dog."]
    assert recs[1].captions == ["A cat sleeps."] and recs[2].captions == []
    assert recs[0].path == str((img_dir / "c0.jpg").resolve()) and recs[0].split == "val2017"
    assert read_dataset("coco", ann, img_dir, "val")[0].split == "val"


def test_coco_reader_errors(tmp_path, coco):
    ann, img_dir = coco
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"images": []}))
    with pytest.raises(DatasetError, match="bad.json: not a COCO captions file \\(missing 'annotations'"):
        read_coco(bad, img_dir)
    bad.write_text(json.dumps({"images": [{"id": 1, "file_name": "c0.jpg"}], "annotations": [{"caption": "x"}]}))
    with pytest.raises(DatasetError, match="bad.json: bad image or annotation entry"):
        read_coco(bad, img_dir)
    bad.write_text("{")
    with pytest.raises(DatasetError, match="bad.json: not valid JSON"):
        read_coco(bad, img_dir)


def _records_with_bad(tmp_path: Path, make_images) -> list[ImageRecord]:
    good = make_images(3, "mixed")
    corrupt = tmp_path / "mixed" / "corrupt.jpg"
    corrupt.write_bytes(good[0].read_bytes()[:200])  # truncated JPEG
    paths = [good[0], corrupt, good[1], tmp_path / "mixed" / "missing.jpg", good[2]]
    return [ImageRecord(str(p), i, [f"caption {i}"], "train") for i, p in enumerate(paths)]


def test_dataset_and_collate_skip_bad_images(tmp_path, make_images, caplog):
    ds = CaptionDataset(_records_with_bad(tmp_path, make_images), image_size=32)
    assert len(ds) == 5
    item = ds[0]
    assert item["ok"] and item["index"] == 0 and item["image"].shape == (3, 32, 32)
    assert item["image"].dtype == torch.float32
    with caplog.at_level(logging.WARNING, logger="training.datasets"):
        bad = ds[1]
        ds[1]
        ds[3]
    assert not bad["ok"] and bad["image"].shape == (3, 32, 32) and "corrupt" in bad["error"]
    assert len(caplog.records) == 2  # once per bad image
    batch = collate([ds[i] for i in range(5)])
    assert batch["indices"].tolist() == [0, 2, 4] and batch["indices"].dtype == torch.long
    assert batch["images"].shape == (3, 3, 32, 32)
    assert [i for i, _ in batch["errors"]] == [1, 3]
    assert "missing.jpg: no such file" in batch["errors"][1][1]
    empty = collate([ds[1]])
    assert empty["images"].shape == (0, 3, 32, 32) and empty["indices"].numel() == 0


def test_dataset_with_config_transform(tmp_path, make_images):
    recs = [ImageRecord(str(p), i, []) for i, p in enumerate(make_images(1))]
    cfg = PreprocessConfig(image_size=24, resize=28)
    assert CaptionDataset(recs, cfg, train=True)[0]["image"].shape == (3, 24, 24)
    assert CaptionDataset(recs, transform=eval_transform(cfg), image_size=24)[0]["image"].shape == (3, 24, 24)


def test_dataloader_with_workers(tmp_path, make_images):
    ds = CaptionDataset(_records_with_bad(tmp_path, make_images), image_size=32, train=True)
    loader = DataLoader(ds, batch_size=2, num_workers=2, collate_fn=collate)
    batches = list(loader)
    assert sorted(i for b in batches for i in b["indices"].tolist()) == [0, 2, 4]
    assert sorted(i for b in batches for i, _ in b["errors"]) == [1, 3]
    assert all(b["images"].shape[1:] == (3, 32, 32) for b in batches)


def test_encode_and_pad_captions():
    vocab = Vocabulary(["a", "dog", "runs"])
    recs = [ImageRecord("x.jpg", 0, ["A dog runs fast.", "Dog!"]), ImageRecord("y.jpg", 1, [])]
    enc = encode_captions(recs, vocab, max_length=3)
    a, dog, runs = (vocab.stoi[w] for w in ("a", "dog", "runs"))
    assert [t.tolist() for t in enc[0]] == [[a, dog, runs], [dog]] and enc[1] == []
    assert enc[0][0].dtype == torch.long
    assert encode_captions(recs[:1], vocab, 10)[0][0].tolist() == [a, dog, runs, UNK_ID]

    tin, tgt = pad_captions([[5, 6, 7, 8], [9], []], max_length=3)
    assert tin.shape == tgt.shape == (3, 4) and tin.dtype == torch.long
    assert tin.tolist() == [[BOS_ID, 5, 6, 7], [BOS_ID, 9, PAD_ID, PAD_ID], [BOS_ID, PAD_ID, PAD_ID, PAD_ID]]
    assert tgt.tolist() == [[5, 6, 7, EOS_ID], [9, EOS_ID, PAD_ID, PAD_ID], [EOS_ID, PAD_ID, PAD_ID, PAD_ID]]
    tin, tgt = pad_captions([torch.tensor([4]), torch.tensor([4, 5])], max_length=20)
    assert tin.shape == (2, 3) and tgt[1].tolist() == [4, 5, EOS_ID]


@pytest.mark.shared_data
@pytest.mark.skipif(not SHARED.exists(), reason="../shared/data not present (real Flickr8k/COCO-mini data)")
def test_real_data():
    flickr = SHARED / "flickr8k"
    train = read_karpathy(flickr / "dataset_flickr8k.json", flickr, "train")
    assert len(train) == 6000 and all(len(r.captions) == 5 for r in train)
    assert Path(train[0].path).is_file()
    assert len(read_karpathy(flickr / "dataset_flickr8k.json", flickr, "val")) == 1000
    with pytest.raises(DatasetError, match="splits present: train, val"):
        read_karpathy(flickr / "dataset_flickr8k.json", flickr, "test")
    coco = read_coco(SHARED / "coco-mini" / "annotations" / "captions_val2017.json", SHARED / "coco-mini" / "val2017")
    assert len(coco) > 0 and all(r.captions for r in coco)
    assert Path(coco[0].path).is_file()
    item = CaptionDataset(coco[:1], image_size=64)[0]
    assert item["ok"] and item["image"].shape == (3, 64, 64)
