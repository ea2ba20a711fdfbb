"""ImageFeatures (fc / att by name) and the three injection cores against their equations, written out here."""
from __future__ import annotations

import dataclasses

import pytest
import torch
from safetensors.torch import load_file

from captioner.config import DecoderConfig
from captioner.decoder import Decoder
from captioner.features import ImageFeatures
from captioner.inject import Attend, EveryStep, FirstStep
from captioner.model import CaptionModel
from tests.conftest import tiny_model_config

pytestmark = pytest.mark.usefixtures("one_thread")

V, E, H, D, P, C = 11, 5, 6, 7, 9, 4  # vocab, embedding, hidden, fc, grid cells, channels
INJECT = ("every", "first", "attention")


def make_decoder(cell: str, inject: str, num_layers: int = 1, gate: bool = True, seed: int = 0) -> Decoder:
    torch.manual_seed(seed)
    cfg = DecoderConfig(cell=cell, inject=inject, embed_dim=E, hidden_dim=H, num_layers=num_layers, dropout=0.0,
                        attention_dim=3, attention_gate=gate)
    dec = Decoder(cfg, V, C if inject == "attention" else D).eval()
    with torch.no_grad():  # a non-zero h0 (and c0), and an image term strong enough to matter
        dec.h0.normal_(0, 0.5)
        dec.layers[0].W_ih.weight.mul_(3)
    return dec


def features(n: int = 3, seed: int = 1) -> ImageFeatures:
    g = torch.Generator().manual_seed(seed)
    return ImageFeatures(torch.rand(n, D, generator=g), torch.rand(n, P, C, generator=g))


def tokens(n: int = 3, t: int = 5, seed: int = 2) -> torch.Tensor:
    return torch.randint(1, V, (n, t), generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------------ the features type

def test_fields_have_names_and_move_together():
    f = features(4)
    assert set(f.named()) == {"fc", "att"} and set(ImageFeatures(f.fc).named()) == {"fc"}
    assert len(f) == 4 and f.device == f.fc.device
    rows = torch.tensor([2, 0])
    sub = f[rows]
    assert torch.equal(sub.fc, f.fc[rows]) and torch.equal(sub.att, f.att[rows])
    assert torch.equal(f[torch.tensor([True, False, True, False])].att, f.att[[0, 2]])
    parts = f.split([1, 3])
    assert [len(p) for p in parts] == [1, 3]
    joined = ImageFeatures.cat(parts)
    assert torch.equal(joined.fc, f.fc) and torch.equal(joined.att, f.att)
    half = f.to(torch.float16)
    assert half.fc.dtype == half.att.dtype == torch.float16 and half.float().att.dtype == torch.float32
    fc_only = ImageFeatures(f.fc)[1:3]
    assert fc_only.att is None and fc_only.fc.shape == (2, D)
    with pytest.raises(dataclasses.FrozenInstanceError):
        f.fc = f.fc * 2


def test_encode_gives_fc_for_every_model_and_att_for_attention():
    x = torch.randn(2, 3, 32, 32)
    for inject in INJECT:
        torch.manual_seed(0)
        model = CaptionModel(tiny_model_config("gru", inject=inject)).eval()
        with torch.no_grad():
            f = model.encode(x)
            assert torch.allclose(f.fc, model.encoder(x), atol=1e-6)  # v, whatever the decoder
        assert {k: tuple(t.shape[1:]) for k, t in f.named().items()} == model.cfg.feature_shapes
        assert (f.att is not None) == (inject == "attention")
        blank = model.blank_features(3, "cpu")
        assert {k: tuple(t.shape[1:]) for k, t in blank.named().items()} == model.cfg.feature_shapes
        assert all((t == 0).all() for t in blank.named().values())


# ------------------------------------------------------------------------------------------ each core alone

def test_cores_precompute_once_and_add_their_term_per_step():
    f, xp, h = features(), torch.randn(3, H), torch.randn(3, H)
    every, first, att = make_decoder("rnn", "every"), make_decoder("rnn", "first"), make_decoder("rnn", "attention")
    assert isinstance(every.inject, EveryStep) and isinstance(first.inject, FirstStep)
    assert isinstance(att.inject, Attend)
    with torch.no_grad():
        for dec in (every, first):
            (wv,) = dec.precompute(f)
            assert torch.allclose(wv, f.fc @ dec.layers[0].W_ih.weight.T)  # W_ih·v
            for t in range(3):
                out, alpha = dec.inject.step(xp, (wv,), h, t)
                added = dec.cfg.inject == "every" or t == 0
                assert alpha is None and torch.equal(out, xp + wv if added else xp)
        a, wa = att.precompute(f)
        A = att.attend
        assert torch.equal(a, f.att) and torch.allclose(wa, f.att @ A.W_a.weight.T + A.W_a.bias)
        out, alpha = att.inject.step(xp, (a, wa), h, 4)
        z, want_alpha = attention_context(att, f.att, h)
        assert torch.allclose(alpha, want_alpha, atol=1e-6)
        assert torch.allclose(out, xp + z @ att.layers[0].W_ih.weight.T, atol=1e-6)


# ------------------------------------------------------------------------------------------ the whole decoder

def attention_context(dec: Decoder, a: torch.Tensor, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """z_t = beta_t sum_i alpha_ti a_i, alpha_t = softmax_i(w^T tanh(W_a a_i + U_a h_{t-1})), beta_t = sigma(f_beta h)."""
    A = dec.attend
    e = torch.tanh(a @ A.W_a.weight.T + A.W_a.bias + (h @ A.U_a.weight.T)[:, None]) @ A.w.weight[0]  # (N, P)
    alpha = e.softmax(-1)
    z = (alpha[..., None] * a).sum(1)  # (N, C)
    if A.f_beta is not None:
        z = torch.sigmoid(h @ A.f_beta.weight.T + A.f_beta.bias) * z
    return z, alpha


def image_term(dec: Decoder, f: ImageFeatures, h: torch.Tensor, t: int):
    """What each mode adds to layer 0's input pre-activation at step t (h: layer 0's h_{t-1}), and alpha_t."""
    W_ih = dec.layers[0].W_ih.weight
    if dec.cfg.inject == "attention":
        z, alpha = attention_context(dec, f.att, h)
        return z @ W_ih.T, alpha
    if dec.cfg.inject == "every" or t == 0:
        return f.fc @ W_ih.T, None
    return 0.0, None


def cell_step(cell: str, layer, pre: torch.Tensor, h: torch.Tensor, c: torch.Tensor | None):
    """The standard cells (torch.nn.GRUCell / LSTMCell gate order) from the input pre-activation."""
    hp = h @ layer.W_hh.weight.T + (layer.W_hh.bias if layer.W_hh.bias is not None else 0.0)
    if cell == "rnn":
        return torch.tanh(pre + hp), None
    if cell == "gru":
        (xr, xz, xn), (hr, hz, hn) = pre.chunk(3, 1), hp.chunk(3, 1)
        r, z = torch.sigmoid(xr + hr), torch.sigmoid(xz + hz)
        n = torch.tanh(xn + r * hn)
        return (1 - z) * n + z * h, None
    i, f_, g, o = (pre + hp).chunk(4, 1)
    c = torch.sigmoid(f_) * c + torch.sigmoid(i) * torch.tanh(g)
    return torch.sigmoid(o) * torch.tanh(c), c


def reference(dec: Decoder, f: ImageFeatures, toks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Logits (N, T, V) and alpha (N, T, P) of the decoder's equations, step by step with plain tensor ops."""
    cfg, (N, T) = dec.cfg, toks.shape
    h = [dec.h0[0, l].expand(N, H) for l in range(cfg.num_layers)]
    c = [dec.h0[1, l].expand(N, H) if cfg.cell == "lstm" else None for l in range(cfg.num_layers)]
    logits, alphas = [], []
    for t in range(T):
        x = dec.embed.weight[toks[:, t]]
        for l, layer in enumerate(dec.layers):
            pre = x @ layer.W_xh.weight.T + layer.W_xh.bias  # W_xh·x_t + b
            if l == 0:  # only layer 0 receives the image
                term, alpha = image_term(dec, f, h[0], t)
                pre = pre + term
                alphas.append(alpha)
            h[l], c[l] = cell_step(cfg.cell, layer, pre, h[l], c[l])
            x = h[l]
        logits.append(x @ dec.W_hy.weight.T + dec.W_hy.bias)
    return torch.stack(logits, 1), (torch.stack(alphas, 1) if alphas[0] is not None else None)


@pytest.mark.parametrize("num_layers", [1, 2])
@pytest.mark.parametrize("cell", ["rnn", "gru", "lstm"])
@pytest.mark.parametrize("inject", INJECT)
def test_decoder_is_the_written_equations(inject, cell, num_layers):
    """Teacher forcing (forward) and one step at a time (step, as the searches run it) both give the equations."""
    dec, f, toks = make_decoder(cell, inject, num_layers), features(), tokens()
    with torch.no_grad():
        want, want_alpha = reference(dec, f, toks)
        got, alpha = dec(f, toks, return_attention=True)
        state, pre, steps, step_alphas = dec.init_state(3), dec.precompute(f), [], []
        for t in range(toks.size(1)):
            out, state, a = dec.step(toks[:, t], state, pre, t)
            steps.append(out)
            step_alphas.append(a)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(torch.stack(steps, 1), want, atol=1e-5, rtol=1e-5)
    if inject == "attention":
        torch.testing.assert_close(alpha, want_alpha, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(torch.stack(step_alphas, 1), want_alpha, atol=1e-6, rtol=1e-5)
    else:
        assert alpha is None and all(a is None for a in step_alphas)


def test_ungated_attention_is_the_plain_average():
    dec, f, toks = make_decoder("lstm", "attention", gate=False), features(), tokens()
    assert dec.attend.f_beta is None
    with torch.no_grad():
        torch.testing.assert_close(dec(f, toks), reference(dec, f, toks)[0], atol=1e-5, rtol=1e-5)


def test_each_mode_reads_only_its_field():
    """FC modes read fc (att may be absent); attention reads att (fc does not change its captions)."""
    f, toks = features(), tokens()
    other = ImageFeatures(torch.rand(3, D), f.att)
    with torch.no_grad():
        for inject in ("every", "first"):
            dec = make_decoder("gru", inject)
            assert torch.equal(dec(f, toks), dec(ImageFeatures(f.fc), toks))
            assert not torch.allclose(dec(f, toks), dec(other, toks))
        dec = make_decoder("gru", "attention")
        assert torch.equal(dec(f, toks), dec(other, toks))
        with pytest.raises(ValueError, match="needs the image grid"):
            dec(ImageFeatures(f.fc), toks)


# ------------------------------------------------------------------------------------------ checkpoint names

def test_parameter_names_do_not_depend_on_the_core():
    """The cores own no parameters: a checkpoint's names are those written before the cores existed."""
    names = {inject: sorted(make_decoder("lstm", inject).state_dict()) for inject in INJECT}
    fc = ["W_hy.bias", "W_hy.weight", "embed.weight", "h0", "layers.0.W_hh.weight", "layers.0.W_ih.weight",
          "layers.0.W_xh.bias", "layers.0.W_xh.weight"]
    assert names["every"] == names["first"] == fc
    assert names["attention"] == sorted(fc + ["attend.U_a.weight", "attend.W_a.bias", "attend.W_a.weight",
                                              "attend.f_beta.bias", "attend.f_beta.weight", "attend.w.weight"])


# ------------------------------------------------------------------------------------------ the feature cache

def test_cache_files_store_the_fields_by_name(tmp_path, make_images):
    from training.datasets import ImageRecord
    from training.features import FeatureDataset, cache_key, cached_features

    paths = make_images(3, size=(40, 40))
    (paths[0].parent / "broken.jpg").write_text("not a JPEG")
    recs = [ImageRecord(str(p), f"i{k}", ["a dog"]) for k, p in enumerate(paths + [paths[0].parent / "broken.jpg"])]
    torch.manual_seed(0)
    fc_model = CaptionModel(tiny_model_config("lstm"))
    att_model = CaptionModel(tiny_model_config("lstm", inject="attention"))
    att_model.encoder.load_state_dict(fc_model.encoder.state_dict())
    # the same encoder and images: the keys differ by what the files hold
    assert cache_key(fc_model, recs) != cache_key(att_model, recs)
    for model, fields in ((fc_model, {"fc", "ok"}), (att_model, {"fc", "att", "ok"})):
        cache = cached_features(model, recs, tmp_path / "cache", torch.device("cpu"), None, batch_size=2, workers=0)
        stored = load_file(str(tmp_path / "cache" / f"{cache_key(model, recs)}.safetensors"))
        assert set(stored) == fields and stored["ok"].tolist() == [True, True, True, False]
        batch = FeatureDataset.collate([FeatureDataset(cache)[i] for i in range(4)])  # the broken image is dropped
        assert batch["indices"].tolist() == [0, 1, 2] and batch["errors"][0][0] == 3
        assert set(batch["features"].named()) == fields - {"ok"} and len(batch["features"]) == 3
        torch.testing.assert_close(batch["features"].fc, stored["fc"][:3])
