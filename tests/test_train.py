"""Training loop, resume, feature cache, DDP and evaluation on a tiny synthetic dataset."""
from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from captioner.checkpoint import CheckpointError
from training import evaluate as evaluate_mod
from training import engine
from training import train as train_mod
from training.datasets import read_dataset
from training.features import FeatureDataset, cached_features
from captioner.cli import parsers

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220), "yellow": (230, 230, 20)}
SHAPES = ("square", "stripe")


def _draw(colour, shape, seed):
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 40, (40, 40, 3)).astype(np.uint8)
    if shape == "square":
        a[8:32, 8:32] = COLOURS[colour]
    else:
        a[:, 14:26] = COLOURS[colour]
    return Image.fromarray(a)


@pytest.fixture
def tiny_karpathy(tmp_path):
    """16 images (4 colours x 2 shapes x 2), Karpathy JSON with train/val splits; one train image is corrupt."""
    root = tmp_path / "data"
    (root / "images").mkdir(parents=True)
    images, n = [], 0
    for colour in COLOURS:
        for shape in SHAPES:
            for k in range(2):
                name = f"{colour}_{shape}_{k}.jpg"
                _draw(colour, shape, n).save(root / "images" / name)
                caps = [f"a {colour} {shape}", f"the {colour} {shape} .", f"one {colour} {shape} here"]
                images.append({"filename": name, "filepath": "images", "imgid": n, "split": "val" if k else "train",
                               "sentences": [{"raw": c, "tokens": c.split(), "imgid": n, "sentid": 3 * n + j}
                                             for j, c in enumerate(caps)]})
                n += 1
    (root / "images" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    images.append({"filename": "broken.jpg", "filepath": "images", "imgid": n, "split": "train",
                   "sentences": [{"raw": "a broken image", "tokens": [], "imgid": n, "sentid": 999}]})
    ann = root / "dataset_tiny.json"
    ann.write_text(json.dumps({"dataset": "tiny", "images": images}))
    return ann, root


def _args(ann, root, out, *extra):
    return parsers.train().parse_args([
        "--annotations", str(ann), "--images", str(root), "--output", str(out), "--arch", "compact",
        "--image-size", "32", "--encoder-layers", "8,M,16,M,32,M", "--fc-dims", "32", "--embed-dim", "16", "--hidden-dim", "32", "--cell", "gru", "--min-count", "1",
        "--batch-size", "4", "--workers", "0", "--no-java", "--amp", "off", "--warmup-steps", "2",
        "--feature-cache", str(Path(out).parent / "cache"), *extra])


def _weights(path):
    return load_file(str(Path(path) / "model.safetensors"))


def test_train_writes_checkpoints_metrics_and_skips_corrupt_images(tiny_karpathy, tmp_path, caplog):
    ann, root = tiny_karpathy
    out = tmp_path / "run"
    train_mod.main(_args(ann, root, out, "--epochs", "2"))
    for d in ("last", "best"):
        assert {"config.json", "vocab.json", "model.safetensors", "metrics.json"} <= {p.name for p in (out / d).iterdir()}
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [0, 1]
    assert all(r["CIDEr-D"] >= 0 and r["val_loss"] > 0 for r in rows)
    assert (out / "curves.png").stat().st_size > 1000
    assert (out / "best" / "README.md").is_file()
    assert "broken.jpg" in caplog.text  # reported, not fatal
    state = torch.load(out / "last" / "training_state.pt", weights_only=True)
    assert state["epoch"] == 1


def test_resume_continues_exactly(tiny_karpathy, tmp_path, monkeypatch):
    ann, root = tiny_karpathy
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train_mod.main(_args(ann, root, straight, "--epochs", "3"))
    real = engine.train_one_epoch  # the one epoch loop

    def crash_in_epoch_1(*a, **k):
        if a[5] == 1:  # epoch
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(engine, "train_one_epoch", crash_in_epoch_1)
    with pytest.raises(KeyboardInterrupt):
        train_mod.main(_args(ann, root, resumed, "--epochs", "3"))
    monkeypatch.setattr(engine, "train_one_epoch", real)
    first = _weights(resumed / "last")
    train_mod.main(_args(ann, root, resumed, "--epochs", "3", "--resume"))
    a, b = _weights(straight / "last"), _weights(resumed / "last")
    assert any(not torch.equal(first[k], b[k]) for k in b)  # the resumed run did train further
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)
    rows = [json.loads(line) for line in (resumed / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [0, 1, 2]


def test_resume_without_state_is_a_clear_error(tiny_karpathy, tmp_path):
    ann, root = tiny_karpathy
    with pytest.raises(CheckpointError, match="training_state.pt not found"):
        train_mod.main(_args(ann, root, tmp_path / "nothing", "--resume"))


def test_frozen_encoder_uses_feature_cache_and_finetunes_later(tiny_karpathy, tmp_path):
    ann, root = tiny_karpathy
    out = tmp_path / "frozen"
    model = train_mod.main(_args(ann, root, out, "--epochs", "1", "--freeze-encoder"))
    cache = list((tmp_path / "cache").glob("*.safetensors"))
    assert len(cache) == 2  # train and val features
    start = {k: v.clone() for k, v in model.encoder.state_dict().items()}
    model2 = train_mod.main(_args(ann, root, tmp_path / "ft", "--epochs", "2", "--freeze-encoder",
                                  "--finetune-after", "1"))
    assert len(list((tmp_path / "cache").glob("*.safetensors"))) == 2  # same encoder + images: cache reused
    # same seed, so the encoder starts from the same weights; it only moves once unfrozen in epoch 1
    assert any(not torch.equal(start[k], v) for k, v in model2.encoder.state_dict().items() if v.is_floating_point())
    torch.testing.assert_close(model.encoder.state_dict()["features.0.weight"], start["features.0.weight"])


def test_feature_views_cache_augmented_crops_beside_the_centre_crop(tiny_karpathy, tmp_path):
    ann, root = tiny_karpathy
    cache_dir = tmp_path / "cache"
    model = train_mod.main(_args(ann, root, tmp_path / "one", "--epochs", "1", "--freeze-encoder"))
    assert len(list(cache_dir.glob("*.safetensors"))) == 2
    train_mod.main(_args(ann, root, tmp_path / "three", "--epochs", "1", "--freeze-encoder", "--feature-views", "3"))
    assert len(list(cache_dir.glob("*.safetensors"))) == 4  # the centre crops are reused; 2 training views added

    records = read_dataset("karpathy", ann, root, "train")
    cpu = torch.device("cpu")
    rng = torch.get_rng_state()
    views = cached_features(model, records, cache_dir, cpu, None, 4, 0, views=3)
    centre = cached_features(model, records, cache_dir, cpu, None, 4, 0)
    fc = torch.stack([f.fc for f in views["views"]])  # (3, N, D): the fields by name, fc alone for an FC model
    assert fc.shape == (3, len(records), model.cfg.encoder.feature_dim)
    assert all(f.att is None for f in views["views"])
    torch.testing.assert_close(fc[0], centre["views"][0].fc, rtol=0, atol=0)
    ok = views["ok"]
    assert not ok.all() and ok.sum() == len(records) - 1  # the broken image is unreadable in every view
    f = fc[:, ok]
    assert not torch.allclose(f[0], f[1]) and not torch.allclose(f[1], f[2])  # crops and flips differ
    for p in cache_dir.glob("*.safetensors"):  # recomputed from scratch: the same crops (each view has its seed)
        p.unlink()
    again = cached_features(model, records, cache_dir, cpu, None, 4, 0, views=3)
    for a, b in zip(again["views"], views["views"], strict=True):
        torch.testing.assert_close(a.fc, b.fc, rtol=0, atol=0)
    assert torch.equal(torch.get_rng_state(), rng)  # caching does not move the training run's random stream

    ds = FeatureDataset(views)
    i = int(ok.nonzero()[0])
    drawn = {tuple(ds[i]["features"].fc[0].tolist()) for _ in range(40)}
    assert len(drawn) >= 2 and drawn <= {tuple(v.tolist()) for v in fc[:, i]}


def test_feature_views_need_a_frozen_encoder(tiny_karpathy, tmp_path):
    ann, root = tiny_karpathy
    with pytest.raises(SystemExit, match="needs --freeze-encoder"):
        train_mod.main(_args(ann, root, tmp_path / "x", "--feature-views", "2"))


def test_image_blind_baseline_never_reads_images(tiny_karpathy, tmp_path, monkeypatch):
    ann, root = tiny_karpathy

    def fail(*a, **k):
        raise AssertionError("image-blind training opened an image")

    monkeypatch.setattr("captioner.data.load_image", fail)  # the one image dataset's reader
    train_mod.main(_args(ann, root, tmp_path / "blind", "--epochs", "1", "--image-blind"))


def test_learns_to_use_the_image(tiny_karpathy, tmp_path):
    """Colour and shape are only in the pixels: a trained model must beat the image-blind one on val."""
    ann, root = tiny_karpathy
    common = ("--epochs", "30", "--batch-size", "2", "--lr", "1e-2", "--dropout", "0.0", "--captions-per-image", "3", "--freeze-encoder")
    train_mod.main(_args(ann, root, tmp_path / "seeing", *common))
    train_mod.main(_args(ann, root, tmp_path / "blind", *common, "--image-blind"))
    seeing = json.loads((tmp_path / "seeing" / "best" / "metrics.json").read_text())
    blind = json.loads((tmp_path / "blind" / "best" / "metrics.json").read_text())
    assert seeing["CIDEr-D"] > blind["CIDEr-D"] + 0.25, (seeing["CIDEr-D"], blind["CIDEr-D"])


def test_evaluate_command_writes_results_and_metrics(tiny_karpathy, tmp_path, capsys):
    ann, root = tiny_karpathy
    train_mod.main(_args(ann, root, tmp_path / "run", "--epochs", "1"))
    out = tmp_path / "results.json"
    args = parsers.evaluate().parse_args([
        "--checkpoint", str(tmp_path / "run" / "best"), "--annotations", str(ann), "--images", str(root),
        "--split", "val", "--out", str(out), "--no-java", "--workers", "0", "--device", "cpu"])
    m = evaluate_mod.main(args)
    results = json.loads(out.read_text())
    assert len(results) == 8 and {"image_id", "caption"} <= set(results[0])
    saved = json.loads(out.with_suffix(".metrics.json").read_text())
    assert saved["CIDEr-D"] == pytest.approx(m["CIDEr-D"]) and saved["SPICE"] is None
    texts = [r["caption"] for r in results]
    assert saved["distinct_captions"] == len(set(texts))
    assert saved["commonest_caption_count"] == texts.count(saved["commonest_caption"]) == max(map(texts.count, texts))
    # scoring an existing results file gives the same numbers without a model
    args.results, args.metrics_out = str(out), str(tmp_path / "again.json")
    assert evaluate_mod.main(args)["BLEU-4"] == pytest.approx(m["BLEU-4"])
    assert "CIDEr-D" in capsys.readouterr().out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank, world, port, argv, out):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    model = train_mod.main(parsers.train().parse_args(argv))
    torch.save({k: v.clone() for k, v in model.state_dict().items()}, Path(out) / f"rank{rank}.pt")


def test_ddp_two_processes_gloo_end_identical(tiny_karpathy, tmp_path):
    ann, root = tiny_karpathy
    args = _args(ann, root, tmp_path / "ddp", "--epochs", "2")
    argv = [a for k, v in vars(args).items() for a in _flag(k, v)]
    torch.multiprocessing.spawn(_ddp_worker, args=(2, _free_port(), argv, str(tmp_path)), nprocs=2, join=True)
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    for k in r0:
        assert torch.equal(r0[k], r1[k]), k
    saved = _weights(tmp_path / "ddp" / "last")  # rank 0 checkpointed the same weights
    for k in saved:
        assert torch.equal(saved[k], r0[k]), k


def _flag(k, v):
    name = "--" + k.replace("_", "-")
    if isinstance(v, bool):
        return [name] if v else []
    if v is None:
        return []
    return [name, str(v)]


def test_caption_training_from_a_vqa_only_model_says_it_now_captions(tmp_path):
    from training.train import carried_metrics

    (tmp_path / "metrics.json").write_text(json.dumps({"tasks": ["vqa"], "val_accuracy": 0.7}))
    assert carried_metrics(tmp_path, encoder_frozen=True) == {"tasks": ["caption", "vqa"], "val_accuracy": 0.7}
    assert carried_metrics(tmp_path, encoder_frozen=False) == {"tasks": ["caption", "vqa"]}
