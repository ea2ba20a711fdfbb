"""recipes/teacher_bound.py: the teacher's features land under exactly the cache keys a frozen-encoder
`captioner train` run of the same model and data looks up, so that run trains on them."""
from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

import torch
from safetensors.torch import load_file

from captioner.checkpoint import load_pretrained, save_pretrained
from captioner.config import DecoderConfig, EncoderConfig, ModelConfig, PreprocessConfig
from captioner.model import CaptionModel
from captioner.tokenizer import Vocabulary
from tests.test_distill import tiny_teacher  # noqa: F401  (fixture)
from tests.test_train import tiny_karpathy  # noqa: F401  (fixture)
from training import train as train_mod
from training.features import cache_key, compute_features

ROOT = Path(__file__).resolve().parents[1]


def _recipe():
    spec = importlib.util.spec_from_file_location("teacher_bound", ROOT / "recipes" / "teacher_bound.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_teacher_features_replace_the_students_in_training(tiny_karpathy, tiny_teacher, tmp_path, caplog,  # noqa: F811
                                                            one_thread):
    ann, root = tiny_karpathy
    enc = EncoderConfig(arch="custom", layers=[8, "M", 16, "M", 32, "M"], batch_norm=True, pool_size=1, fc_dims=[32])
    vocab = Vocabulary(["a", "red", "blue", "square", "circle"])
    cfg = ModelConfig(encoder=enc, preprocess=PreprocessConfig(image_size=24, resize=28),
                      decoder=DecoderConfig(embed_dim=8, hidden_dim=8), vocab_size=len(vocab))
    torch.manual_seed(0)
    save_pretrained(CaptionModel(cfg), vocab, tmp_path / "model")
    data = ["--annotations", str(ann), "--images", str(root)]
    cache = tmp_path / "teacher-cache"

    recipe = _recipe()
    recipe.main(recipe.get_args_parser().parse_args([
        "--model", str(tmp_path / "model"), "--teacher", "tiny", "--teacher-size", "32", "--batch-size", "4",
        "--workers", "0", "--out", str(cache), "--", *data]))

    model, _ = load_pretrained(tmp_path / "model")
    train_rec, val_rec = train_mod.read_records(train_mod.get_args_parser().parse_args([*data, "--output", "x"]))
    assert len(list(cache.glob("*.safetensors"))) == 2
    train_file, val_file = (load_file(str(cache / f"{cache_key(model, rec)}.safetensors"))
                            for rec in (train_rec, val_rec))
    assert train_file["features"].shape == (len(train_rec), 32) and val_file["features"].shape == (len(val_rec), 32)
    student_v, ok = compute_features(model, train_rec, torch.device("cpu"), None, 4, 0)
    assert torch.equal(train_file["ok"], ok) and not ok.all()  # the corrupt training image stays marked
    assert not torch.allclose(train_file["features"][ok], student_v[ok], atol=1e-3)  # the teacher's, not v

    caplog.set_level(logging.INFO)
    train_mod.main(train_mod.get_args_parser().parse_args([
        *data, "--output", str(tmp_path / "run"), "--init-from", str(tmp_path / "model"), "--fresh-decoder",
        "--freeze-encoder", "--feature-cache", str(cache), "--epochs", "1", "--batch-size", "4", "--workers", "0",
        "--no-java", "--amp", "off", "--warmup-steps", "1"]))
    assert "computing features" not in caplog.text
    assert caplog.text.count("using cached features") == 2
