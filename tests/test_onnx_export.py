"""`captioner export --format onnx`: the encoder and the decoder's single step as ONNX graphs that ONNX Runtime runs
to the same features and the same greedy captions as torch (tiny models of each cell and injection, and the
shipped model on real photos)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("onnxscript", reason="torch.onnx's exporter needs onnxscript: pip install -e '.[onnx]'")
ort = pytest.importorskip("onnxruntime", reason="onnxruntime is not installed: pip install -e '.[onnx]'")

from captioner.api import Captioner  # noqa: E402
from captioner.checkpoint import save_pretrained  # noqa: E402
from captioner.cli import main as cli  # noqa: E402
from captioner.generation import GenerationConfig  # noqa: E402
from captioner.model import CaptionModel  # noqa: E402
from captioner.onnx_export import export_onnx, greedy_search  # noqa: E402
from captioner.tokenizer import EOS_ID, PAD_ID, Vocabulary  # noqa: E402
from tests.conftest import TINY_WORDS, tiny_model_config  # noqa: E402

SAMPLES = Path(__file__).resolve().parents[1] / "service" / "static" / "samples"
pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(cell: str, inject: str, layers: int, seed: int = 0) -> CaptionModel:
    torch.manual_seed(seed)
    model = CaptionModel(tiny_model_config(cell, inject=inject, num_layers=layers)).eval()
    with torch.no_grad():  # captions that depend on the image (seeds chosen so that the 5 images differ)
        model.decoder.layers[0].W_ih.weight.mul_(30)
        model.decoder.W_hy.weight.mul_(5)
    return model


def torch_greedy(model: CaptionModel, x: torch.Tensor) -> list[list[int]]:
    with torch.no_grad():
        toks = model.generate(images=x, generation=GenerationConfig(beam_size=1)).tokens[:, 0].tolist()
    return [[t for t in row if t not in (EOS_ID, PAD_ID)] for row in toks]


@pytest.mark.parametrize("cell,inject,layers,seed", [("lstm", "every", 1, 0), ("gru", "first", 2, 0),
                                                     ("rnn", "every", 2, 3)])
def test_onnx_runtime_gives_torchs_features_and_greedy_captions(tmp_path, cell, inject, layers, seed):
    model, vocab = tiny(cell, inject, layers, seed), Vocabulary(TINY_WORDS)
    out = export_onnx(model, vocab, tmp_path / "onnx")
    assert {p.name for p in out.iterdir()} == {"encoder.onnx", "decoder_start.onnx", "decoder_step.onnx",
                                               "config.json", "vocab.json", "decoding.json"}
    spec = json.loads((out / "decoding.json").read_text())
    assert spec["image_every_step"] == (inject == "every") and spec["state"] == (["h", "c"] if cell == "lstm" else ["h"])
    x = torch.randn(5, 3, 32, 32, generator=torch.Generator().manual_seed(0))  # a batch size the export never saw
    enc = ort.InferenceSession(str(out / "encoder.onnx"), providers=["CPUExecutionProvider"])
    fc = enc.run(None, {"pixels": x.numpy()})[0]
    np.testing.assert_allclose(fc, model.encode(x).fc.detach().numpy(), rtol=1e-4, atol=1e-4)
    want = torch_greedy(model, x)
    assert len({tuple(w) for w in want}) > 1  # the images give different captions: the image term really counts
    assert greedy_search(out, x.numpy()) == want


def test_export_command_writes_onnx_beside_the_models_files_and_refuses_attention(tmp_path, tiny_checkpoint, capsys):
    out = tmp_path / "onnx"
    assert cli(["export", "--checkpoint", str(tiny_checkpoint), "--out", str(out), "--format", "onnx",
                "--name", "tiny-onnx"]) == 0
    assert "encoder.onnx" in capsys.readouterr().out
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["name"] == "tiny-onnx" and cfg["preprocess"] == json.loads((tiny_checkpoint / "config.json").read_text())["preprocess"]
    assert (out / "vocab.json").read_text() == (tiny_checkpoint / "vocab.json").read_text()
    att = save_pretrained(tiny("gru", "attention", 1), Vocabulary(TINY_WORDS), tmp_path / "att")
    assert cli(["export", "--checkpoint", str(att), "--out", str(tmp_path / "att-onnx"), "--format", "onnx"]) == 2
    assert "attention" in capsys.readouterr().err and not (tmp_path / "att-onnx").exists()


@pytest.mark.slow
def test_shipped_model_captions_real_photos_alike_in_onnx_runtime(tmp_path):
    cap = Captioner.from_pretrained(device="cpu", precision="fp32")
    out = export_onnx(cap.model, cap.vocab, tmp_path / "onnx")
    x = cap.preprocess(sorted(SAMPLES.glob("*.jpg")))
    want = [c[0].text for c in cap.caption_batch(x, generation=GenerationConfig(beam_size=1))]
    assert [cap.vocab.decode(t) for t in greedy_search(out, x.numpy())] == want


def test_onnxruntime_encoder_backend_gives_torchs_features_and_refuses_what_it_cannot_run(tiny_checkpoint, tmp_path):
    from captioner.api import ENCODER_BACKENDS
    from captioner.cli import parsers

    assert parsers.ENCODER_BACKENDS == ENCODER_BACKENDS  # one vocabulary for the API and the command
    ref = Captioner.from_pretrained(tiny_checkpoint, device="cpu", precision="fp32")
    cap = Captioner.from_pretrained(tiny_checkpoint, device="cpu", precision="fp32", encoder_backend="onnxruntime",
                                    encode_chunk=2)
    x = torch.randn(5, 3, 32, 32, generator=torch.Generator().manual_seed(0))  # chunks of 2, 2 and 1
    got, want = cap.encode(x), ref.encode(x)
    assert got.fc.dtype == torch.float32 and got.fc.shape == want.fc.shape
    torch.testing.assert_close(got.fc, want.fc, rtol=1e-4, atol=1e-4)
    assert cap.encoder_backend == "onnxruntime" and ref.encoder_backend == "torch"
    with pytest.raises(ValueError, match="encoder backend must be one of"):
        Captioner.from_pretrained(tiny_checkpoint, device="cpu", encoder_backend="tensorrt")
    att = save_pretrained(tiny("gru", "attention", 1), Vocabulary(TINY_WORDS), tmp_path / "att")
    with pytest.raises(ValueError, match="attends over the grid"):
        Captioner.from_pretrained(att, device="cpu", encoder_backend="onnxruntime")


def test_caption_command_runs_the_encoder_in_onnxruntime_and_refuses_ray(tiny_checkpoint, tmp_path, capsys):
    import shutil

    for im in sorted(SAMPLES.glob("*.jpg"))[:3]:
        shutil.copy(im, tmp_path / im.name)
    outs = {}
    for backend in ("torch", "onnxruntime"):
        out = tmp_path / f"{backend}.json"
        assert cli(["caption", str(tmp_path), "--checkpoint", str(tiny_checkpoint), "--device", "cpu",
                    "--encoder-backend", backend, "--out", str(out), "--no-progress"]) == 0
        outs[backend] = {r["image_id"]: r["caption"] for r in json.loads(out.read_text())}
    assert len(outs["torch"]) == 3 and outs["onnxruntime"] == outs["torch"]
    capsys.readouterr()
    assert cli(["caption", str(tmp_path), "--checkpoint", str(tiny_checkpoint), "--engine", "ray",
                "--encoder-backend", "onnxruntime", "--out", str(tmp_path / "r.json")]) == 2
    assert "--engine local" in capsys.readouterr().err


@pytest.mark.slow
def test_shipped_model_beam_captions_equal_with_the_onnxruntime_encoder():
    images = sorted(SAMPLES.glob("*.jpg"))
    want = [c[0] for c in Captioner.from_pretrained(device="cpu", precision="fp32").caption(images)]
    cap = Captioner.from_pretrained(device="cpu", precision="fp32", encoder_backend="onnxruntime")
    got = [c[0] for c in cap.caption(images)]
    assert [c.text for c in got] == [c.text for c in want]  # log-probabilities within float rounding
    np.testing.assert_allclose([c.log_prob for c in got], [c.log_prob for c in want], rtol=1e-5)
