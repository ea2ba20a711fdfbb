"""The Python API: Captioner.from_pretrained(path).caption(images) on every input form, and bad inputs."""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import captioner.api as api
import captioner.runtime as runtime
from captioner import Caption, Captioner
from captioner.checkpoint import save_pretrained
from captioner.model import CaptionModel
from captioner.preprocess import ImageError, eval_transform
from captioner.tokenizer import BOS_ID, EOS_ID, PAD_ID, Vocabulary
from tests.conftest import TINY_WORDS, tiny_model_config


pytestmark = pytest.mark.usefixtures("one_thread")


CAPTIONS = ["a dog runs on the grass", "a cat in the water", "two people on the grass", "a man in red",
            "a red ball in the water", "the dog runs in the water", "two men on a red ball", "a man runs"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, list[Path]]:
    """A tiny checkpoint trained (through the API's own preprocessing) to give each of 8 JPEGs its own caption:
    a random tiny model says the same thing for every image, which would make the checks below vacuous."""
    folder = tmp_path_factory.mktemp("trained")
    rng = np.random.default_rng(0)
    paths = []
    for i in range(len(CAPTIONS)):
        paths.append(folder / f"img{i}.jpg")
        Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(paths[-1], quality=90)
    torch.manual_seed(0)
    cfg = tiny_model_config("gru", dropout=0.0)
    cfg.encoder.dropout = 0.0
    model = CaptionModel(cfg)
    vocab = Vocabulary(TINY_WORDS)
    tf = eval_transform(cfg.preprocess)
    images = torch.stack([tf(Image.open(p).convert("RGB")) for p in paths])
    ids = [vocab.encode(c) for c in CAPTIONS]
    T = max(map(len, ids)) + 1
    inp = torch.tensor([[BOS_ID] + s + [PAD_ID] * (T - 1 - len(s)) for s in ids])
    tgt = torch.tensor([s + [EOS_ID] + [PAD_ID] * (T - 1 - len(s)) for s in ids])
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    for _ in range(200):
        logits = model(images, inp)
        loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), tgt.reshape(-1), ignore_index=PAD_ID)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    torch.set_num_threads(n)
    return save_pretrained(model.eval(), vocab, folder / "ckpt"), paths


@pytest.fixture
def cap(trained) -> Captioner:
    return Captioner.from_pretrained(trained[0], device="cpu")


def test_random_tiny_checkpoint_loads_and_captions(tiny_checkpoint, make_images):
    c = Captioner.from_pretrained(tiny_checkpoint, device="cpu")
    out = c.caption(make_images(2), num_captions=2)
    assert len(out) == 2 and all(len(o) == 2 and o[0].score >= o[1].score for o in out)


def test_trained_images_get_their_captions(cap, trained):
    # end to end through the API's preprocessing: what the model was trained on comes back
    out = cap.caption(trained[1], beam_size=3)
    assert sum(o[0].text == c for o, c in zip(out, CAPTIONS)) >= 7, [o[0].text for o in out]


def as_tuples(caps: list[Caption]) -> list[tuple[str, float]]:
    return [(c.text, round(c.log_prob, 4)) for c in caps]


def test_single_image_forms_agree(cap, trained):
    path = trained[1][0]
    pil = Image.open(path)
    uint8 = torch.from_numpy(np.array(pil.convert("RGB"))).permute(2, 0, 1).contiguous()  # (3, H, W) uint8
    floats = uint8.float() / 255  # (3, H, W) in 0..1, not the model's size: preprocessed like an image
    ready = eval_transform(cap.cfg.preprocess)(pil.convert("RGB"))  # (3, 32, 32) normalised: used as is
    forms = {"str": str(path), "path": path, "bytes": path.read_bytes(), "bytearray": bytearray(path.read_bytes()),
             "pil": pil, "uint8": uint8, "float01": floats, "preprocessed": ready}
    results = {name: cap.caption(x) for name, x in forms.items()}
    ref = results["path"]
    assert isinstance(ref, list) and len(ref) == 1 and isinstance(ref[0], Caption)
    assert ref[0].text and ref[0].log_prob < 0 and ref[0].score == pytest.approx(ref[0].log_prob)
    for name, r in results.items():
        assert as_tuples(r) == as_tuples(ref), name
    assert ref[0].text == CAPTIONS[0]


def test_list_gives_one_list_per_image(cap, trained):
    paths = trained[1][:5]
    out = cap.caption(paths, beam_size=3)
    assert len(out) == 5 and all(isinstance(o, list) and len(o) == 1 for o in out)
    # batching does not change results: same captions one by one and in small batches
    one_by_one = [cap.caption(p)[0] for p in paths]
    assert [o[0].text for o in out] == [c.text for c in one_by_one]
    small = cap.caption(paths, batch_size=2)
    assert [o[0].text for o in small] == [o[0].text for o in out]
    for a, b in zip(out, one_by_one):
        assert a[0].log_prob == pytest.approx(b.log_prob, abs=1e-4)
    assert len({o[0].text for o in out}) == 5
    assert cap.caption([]) == []
    assert len(cap.caption((paths[0],))) == 1  # a tuple is a list of images too


def test_num_captions_sorted_by_score(cap, trained):
    paths = trained[1][:3]
    out = cap.caption(paths, beam_size=3, num_captions=2)
    for caps in out:
        assert len(caps) == 2
        assert caps[0].score >= caps[1].score
        assert caps[0].text != caps[1].text
        assert caps[0].to_dict().keys() == {"caption", "log_prob", "score"}
    single = cap.caption(paths[0], beam_size=3, num_captions=3, length_penalty=1.0)
    assert len(single) == 3 and [c.score for c in single] == sorted((c.score for c in single), reverse=True)
    # with length normalisation the score is log_prob / (words + 1)
    for c in single:
        assert c.score == pytest.approx(c.log_prob / (len(c.text.split()) + 1), rel=1e-5)


def test_generation_options_pass_through(cap, trained):
    path = trained[1][0]
    greedy = cap.caption(path, beam_size=1)
    top1 = cap.caption(path, sample=True, top_k=1, generator=torch.Generator().manual_seed(0))
    assert as_tuples(greedy) == as_tuples(top1)
    short = cap.caption(path, beam_size=3, max_length=2)
    assert len(short[0].text.split()) <= 2
    with pytest.raises(ValueError, match="temperature"):
        cap.caption(path, sample=True, temperature=0)


def test_caption_batch_and_features(cap, trained):
    paths = trained[1][:2]
    batch = cap.preprocess(paths)
    assert batch.shape == (2, 3, 32, 32)
    f = cap.encode(batch)
    assert f.fc.shape == (2, cap.cfg.encoder.feature_dim) and f.att is None
    a = cap.caption_batch(batch, beam_size=2)
    b = cap.caption_batch(features=f, beam_size=2)
    assert [x[0].text for x in a] == [x[0].text for x in b] == [c[0].text for c in cap.caption(paths, beam_size=2)]


# ------------------------------------------------------------------------------------------------ bad input

def test_missing_path(cap, tmp_path):
    with pytest.raises(ImageError, match="no such file"):
        cap.caption(tmp_path / "missing.jpg")
    with pytest.raises(ImageError, match="not a regular file"):
        cap.caption(str(tmp_path))  # a directory is not an image file


def test_corrupt_bytes(cap, make_images):
    with pytest.raises(ImageError, match="not a recognised image format"):
        cap.caption(b"\x00\x01definitely not an image")
    with pytest.raises(ImageError, match="empty"):
        cap.caption(b"")
    data = make_images(1, size=(200, 160))[0].read_bytes()
    with pytest.raises(ImageError, match="corrupt or truncated"):
        cap.caption(data[: len(data) // 2])


def test_corrupt_file_and_text_file(cap, tmp_path, make_images):
    text = tmp_path / "notes.jpg"
    text.write_text("this is a text file, not a JPEG\n")
    with pytest.raises(ImageError, match=r"notes\.jpg: not a recognised image format"):
        cap.caption(text)
    data = make_images(1, size=(200, 160))[0].read_bytes()
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageError, match=r"broken\.jpg: corrupt or truncated"):
        cap.caption(broken)
    # one bad image in a list names that image
    good = make_images(1)[0]
    with pytest.raises(ImageError, match="notes.jpg"):
        cap.caption([good, text])


@pytest.mark.parametrize("shape", [(32, 32), (1, 3, 32, 32), (4, 32, 32), (1, 32, 32)])
def test_wrong_tensor_shape(cap, shape):
    with pytest.raises(ImageError, match=r"must be \(3, H, W\)"):
        cap.caption(torch.rand(shape))


def test_unsupported_input_type(cap):
    with pytest.raises(ImageError, match="unsupported image input type int"):
        cap.caption(42)


def test_image_error_is_a_value_error():
    assert issubclass(ImageError, ValueError)


def test_grayscale_and_rgba_images_are_converted(cap, tmp_path):
    rng = np.random.default_rng(0)
    gray = tmp_path / "gray.png"
    Image.fromarray(rng.integers(0, 256, (40, 48), dtype=np.uint8), "L").save(gray)
    rgba = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (40, 48, 4), dtype=np.uint8), "RGBA").save(rgba, format="PNG")
    for x in (gray, rgba.getvalue()):
        assert len(cap.caption(x)) == 1


# -------------------------------------------------------------------------------------------------- device

def test_default_device_prefers_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert runtime.default_device() == torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert runtime.default_device() == torch.device("cpu")


def test_from_pretrained_uses_default_device(tiny_checkpoint, monkeypatch):
    seen = []
    real = api.load_pretrained

    def spy(path, device="cpu"):
        seen.append(device)
        return real(path, "cpu")  # no GPU here: record the choice, load on the CPU

    monkeypatch.setattr(api, "load_pretrained", spy)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    Captioner.from_pretrained(tiny_checkpoint)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    c = Captioner.from_pretrained(tiny_checkpoint)
    Captioner.from_pretrained(tiny_checkpoint, device="cpu")
    assert seen == [torch.device("cuda"), torch.device("cpu"), torch.device("cpu")]
    assert c.device == torch.device("cpu") and c.path == tiny_checkpoint and c.metrics is None


def test_bf16_precision_on_cpu(tiny_checkpoint, make_images):
    cap = Captioner.from_pretrained(tiny_checkpoint, device="cpu", precision="bf16")
    out = cap.caption(make_images(2))
    assert len(out) == 2 and all(isinstance(c[0].log_prob, float) for c in out)
    with pytest.raises(ValueError, match="precision"):
        Captioner.from_pretrained(tiny_checkpoint, device="cpu", precision="fp8").caption(make_images(1)[0])


@pytest.mark.parametrize("inject", ["every", "attention"])
def test_loaded_models_hold_their_decoder_weights_in_the_autocast_dtype_and_caption_bit_identically(
        tmp_path, make_images, inject):
    """In bf16, from_pretrained stores the caption decoder's Linear weights in bf16 (autocast would cast them again
    at every call in inference mode: W_hy at every decoding step): the same values autocast computes from the
    float32 weights, so captions, log-probabilities and attention maps equal those of float32 weights under
    autocast, bit for bit. The encoder and the embeddings stay float32."""
    import torch.nn as nn

    from captioner.checkpoint import save_pretrained
    from captioner.generation import GenerationConfig
    from captioner.model import CaptionModel
    from captioner.tokenizer import Vocabulary
    from conftest import TINY_WORDS, tiny_model_config

    torch.manual_seed(0)
    save_pretrained(CaptionModel(tiny_model_config(inject=inject)), Vocabulary(TINY_WORDS), tmp_path / "m")
    cast = Captioner.from_pretrained(tmp_path / "m", device="cpu", precision="bf16")
    ref = Captioner.from_pretrained(tmp_path / "m", device="cpu", precision="fp32")
    assert {p.dtype for p in ref.model.parameters()} == {torch.float32}
    ref.precision = "bf16"  # autocast on the float32 weights, as before
    linears = [m for m in cast.model.decoder.modules() if isinstance(m, nn.Linear)]
    assert cast.model.decoder.W_hy in linears and {m.weight.dtype for m in linears} == {torch.bfloat16}
    if inject == "attention":
        assert cast.model.decoder.attend.W_a in linears
    assert {p.dtype for p in cast.model.encoder.parameters()} == {torch.float32}
    assert cast.model.decoder.embed.weight.dtype == torch.float32
    x = cast.preprocess(make_images(3))
    with torch.inference_mode():
        g = GenerationConfig(beam_size=3, num_captions=3, attention=inject == "attention")
        a, b = cast.caption_batch(x, generation=g), ref.caption_batch(x, generation=g)
    assert [[(c.text, c.log_prob, c.score, c.attention) for c in caps] for caps in a] == \
        [[(c.text, c.log_prob, c.score, c.attention) for c in caps] for caps in b]


def test_user_facing_messages_and_repr(tiny_checkpoint):
    from captioner.api import Captioner

    cap = Captioner.from_pretrained(tiny_checkpoint, "cpu")
    img = torch.zeros(3, 32, 32, dtype=torch.uint8)
    with pytest.raises(ValueError, match=r"num_captions \(5\) must be at most beam_size \(3\).*use beam_size 5"):
        cap.caption(img, num_captions=5)
    assert len(cap.caption(img, num_captions=5, sample=True)) == 5
    r = repr(cap)
    assert r.startswith("Captioner(") and "tasks=['caption']" in r and "device=cpu" in r and f"precision={cap.precision}" in r


def test_auto_precision_follows_the_hardware(monkeypatch):
    from captioner import runtime
    from captioner.cli import parsers

    assert parsers.PRECISIONS == runtime.PRECISIONS  # one vocabulary for every command
    monkeypatch.setattr(runtime, "native_bf16", lambda d: True)
    assert runtime.resolve_precision("auto", "cpu") == "bf16" and runtime.resolve_precision("auto", "cuda") == "bf16"
    monkeypatch.setattr(runtime, "native_bf16", lambda d: False)
    assert runtime.resolve_precision("auto", "cpu") == "fp32" and runtime.resolve_precision("auto", "cuda") == "fp16"
    assert runtime.resolve_precision("off", "cpu") == "fp32" and runtime.resolve_precision("fp16", "cpu") == "fp16"
    with pytest.raises(ValueError, match="precision must be one of"):
        runtime.resolve_precision("fp64", "cpu")


def test_auto_picks_fp16_on_gpus_that_only_emulate_bf16(monkeypatch):
    from captioner import runtime

    monkeypatch.setattr(torch.version, "hip", None)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: (7, 0))  # V100: bf16 only emulated
    assert runtime.resolve_precision("auto", "cuda") == "fp16"
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: (8, 0))  # A100
    assert runtime.resolve_precision("auto", "cuda") == "bf16"


def test_loaded_models_run_with_batch_norm_folded_and_caption_alike():
    """from_pretrained folds each BatchNorm into its conv (one pass less per activation, bench/encoder.py
    --fold-bn): the shipped model's v moves by fp32 rounding only and its captions of the sample photos stay."""
    import torch.nn as nn

    from captioner.generation import GenerationConfig

    photos = sorted((Path(__file__).resolve().parents[1] / "service" / "static" / "samples").glob("*.jpg"))
    plain = Captioner.from_pretrained(device="cpu", precision="fp32", fold_batch_norm=False)
    folded = Captioner.from_pretrained(device="cpu", precision="fp32")
    assert any(isinstance(m, nn.BatchNorm2d) for m in plain.model.encoder.features)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.model.encoder.features)
    x = plain.preprocess(photos)
    torch.testing.assert_close(folded.encode(x).fc, plain.encode(x).fc, rtol=1e-4, atol=1e-5)
    g = GenerationConfig(beam_size=3)
    assert [c[0].text for c in folded.caption_batch(x, generation=g)] == \
        [c[0].text for c in plain.caption_batch(x, generation=g)]
