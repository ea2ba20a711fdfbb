"""Checkpoint directories (config.json + vocab.json + model.safetensors) and the tokenizer saved with them."""
from __future__ import annotations

import json
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import captioner.checkpoint as ckpt
from captioner.checkpoint import CheckpointError, load_pretrained, read_config, save_pretrained
from captioner.config import ModelConfig
from captioner.generation import GenerationConfig
from captioner.model import CaptionModel
from captioner.tokenizer import (BOS_ID, EOS_ID, PAD_ID, SPECIALS, UNK, UNK_ID, Vocabulary, detokenize,
                                 tokenize)
from tests.conftest import TINY_WORDS, tiny_model_config


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_model(seed: int = 0, **decoder) -> CaptionModel:
    torch.manual_seed(seed)
    model = CaptionModel(tiny_model_config(**decoder)).eval()
    with torch.no_grad():
        model.decoder.layers[0].W_ih.weight.mul_(30)  # make captions depend visibly on the image
    return model


def images(n: int = 4) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(5))


# ----------------------------------------------------------------------------------------------- round trip

@pytest.mark.parametrize("cell", ["rnn", "lstm"])
def test_round_trip_is_exact(tmp_path, cell):
    model = tiny_model(cell=cell, num_layers=2)
    vocab = Vocabulary(TINY_WORDS)
    path = save_pretrained(model, vocab, tmp_path / "ckpt", metrics={"CIDEr-D": 0.5}, card="# tiny")
    assert {p.name for p in path.iterdir()} == {"config.json", "vocab.json", "model.safetensors", "metrics.json",
                                                "README.md"}
    loaded, vocab2 = load_pretrained(path)
    assert not loaded.training
    assert vocab2.itos == vocab.itos
    assert loaded.cfg == model.cfg
    sd, sd2 = model.state_dict(), loaded.state_dict()
    assert sd.keys() == sd2.keys()
    for k in sd:
        assert sd2[k].dtype == sd[k].dtype and torch.equal(sd[k], sd2[k]), k
    x = images()
    gen = GenerationConfig(beam_size=3, num_captions=2)
    a, b = model.generate(images=x, generation=gen), loaded.generate(images=x, generation=gen)
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.log_probs, b.log_probs)
    assert ckpt.read_metrics(path) == {"CIDEr-D": 0.5}


def test_config_json_is_readable_and_complete(tmp_path):
    model = tiny_model()
    path = save_pretrained(model, Vocabulary(TINY_WORDS), tmp_path / "ckpt")
    d = json.loads((path / "config.json").read_text())
    assert d["format"] == "captioner/1"
    assert d["vocab_size"] == 4 + len(TINY_WORDS)
    assert d["preprocess"]["image_size"] == 32 and len(d["preprocess"]["mean"]) == 3
    assert d["decoder"]["cell"] == "lstm" and d["encoder"]["fc_dims"] == [32]
    assert ModelConfig.from_dict(d) == model.cfg
    assert read_config(path) == model.cfg


def test_config_json_says_what_the_weights_were_trained_for(tmp_path):
    from tests.test_vqa_model import tiny_vqa_model

    assert tiny_model().cfg.trained_tasks == ["caption"] and tiny_vqa_model().cfg.trained_tasks == ["caption", "vqa"]
    # training's metrics name the tasks: config.json says them too, and that is what loads
    path = save_pretrained(tiny_vqa_model(), Vocabulary(TINY_WORDS), tmp_path / "vqa", metrics={"tasks": ["vqa"]})
    assert json.loads((path / "config.json").read_text())["tasks"] == ["vqa"]
    assert read_config(path).trained_tasks == ["vqa"]
    # a checkpoint from before config.json said it: metrics.json's tasks, else the heads it has
    d = json.loads((path / "config.json").read_text())
    del d["tasks"]
    (path / "config.json").write_text(json.dumps(d))
    assert read_config(path).trained_tasks == ["vqa"]
    (path / "metrics.json").unlink()
    assert read_config(path).trained_tasks == ["caption", "vqa"]
    for bad, msg in ((["caption", "speech"], "one or both"), ([], "one or both")):
        with pytest.raises(ValueError, match=msg):
            ModelConfig.from_dict({**tiny_model().cfg.to_dict(), "tasks": bad})
    with pytest.raises(ValueError, match="no VQA head"):
        ModelConfig.from_dict({**tiny_model().cfg.to_dict(), "tasks": ["vqa"]})
    d["tasks"] = ["speech"]
    (path / "config.json").write_text(json.dumps(d))
    with pytest.raises(CheckpointError, match="tasks must be"):
        read_config(path)


def test_fp16_storage_loads_as_float32(tmp_path):
    model = tiny_model()
    vocab = Vocabulary(TINY_WORDS)
    full = save_pretrained(model, vocab, tmp_path / "fp32")
    half = save_pretrained(model, vocab, tmp_path / "fp16", dtype=torch.float16)
    size32, size16 = (full / "model.safetensors").stat().st_size, (half / "model.safetensors").stat().st_size
    assert size16 < 0.6 * size32
    loaded, _ = load_pretrained(half)
    for k, t in model.state_dict().items():
        got = loaded.state_dict()[k]
        assert got.dtype == t.dtype, k  # float32 again (and num_batches_tracked still int64)
        torch.testing.assert_close(got, t, rtol=1e-3, atol=1e-4)
    x = images()
    torch.testing.assert_close(loaded.encode(x).fc, model.encode(x).fc, rtol=1e-2, atol=1e-3)


def test_loading_never_unpickles(tmp_path, monkeypatch):
    path = save_pretrained(tiny_model(), Vocabulary(TINY_WORDS), tmp_path / "ckpt")

    def refuse(*args, **kwargs):
        raise AssertionError("checkpoint loading must not unpickle")

    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "Unpickler", refuse)
    monkeypatch.setattr(torch, "load", refuse)
    model, vocab = load_pretrained(path)
    assert len(vocab) == model.cfg.vocab_size


def test_save_overwrites_an_existing_checkpoint(tmp_path):
    path = tmp_path / "ckpt"
    save_pretrained(tiny_model(seed=0), Vocabulary(TINY_WORDS), path, metrics={"epoch": 1})
    new = tiny_model(seed=1)
    save_pretrained(new, Vocabulary(TINY_WORDS), path)
    loaded, _ = load_pretrained(path)
    assert torch.equal(loaded.decoder.W_hy.weight, new.decoder.W_hy.weight)
    assert not (path / "metrics.json").exists()  # the whole directory was replaced, not merged
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]  # no temp or old directories left


def test_failed_save_leaves_previous_checkpoint_intact(tmp_path, monkeypatch):
    path = tmp_path / "ckpt"
    old = tiny_model(seed=0)
    save_pretrained(old, Vocabulary(TINY_WORDS), path, metrics={"epoch": 1})
    before = {p.name: p.read_bytes() for p in path.iterdir()}

    def crash(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"partial")  # half-written, then the disk fills up
        raise OSError("No space left on device")

    monkeypatch.setattr(ckpt, "save_file", crash)
    with pytest.raises(OSError, match="No space"):
        save_pretrained(tiny_model(seed=1), Vocabulary(TINY_WORDS), path)
    assert {p.name: p.read_bytes() for p in path.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]  # temp directory cleaned up
    monkeypatch.undo()
    loaded, _ = load_pretrained(path)
    assert torch.equal(loaded.decoder.W_hy.weight, old.decoder.W_hy.weight)


def test_failed_swap_puts_previous_checkpoint_back(tmp_path, monkeypatch):
    path = tmp_path / "ckpt"
    old = tiny_model(seed=0)
    save_pretrained(old, Vocabulary(TINY_WORDS), path)
    real_replace = ckpt.os.replace

    def replace(src, dst):
        if ".tmp-" in str(src):  # the new directory cannot be moved into place
            raise PermissionError("rename refused")
        real_replace(src, dst)

    monkeypatch.setattr(ckpt.os, "replace", replace)
    with pytest.raises(PermissionError):
        save_pretrained(tiny_model(seed=1), Vocabulary(TINY_WORDS), path)
    monkeypatch.undo()
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]
    loaded, _ = load_pretrained(path)
    assert torch.equal(loaded.decoder.W_hy.weight, old.decoder.W_hy.weight)


def test_checkpoint_directory_is_readable_by_others(tmp_path):
    # a service often runs as another user than the trainer: the directory must not stay mkdtemp's 0700
    path = save_pretrained(tiny_model(), Vocabulary(TINY_WORDS), tmp_path / "ckpt")
    assert path.stat().st_mode & 0o055 == 0o055


def test_save_rejects_vocab_size_mismatch(tmp_path):
    with pytest.raises(CheckpointError, match="vocab"):
        save_pretrained(tiny_model(), Vocabulary(TINY_WORDS[:-1]), tmp_path / "ckpt")
    assert not (tmp_path / "ckpt").exists()


# ------------------------------------------------------------------------------------------ bad checkpoints

@pytest.fixture
def saved(tmp_path) -> Path:
    return save_pretrained(tiny_model(), Vocabulary(TINY_WORDS), tmp_path / "ckpt")


def test_not_a_directory(tmp_path):
    with pytest.raises(CheckpointError, match="not a checkpoint directory"):
        load_pretrained(tmp_path / "nowhere")


@pytest.mark.parametrize("name", ["config.json", "vocab.json", "model.safetensors"])
def test_missing_file(saved, name):
    (saved / name).unlink()
    with pytest.raises(CheckpointError, match=f"missing {name}"):
        load_pretrained(saved)


@pytest.mark.parametrize("text,match", [
    ("{not json", "config.json"),
    ("[1, 2]", "config.json"),
    ('{"format": "captioner/9"}', "unsupported config format"),
    ('{"decoder": {"cell": "transformer"}}', "decoder.cell"),
    ('{"decoder": {"colour": "blue"}}', "unknown keys"),
])
def test_corrupt_config(saved, text, match):
    (saved / "config.json").write_text(text)
    with pytest.raises(CheckpointError, match=match):
        load_pretrained(saved)


@pytest.mark.parametrize("text", ["{not json", "[1, 2]", '{"format": "captioner-vocab/1", "itos": ["a", "b"]}'])
def test_corrupt_vocab(saved, text):
    (saved / "vocab.json").write_text(text)
    with pytest.raises(CheckpointError, match="vocab.json"):
        load_pretrained(saved)


def test_vocab_size_mismatch(saved):
    Vocabulary(TINY_WORDS + ["extra"]).save(saved / "vocab.json")
    with pytest.raises(CheckpointError, match="vocab.json has 19 entries, config.vocab_size is 18"):
        load_pretrained(saved)


def test_wrong_tensor_shapes(saved):
    state = tiny_model().state_dict()
    state["decoder.W_hy.weight"] = torch.zeros(7, 24)
    save_file({k: v.contiguous() for k, v in state.items()}, str(saved / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"decoder\.W_hy\.weight"):
        load_pretrained(saved)


def test_weights_of_another_architecture(saved):
    other = CaptionModel(tiny_model_config(cell="gru", num_layers=2))  # config.json says a 1-layer lstm
    save_file(other.state_dict(), str(saved / "model.safetensors"))
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_pretrained(saved)


def test_missing_and_unexpected_tensors(saved):
    state = tiny_model().state_dict()
    del state["decoder.W_hy.bias"]
    state["decoder.extra"] = torch.zeros(3)
    save_file(state, str(saved / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"missing \['decoder.W_hy.bias'\], unexpected \['decoder.extra'\]"):
        load_pretrained(saved)


@pytest.mark.parametrize("data", [b"", b"garbage" * 5, b"\x08\x00\x00\x00\x00\x00\x00\x00{\"a\":1}"])
def test_corrupt_weights_file(saved, data):
    (saved / "model.safetensors").write_bytes(data)
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_pretrained(saved)


def test_truncated_weights_file(saved):
    f = saved / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_pretrained(saved)


# ------------------------------------------------------------------------------------ tokenizer / vocabulary

def test_tokenize_lowercases_and_drops_punctuation():
    assert tokenize("A Dog, running on the GRASS!") == ["a", "dog", "running", "on", "the", "grass"]
    assert tokenize('Two "happy" kids (outside) ... ;') == ["two", "happy", "kids", "outside"]
    assert tokenize("A 3-year-old boy with 2 balls.") == ["a", "3-year-old", "boy", "with", "2", "balls"]
    assert tokenize("") == [] and tokenize(" . , !") == []


def test_clitics_split_and_rejoined():
    toks = tokenize("The dog's ball isn't red; they're here")
    assert toks == ["the", "dog", "'s", "ball", "is", "n't", "red", "they", "'re", "here"]
    assert detokenize(toks) == "the dog's ball isn't red they're here"
    assert detokenize(["a", "man", "'s", "hat"]) == "a man's hat"
    assert detokenize([]) == ""


def test_vocabulary_build_min_count_and_order():
    caps = ["a dog runs", "A dog sits", "a cat sits.", "a dog", "the bird"]
    vocab = Vocabulary.build(caps, min_count=2)
    assert vocab.itos[:4] == list(SPECIALS) == ["<pad>", "<bos>", "<eos>", "<unk>"]
    assert (PAD_ID, BOS_ID, EOS_ID, UNK_ID) == (0, 1, 2, 3)
    # most frequent first, ties alphabetical; words seen once are left to <unk>
    assert vocab.itos[4:] == ["a", "dog", "sits"]
    assert Vocabulary.build(caps, min_count=1).itos[4:] == ["a", "dog", "sits", "bird", "cat", "runs", "the"]
    assert len(Vocabulary.build(caps, min_count=100)) == 4


def test_vocabulary_ignores_specials_in_words_and_rejects_duplicates():
    assert Vocabulary(["<unk>", "a", "<pad>"]).itos == list(SPECIALS) + ["a"]
    with pytest.raises(ValueError, match="duplicate"):
        Vocabulary(["a", "b", "a"])


def test_encode_decode_round_trip_with_unk():
    vocab = Vocabulary(TINY_WORDS)
    ids = vocab.encode("A dog runs on the purple grass!")
    assert ids == [vocab.stoi["a"], vocab.stoi["dog"], vocab.stoi["runs"], vocab.stoi["on"], vocab.stoi["the"],
                   UNK_ID, vocab.stoi["grass"]]
    assert vocab.decode(ids) == f"a dog runs on the {UNK} grass"
    assert vocab.encode("a dog runs on the grass", max_length=3) == ids[:3]
    # decode stops at <eos>, skips <pad>/<bos>, accepts tensors, maps out-of-range ids to <unk>
    assert vocab.decode(torch.tensor([BOS_ID, ids[0], PAD_ID, ids[1], EOS_ID, ids[2]])) == "a dog"
    assert vocab.decode([ids[0], 999]) == f"a {UNK}"


def test_vocab_json_round_trip(tmp_path):
    vocab = Vocabulary.build(["a dog's ball", "a dog's bone", "the cat"], min_count=2)
    vocab.save(tmp_path / "vocab.json")
    d = json.loads((tmp_path / "vocab.json").read_text())
    assert d["format"] == "captioner-vocab/1" and d["min_count"] == 2 and d["itos"] == vocab.itos
    loaded = Vocabulary.load(tmp_path / "vocab.json")
    assert loaded.itos == vocab.itos and loaded.stoi == vocab.stoi and loaded.min_count == 2


@pytest.mark.parametrize("text,match", [
    ("{oops", "Expecting"),
    ("[1, 2, 3]", "not a captioner vocab.json"),
    ('"just a string"', "not a captioner vocab.json"),
    ('{"itos": ["<pad>", "<bos>", "<eos>", "<unk>"]}', "not a captioner vocab.json"),
    ('{"format": "captioner-vocab/1", "itos": ["<bos>", "<pad>", "<eos>", "<unk>", "a"]}', "must start with"),
    ('{"format": "captioner-vocab/1", "itos": ["<pad>", "<bos>", "<eos>", "<unk>", "a", 7]}', "strings"),
    ('{"format": "captioner-vocab/1", "itos": ["<pad>", "<bos>", "<eos>", "<unk>", "a", "a"]}', "duplicate"),
])
def test_bad_vocab_json(tmp_path, text, match):
    (tmp_path / "vocab.json").write_text(text)
    with pytest.raises(ValueError, match=match):
        Vocabulary.load(tmp_path / "vocab.json")


def _strings(obj):
    if isinstance(obj, dict):
        for v in obj.values():
            yield from _strings(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from _strings(v)
    elif isinstance(obj, str):
        yield obj


def test_shipped_files_hold_no_absolute_path():
    """metrics.json (served by /v1/models) and the model card must not show the build machine's folders."""
    import os
    import re

    root = Path(__file__).resolve().parents[1]
    shipped = [*root.glob("captioner/models/**/*.json"), *root.glob("captioner/models/**/README.md")]
    assert shipped
    for f in shipped:
        if f.suffix == ".json":
            bad = [s for s in _strings(json.loads(f.read_text())) if os.path.isabs(s)]
        else:
            bad = re.findall(r"(?<![\w.:/])/(?:work|home|root|tmp|Users|mnt|data)/[^\s`)\]]*", f.read_text())
        assert not bad, (f, bad[:5])


def test_saved_metrics_record_portable_paths(tmp_path, monkeypatch):
    from captioner.fileio import portable_path

    monkeypatch.chdir(tmp_path)
    assert portable_path(str(tmp_path / "runs" / "x")) == "runs/x"  # under the working directory: relative
    assert portable_path("/srv/datasets/flickr8k/images") == "flickr8k/images"
    assert portable_path("runs/x") == "runs/x" and portable_path("a dog") == "a dog"


def test_export_records_the_domain_line(tiny_checkpoint, tmp_path):
    import json

    from captioner.cli import main as cli

    out = tmp_path / "exported"
    assert cli(["export", "--checkpoint", str(tiny_checkpoint), "--out", str(out), "--domain", "tiny test shapes."]) == 0
    assert json.loads((out / "metrics.json").read_text())["domain"] == "tiny test shapes."


def test_loading_and_captioning_import_neither_torchvision_nor_dynamo():
    """Start-up cost: torchvision (1 s) and torch._dynamo (1.5 s, pulled in by weight fills on the meta device of
    the shape check) would be paid by every CLI run, service start and Ray actor."""
    code = ("import sys; from captioner.api import Captioner; c = Captioner.from_pretrained("
            "'captioner/models/default'); c.caption(['service/static/samples/elephant.jpg']); "
            "print(sorted(m for m in ('torchvision', 'torch._dynamo') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[1])
    assert out.stdout.strip() == "[]"
