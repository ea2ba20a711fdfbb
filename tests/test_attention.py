"""Soft attention (decoder.inject = 'attention'): the formula, alpha, searches, training, the API and the service."""
from __future__ import annotations

import io
import json

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from captioner.api import Captioner
from captioner.checkpoint import load_pretrained, save_pretrained
from captioner.config import ModelConfig
from captioner.decoding import AttentionUnavailableError, beam_search, greedy_search, sample
from captioner.features import ImageFeatures
from captioner.generation import GenerationConfig
from captioner.model import CaptionModel
from captioner.tokenizer import BOS_ID, Vocabulary
from conftest import TINY_WORDS, tiny_model_config

CELLS = [(c, n) for c in ("rnn", "gru", "lstm") for n in (1, 2)]


def att_model(cell: str = "lstm", num_layers: int = 1, seed: int = 0, **kw) -> CaptionModel:
    torch.manual_seed(seed)
    model = CaptionModel(tiny_model_config(cell, inject="attention", num_layers=num_layers, dropout=0.0, **kw)).eval()
    with torch.no_grad():  # sharper attention and a stronger image term than random init gives
        model.decoder.attend.w.weight.mul_(20)
        model.decoder.layers[0].W_ih.weight.mul_(10)
    return model


def test_att_is_the_conv_stack_before_its_last_pool_and_fc_finishes_it():
    model = att_model()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        f = model.encode(x)
        assert f.att.shape == (3, 64, 16) and f.fc.shape == (3, 32)
        assert model.cfg.feature_shapes == {"fc": (32,), "att": (64, 16)} and model.cfg.grid_size == 8
        grid = model.encoder.grid(x)  # (3, 16, 8, 8)
        assert torch.equal(f.att, grid.flatten(2).transpose(1, 2))  # cells in row-major order
        assert torch.allclose(f.fc, model.encoder(x), atol=1e-6)  # v, as an FC model's encoder gives it
    # the default model's compact encoder at 112 px: 7 x 7 cells of 256 channels
    cfg = ModelConfig.from_json((Captioner.from_pretrained().path / "config.json").read_text())
    cfg.decoder.inject = "attention"
    assert cfg.feature_shapes == {"fc": (512,), "att": (49, 256)}


def test_rnn_step_is_the_written_formula():
    model = att_model("rnn", attention_gate=False)
    dec = model.decoder
    a = torch.randn(2, 64, 16).relu()  # a_i (2, P, C)
    tok = torch.tensor([5, 7])
    h = torch.randn(1, 2, dec.cfg.hidden_dim)
    with torch.no_grad():
        logits, (h1,), alpha = dec.step(tok, (h,), dec.precompute(ImageFeatures(torch.zeros(2, 32), a)), 3)
        at, L = dec.attend, dec.layers[0]
        e = (torch.tanh(a @ at.W_a.weight.T + at.W_a.bias + (h[0] @ at.U_a.weight.T)[:, None]) @ at.w.weight.T)[..., 0]
        want_alpha = e.softmax(-1)
        z = (want_alpha[..., None] * a).sum(1)
        x = dec.embed(tok)
        want_h = torch.tanh(x @ L.W_xh.weight.T + L.W_xh.bias + h[0] @ L.W_hh.weight.T + z @ L.W_ih.weight.T)
    assert torch.allclose(alpha, want_alpha, atol=1e-5)
    assert torch.allclose(h1[0], want_h, atol=1e-5)
    assert torch.allclose(logits, dec.W_hy(want_h), atol=1e-5)


def test_gate_scales_the_context():
    model = att_model("rnn")
    dec = model.decoder
    a, h = torch.randn(2, 64, 16), torch.randn(2, dec.cfg.hidden_dim)
    with torch.no_grad():
        z, alpha = dec.attend(a, dec.attend.W_a(a), h)
        beta = torch.sigmoid(dec.attend.f_beta(h))
        plain = torch.bmm(alpha[:, None], a)[:, 0]
    assert torch.allclose(z, beta * plain, atol=1e-6)


@pytest.mark.parametrize("cell,num_layers", CELLS)
def test_alpha_sums_to_one_and_step_equals_forward(cell, num_layers):
    model = att_model(cell, num_layers)
    B, T = 3, 6
    features = model.encode(torch.randn(B, 3, 32, 32))
    tokens = torch.randint(4, model.cfg.vocab_size, (B, T))
    tokens[:, 0] = BOS_ID
    dec = model.decoder
    with torch.no_grad():
        logits, alpha = dec(features, tokens, return_attention=True)
        assert logits.shape == (B, T, model.cfg.vocab_size) and alpha.shape == (B, T, 64)
        assert torch.allclose(alpha.sum(-1), torch.ones(B, T), atol=1e-5)
        assert (alpha >= 0).all() and alpha.std() > 0  # not uniform: it looks somewhere
        state, pre, steps, alphas = dec.init_state(B), dec.precompute(features), [], []
        for t in range(T):
            out, state, a = dec.step(tokens[:, t], state, pre, t)
            steps.append(out)
            alphas.append(a)
    assert (torch.stack(steps, 1) - logits).abs().max() < 1e-5
    assert (torch.stack(alphas, 1) - alpha).abs().max() < 1e-6


@pytest.mark.parametrize("cell", ["gru", "lstm"])
def test_batched_beam_equals_per_image_with_attention(cell):
    model = att_model(cell, seed=1)
    features = model.encode(torch.randn(4, 3, 32, 32))
    gen = GenerationConfig(beam_size=3, num_captions=2, attention=True)
    batched = beam_search(model.decoder, features, gen, 8)
    assert batched.attention.shape[:2] == (4, 2) and batched.attention.shape[-1] == 64
    for i in range(4):
        one = beam_search(model.decoder, features[i:i + 1], gen, 8)
        T = one.tokens.size(-1)
        assert torch.equal(one.tokens[0], batched.tokens[i, :, :T])
        assert torch.allclose(one.attention[0], batched.attention[i, :, :T], atol=1e-5)
    # steps up to <eos> sum to 1, later ones are 0
    steps = batched.attention.sum(-1)
    for i in range(4):
        for j in range(2):
            n = int(batched.lengths[i, j])
            assert torch.allclose(steps[i, j, :n], torch.ones(n), atol=1e-5) and (steps[i, j, n:] == 0).all()


def test_beam_one_equals_greedy_and_sampling_records_attention():
    model = att_model("lstm", seed=2)
    features = model.encode(torch.randn(3, 3, 32, 32))
    g = greedy_search(model.decoder, features, 8, attention=True)
    b = beam_search(model.decoder, features, GenerationConfig(beam_size=1, attention=True), 8)
    assert torch.equal(g.tokens, b.tokens) and torch.allclose(g.attention, b.attention, atol=1e-6)
    s = sample(model.decoder, features, GenerationConfig(sample=True, num_captions=4, attention=True), 8,
               torch.Generator().manual_seed(0))
    assert s.attention.shape[:2] == (3, 4)
    # the maps follow their samples when those are sorted by likelihood: re-decode each sample by teacher forcing
    for i in range(3):
        for j in range(4):
            n = int(s.lengths[i, j])
            toks = torch.cat([torch.tensor([BOS_ID]), s.tokens[i, j, :n - 1]])[None]
            _, alpha = model.decoder(features[i:i + 1], toks, return_attention=True)
            assert torch.allclose(alpha[0], s.attention[i, j, :n], atol=1e-5)


def test_fc_models_refuse_attention_maps(tiny_checkpoint):
    model, _ = load_pretrained(tiny_checkpoint, "cpu")
    v = model.encode(torch.randn(1, 3, 32, 32))
    with pytest.raises(AttentionUnavailableError, match="inject attention"):
        model.generate(features=v, generation=GenerationConfig(attention=True))
    cap = Captioner.from_pretrained(tiny_checkpoint, device="cpu")
    assert not cap.has_attention
    with pytest.raises(AttentionUnavailableError):
        cap.caption(Image.new("RGB", (40, 40)), attention=True)


def test_config_round_trip_and_fc_config_unchanged(tmp_path):
    cfg = tiny_model_config("gru", inject="attention", attention_dim=12, attention_gate=False)
    d = cfg.to_dict()
    assert d["decoder"]["attention_dim"] == 12 and ModelConfig.from_dict(d) == cfg
    fc = tiny_model_config("gru").to_dict()
    assert "attention_dim" not in fc["decoder"] and "attention_gate" not in fc["decoder"]
    with pytest.raises(ValueError, match="ensembles"):
        tiny_model_config("gru", inject="attention", members=2)


def test_captioner_round_trip_gives_per_word_maps(tmp_path):
    model = att_model("lstm", seed=3)
    path = save_pretrained(model, Vocabulary(TINY_WORDS), tmp_path / "att")
    cap = Captioner.from_pretrained(path, device="cpu", precision="fp32")
    assert cap.has_attention
    images = [Image.new("RGB", (40, 40), c) for c in ("red", "blue")]
    out = cap.caption(images, beam_size=3, num_captions=2, attention=True)
    for caps in out:
        for c in caps:
            assert len(c.words) == len(c.attention) == len(c.text.split())
            for m in c.attention:
                assert len(m) == 8 and all(len(r) == 8 for r in m)
                assert abs(sum(map(sum, m)) - 1) < 1e-4
            assert set(c.to_dict()) == {"caption", "log_prob", "score", "words", "attention"}
    plain = cap.caption(images, beam_size=3)
    assert [c[0].text for c in out] == [c[0].text for c in plain] and plain[0][0].attention is None
    # VQA-less attention model: the features have the config's shapes
    f = cap.encode(cap.preprocess(images))
    assert f.fc.shape == (2, 32) and f.att.shape == (2, 64, 16)


def test_attention_training_step_penalty_and_feature_cache(tmp_path, make_images):
    from training.features import FeatureDataset, cached_features
    from training.datasets import ImageRecord
    from training.train import CaptionLoss, doubly_stochastic

    # the penalty: zero when every cell gets exactly 1 over the caption, the paper's sum otherwise
    alpha = torch.eye(4)[None].expand(2, 4, 4)  # 4 steps, 4 cells, each looked at once
    mask = torch.ones(2, 4, dtype=torch.bool)
    assert doubly_stochastic(alpha, mask) == 0
    mask[:, 3] = False  # the last step is padding: cell 3 never looked at
    assert doubly_stochastic(alpha, mask) == 2.0

    model = att_model("lstm")
    paths = make_images(3, size=(40, 40))
    recs = [ImageRecord(str(p), f"i{k}", ["a dog runs"]) for k, p in enumerate(paths)]
    cache = cached_features(model, recs, tmp_path / "cache", torch.device("cpu"), None, batch_size=2, workers=0)
    (f,) = cache["views"]
    assert f.att.shape == (3, 64, 16) and f.att.dtype == torch.float16  # fp16: att is P times the size of fc
    assert f.fc.shape == (3, 32) and f.fc.dtype == torch.float32
    item = FeatureDataset(cache)[1]["features"]
    assert item.att.dtype == item.fc.dtype == torch.float32
    with torch.no_grad():
        want = model.encode(Captioner(model, Vocabulary(TINY_WORDS), precision="fp32").preprocess([paths[1]]))
    assert torch.allclose(item.att, want.att, atol=2e-2 * want.att.abs().max())
    assert torch.allclose(item.fc, want.fc, atol=1e-5)

    inp = torch.tensor([[BOS_ID, 5, 6, 7], [BOS_ID, 8, 9, 0]])
    tgt = torch.tensor([[5, 6, 7, 2], [8, 9, 2, 0]])
    x = FeatureDataset.collate([FeatureDataset(cache)[k] for k in range(2)])["features"]
    rep = torch.tensor([0, 1])
    with_pen = CaptionLoss(model, 0.0, False, 1.0)(x, rep, inp, tgt)
    without = CaptionLoss(model, 0.0, False, 0.0)(x, rep, inp, tgt)
    logits, a = model.decoder(x, inp, return_attention=True)
    ce = F.cross_entropy(logits.flatten(0, 1), tgt.flatten(), ignore_index=0)
    assert torch.allclose(without, ce, atol=1e-5)
    assert torch.allclose(with_pen, (ce * 7 + doubly_stochastic(a, tgt != 0)) / 7, atol=1e-4)
    with_pen.backward()
    assert model.decoder.attend.W_a.weight.grad.abs().sum() > 0


def test_train_cli_fresh_attention_decoder_and_scst(tmp_path, make_images):
    """--init-from an FC model --fresh-decoder --inject attention trains, saves and reloads; SCST runs on it."""
    from captioner.cli.parsers import train as train_parser
    from training import train

    paths = make_images(6, size=(40, 40))
    caps = ["a dog runs on the grass", "a man in the water", "two people on the grass"]
    ann = {"images": [{"filename": p.name, "split": "train" if k < 4 else "val", "imgid": k,
                       "sentences": [{"raw": caps[k % 3]}, {"raw": caps[(k + 1) % 3]}]} for k, p in enumerate(paths)]}
    (tmp_path / "ann.json").write_text(json.dumps(ann))
    torch.manual_seed(0)
    fc = save_pretrained(CaptionModel(tiny_model_config("lstm")), Vocabulary(TINY_WORDS), tmp_path / "fc")
    common = ["--annotations", str(tmp_path / "ann.json"), "--images", str(paths[0].parent), "--freeze-encoder",
              "--feature-cache", str(tmp_path / "cache"), "--batch-size", "2", "--workers", "0", "--no-java",
              "--eval-batch-size", "4", "--amp", "off"]
    train.main(train_parser().parse_args(common + ["--init-from", str(fc), "--fresh-decoder", "--inject", "attention",
                                                   "--attention-dim", "8", "--epochs", "1",
                                                   "--output", str(tmp_path / "att")]))
    cap = Captioner.from_pretrained(tmp_path / "att" / "best", device="cpu")
    assert cap.cfg.decoder.inject == "attention" and cap.cfg.decoder.attention_dim == 8
    assert cap.caption(paths[0], attention=True)[0].attention is not None
    train.main(train_parser().parse_args(common + ["--init-from", str(tmp_path / "att" / "best"), "--scst",
                                                   "--scst-samples", "2", "--epochs", "1",
                                                   "--output", str(tmp_path / "scst")]))
    assert Captioner.from_pretrained(tmp_path / "scst" / "best", device="cpu").has_attention


def _jpeg(seed: int) -> bytes:
    buf = io.BytesIO()
    g = torch.Generator().manual_seed(seed)
    Image.fromarray(torch.randint(0, 256, (48, 48, 3), generator=g, dtype=torch.uint8).numpy()).save(buf, "JPEG")
    return buf.getvalue()


def test_service_attention_field_round_trip_and_422(tmp_path, tiny_checkpoint):
    from fastapi.testclient import TestClient

    from _service_util import wait_ready
    from service.app import create_app
    from service.settings import Settings

    model = att_model("lstm", seed=4)
    att = save_pretrained(model, Vocabulary(TINY_WORDS), tmp_path / "att")
    cap = Captioner.from_pretrained(att, device="cpu")
    with TestClient(create_app(Settings(checkpoint=str(att), device="cpu", warmup=False), captioner=cap)) as client:
        wait_ready(client)
        r = client.post("/v1/captions", files={"image": ("a.jpg", _jpeg(0), "image/jpeg")},
                        data={"attention": "true", "beam_size": "2", "num_captions": "2"})
        assert r.status_code == 200, r.text
        assert any(c["words"] for c in r.json()["captions"])
        for c in r.json()["captions"]:
            assert len(c["words"]) == len(c["attention"])
            assert all(len(m) == 8 and abs(sum(map(sum, m)) - 1) < 1e-3 for m in c["attention"])
        direct = cap.caption(Image.open(io.BytesIO(_jpeg(0))), beam_size=2, num_captions=2)
        assert [c["caption"] for c in r.json()["captions"]] == [c.text for c in direct]
        r = client.post("/v1/captions", json={"image": __import__("base64").b64encode(_jpeg(1)).decode(),
                                              "attention": True})
        assert r.status_code == 200 and r.json()["captions"][0]["attention"]
        plain = client.post("/v1/captions", files={"image": ("a.jpg", _jpeg(0), "image/jpeg")})
        assert plain.json()["captions"][0]["attention"] is None
        bad = client.post("/v1/captions", files={"image": ("a.jpg", _jpeg(0), "image/jpeg")},
                          data={"attention": "yes"})
        assert bad.status_code == 422 and bad.json()["detail"][0]["loc"] == ["body", "attention"]
    fc = Captioner.from_pretrained(tiny_checkpoint, device="cpu")
    with TestClient(create_app(Settings(checkpoint=str(tiny_checkpoint), device="cpu", warmup=False),
                               captioner=fc)) as client:
        wait_ready(client)
        r = client.post("/v1/captions", files={"image": ("a.jpg", _jpeg(0), "image/jpeg")},
                        data={"attention": "true"})
        assert r.status_code == 422
        d = r.json()["detail"][0]
        assert d["loc"] == ["body", "attention"] and "no attention decoder" in d["msg"]


def test_batch_cli_attention_records_gallery_strip_and_refusal(tmp_path, make_images, tiny_checkpoint, monkeypatch):
    import re

    from captioner.cli import main as cli

    monkeypatch.chdir(tmp_path)
    paths = make_images(3, "imgs", size=(50, 40))
    (tmp_path / "imgs" / "broken.jpg").write_text("not a JPEG")
    att = save_pretrained(att_model("lstm", seed=5), Vocabulary(TINY_WORDS), tmp_path / "att")
    base = ["caption", "imgs", "--workers", "0", "--no-progress", "--checkpoint", str(att)]
    assert cli(base + ["--out", "c.jsonl", "--attention"]) == 1  # broken.jpg failed, the rest captioned
    recs = [json.loads(x) for x in (tmp_path / "c.jsonl").read_text().splitlines()]
    good = [r for r in recs if "error" not in r]
    assert len(good) == 3 and len(recs) == 4
    direct = Captioner.from_pretrained(att, device="cpu").caption([str(p) for p in paths], attention=True)
    for r in good:
        c = r["captions"][0]
        assert r["attention_crop"] == pytest.approx(32 / 36)
        want = direct[[str(p) for p in paths].index(str(tmp_path / r["path"]))][0]
        assert c["words"] == want.words and len(c["attention"]) == len(c["words"])
        assert torch.allclose(torch.tensor(c["attention"]), torch.tensor(want.attention), atol=2e-3)
    # the gallery: one overlay per word of each readable image's best caption
    assert cli(base + ["--out", "g.html", "--attention"]) == 1
    html = (tmp_path / "g.html").read_text()
    strips = re.findall(r'<div class="strip">(.*?)</div>', html)
    assert len(strips) == sum(1 for r in good if r["captions"][0]["words"])
    assert all(s.count("<img") == len(re.findall(r"</span>", s)) for s in strips)
    assert cli(base + ["--out", "plain.html"]) == 1 and 'class="strip"' not in (tmp_path / "plain.html").read_text()
    # a model without attention refuses the flag before any work
    assert cli(["caption", "imgs", "--out", "x.jsonl", "--attention", "--checkpoint", str(tiny_checkpoint)]) == 2
    assert not (tmp_path / "x.jsonl").exists()
