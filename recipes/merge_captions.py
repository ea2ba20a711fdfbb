"""Join caption datasets into one Karpathy split file for `captioner train --annotations` (one file, one vocabulary).

    python recipes/merge_captions.py --karpathy ../shared/data/flickr8k/dataset_flickr8k.json ../shared/data/flickr8k \\
        --coco ../shared/data/coco-mini/annotations/captions_train2017.json ../shared/data/coco-mini/train2017 train \\
        --coco ../shared/data/coco-mini/annotations/captions_val2017.json ../shared/data/coco-mini/val2017 val \\
        --karpathy runs/v7/pseudo-refs.json . --exclude-ids ../shared/data/coco-captions-pool/coco_test_ids.txt \\
        --out runs/v7/captions.json

Every image gets an absolute filepath and a fresh ``imgid`` (the sources' ids collide: Flickr8k and the
pseudo-references both count from 0); ``source`` and the source's own id are kept. An image of a training split whose
COCO id is in --exclude-ids is refused (the COCO test photos must never be trained on); in val it is kept.
"""
from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from captioner.fileio import write_json_atomic  # noqa: E402
from training.datasets import read_coco, read_karpathy  # noqa: E402

_COCO_ID = re.compile(r"(\d{6,12})\.jpg$")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--karpathy", nargs=2, action="append", default=[], metavar=("JSON", "IMAGES"))
    p.add_argument("--coco", nargs=3, action="append", default=[], metavar=("CAPTIONS", "IMAGES", "SPLIT"))
    p.add_argument("--exclude-ids", help="COCO image ids never to train on, one a line")
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)
    excluded = set()
    if a.exclude_ids:
        excluded = {int(t) for t in Path(a.exclude_ids).read_text().split() if t.isdigit()}
    sources = [(f"karpathy:{Path(j).name}", read_karpathy(j, root, "all")) for j, root in a.karpathy]
    sources += [(f"coco:{Path(j).name}", read_coco(j, root, split)) for j, root, split in a.coco]
    images, counts = [], {}
    for name, records in sources:
        for r in records:
            m = _COCO_ID.search(os.path.basename(r.path))
            coco_id = int(m.group(1)) if m else (r.image_id if name.startswith("coco:") else None)
            if coco_id in excluded and r.split in ("train", "restval"):
                raise SystemExit(f"{r.path}: COCO id {coco_id} is in {a.exclude_ids} but its split is {r.split!r}")
            path = Path(r.path).resolve()
            images.append({"filepath": str(path.parent), "filename": path.name, "split": r.split,
                           "imgid": len(images), "source": name, "source_id": r.image_id,
                           "sentences": [{"raw": c} for c in r.captions]})
            key = (name, r.split)
            counts[key] = counts.get(key, 0) + 1
    write_json_atomic(a.out, {"dataset": "merged", "images": images})
    for (name, split), n in sorted(counts.items()):
        print(f"{name:40s} {split:6s} {n:6d} images")
    print(f"{a.out}: {len(images)} images")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
