"""recipes/teacher_bound.py: the teacher's features land under exactly the cache keys a frozen-encoder
`captioner train` run of the same model and data looks up, so that run trains on them; recipes/probe_student.py
measures against them."""
from __future__ import annotations

import importlib.util
import logging
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from captioner.checkpoint import load_pretrained, save_pretrained
from captioner.config import DecoderConfig, EncoderConfig, ModelConfig, PreprocessConfig
from captioner.model import CaptionModel
from captioner.tokenizer import Vocabulary
from tests.test_distill import TinyTeacher as tiny_teacher_model
from tests.test_distill import tiny_teacher  # noqa: F401  (fixture)
from tests.test_train import tiny_karpathy  # noqa: F401  (fixture)
from training import train as train_mod
from training.distill import save_encoder
from training.features import cache_key, compute_features
from training.options import CaptionData
from captioner.cli import parsers

ROOT = Path(__file__).resolve().parents[1]


def _recipe(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "recipes" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _model_and_cache(tiny_karpathy, tmp_path):
    """A tiny saved model, and the teacher's features that the recipe writes under its cache keys."""
    ann, root = tiny_karpathy
    enc = EncoderConfig(arch="custom", layers=[8, "M", 16, "M", 32, "M"], batch_norm=True, pool_size=1, fc_dims=[32])
    vocab = Vocabulary(["a", "red", "blue", "square", "circle"])
    cfg = ModelConfig(encoder=enc, preprocess=PreprocessConfig(image_size=24, resize=28),
                      decoder=DecoderConfig(embed_dim=8, hidden_dim=8), vocab_size=len(vocab))
    torch.manual_seed(0)
    save_pretrained(CaptionModel(cfg), vocab, tmp_path / "model")
    data = ["--annotations", str(ann), "--images", str(root)]
    cache = tmp_path / "teacher-cache"
    recipe = _recipe("teacher_bound")
    recipe.main(recipe.get_args_parser().parse_args([
        "--model", str(tmp_path / "model"), "--teacher", "tiny", "--teacher-size", "32", "--batch-size", "4",
        "--workers", "0", "--out", str(cache), "--", *data]))
    return data, cache


def test_teacher_features_replace_the_students_in_training(tiny_karpathy, tiny_teacher, tmp_path, caplog,  # noqa: F811
                                                            one_thread):
    data, cache = _model_and_cache(tiny_karpathy, tmp_path)
    model, _ = load_pretrained(tmp_path / "model")
    train_data = CaptionData.from_args(parsers.train().parse_args([*data, "--output", "x"]))
    train_rec, val_rec = train_mod.read_records(train_data)
    assert len(list(cache.glob("*.safetensors"))) == 2
    train_file, val_file = (load_file(str(cache / f"{cache_key(model, rec)}.safetensors"))
                            for rec in (train_rec, val_rec))
    assert train_file["fc"].shape == (len(train_rec), 32) and val_file["fc"].shape == (len(val_rec), 32)
    student, ok = compute_features(model, train_rec, torch.device("cpu"), None, 4, 0)
    assert torch.equal(train_file["ok"], ok) and not ok.all()  # the corrupt training image stays marked
    assert not torch.allclose(train_file["fc"][ok], student.fc[ok], atol=1e-3)  # the teacher's, not v

    caplog.set_level(logging.INFO)
    train_mod.main(parsers.train().parse_args([
        *data, "--output", str(tmp_path / "run"), "--init-from", str(tmp_path / "model"), "--fresh-decoder",
        "--freeze-encoder", "--feature-cache", str(cache), "--epochs", "1", "--batch-size", "4", "--workers", "0",
        "--no-java", "--amp", "off", "--warmup-steps", "1"]))
    assert "computing features" not in caplog.text
    assert caplog.text.count("using cached features") == 2


def test_probe_measures_the_model_a_distilled_encoder_and_the_teacher(tiny_karpathy, tiny_teacher, tmp_path,  # noqa: F811
                                                                      capsys, one_thread):
    data, cache = _model_and_cache(tiny_karpathy, tmp_path)
    printed = re.findall(r"explains R\^2 = (-?[0-9.]+)", capsys.readouterr().out)
    probe = _recipe("probe_student")

    def r2(*flags):
        return probe.main(probe.get_args_parser().parse_args([
            "--model", str(tmp_path / "model"), "--cache", str(cache), "--teacher", "tiny", "--teacher-size", "32",
            "--batch-size", "4", "--workers", "0", *flags, "--", *data]))

    own = r2()
    assert [f"{own['train']:.3f}", f"{own['val']:.3f}"] == printed  # the figure teacher_bound.py prints
    model, _ = load_pretrained(tmp_path / "model")
    save_encoder(model.encoder, tmp_path / "same.safetensors", {"encoder": model.cfg.to_dict()["encoder"],
                                                                "preprocess": model.cfg.to_dict()["preprocess"]})
    assert r2("--encoder", str(tmp_path / "same.safetensors")) == pytest.approx(own, abs=1e-6)

    torch.manual_seed(1)  # another encoder, of another layout, explains something else
    other = CaptionModel(ModelConfig(encoder=EncoderConfig(arch="custom", layers=[4, "M", 8, "M"], batch_norm=True,
                                                           pool_size=1, fc_dims=[16]),
                                     preprocess=PreprocessConfig(image_size=20, resize=22), vocab_size=5))
    save_encoder(other.encoder, tmp_path / "other.safetensors", {"encoder": other.cfg.to_dict()["encoder"],
                                                                 "preprocess": other.cfg.to_dict()["preprocess"]})
    assert r2("--encoder", str(tmp_path / "other.safetensors"))["train"] != pytest.approx(own["train"], abs=1e-3)

    # the cached features are a linear map of the teacher's own, so seen at its own size it explains nearly all
    full = r2("--teacher-seen-at", "32")
    assert full["train"] > 0.95 and full["val"] > 0.9, full
    # seen at fewer pixels, the teacher gets other input (what it sees is resized back up to its own size)
    teacher, recs = tiny_teacher_model(), train_mod.read_records(
        CaptionData.from_args(parsers.train().parse_args([*data, "--output", "x"])))[1]
    same, small = (probe.teacher_features(teacher, recs, 32, 4, 0, seen_at=s) for s in (32, 4))
    assert torch.equal(same, probe.teacher_features(teacher, recs, 32, 4, 0))
    assert not torch.allclose(small, same, atol=1e-3)

    save_file(model.encoder.state_dict(), str(tmp_path / "bare.safetensors"))  # weights without a layout
    with pytest.raises(ValueError, match="no encoder layout"):
        r2("--encoder", str(tmp_path / "bare.safetensors"))
    with pytest.raises(SystemExit, match="no teacher features"):
        probe.main(probe.get_args_parser().parse_args([
            "--model", str(tmp_path / "model"), "--cache", str(tmp_path / "empty"), "--", *data]))
